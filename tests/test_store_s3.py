"""The store on object storage, against a real S3 server (SeaweedFS on loopback, started from the pip package):
a build into s3:// equals a local build, a build killed midway and resumed equals an uninterrupted one,
integrity checks work there, and training reads its targets from S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, kill_build_when, many_images, olacache_cli, s3_server
from s3_server import BUCKET

from olacache.store import OK, EmbeddingStore, TargetReader
from olacache.verify import verify_store


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """AWS_* variables of a running SeaweedFS (also set in os.environ for this module's tests)."""
    with s3_server(tmp_path_factory.mktemp("s3")) as aws:
        yield aws


_cli = olacache_cli


def _dump(url: str) -> dict[str, np.ndarray]:
    with EmbeddingStore.open(url) as s:
        out = {"paths": np.array(s.image_paths)}
        for t in s.teachers:
            out[f"{t}/target"] = s.read_rows(t, np.arange(s.n_images))
            out[f"{t}/status"] = s.status(t)
            out[f"{t}/errors"] = np.array(s.errors(t), dtype=object)
        return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


COMMON = [str(EXAMPLES / "sample.json"), str(EXAMPLES / "images"), "--teachers", "depth,gen", "--batch-size", "4",
          "--shard-size", "4", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    res = _cli("build", *COMMON, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return str(out)


def test_build_to_s3_equals_local_and_verifies(s3, local_ref):
    url = f"s3://{BUCKET}/plain.zarr"
    res = _cli("build", *COMMON, "--out", url, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["shards_computed"] > 0
    _assert_same(_dump(local_ref), _dump(url))
    assert verify_store(url).ok
    # --storage-option instead of the variables reaches the same server
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    res = subprocess.run([sys.executable, "-m", "olacache", "info", url, "--json",
                          "--storage-option", f"endpoint_url={s3['AWS_ENDPOINT_URL']}",
                          "--storage-option", f"key={s3['AWS_ACCESS_KEY_ID']}",
                          "--storage-option", f"secret={s3['AWS_SECRET_ACCESS_KEY']}"],
                         env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["teachers"]["gen"]["n_ok"] > 0


@pytest.mark.slow
def test_kill_build_to_s3_and_resume_equals_uninterrupted(s3, tmp_path):
    ann, root = many_images(tmp_path, 48)
    common = [str(ann), str(root), "--teachers", "depth,gen", "--batch-size", "2", "--shard-size", "4",
              "--workers", "0", "--device", "cpu"]
    ref = _cli("build", *common, "--out", str(tmp_path / "ref.zarr"))
    assert ref.returncode == 0, ref.stderr
    url = f"s3://{BUCKET}/killed.zarr"
    kill_build_when([*common, "--out", url], url, lambda s: {"gen", "depth"} <= set(s.teachers) and int(
        (s.complete_shards("depth") & s.complete_shards("gen")).sum()) >= 1, poll=0.2)
    with EmbeddingStore.open(url) as s:
        done = s.complete_shards("depth") & s.complete_shards("gen")
        assert 0 < done.sum() < s.n_shards
    res = _cli("build", *common, "--out", url, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["shards_skipped_complete"] >= int(done.sum())
    _assert_same(_dump(str(tmp_path / "ref.zarr")), _dump(url))


def test_damage_on_s3_is_found_and_never_read(s3, local_ref):
    import s3fs

    url = f"s3://{BUCKET}/damaged.zarr"
    assert _cli("build", *COMMON, "--teachers", "gen", "--out", url).returncode == 0
    fs = s3fs.S3FileSystem()
    key = f"{BUCKET}/damaged.zarr/gen/target/c/1/0/0"
    b = bytearray(fs.cat(key))
    b[3] ^= 1
    fs.pipe(key, bytes(b))
    rep = verify_store(url)
    assert any("gen/target shard 1" in p for p in rep.problems), rep.problems
    r = TargetReader(url, ["gen"])
    _, ok = r.fetch(r.image_paths)
    with EmbeddingStore.open(url) as s:
        st = s.status("gen")
    bad = np.flatnonzero((st == OK) & ~ok["gen"].numpy())
    assert len(bad) and set((bad // 4).tolist()) == {1}
    fs.rm(key)  # a deleted shard object of a complete shard: found by verify, failed rows for the reader
    assert any("missing" in p for p in verify_store(url).problems)
    r2 = TargetReader(url, ["gen"])
    _, ok2 = r2.fetch(r2.image_paths)
    assert not ok2["gen"].numpy()[4:8].any()


def _train_gen(url: str, tmp_path, name: str, *sets: str) -> list[float]:
    """Tiny PT (gen only: the store holds just that teacher) reading targets from ``url``; -> loss per step."""
    import yaml

    from olatrain import train
    from olatrain.config import load_run

    cfg = tmp_path / "tiny-pt.yaml"
    if not cfg.exists():
        raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        raw["stages"] = {k: v for k, v in raw["stages"].items() if k == "pt"}
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    base = [f"data.annotations={EXAMPLES / 'sample.json'}", f"data.image_root={EXAMPLES / 'images'}",
            f"data.store={url}", f"output_dir={tmp_path / name}", "data.max_length=1024", "train.batch_size=2",
            "train.save_every=0", "loss.weights.depth=0", "loss.weights.seg=0"]
    train.run(load_run(cfg, [*base, *sets]), log=lambda _m: None, progress=False)
    rows = [json.loads(x) for x in (tmp_path / name / "pt" / "metrics.jsonl").read_text().splitlines() if x]
    return [r["loss_gen"] for r in rows]


def test_train_reads_targets_from_s3(s3, tmp_path):
    """A few PT steps whose targets come from S3 (the trainer's reader inside DataLoader workers)."""
    url = f"s3://{BUCKET}/train.zarr"
    assert _cli("build", *COMMON, "--teachers", "gen", "--shard-size", "8", "--out", url).returncode == 0
    losses = _train_gen(url, tmp_path, "run", "data.num_workers=1", "train.max_steps=2")
    assert len(losses) == 2 and all(np.isfinite(x) and x > 0 for x in losses)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_remote_reader_equals_zarr_api(s3, dtype):
    """The batched S3 reader returns exactly what zarr-python returns (written, failed and never-written rows,
    one and several images per inner chunk), and is really the one in use."""
    url = f"s3://{BUCKET}/api-{dtype}.zarr"
    paths = [f"p/{i:03d}.jpg" for i in range(21)]
    rng = np.random.default_rng(3)
    with EmbeddingStore.create(url, paths, shard_size=8) as s:
        for name, shape in (("big", (64, 1024)), ("small", (2, 16))):
            s.add_teacher(name, shape, dtype=dtype)
            v = rng.standard_normal((21, *shape), dtype=np.float32)
            st = np.full(8, OK, np.uint8)
            st[3] = 2
            s.write_shard(name, 0, v[:8], st, ["", "", "", "bad", "", "", "", ""])
            r = s.shard_rows(2)
            s.write_shard(name, 2, v[r.start:r.stop], np.full(len(r), OK, np.uint8), [""] * len(r))
    rows = np.array([20, 3, 0, 0, 9, 17, 16, 1, 2, 15, 8, 19, 4])
    with EmbeddingStore.open(url) as fast, EmbeddingStore.open(url, fast_reads=False) as api:
        for name in ("big", "small"):
            np.testing.assert_array_equal(fast.read_rows(name, rows), api.read_rows(name, rows))
            assert type(fast._b._readers[f"{name}/target"]).__name__ == "RemoteShardedReader"


def _cache_store(url: str, n: int = 21, seed: int = 5, teachers: tuple[str, ...] = ("t",)) -> np.ndarray:
    """Teacher ``teachers[k]`` holds ``v + k``."""
    paths = [f"c/{i:03d}.jpg" for i in range(n)]
    v = np.random.default_rng(seed).standard_normal((n, 4, 512), dtype=np.float32).astype(np.float16)
    with EmbeddingStore.create(url, paths, shard_size=8) as s:
        for j, t in enumerate(teachers):
            s.add_teacher(t, (4, 512))
            for k in range(s.n_shards):
                r = s.shard_rows(k)
                s.write_shard(t, k, v[r.start:r.stop] + j, np.full(len(r), OK, np.uint8), [""] * len(r))
    return v


def _no_target_reads(monkeypatch) -> None:
    """Target bytes and shard indexes may no longer come from the server (metadata and status still do)."""
    import s3fs

    from olacache.store.remote_reader import RemoteShardedReader

    def refuse(*a, **k):
        raise AssertionError("read from the network although every chunk is in the local cache")

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_ranges", refuse)
    monkeypatch.setattr(RemoteShardedReader, "_fetch_index", refuse)


def test_chunk_cache_serves_repeated_reads_locally(s3, tmp_path, monkeypatch):
    """data.store_cache: a second reader (another process, another epoch) gets every chunk from local disk with
    no network read, equal bit for bit; a damaged cache entry is noticed by its crc32c and fetched again."""
    url = f"s3://{BUCKET}/cache.zarr"
    v = _cache_store(url)
    paths = [f"c/{i:03d}.jpg" for i in range(21)]
    cache = tmp_path / "cache"
    first = TargetReader(url, cache_dir=cache, cache_bytes=10**9)
    got, ok = first.fetch(paths)
    np.testing.assert_array_equal(got["t"].numpy(), v)
    assert bool(ok["t"].all())
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(entries) == len({(i // 8, (i % 8) // first._store_()._b._readers["t/target"].chunk_rows)
                                for i in range(21)})
    first.close()

    again = TargetReader(url, cache_dir=cache, cache_bytes=10**9)
    with monkeypatch.context() as m:
        _no_target_reads(m)
        got2, ok2 = again.fetch(paths[::-1])
        np.testing.assert_array_equal(got2["t"].numpy(), v[::-1])
        assert bool(ok2["t"].all())
        again.close()

    raw = bytearray(entries[0].read_bytes())
    raw[10] ^= 0x01
    entries[0].write_bytes(bytes(raw))
    third = TargetReader(url, cache_dir=cache, cache_bytes=10**9)
    got3, _ = third.fetch(paths)
    np.testing.assert_array_equal(got3["t"].numpy(), v)
    assert entries[0].read_bytes() != bytes(raw)  # fetched again and stored whole
    third.close()


def test_chunk_cache_never_serves_a_rewritten_shard(s3, tmp_path):
    """A shard recomputed after it was cached (retry/repair/overwrite) has a new digest: readers get the new
    values, never the cached old ones."""
    url = f"s3://{BUCKET}/cache-rewrite.zarr"
    _cache_store(url)
    paths = [f"c/{i:03d}.jpg" for i in range(21)]
    cache = tmp_path / "cache"
    r = TargetReader(url, cache_dir=cache, cache_bytes=10**9)
    r.fetch(paths)
    r.close()
    new = np.full((8, 4, 512), 7, dtype=np.float16)
    with EmbeddingStore.open(url, "r+") as s:
        s.write_shard("t", 1, new, np.full(8, OK, np.uint8), [""] * 8)
    r2 = TargetReader(url, cache_dir=cache, cache_bytes=10**9)
    got, _ = r2.fetch(paths[8:16])
    np.testing.assert_array_equal(got["t"].numpy(), new)
    r2.close()


def test_readahead_on_s3_returns_what_a_plain_read_returns(s3):
    """TargetReader.prefetch reads in the background; fetch of the same paths takes that result (equal to a
    plain read), other paths are read directly, and at most readahead + 1 reads are kept."""
    url = f"s3://{BUCKET}/ahead.zarr"
    v = _cache_store(url, seed=9, teachers=("t", "u"))  # two teachers: their reads go out together
    paths = [f"c/{i:03d}.jpg" for i in range(21)]
    r = TargetReader(url)
    assert r.is_remote and r.readahead == 2  # the default for object storage
    batches = [paths[0:5], paths[5:12], paths[12:21], paths[3:9]]
    for b in batches:
        assert r.prefetch(b)
    assert len(r._ahead) == 3  # the oldest was dropped
    for b in batches:
        got, ok = r.fetch(b)
        rows = [paths.index(p) for p in b]
        np.testing.assert_array_equal(got["t"].numpy(), v[rows])
        np.testing.assert_array_equal(got["u"].numpy(), v[rows] + 1)
        assert bool(ok["t"].all()) and bool(ok["u"].all())
    assert not r._ahead
    r.close()


def test_train_reads_from_s3_with_readahead_and_cache(s3, tmp_path):
    """Training from S3 with 2 DataLoader workers, read-ahead on (the default there) and a chunk cache: the
    cache fills, and the run's losses equal a run without read-ahead or cache (same batches, same targets)."""
    url = f"s3://{BUCKET}/train-ahead.zarr"
    assert _cli("build", *COMMON, "--teachers", "gen", "--shard-size", "4", "--out", url).returncode == 0
    common = ("data.num_workers=2", "train.max_steps=4")
    cache = tmp_path / "chunks"
    fast = _train_gen(url, tmp_path, "ahead", *common, f"data.store_cache={cache}", "data.store_cache_size=1GB")
    plain = _train_gen(url, tmp_path, "plain", *common, "data.store_readahead=0")
    assert len(fast) == 4 and fast == plain
    assert any(p.is_file() for p in cache.rglob("*"))
