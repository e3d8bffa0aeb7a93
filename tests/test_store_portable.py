"""Store format 2 is readable by every Zarr client: zarr-python, zarr-python + zarrs (strict) and tensorstore
open every array and agree bitwise with TargetReader; HDF5 attributes are native; format-1 stores still open
(read-only) and `olacache upgrade` converts them in place, resumably."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from olacache.store import FAILED, FORMAT_VERSION, OK, EmbeddingStore, StoreError, TargetReader
from olacache.store.strings import ERROR_BYTES, decode_concat, decode_fixed, encode_fixed
from olacache.store.upgrade import upgrade_store

N, SHARD = 21, 8
PATHS = sorted([f"coco/train2017/{i:012d}.jpg" for i in range(N - 1)] + ["ünï/çødé image.jpg"])
SHAPES = {"big": (64, 1024), "small": (4, 32), "vec": (1, 48)}


def _make_store(url: Path, fmt: str = "zarr") -> dict[str, np.ndarray]:
    """fp16 + int8 columns; shard 0 complete with failed rows, shard 1 missing, shard 2 complete."""
    rng = np.random.default_rng(0)
    vals = {}
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        for name, shape in SHAPES.items():
            dtype = "int8" if name == "small" else "float16"
            s.add_teacher(name, shape, dtype=dtype, attrs={"note": "x", "nested": {"a": [1, 2]}})
            v = rng.standard_normal((N, *shape), dtype=np.float32)
            vals[name] = v
            st = np.full(SHARD, OK, np.uint8)
            st[[2, 5]] = FAILED
            s.write_shard(name, 0, v[:SHARD], st, ["", "", "decode failed: truncated JPEG ✗", "", "", "x" * 400,
                                                    "", ""])
            r = s.shard_rows(2)
            s.write_shard(name, 2, v[r.start:r.stop], np.full(len(r), OK, np.uint8), [""] * len(r))
    return vals


def _zarr_arrays(url: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(url), mode="r")
    out = {}

    def walk(grp: zarr.Group, prefix: str) -> None:
        for k, v in grp.members():
            if isinstance(v, zarr.Array):
                out[prefix + k] = np.asarray(v[:])
            else:
                walk(v, prefix + k + "/")

    walk(g, "")
    return out


def _tensorstore_arrays(url: Path, names: list[str]) -> dict[str, np.ndarray]:
    import tensorstore as ts

    out = {}
    for n in names:
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(url / n)}}, open=True).result()
        out[n] = np.asarray(t.read().result())
    return out


def test_every_zarr_client_reads_every_array(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    _make_store(url)
    plain = _zarr_arrays(url)
    # index, 3 columns x (target, status, error_utf8, digest) + the int8 column's scale
    assert set(plain) >= {"index/path_utf8", "index/path_offsets", "big/target", "big/error_utf8", "small/scale"}
    assert not [k for k, v in plain.items() if v.dtype.kind in "OUS"], "no variable-length string arrays"
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True}):
        via_zarrs = _zarr_arrays(url)
    via_ts = _tensorstore_arrays(url, sorted(plain))
    for k, v in plain.items():
        assert v.dtype == via_zarrs[k].dtype == via_ts[k].dtype, k
        np.testing.assert_array_equal(v, via_zarrs[k], err_msg=k)
        np.testing.assert_array_equal(v, via_ts[k], err_msg=k)

    # ... and what they read is exactly what TargetReader / EmbeddingStore return
    r = TargetReader(url)
    assert decode_concat(via_ts["index/path_utf8"], via_ts["index/path_offsets"]) == r.image_paths == PATHS
    targets, ok = r.fetch(PATHS)
    for name in SHAPES:
        st = via_ts[f"{name}/status"]
        np.testing.assert_array_equal(ok[name].numpy(), st == OK)
        want = via_ts[f"{name}/target"]
        if name == "small":  # int8 + per-vector scale, dequantised by the reader
            want = (want.astype(np.float32) * via_ts[f"{name}/scale"][..., None]).astype(np.float16)
        got = targets[name].numpy()
        np.testing.assert_array_equal(got[st == OK].view(np.uint16), want[st == OK].view(np.uint16))
        with EmbeddingStore.open(url) as s:
            errs = dict(s.errors(name))
        texts = decode_fixed(via_ts[f"{name}/error_utf8"])
        assert {PATHS[i]: texts[i] for i in np.flatnonzero(st == FAILED)} == errs
        assert errs[PATHS[2]] == "decode failed: truncated JPEG ✗"
        assert len(errs[PATHS[5]].encode()) <= ERROR_BYTES and errs[PATHS[5]].endswith("...")
    r.close()


def test_fixed_width_text_cuts_at_a_character_boundary() -> None:
    enc = encode_fixed(["é" * 200, "", "ok"])
    dec = decode_fixed(enc)
    assert dec[0].endswith("...") and set(dec[0][:-3]) == {"é"} and dec[1] == "" and dec[2] == "ok"


def test_hdf5_attributes_are_native(tmp_path: Path) -> None:
    url = tmp_path / "s.h5"
    _make_store(url, "hdf5")
    with h5py.File(url, "r") as f:
        assert isinstance(f.attrs["n_images"], np.integer) and f.attrs["n_images"] == N
        assert isinstance(f.attrs["format_version"], np.integer)
        assert f["big"].attrs["dtype"] == "float16"
        np.testing.assert_array_equal(f["big"].attrs["target_shape"], [64, 1024])
        assert json.loads(f["big"].attrs["nested"]) == {"a": [1, 2]}  # a dict stays JSON (named as such)
        assert "nested" in json.loads(f["big"].attrs["olacache_json"])
        assert f["big/target"].fletcher32
    with EmbeddingStore.open(url) as s:
        a = s.teacher_attrs("big")
        assert a["target_shape"] == [64, 1024] and a["nested"] == {"a": [1, 2]} and a["note"] == "x"


# ----------------------------------------------------------------------------------------------- format 1
def make_v1_zarr(url: Path, vals: np.ndarray) -> None:
    """A store exactly as format 1 wrote it (zarr "string" arrays, no inner checksums, all-JSON attrs)."""
    g = zarr.create_group(str(url), attributes={})
    idx = g.create_array("index/image_path", shape=(N,), dtype=str, chunks=(N,))
    idx[:] = np.array(PATHS, dtype=object)
    g.create_group("t")
    g.create_array("t/target", shape=(N, 4, 32), dtype="float16", chunks=(SHARD, 4, 32), shards=(SHARD, 4, 32),
                   compressors=None, fill_value=0)
    g.create_array("t/status", shape=(N,), dtype="uint8", chunks=(SHARD,), compressors=None, fill_value=0)
    g.create_array("t/errors", shape=(N,), dtype=str, chunks=(SHARD,), fill_value="")
    g["t/target"][:] = vals.astype(np.float16)
    st = np.full(N, OK, np.uint8)
    st[3] = FAILED
    g["t/status"][:] = st
    errs = np.array([""] * N, dtype=object)
    errs[3] = "bad image"
    g["t/errors"][:] = errs
    g["t"].attrs.put({"teacher": "t", "target_shape": [4, 32], "dtype": "float16", "kind": "spatial",
                      "codec": {"compressor": None, "inner_chunk_rows": SHARD, "shard_rows": SHARD}})
    from olacache.store import image_set_fingerprint

    g.update_attributes({"format_version": 1, "created_by": "olacache 0.1", "fingerprint":
                         image_set_fingerprint(PATHS), "n_images": N, "shard_size": SHARD})


def test_v1_store_opens_read_only_and_upgrades_in_place(tmp_path: Path) -> None:
    url = tmp_path / "v1.zarr"
    vals = np.random.default_rng(1).standard_normal((N, 4, 32), dtype=np.float32)
    make_v1_zarr(url, vals)
    target_files = {f: f.read_bytes() for f in (url / "t" / "target").rglob("*") if f.is_file()}
    with EmbeddingStore.open(url) as s:  # readable as is
        assert s.version == 1 and s.image_paths == PATHS
        before = s.read_rows("t", np.arange(N))
        assert s.errors("t") == [(PATHS[3], "bad image")]
    with pytest.raises(StoreError, match="olacache upgrade"):
        EmbeddingStore.open(url, "r+")

    # a crash after the new arrays exist but before the commit point: a rerun finishes the job
    import olacache.store.upgrade as up

    real = zarr.Group.update_attributes
    calls = {"n": 0}

    def crash(self, attrs):  # noqa: ANN001
        calls["n"] += 1
        raise KeyboardInterrupt("killed")

    zarr.Group.update_attributes = crash  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            up.upgrade_store(url)
    finally:
        zarr.Group.update_attributes = real  # type: ignore[method-assign]
    with EmbeddingStore.open(url) as s:
        assert s.version == 1 and s.image_paths == PATHS  # still a valid format-1 store
    assert "was 1" in upgrade_store(url)
    assert "already" in upgrade_store(url)
    # target bytes untouched
    assert {f: f.read_bytes() for f in (url / "t" / "target").rglob("*") if f.is_file()} == target_files
    with EmbeddingStore.open(url, "r+") as s:
        assert s.version == FORMAT_VERSION and s.image_paths == PATHS
        np.testing.assert_array_equal(s.read_rows("t", np.arange(N)), before)
        assert s.errors("t") == [(PATHS[3], "bad image")]
        assert s.teacher_attrs("t")["generation"]
    arrays = _zarr_arrays(url)
    assert "index/image_path" not in arrays and "t/errors" not in arrays
    _tensorstore_arrays(url, sorted(arrays))  # every array now opens in tensorstore


def test_v1_hdf5_upgrade_makes_attrs_native(tmp_path: Path) -> None:
    url = tmp_path / "v1.h5"
    with h5py.File(url, "w") as f:
        ds = f.create_dataset("index/image_path", data=np.array(PATHS, dtype=object),
                              dtype=h5py.string_dtype("utf-8"))
        assert ds.shape == (N,)
        g = f.create_group("t")
        g.create_dataset("target", shape=(N, 4), dtype="float16", chunks=(SHARD, 4), fillvalue=0)
        g.create_dataset("status", data=np.full(N, OK, np.uint8), chunks=(SHARD,))
        g.create_dataset("errors", shape=(N,), dtype=h5py.string_dtype("utf-8"), chunks=(SHARD,))
        for k, v in {"teacher": "t", "target_shape": [4], "dtype": "float16", "kind": "global"}.items():
            g.attrs[k] = json.dumps(v)
        from olacache.store import image_set_fingerprint

        for k, v in {"format_version": 1, "created_by": "olacache 0.1", "fingerprint": image_set_fingerprint(PATHS),
                     "n_images": N, "shard_size": SHARD}.items():
            f.attrs[k] = json.dumps(v)
    with EmbeddingStore.open(url) as s:
        assert s.version == 1 and s.target_shape("t") == (4,)
    assert "was 1" in upgrade_store(url)
    with h5py.File(url, "r") as f:
        assert f.attrs["n_images"] == N and isinstance(f.attrs["n_images"], np.integer)
    with EmbeddingStore.open(url, "r+") as s:
        assert s.version == FORMAT_VERSION and s.target_shape("t") == (4,) and s.image_paths == PATHS
