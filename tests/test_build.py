"""olacache build: dedup, odd and bad images, resume after SIGKILL, refusals, formats, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, kill_build_when, many_images
from PIL import Image

from olacache.build import BuildConfig, BuildError, build
from olacache.store import FAILED, OK, EmbeddingStore, StoreMismatch
from olacache.verify import store_info, verify_store

FAST = ["depth", "gen"]  # the seg teacher runs at 800x800; tests that don't need it skip it


def _cfg(tmp: Path, **kw) -> BuildConfig:
    base = dict(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"),
                out=str(tmp / "store.zarr"), teachers=list(FAST), batch_size=4, shard_size=8, workers=0,
                progress=False)
    base.update(kw)
    return BuildConfig(**base)


def _quiet(*a, **k):
    pass


def _dump(url: str) -> dict[str, np.ndarray]:
    with EmbeddingStore.open(url) as s:
        out = {"paths": np.array(s.image_paths)}
        for t in s.teachers:
            out[f"{t}/target"] = s.read_rows(t, np.arange(s.n_images))
            out[f"{t}/status"] = s.status(t)
        return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("sample")
    cfg = _cfg(tmp, teachers=["depth", "seg", "gen"], workers=2)
    summary = build(cfg, log=_quiet)
    assert summary.n_images == 21
    return cfg.out


def test_sample_build_all_teachers(sample_store):
    info = store_info(sample_store)
    assert info["n_images"] == 21  # unique images: './chelsea.jpg' and shared images are one row each
    assert set(info["teachers"]) == {"depth", "seg", "gen"}
    for t, ti in info["teachers"].items():
        # every odd-but-valid image (grayscale, RGBA, palette, CMYK, 16-bit, EXIF, 1x1, 400x6, unicode) is ok
        assert ti["n_ok"] == 21 and ti["n_failed"] == 0 and ti["n_missing"] == 0, t
        assert ti["random_init"] is True
        assert ti["dtype"] == "float16"
        assert ti["bytes"] > 0
    assert info["teachers"]["depth"]["shape"][0] == 576
    assert info["teachers"]["seg"]["shape"][0] == 576
    assert info["teachers"]["gen"]["shape"][0] == 1
    with EmbeddingStore.open(sample_store) as s:
        assert "chelsea.jpg" in s.image_paths and "./chelsea.jpg" not in s.image_paths
        assert "nested/deep/chelsea_rgba.png" in s.image_paths
        assert "café ☕.jpg" in s.image_paths
        assert "channel_mean" in s.teacher_attrs("depth")


def test_verify_recompute_parity(sample_store):
    rep = verify_store(sample_store, recompute=3)
    assert rep.ok, rep.problems
    for t in ("depth", "seg", "gen"):
        assert rep.parity[t]["cosine_min"] >= 0.999


def test_bad_images_are_recorded_not_fatal(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for n in ("chelsea.jpg", "coffee.jpg", "camera.png"):
        shutil.copy(EXAMPLES / "images" / n, root / n)
    data = (EXAMPLES / "images" / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "notanimage.jpg").write_text("hello, I am text")
    Image.new("L", (13000, 13000)).save(root / "bomb.png")  # 169 Mpx > PIL's default limit
    names = ["chelsea.jpg", "coffee.jpg", "camera.png", "truncated.jpg", "empty.png", "notanimage.jpg",
             "bomb.png", "missing.jpg"]
    ann = [{"id": str(i), "image": n, "conversations": []} for i, n in enumerate(names)]
    ann.append({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    (tmp_path / "a.json").write_text(json.dumps(ann))
    s = build(_cfg(tmp_path, annotations=str(tmp_path / "a.json"), image_root=str(root), teachers=["gen"]),
              log=_quiet)
    assert s.skipped_text_only == 1
    failed = dict(s.failures)
    assert set(failed) == {"truncated.jpg", "empty.png", "notanimage.jpg", "bomb.png", "missing.jpg"}
    assert "missing" in failed["missing.jpg"].lower() or "not found" in failed["missing.jpg"].lower()
    assert "bomb" in failed["bomb.png"].lower() or "pixels" in failed["bomb.png"].lower()
    with EmbeddingStore.open(s.store) as st:
        status = dict(zip(st.image_paths, st.status("gen"), strict=True))
        assert status["chelsea.jpg"] == OK and status["bomb.png"] == FAILED
        assert {p for p, _ in st.errors("gen")} == set(failed)


def test_malformed_annotations_fail_fast(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "image": "a.jpg"}\n{"id": 2, "image": 5}\n')
    cfg = _cfg(tmp_path, annotations=str(tmp_path / "bad.jsonl"))
    with pytest.raises(Exception, match="line 2"):
        build(cfg, log=_quiet)
    assert not Path(cfg.out).exists()  # nothing written, no teacher ran


def test_refuses_different_image_set_and_teacher_changes(tmp_path):
    cfg = _cfg(tmp_path, teachers=["gen"])
    build(cfg, log=_quiet)
    sub = json.loads((EXAMPLES / "sample.json").read_text())[:5]
    (tmp_path / "sub.json").write_text(json.dumps(sub))
    with pytest.raises((StoreMismatch, BuildError), match="image set"):
        build(_cfg(tmp_path, annotations=str(tmp_path / "sub.json"), teachers=["gen"]), log=_quiet)

    build(_cfg(tmp_path, teachers=["gen", "depth"]), log=_quiet)  # adding a column is fine
    before = _dump(cfg.out)
    quirk = _cfg(tmp_path, teachers=["gen", "depth"], teacher_overrides={"depth": {"options": {"bgr_quirk": True}}})
    with pytest.raises((StoreMismatch, BuildError), match="bgr"):
        build(quirk, log=_quiet)
    _assert_same(before, _dump(cfg.out))  # the refusal wrote nothing

    quirk.overwrite_teacher = ["depth"]
    build(quirk, log=_quiet)
    after = _dump(cfg.out)
    np.testing.assert_array_equal(before["gen/target"], after["gen/target"])  # other column untouched
    assert not np.array_equal(before["depth/target"], after["depth/target"])
    with EmbeddingStore.open(cfg.out) as s:
        assert s.teacher_attrs("depth")["spec"]["bgr_quirk"] is True


def test_hdf5_equals_zarr_and_int8(tmp_path):
    z = build(_cfg(tmp_path, teachers=["gen"]), log=_quiet)
    h = build(_cfg(tmp_path, teachers=["gen"], format="hdf5", out=str(tmp_path / "s.h5")), log=_quiet)
    a, b = _dump(z.store), _dump(h.store)
    _assert_same(a, b)
    q = build(_cfg(tmp_path, teachers=["depth"], dtype="int8", out=str(tmp_path / "q.zarr")), log=_quiet)
    tq = q.teachers[0]
    assert tq.int8_cosine_mean is not None and tq.int8_cosine_min > 0.99
    info = store_info(q.store)["teachers"]["depth"]
    assert info["dtype"] == "int8" and info["int8_cosine_min"] > 0.99


def _cli(*args: str, threads: int | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:  # same BLAS thread count on both sides of a bitwise comparison
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "olacache", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    ann, root = many_images(tmp_path, 48, sub="sub")
    common = [str(ann), str(root), "--teachers", "depth,gen", "--batch-size", "2", "--shard-size", "4",
              "--workers", "0"]
    ref = _cli("build", *common, "--out", str(tmp_path / "ref.zarr"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed.zarr"
    kill_build_when([*common, "--out", str(out)], str(out),
                    lambda s: {"gen", "depth"} <= set(s.teachers) and int(s.complete_shards("depth").sum()) >= 3,
                    poll=0.05, timeout=120)
    with EmbeddingStore.open(str(out)) as s:
        done_before = s.complete_shards("depth") & s.complete_shards("gen")
        assert 0 < done_before.sum() < s.n_shards
    shard_files = {f: f.stat().st_mtime_ns for f in (out / "depth" / "target").rglob("*") if f.is_file()}
    res = _cli("build", *common, "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["shards_skipped_complete"] >= int(done_before.sum())
    _assert_same(_dump(str(tmp_path / "ref.zarr")), _dump(str(out)))
    # finished shards were not rewritten: their files kept their mtimes
    with EmbeddingStore.open(str(out)) as s:
        n_shards = s.n_shards
    kept = [f for f, m in shard_files.items() if f.stat().st_mtime_ns == m]
    assert len(kept) >= int(done_before.sum()) and n_shards > 0


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path):
    ann, root = many_images(tmp_path, 20, sub="sub")
    common = [str(ann), str(root), "--teachers", "depth,gen", "--batch-size", "2", "--shard-size", "4",
              "--workers", "0", "--device", "cpu"]
    single = _cli("build", *common, "--out", str(tmp_path / "one.zarr"), threads=1)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "olacache", "build", *common, "--out",
                          str(tmp_path / "two.zarr")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same(_dump(str(tmp_path / "one.zarr")), _dump(str(tmp_path / "two.zarr")))


def test_cli_info_json_and_help(sample_store):
    r = _cli("info", sample_store, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for t in ("depth", "seg", "gen"):
        for key in ("shape", "dtype", "n_ok", "n_failed", "n_missing", "bytes"):
            assert key in info["teachers"][t]
    assert _cli("build", "--help").returncode == 0
    bad = _cli("info", str(ROOT / "examples"))
    assert bad.returncode != 0 and "examples" in bad.stderr


def test_image_directory_as_annotations(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    shutil.copy(EXAMPLES / "images" / "chelsea.jpg", root / "a" / "cat.jpg")
    shutil.copy(EXAMPLES / "images" / "camera.png", root / "cam.png")
    s = build(_cfg(tmp_path, annotations=str(root), image_root=str(root), teachers=["gen"]), log=_quiet)
    assert s.n_images == 2 and s.teachers[0].n_ok == 2
    with EmbeddingStore.open(s.store) as st:
        assert st.image_paths == ["a/cat.jpg", "cam.png"]
