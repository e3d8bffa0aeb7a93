"""`olacache build ... --extend`: new images are computed and added, images already in the store are neither
recomputed nor rewritten, a killed extension resumes to the same store, and the result equals (by path) a fresh
build of the union."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, kill_build_when, olacache_cli

from olacache.store import EmbeddingStore, TargetReader
from olacache.store.format import PAD
from olacache.verify import verify_store

TEACHERS = "depth,gen"


_cli = olacache_cli


def _split(tmp: Path) -> tuple[Path, Path, Path]:
    """sample.json as A (first 9 image samples), B (the rest) and A+B."""
    samples = json.loads((EXAMPLES / "sample.json").read_text())
    with_img = [s for s in samples if s.get("image")]
    a, b = with_img[:9], with_img[9:]
    out = []
    for name, part in (("a", a), ("b", b), ("ab", a + b)):
        p = tmp / f"{name}.json"
        p.write_text(json.dumps(part))
        out.append(p)
    return out[0], out[1], out[2]


def _build(ann: Path, out: Path, *extra: str, teachers: str = "gen") -> dict:
    # gen only (the cheapest teacher): "every teacher of the store" is covered by the killed-extension test
    res = _cli("build", str(ann), str(EXAMPLES / "images"), "--out", str(out), "--teachers", teachers,
               "--batch-size", "1", "--shard-size", "4", "--workers", "0", "--device", "cpu", "--json", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _by_path(url: Path) -> dict:
    r = TargetReader(url)
    paths = sorted(p for p in r.image_paths if p)
    targets, ok = r.fetch(paths)
    out = {"paths": paths}
    for t in r.teachers:
        out[t] = targets[t].numpy()
        out[f"{t}/ok"] = ok[t].numpy()
    with EmbeddingStore.open(url) as s:
        for t in s.teachers:
            out[f"{t}/errors"] = sorted(s.errors(t))
    r.close()
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def test_extend_equals_fresh_build_and_reuses_everything_old(tmp_path: Path) -> None:
    a, b, ab = _split(tmp_path)
    ext = tmp_path / "ext.zarr"
    first = _build(a, ext)
    n_a = first["images_computed"]
    files = {f: f.stat().st_mtime_ns for f in ext.rglob("*") if f.is_file() and "/target/c/" in str(f)}
    summary = _build(b, ext, "--extend")
    assert summary["images_reused"] == n_a
    from olacache.inputs.annotations import load_annotations, unique_images

    in_a, in_b = (set(unique_images(load_annotations(str(x)))) for x in (a, b))
    assert summary["images_computed"] == len(in_b - in_a) > 0 and in_a & in_b  # overlap is reused, not redone
    # no target file of the old images was rewritten
    assert all(f.stat().st_mtime_ns == m for f, m in files.items())
    with EmbeddingStore.open(ext) as s:
        st = s.status("gen")
        assert (st == PAD).sum() == (-n_a) % 4  # padding up to the old tail shard's boundary
    assert verify_store(str(ext)).ok
    fresh = tmp_path / "fresh.zarr"
    _build(ab, fresh)
    _same(_by_path(ext), _by_path(fresh))
    # rerunning the same extension is a no-op; a plain (non --extend) rebuild of A+B accepts the extended store
    assert _build(b, ext, "--extend")["images_computed"] == 0
    assert _build(ab, ext)["images_computed"] == 0
    # a teacher added to the extended store later: its padding rows are PAD too, never "failed" images
    _build(ab, ext, teachers="gen,depth")
    with EmbeddingStore.open(ext) as s:
        np.testing.assert_array_equal(s.status("depth") == PAD, s.status("gen") == PAD)
        assert s.errors("depth") == s.errors("gen")
    assert verify_store(str(ext)).ok


def test_extend_hdf5_equals_fresh_build(tmp_path: Path) -> None:
    """HDF5 stores extend too (their datasets grow along rows); the old rows' values are untouched."""
    a, b, ab = _split(tmp_path)
    ext = tmp_path / "ext.h5"
    n_a = _build(a, ext)["images_computed"]
    before = _by_path(ext)
    summary = _build(b, ext, "--extend")
    assert summary["images_reused"] == n_a and summary["images_computed"] > 0
    after = _by_path(ext)
    keep = [after["paths"].index(p) for p in before["paths"]]
    np.testing.assert_array_equal(after["gen"][keep], before["gen"])
    assert verify_store(str(ext)).ok
    fresh = tmp_path / "fresh.h5"
    _build(ab, fresh)
    _same(after, _by_path(fresh))
    assert _build(b, ext, "--extend")["images_computed"] == 0


def test_extend_refuses_fixed_size_hdf5_and_missing_teacher(tmp_path: Path) -> None:
    import h5py

    from olacache.build import BuildConfig, BuildError, extend_existing
    from olacache.store import StoreError
    from olacache.store.extend import extend_store

    paths = [f"a/{i}.jpg" for i in range(6)]
    old = tmp_path / "s.h5"
    EmbeddingStore.create(old, paths, shard_size=4, format="hdf5").close()
    with h5py.File(old, "r+") as f:  # as stores made before HDF5 extension existed: fixed-size datasets
        del f["index/image_path"]
        f.create_dataset("index/image_path", data=np.array(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
    with EmbeddingStore.open(old, "r+") as s:
        with pytest.raises(StoreError, match="fixed-size datasets"):
            extend_store(s, [*paths, "b/new.jpg"])
    with EmbeddingStore.create(tmp_path / "s.zarr", paths, shard_size=4) as s:
        s.add_teacher("depth", (4, 8))
        s.add_teacher("gen", (1, 8))
        cfg = BuildConfig(annotations="-", image_root=str(tmp_path), out=str(tmp_path / "s.zarr"), teachers=["gen"])
        with pytest.raises(BuildError, match=r"add \['depth'\] to --teachers"):
            extend_existing(s, cfg, [*paths, "b/new.jpg"])
        assert s.n_images == 6  # refused before anything changed


@pytest.mark.slow
def test_killed_extension_resumes_to_the_same_store(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "imgs"
    root.mkdir()
    srcs = sorted((EXAMPLES / "images").glob("*.jpg"))
    rows = []
    for i in range(40):
        shutil.copy(srcs[i % len(srcs)], root / f"im_{i:03d}.jpg")
        rows.append({"id": str(i), "image": f"im_{i:03d}.jpg", "conversations": []})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(rows[:6]))
    b.write_text(json.dumps(rows[6:]))
    common = [str(root), "--teachers", TEACHERS, "--batch-size", "1", "--shard-size", "4", "--workers", "0",
              "--device", "cpu"]
    ref, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    for out in (ref, killed):
        assert _cli("build", str(a), *common, "--out", str(out)).returncode == 0
    assert _cli("build", str(b), *common, "--out", str(ref), "--extend").returncode == 0
    kill_build_when([str(b), *common, "--out", str(killed), "--extend"], str(killed),
                    lambda s: s.n_images > 8 and int(s.complete_shards("gen").sum()) >= 4)
    summary = json.loads(_cli("build", str(b), *common, "--out", str(killed), "--extend", "--json").stdout)
    assert summary["shards_skipped_complete"] >= 4
    with EmbeddingStore.open(ref) as r, EmbeddingStore.open(killed) as k:
        assert r.image_paths == k.image_paths
        for t in r.teachers:
            np.testing.assert_array_equal(r.status(t), k.status(t))
            np.testing.assert_array_equal(r.read_rows(t, np.arange(r.n_images)), k.read_rows(t, np.arange(k.n_images)))
