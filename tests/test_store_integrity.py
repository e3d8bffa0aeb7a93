"""Integrity (store format 2): a flipped byte, a truncated status chunk, a deleted or swapped shard file are
reported by `verify` (naming the chunk, never crashing), never reach the trainer as data, and `verify --repair`
plus the next build recompute exactly the damaged shards. A column replaced under a reader is detected."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import EXAMPLES, olacache_cli

from olacache.store import FAILED, MISSING, OK, EmbeddingStore, StoreError, TargetReader
from olacache.store.format import CorruptChunk
from olacache.verify import store_info, verify_store

N, SHARD = 24, 8
PATHS = [f"img/{i:04d}.jpg" for i in range(N)]
SHAPES = {"big": (64, 1024), "small": (2, 32)}  # one image per inner chunk / several per inner chunk


def _make(url: Path, fmt: str = "zarr", dtype: str = "float16") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vals = {}
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        for name, shape in SHAPES.items():
            s.add_teacher(name, shape, dtype=dtype)
            vals[name] = v = rng.standard_normal((N, *shape), dtype=np.float32)
            for sh in range(s.n_shards):
                r = s.shard_rows(sh)
                s.write_shard(name, sh, v[r.start:r.stop], np.full(len(r), OK, np.uint8), [""] * len(r))
    return vals


def _shard_file(url: Path, col: str, shard: int) -> Path:
    return url / col / "target" / "c" / str(shard) / "0" / "0"


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01  # a low bit: the kind of flip a range check would never see
    path.write_bytes(bytes(b))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return olacache_cli(*args, timeout=300)


@pytest.mark.parametrize("col", ["big", "small"])
def test_flipped_byte_is_reported_and_never_read(tmp_path: Path, col: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    url = tmp_path / "s.zarr"
    vals = _make(url)
    row_nbytes = int(np.prod(SHAPES[col])) * 2
    chunk_rows = 1 if col == "big" else SHARD
    # second image of shard 1: inner chunk 1 for "big" (1 image per chunk), chunk 0 for "small"
    _flip(_shard_file(url, col, 1), (row_nbytes + 4) * 1 + 7 if chunk_rows == 1 else row_nbytes + 7)
    bad_rows = [9] if chunk_rows == 1 else list(range(8, 16))

    rep = verify_store(str(url))
    assert not rep.ok
    assert any(f"{col}/target shard 1" in p and "crc32c" in p for p in rep.problems), rep.problems
    with EmbeddingStore.open(url) as s:
        with pytest.raises(CorruptChunk, match=rf"teacher '{col}'.*shard 1 rows") as e:
            s.read_rows(col, [0, 9, 20])
        assert e.value.rows == ([9] if chunk_rows == 1 else [9])
        for fast in (True, False):  # the pread fast path and the zarr library path agree
            with EmbeddingStore.open(url, fast_reads=fast) as s2:
                out = np.empty((N, *SHAPES[col]), np.float16)
                bad = s2._read_into(col, np.arange(N), out, np.arange(N))
                assert bad.tolist() == bad_rows
                assert not out[bad_rows].any()
                good = np.setdiff1d(np.arange(N), bad_rows)
                np.testing.assert_array_equal(out[good], vals[col][good].astype(np.float16))

    r = TargetReader(url)
    with caplog.at_level(logging.WARNING, logger="olacache.store"):
        targets, ok = r.fetch(PATHS)
    assert (~ok[col].numpy()).nonzero()[0].tolist() == bad_rows
    assert not targets[col].numpy()[bad_rows].any()
    assert ok["big" if col == "small" else "small"].numpy().all()
    assert "fail their checksum" in caplog.text and "shard 1" in caplog.text
    r.close()

    res = _cli("verify", str(url))
    assert res.returncode == 1 and "crc32c" in res.stdout, res.stdout + res.stderr


def test_truncated_status_deleted_and_swapped_shards(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    _make(url)
    (url / "big" / "status" / "c" / "1").write_bytes(b"\x01")  # status chunk of shard 1 -> 1 byte
    _shard_file(url, "small", 2).unlink()  # a complete shard's file deleted
    a, b = _shard_file(url, "big", 0), _shard_file(url, "big", 2)  # two complete shard files swapped
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)

    rep = verify_store(str(url))  # never crashes on damaged metadata
    text = "\n".join(rep.problems)
    assert "status chunk of shard(s) [1] is damaged" in text
    assert "small/target shard 2" in text and "missing" in text
    assert "big' shard 0" in text and "digest" in text and "big' shard 2" in text
    info = store_info(str(url))  # neither does info
    assert info["teachers"]["big"]["n_missing"] == SHARD

    r = TargetReader(url)
    _, ok = r.fetch(PATHS)
    assert not ok["big"].numpy()[8:16].any()  # unreadable status: missing, not OK
    assert not ok["small"].numpy()[16:24].any() and ok["small"].numpy()[:16].all()  # deleted shard: failed
    r.close()


def test_hdf5_fletcher32_flip(tmp_path: Path) -> None:
    url = tmp_path / "s.h5"
    vals = _make(url, "hdf5")
    with h5py.File(url, "r") as f:
        info = f["big/target"].id.get_chunk_info_by_coord((9, 0, 0))
        off = info.byte_offset
    with open(url, "r+b") as fh:
        fh.seek(off + 100)
        c = fh.read(1)
        fh.seek(off + 100)
        fh.write(bytes([c[0] ^ 1]))
    rep = verify_store(str(url))
    assert any("big/target shard 1" in p and "fletcher32" in p for p in rep.problems), rep.problems
    r = TargetReader(url)
    targets, ok = r.fetch(PATHS)
    assert (~ok["big"].numpy()).nonzero()[0].tolist() == [9]
    np.testing.assert_array_equal(targets["big"].numpy()[10], vals["big"][10].astype(np.float16))
    r.close()


def test_replaced_column_under_reader_fails_in_one_line(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    _make(url)
    r = TargetReader(url)
    r.fetch(PATHS[:4])
    with EmbeddingStore.open(url, "r+") as s:
        s.add_teacher("big", SHAPES["big"], replace=True)
    with pytest.raises(StoreError, match="was replaced while this run read it"):
        r.check_generation(force=True)
    r.close()


@pytest.mark.slow
def test_repair_then_build_recomputes_exactly_the_damaged_shard(tmp_path: Path) -> None:
    common = [str(EXAMPLES / "sample.json"), str(EXAMPLES / "images"), "--teachers", "gen", "--batch-size", "4",
              "--shard-size", "8", "--workers", "0"]
    out = tmp_path / "s.zarr"
    assert _cli("build", *common, "--out", str(out)).returncode == 0
    with EmbeddingStore.open(out) as s:
        want = s.read_rows("gen", np.arange(s.n_images))
        st = s.status("gen")
    files = sorted(f for f in (out / "gen" / "target").rglob("*") if f.is_file())
    _flip(files[1], 5)
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    res = _cli("verify", str(out), "--repair")
    assert res.returncode == 1 and "crc32c" in res.stdout, res.stdout
    with EmbeddingStore.open(out) as s:
        assert (s.status("gen")[8:16] == MISSING).all() and (s.status("gen")[:8] != MISSING).all()
    # a status chunk truncated to 1 byte (shard 2): the build does not crash, it recomputes that shard too
    (out / "gen" / "status" / "c" / "2").write_bytes(b"\x01")
    mtimes[files[2]] = files[2].stat().st_mtime_ns
    res = _cli("build", *common, "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert '"shards_computed": 2' in res.stdout
    assert _cli("verify", str(out)).returncode == 0
    with EmbeddingStore.open(out) as s:
        np.testing.assert_array_equal(s.read_rows("gen", np.arange(s.n_images)), want)
        np.testing.assert_array_equal(s.status("gen"), st)
    changed = [f for f in files if f.stat().st_mtime_ns != mtimes[f]]
    assert changed == [files[1], files[2]]  # exactly the damaged shards were rewritten
    assert FAILED in st or OK in st
