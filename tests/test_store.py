"""Tests of the embedding store (olacache/store/): both formats, the write protocol, the fast read
paths against zarr/h5py, and the trainer-side reader across pickling, spawn and fork."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import unicodedata
import uuid
from pathlib import Path

import numpy as np
import pytest

from olacache.store import (
    FAILED,
    FORMAT_VERSION,
    MISSING,
    OK,
    EmbeddingStore,
    StoreError,
    StoreMismatch,
    TargetReader,
    image_set_fingerprint,
    inner_chunk_rows,
    normalize_image_path,
)

FORMATS = ["zarr", "hdf5"]
N, SHARD = 21, 8  # 3 shards, the last one partial (5 rows)
PATHS = [f"coco/train2017/{i:012d}.jpg" for i in range(N)]
# Shapes chosen to hit each inner-chunk regime with SHARD=8: one image per chunk (128 KiB rows), 4 images per
# chunk (32 KiB rows), and the whole shard in one chunk (tiny rows, like `gen`).
BIG, MID, SMALL = (64, 1024), (16, 1024), (1, 32)


def _url(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("store.zarr" if fmt == "zarr" else "store.h5")


def _values(shape: tuple[int, ...], seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


def _fill(store: EmbeddingStore, name: str, values: np.ndarray, shards: list[int] | None = None) -> None:
    for shard in range(store.n_shards) if shards is None else shards:
        r = store.shard_rows(shard)
        store.write_shard(name, shard, values[r.start : r.stop], np.full(len(r), OK, np.uint8), [""] * len(r))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


# ----------------------------------------------------------------------------------------------- join key


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("./a.jpg", "a.jpg"),
        ("a//b.jpg", "a/b.jpg"),
        ("a\\b.jpg", "a/b.jpg"),
        ("  a/b.jpg \n", "a/b.jpg"),
        ("a/./b.jpg", "a/b.jpg"),
        ("././a/.//./b.jpg", "a/b.jpg"),
        ("a/x/../b.jpg", "a/b.jpg"),
        ("coco\\train2017\\1.jpg", "coco/train2017/1.jpg"),
    ],
)
def test_normalize_image_path(raw: str, want: str) -> None:
    assert normalize_image_path(raw) == want
    assert normalize_image_path(want) == want  # idempotent


def test_normalize_unicode_nfc() -> None:
    nfd = unicodedata.normalize("NFD", "caf\u00e9/na\u00efve.jpg")
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    assert normalize_image_path(nfd) == normalize_image_path(nfc) == nfc


@pytest.mark.parametrize(
    "bad",
    [
        "/abs/a.jpg",
        "\\\\server\\a.jpg",
        "C:/a.jpg",
        "../a.jpg",
        "a/../../b.jpg",
        "",
        "  ",
        ".",
        "./",
        "s3://b/a.jpg",
    ],
)
def test_normalize_rejects(bad: str) -> None:
    with pytest.raises(ValueError) as e:
        normalize_image_path(bad)
    assert repr(bad) in str(e.value)


def test_fingerprint() -> None:
    fp = image_set_fingerprint(["a.jpg", "b/c.jpg"])
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == image_set_fingerprint(["./a.jpg", "b\\c.jpg"])  # normalised first
    assert fp != image_set_fingerprint(["b/c.jpg", "a.jpg"])  # order matters: it fixes the rows
    assert fp != image_set_fingerprint(["a.jpg"])
    # unambiguous concatenation
    assert image_set_fingerprint(["ab", "c"]) != image_set_fingerprint(["a", "bc"])


def test_inner_chunk_rows() -> None:
    assert inner_chunk_rows(576 * 1024 * 2, 256) == 1
    assert inner_chunk_rows(1024 * 2, 256) == 64
    assert inner_chunk_rows(2, 256) == 256
    assert inner_chunk_rows(4000, 100) == 25  # a divisor of the shard size
    assert SHARD % inner_chunk_rows(int(np.prod(MID)) * 2, SHARD) == 0


# ----------------------------------------------------------------------------------------------- create / open


def test_create_open_roundtrip(tmp_path: Path, fmt: str) -> None:
    url = _url(tmp_path, fmt)
    assert not EmbeddingStore.exists(url)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt, created_by="test 1.0") as s:
        assert (s.format, s.n_images, s.shard_size, s.n_shards) == (fmt, N, SHARD, 3)
        assert s.shard_rows(2) == range(16, 21)
        assert s.teachers == []
    assert EmbeddingStore.exists(url)
    assert EmbeddingStore.exists(str(url))
    with EmbeddingStore.open(url) as s:
        assert s.format == fmt
        assert s.image_paths == PATHS
        assert s.fingerprint == image_set_fingerprint(PATHS)
        assert s.attrs["format_version"] == FORMAT_VERSION
        assert s.attrs["created_by"] == "test 1.0"
        assert s.attrs["n_images"] == N and s.attrs["shard_size"] == SHARD
        with pytest.raises(StoreError, match="read-only"):
            s.add_teacher("depth", BIG)
        with pytest.raises(StoreError, match="out of range"):
            s.shard_rows(3)
    with pytest.raises(StoreError, match="already exists"):
        EmbeddingStore.create(url, PATHS, format=fmt)


def test_create_default_created_by(tmp_path: Path) -> None:
    from olacache import __version__

    with EmbeddingStore.create(tmp_path / "s.zarr", PATHS) as s:
        assert s.attrs["created_by"] == f"olacache {__version__}"


def test_create_rejects_bad_paths(tmp_path: Path, fmt: str) -> None:
    url = _url(tmp_path, fmt)
    with pytest.raises(StoreError, match="not normalised"):
        EmbeddingStore.create(url, ["./a.jpg"], format=fmt)
    with pytest.raises(StoreError, match="duplicate image path 'a.jpg'"):
        EmbeddingStore.create(url, ["a.jpg", "b.jpg", "a.jpg"], format=fmt)
    with pytest.raises(StoreError, match="escapes"):
        EmbeddingStore.create(url, ["../a.jpg"], format=fmt)
    with pytest.raises(StoreError, match="no images"):
        EmbeddingStore.create(url, [], format=fmt)
    assert not url.exists()


def test_create_makes_parent_dirs(tmp_path: Path, fmt: str) -> None:
    url = tmp_path / "a" / "b" / ("s.zarr" if fmt == "zarr" else "s.h5")
    EmbeddingStore.create(url, PATHS, format=fmt).close()
    assert EmbeddingStore.exists(url)


def test_create_into_empty_dir_ok_but_not_nonempty(tmp_path: Path) -> None:
    d = tmp_path / "made_by_job_script"
    d.mkdir()
    EmbeddingStore.create(d, PATHS).close()
    other = tmp_path / "busy"
    other.mkdir()
    (other / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="busy"):
        EmbeddingStore.create(other, PATHS)


def test_open_not_a_store(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("not a store")
    with pytest.raises(StoreError, match="notes.txt"):
        EmbeddingStore.open(txt)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(StoreError, match="empty_dir"):
        EmbeddingStore.open(empty)
    missing = tmp_path / "nope.zarr"
    with pytest.raises(StoreError, match="nope.zarr"):
        EmbeddingStore.open(missing)
    # a valid zarr group / HDF5 file that is not an olacache store
    import h5py
    import zarr

    zarr.create_group(str(tmp_path / "plain.zarr"))
    with pytest.raises(StoreError, match=r"plain\.zarr.*not an olacache embedding store"):
        EmbeddingStore.open(tmp_path / "plain.zarr")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match=r"plain\.h5.*not an olacache embedding store"):
        EmbeddingStore.open(tmp_path / "plain.h5")
    for p in (txt, empty, missing, tmp_path / "plain.zarr", tmp_path / "plain.h5"):
        assert not EmbeddingStore.exists(p)
    with pytest.raises(StoreError, match="mode"):
        EmbeddingStore.open(tmp_path / "plain.zarr", mode="w")


def test_require_image_set(tmp_path: Path, fmt: str) -> None:
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.require_image_set(PATHS)
        s.require_image_set(["./" + p for p in PATHS])  # normalised before comparing
        with pytest.raises(StoreMismatch, match="21 images in the store vs 20"):
            s.require_image_set(PATHS[:-1])
        swapped = [PATHS[1], PATHS[0], *PATHS[2:]]
        with pytest.raises(StoreMismatch, match="row 0"):
            s.require_image_set(swapped)


# ----------------------------------------------------------------------------------------------- columns


def test_add_teacher_twice_and_attrs(tmp_path: Path, fmt: str) -> None:
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("depth", BIG, attrs={"weights": {"repo": "x/y", "revision": "abc"}, "layers": [4, 11]})
        assert s.teachers == ["depth"]
        assert s.target_shape("depth") == BIG
        a = s.teacher_attrs("depth")
        assert a["weights"] == {"repo": "x/y", "revision": "abc"} and a["layers"] == [4, 11]
        assert a["dtype"] == "float16" and tuple(a["target_shape"]) == BIG and a["teacher"] == "depth"
        assert a["codec"]["inner_chunk_rows"] == 1 and a["codec"]["compressor"] is None
        with pytest.raises(StoreError, match="already exists"):
            s.add_teacher("depth", BIG)
        with pytest.raises(StoreMismatch, match="target_shape"):
            s.add_teacher("depth", MID)
        s.set_teacher_attrs("depth", mean=[0.0, 1.0], layers=[23])
        a = s.teacher_attrs("depth")
        assert a["mean"] == [0.0, 1.0] and a["layers"] == [23] and a["weights"]["repo"] == "x/y"
        with pytest.raises(StoreError, match="set by the store"):
            s.set_teacher_attrs("depth", dtype="int8")
        with pytest.raises(StoreError, match="JSON"):
            s.set_teacher_attrs("depth", bad=object())
        with pytest.raises(StoreError, match="available"):
            s.teacher_attrs("seg")
        for bad in ("index", "a/b", "", "_x"):
            with pytest.raises(StoreError, match="bad teacher name"):
                s.add_teacher(bad, BIG)
        with pytest.raises(StoreError, match="dtype"):
            s.add_teacher("seg", BIG, dtype="bfloat16")
        s.require_teacher_attrs("depth", {"layers": [23]})
        with pytest.raises(StoreMismatch, match="weights"):
            s.require_teacher_attrs("depth", {"weights": "random_init", "layers": [23]})
    with EmbeddingStore.open(_url(tmp_path, fmt)) as s:  # attrs survive reopening
        assert s.teacher_attrs("depth")["mean"] == [0.0, 1.0]


def test_replace_touches_only_that_column(tmp_path: Path, fmt: str) -> None:
    dv, gv = _values(BIG, 1), _values(SMALL, 2)
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("depth", BIG, attrs={"v": 1})
        s.add_teacher("gen", SMALL, attrs={"v": 1})
        _fill(s, "depth", dv)
        _fill(s, "gen", gv)
        s.add_teacher("gen", (1, 16), attrs={"v": 2}, replace=True)
        assert s.teachers == ["depth", "gen"]
        assert s.target_shape("gen") == (1, 16) and s.teacher_attrs("gen")["v"] == 2
        assert (s.status("gen") == MISSING).all() and not s.complete_shards("gen").any()
        assert (s.status("depth") == OK).all() and s.teacher_attrs("depth")["v"] == 1
        np.testing.assert_array_equal(s.read_rows("depth", np.arange(N)), dv.astype(np.float16))
        np.testing.assert_array_equal(s.read_rows("gen", np.arange(N)), np.zeros((N, 1, 16), np.float16))
    with EmbeddingStore.open(_url(tmp_path, fmt)) as s:
        np.testing.assert_array_equal(s.read_rows("depth", np.arange(N)), dv.astype(np.float16))


# ----------------------------------------------------------------------------------------------- writing


def test_write_shard_status_complete(tmp_path: Path, fmt: str) -> None:
    v = _values(MID)
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("seg", MID)
        assert s.complete_shards("seg").tolist() == [False, False, False]
        assert s.status("seg").dtype == np.uint8 and (s.status("seg") == MISSING).all()
        _fill(s, "seg", v, shards=[2])  # the partial last shard first
        assert s.complete_shards("seg").tolist() == [False, False, True]
        st = np.full(SHARD, OK, np.uint8)
        st[3] = FAILED
        errs = [""] * SHARD
        errs[3] = "decode error: truncated JPEG"
        s.write_shard("seg", 0, v[:SHARD], st, errs)
        assert s.complete_shards("seg").tolist() == [True, False, True]
        status = s.status("seg")
        assert status[3] == FAILED and status[0] == OK and (status[8:16] == MISSING).all()
        assert s.errors("seg") == [(PATHS[3], "decode error: truncated JPEG")]
        # bad calls
        with pytest.raises(StoreError, match="values shape"):
            s.write_shard("seg", 1, v[:5], np.full(5, OK, np.uint8), [""] * 5)
        with pytest.raises(StoreError, match="status entries"):
            s.write_shard("seg", 1, v[8:16], np.full(8, MISSING, np.uint8), [""] * 8)
        with pytest.raises(StoreError, match="error strings"):
            s.write_shard("seg", 1, v[8:16], np.full(8, OK, np.uint8), [""])
        with pytest.raises(StoreError, match="no teacher column 'nope'"):
            s.write_shard("nope", 1, v[8:16], np.full(8, OK, np.uint8), [""] * 8)
        assert s.complete_shards("seg").tolist() == [True, False, True]


def test_fp16_range_marks_failed(tmp_path: Path, fmt: str) -> None:
    v = _values(MID)[:SHARD].copy()
    v[1, 0, 0] = np.inf
    v[2, 5, 7] = np.nan
    v[4, 3, 3] = -70000.0
    v[5, 0, 0] = 65504.0  # the largest finite fp16 is fine
    st = np.full(SHARD, OK, np.uint8)
    st[6] = FAILED
    errs = [""] * SHARD
    errs[6] = "teacher OOM"
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("seg", MID)
        s.write_shard("seg", 0, v, st, errs)
        status = s.status("seg")[:SHARD]
        assert status.tolist() == [OK, FAILED, FAILED, OK, FAILED, OK, FAILED, OK]
        reasons = dict(s.errors("seg"))
        assert reasons[PATHS[1]] == "non-finite values"
        assert reasons[PATHS[2]] == "non-finite values"
        assert reasons[PATHS[4]].startswith("exceeds float16 range (max |x|=70000")
        assert reasons[PATHS[6]] == "teacher OOM"
        got = s.read_rows("seg", np.arange(SHARD))
        assert np.isfinite(got).all()  # never silently inf
        for i in (1, 2, 4, 6):
            assert not got[i].any()  # rows not OK are stored as zeros
        np.testing.assert_array_equal(got[[0, 3, 5, 7]], v[[0, 3, 5, 7]].astype(np.float16))
        assert got[5, 0, 0] == 65504.0


def test_int8_roundtrip(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(3)
    # per-channel scale variation like real features
    v = (rng.standard_normal((N, *MID)) * rng.lognormal(0, 1, MID[-1]) + rng.normal(0, 0.5, MID[-1])).astype(
        np.float32
    )
    v[5] = 0.0  # an all-zero image
    v[7, 2] = 0.0  # one all-zero vector
    g = _values(SMALL, 4)
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("seg", MID, dtype="int8")
        s.add_teacher("gen", SMALL, dtype="int8")
        _fill(s, "seg", v)
        _fill(s, "gen", g)
        assert s.teacher_attrs("seg")["dtype"] == "int8"
        scale = s._b.read_all("seg/scale")
        assert scale.shape == (N, MID[0]) and scale.dtype == np.float32
        assert s._b.read_all("gen/scale").shape == (N, 1)
        assert (scale[5] == 1).all() and scale[7, 2] == 1
        np.testing.assert_allclose(scale[0], np.abs(v[0]).max(-1) / 127, rtol=1e-6)
        got = s.read_rows("seg", np.arange(N))
        assert got.dtype == np.float16 and got.shape == (N, *MID)
        nz = [i for i in range(N) if i != 5]
        assert _cos(got[nz], v[nz]).min() > 0.99
        assert not got[5].any() and not got[7, 2].any()
        assert _cos(s.read_rows("gen", np.arange(N)), g).min() > 0.99
        assert s.nbytes("seg") < s.nbytes() and s.nbytes("seg") > 0


def test_int8_range_and_nonfinite(tmp_path: Path) -> None:
    v = _values(SMALL)[:SHARD].copy()
    v[0, 0, 0] = np.nan
    v[1, 0, 0] = 1e6  # int8 columns dequantise to float16, so the fp16 range applies too
    with EmbeddingStore.create(tmp_path / "s.zarr", PATHS, shard_size=SHARD) as s:
        s.add_teacher("gen", SMALL, dtype="int8")
        s.write_shard("gen", 0, v, np.full(SHARD, OK, np.uint8), [""] * SHARD)
        assert s.status("gen")[:2].tolist() == [FAILED, FAILED]
        assert not s.read_rows("gen", [0, 1]).any()


# ----------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("shape", [BIG, MID, SMALL, (32,)], ids=["big", "mid", "small", "1d"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_read_rows_fast_path_matches_api(
    tmp_path: Path, fmt: str, shape: tuple[int, ...], dtype: str
) -> None:
    v = _values(shape, 5)
    url = _url(tmp_path, fmt)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("t", shape, dtype=dtype)
        # shard 0 complete with two failed rows (zero chunks that zarr omits), shard 1 never written (missing
        # shard file / unallocated chunks), shard 2 (partial) complete.
        st = np.full(SHARD, OK, np.uint8)
        st[[2, 3]] = FAILED
        s.write_shard("t", 0, v[:SHARD], st, ["", "", "x", "y", "", "", "", ""])
        _fill(s, "t", v, shards=[2])
    rows = np.array([20, 3, 0, 0, 9, 17, 16, 20, 1, 2, 15, 8, 19, 4, 5, 6, 7, 18])
    with EmbeddingStore.open(url) as fast, EmbeddingStore.open(url, fast_reads=False) as api:
        fast.read_rows("t", [0])
        api.read_rows("t", [0])
        # the fast path is really in use on one side and really off on the other (format-2 HDF5 datasets carry
        # the fletcher32 filter, which the raw reader verifies itself where it is faster than h5py: one image
        # per chunk; several-image chunks are read through h5py)
        b_fast = fast._b  # type: ignore[attr-defined]
        one_per_chunk = fmt == "hdf5" and b_fast._ds("t/target").chunks[0] == 1
        assert (b_fast._readers["t/target"] is not None) == (fmt == "zarr" or one_per_chunk)
        assert api._b._readers["t/target"] is None  # type: ignore[attr-defined]
        a, b = fast.read_rows("t", rows), api.read_rows("t", rows)
        assert a.dtype == b.dtype == np.float16 and a.shape == (len(rows), *shape)
        np.testing.assert_array_equal(a, b)
        # and against what was written
        want = v.astype(np.float16) if dtype == "float16" else None
        for k, r in enumerate(rows):
            if 8 <= r < 16 or r in (2, 3):
                assert not a[k].any()
            elif want is not None:
                np.testing.assert_array_equal(a[k], want[r])
            else:
                assert _cos(a[k : k + 1], v[r : r + 1])[0] > 0.99
        # every permutation path: a single row, sorted, empty
        np.testing.assert_array_equal(fast.read_rows("t", [17]), b[rows == 17][:1])
        np.testing.assert_array_equal(fast.read_rows("t", np.sort(rows)), api.read_rows("t", np.sort(rows)))
        assert fast.read_rows("t", np.array([], dtype=np.int64)).shape == (0, *shape)
        with pytest.raises(StoreError, match="out of range"):
            fast.read_rows("t", [N])
        with pytest.raises(StoreError, match="out of range"):
            fast.read_rows("t", [-1])


def test_read_threads_same_result(tmp_path: Path, fmt: str) -> None:
    v = _values(BIG, 6)
    url = _url(tmp_path, fmt)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("t", BIG)
        _fill(s, "t", v)
    rows = np.random.default_rng(0).integers(0, N, 40)
    with EmbeddingStore.open(url, read_threads=3) as s:
        np.testing.assert_array_equal(s.read_rows("t", rows), v.astype(np.float16)[rows])


def test_rewrite_incomplete_shard_replaces_old_bytes(tmp_path: Path, fmt: str) -> None:
    """Resume rewrites an incomplete shard; rows now FAILED must read as zeros, not the stale data."""
    v = _values(BIG, 7)
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("t", BIG)
        s.read_rows("t", np.arange(SHARD))  # warm the fast-path caches before the rewrite
        _fill(s, "t", v, shards=[0])
        np.testing.assert_array_equal(s.read_rows("t", np.arange(SHARD)), v[:SHARD].astype(np.float16))
        st = np.full(SHARD, FAILED, np.uint8)
        st[0] = OK
        s.write_shard("t", 0, v[:SHARD] * 2, st, ["boom"] * SHARD)
        got = s.read_rows("t", np.arange(SHARD))
        np.testing.assert_array_equal(got[0], (v[0] * 2).astype(np.float16))
        assert not got[1:].any()


def test_crash_between_data_and_status(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    v = _values(BIG, 8)
    url = _url(tmp_path, fmt)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("t", BIG)
        _fill(s, "t", v, shards=[0])

        def crash(*_a: object, **_k: object) -> None:
            raise KeyboardInterrupt("killed between data and status")

        monkeypatch.setattr(EmbeddingStore, "_write_status", crash)
        with pytest.raises(KeyboardInterrupt):
            _fill(s, "t", v, shards=[1])
        monkeypatch.undo()
    with EmbeddingStore.open(url, "r+") as s:
        # the data of shard 1 is on disk but without its status the shard is not complete -> recomputed
        assert s.complete_shards("t").tolist() == [True, False, False]
        assert (s.status("t")[8:16] == MISSING).all()
        _fill(s, "t", v, shards=[1, 2])
        assert s.complete_shards("t").all()
        np.testing.assert_array_equal(s.read_rows("t", np.arange(N)), v.astype(np.float16))


def test_nbytes(tmp_path: Path, fmt: str) -> None:
    with EmbeddingStore.create(_url(tmp_path, fmt), PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("a", BIG)
        s.add_teacher("b", SMALL)
        _fill(s, "a", _values(BIG))
        _fill(s, "b", _values(SMALL))
        a, b, total = s.nbytes("a"), s.nbytes("b"), s.nbytes()
        assert a >= N * int(np.prod(BIG)) * 2  # uncompressed fp16
        assert 0 < b < a and total >= a + b


def test_zarr_zstd_compressor(tmp_path: Path) -> None:
    v = _values(MID, 9)
    with EmbeddingStore.create(tmp_path / "z.zarr", PATHS, shard_size=SHARD) as s:
        s.add_teacher("t", MID, compressor="zstd")
        _fill(s, "t", v)
        assert s.teacher_attrs("t")["codec"]["compressor"] == "zstd"
        rows = np.array([5, 1, 20, 5])
        np.testing.assert_array_equal(s.read_rows("t", rows), v.astype(np.float16)[rows])
        assert s._b._readers["t/target"] is None  # type: ignore[attr-defined]  # compressed -> zarr API path
        with pytest.raises(StoreError, match="compressor"):
            s.add_teacher("u", MID, compressor="lz4-turbo")
    with EmbeddingStore.create(tmp_path / "h.h5", PATHS, format="hdf5") as s:
        with pytest.raises(StoreError, match="HDF5"):
            s.add_teacher("t", MID, compressor="zstd")


def test_corrupt_shard_index_detected(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD) as s:
        s.add_teacher("t", BIG)
        _fill(s, "t", _values(BIG), shards=[0])
    shard = url / "t" / "target" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # flip a byte of the index
    shard.write_bytes(bytes(raw))
    with EmbeddingStore.open(url) as s, pytest.raises(StoreError, match="checksum"):
        s.read_rows("t", [0])


# ----------------------------------------------------------------------------------------------- URLs


def test_fsspec_memory_url() -> None:
    url = f"memory://olacache-test-{uuid.uuid4().hex}/store.zarr"
    v = _values(MID, 10)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD) as s:
        s.add_teacher("t", MID)
        s.add_teacher("q", SMALL, dtype="int8")
        _fill(s, "t", v)
        _fill(s, "q", _values(SMALL))
    assert EmbeddingStore.exists(url)
    with pytest.raises(StoreError, match="already exists"):
        EmbeddingStore.create(url, PATHS)
    with EmbeddingStore.open(url) as s:
        assert s.image_paths == PATHS and s.complete_shards("t").all()
        rows = np.array([3, 20, 3, 0])
        np.testing.assert_array_equal(s.read_rows("t", rows), v.astype(np.float16)[rows])
        assert s.nbytes("t") > 0
    r = TargetReader(url, ["t"])
    t, ok = r.fetch([PATHS[3], None])
    assert ok["t"].tolist() == [True, False]
    np.testing.assert_array_equal(t["t"][0].numpy(), v[3].astype(np.float16))
    with pytest.raises(StoreError, match="HDF5"):
        EmbeddingStore.create(f"memory://x-{uuid.uuid4().hex}.h5", PATHS, format="hdf5")
    assert not EmbeddingStore.exists(f"memory://nothing-{uuid.uuid4().hex}")


def test_file_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/s.zarr"
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD) as s:
        s.add_teacher("t", BIG)
        _fill(s, "t", _values(BIG))
    with EmbeddingStore.open(url) as s:
        s.read_rows("t", [0])
        assert s._b._readers["t/target"] is not None  # type: ignore[attr-defined]  # local fast path


# ----------------------------------------------------------------------------------------------- reader


def _make_reader_store(url: Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    d, g = _values(MID, 11), _values(SMALL, 12)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        s.add_teacher("depth", MID)
        s.add_teacher("gen", SMALL, dtype="int8")
        st = np.full(SHARD, OK, np.uint8)
        st[4] = FAILED
        s.write_shard("depth", 0, d[:SHARD], st, ["", "", "", "", "bad", "", "", ""])
        _fill(s, "depth", d, shards=[1])  # shard 2 of depth never written: MISSING
        _fill(s, "gen", g)
    return d, g


BATCH = [PATHS[4], None, "./" + PATHS[0], "not/in/store.jpg", PATHS[20], PATHS[9], PATHS[0]]


def _check_fetch(targets: dict, ok: dict, d: np.ndarray, g: np.ndarray) -> None:
    assert set(targets) == {"depth", "gen"}
    assert ok["depth"].tolist() == [False, False, True, False, False, True, True]
    assert ok["gen"].tolist() == [True, False, True, False, True, True, True]
    td = targets["depth"].numpy()
    assert td.dtype == np.float16 and td.shape == (len(BATCH), *MID)
    for k, r in [(2, 0), (5, 9), (6, 0)]:
        np.testing.assert_array_equal(td[k], d[r].astype(np.float16))
    for k in (0, 1, 3, 4):
        assert not td[k].any()
    tg = targets["gen"].numpy()
    assert tg.shape == (len(BATCH), *SMALL) and not tg[1].any() and not tg[3].any()
    assert _cos(tg[[0, 2, 4]], g[[4, 0, 20]]).min() > 0.99


def test_target_reader_fetch(tmp_path: Path, fmt: str) -> None:
    import torch

    url = _url(tmp_path, fmt)
    d, g = _make_reader_store(url, fmt)
    r = TargetReader(url)
    assert r.teachers == ["depth", "gen"]
    assert r.shapes == {"depth": MID, "gen": SMALL}
    assert r.image_paths == PATHS
    assert r.rows_for([PATHS[2], None, "x.jpg", "a/../" + PATHS[2]]).tolist() == [2, -1, -1, 2]
    with pytest.raises(ValueError, match="absolute"):
        r.rows_for(["/abs.jpg"])
    assert r.status("depth")[[0, 4, 16]].tolist() == [OK, FAILED, MISSING]
    targets, ok = r.fetch(BATCH)
    assert targets["depth"].dtype == torch.float16 and ok["depth"].dtype == torch.bool
    _check_fetch(targets, ok, d, g)
    only = TargetReader(url, ["gen"])
    assert list(only.fetch(BATCH)[0]) == ["gen"]
    with pytest.raises(StoreError, match=r"unknown teacher.*\['seg'\].*\['depth', 'gen'\]"):
        TargetReader(url, ["seg", "gen"])
    t, o = r.fetch([])
    assert t["depth"].shape == (0, *MID) and o["depth"].shape == (0,)
    r.close()


def test_target_reader_pickles_without_handles(tmp_path: Path, fmt: str) -> None:
    url = _url(tmp_path, fmt)
    d, g = _make_reader_store(url, fmt)
    r = TargetReader(url)
    r.fetch(BATCH)  # opened + caches filled
    blob = pickle.dumps(r)
    assert len(blob) < 2000  # handles, path index and status caches are not pickled
    r2 = pickle.loads(blob)
    assert r2._store is None
    _check_fetch(*r2.fetch(BATCH), d, g)
    r.close()
    r2.close()


def _spawn_fetch(blob: bytes) -> tuple[dict, dict, int]:
    import os

    r = pickle.loads(blob)
    t, o = r.fetch(BATCH)
    return {k: v.numpy() for k, v in t.items()}, {k: v.numpy() for k, v in o.items()}, os.getpid()


def test_target_reader_in_spawned_process(tmp_path: Path, fmt: str) -> None:
    import os

    import torch

    url = _url(tmp_path, fmt)
    d, g = _make_reader_store(url, fmt)
    r = TargetReader(url)
    r.fetch(BATCH)  # the parent has used it
    with mp.get_context("spawn").Pool(1) as pool:
        t, o, pid = pool.apply(_spawn_fetch, (pickle.dumps(r),))
    assert pid != os.getpid()
    _check_fetch(
        {k: torch.from_numpy(v) for k, v in t.items()}, {k: torch.from_numpy(v) for k, v in o.items()}, d, g
    )
    r.close()


class _ReaderDataset:
    def __init__(self, reader: TargetReader) -> None:
        self.reader = reader

    def __getitem__(self, i: int) -> tuple[dict, dict, int]:
        import os

        t, o = self.reader.fetch(BATCH)
        # inside a worker the batch is allocated in shared memory, so sending it is not another copy
        assert all(x.is_shared() for x in t.values())
        return t, o, os.getpid()

    def __len__(self) -> int:
        return 4


def test_target_reader_dataloader_fork_after_parent_read(tmp_path: Path, fmt: str) -> None:
    import os

    from torch.utils.data import DataLoader

    url = _url(tmp_path, fmt)
    d, g = _make_reader_store(url, fmt)
    r = TargetReader(url)
    _check_fetch(*r.fetch(BATCH), d, g)  # parent reads first: zarr's loop thread / h5py handle exist
    dl = DataLoader(
        _ReaderDataset(r), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    pids = set()
    for t, o, pid in dl:
        _check_fetch(t, o, d, g)
        pids.add(pid)
    assert os.getpid() not in pids and len(pids) == 2
    _check_fetch(*r.fetch(BATCH), d, g)  # the parent's handles still work
    r.close()


# ----------------------------------------------------------------------------------------------- processes


def _write_shards(url: str, shards: list[int], barrier: object) -> None:
    v = _values(BIG, 13, n=48)
    with EmbeddingStore.open(url, "r+") as s:
        barrier.wait(60)  # type: ignore[attr-defined]  # both ranks write at the same time
        for shard in shards:
            r = s.shard_rows(shard)
            st = np.full(len(r), OK, np.uint8)
            st[0] = FAILED  # exercise errors/status chunks too
            s.write_shard("t", shard, v[r.start : r.stop], st, [f"fail {shard}"] + [""] * (len(r) - 1))


def test_zarr_write_shard_touches_no_shared_metadata(tmp_path: Path) -> None:
    """Concurrent ranks are only safe if write_shard never rewrites a file another rank may also write."""
    url = tmp_path / "s.zarr"
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD) as s:
        s.add_teacher("t", BIG, dtype="int8")
        before = {p: p.stat().st_mtime_ns for p in url.rglob("zarr.json")}
        _fill(s, "t", _values(BIG), shards=[1])
        assert {p: p.stat().st_mtime_ns for p in url.rglob("zarr.json")} == before
        # every file written belongs to shard 1 (chunk key c/1/...)
        written = [
            p.relative_to(url).as_posix() for p in url.rglob("*") if p.is_file() and p.name != "zarr.json"
        ]
        assert written and all("/c/1" in w for w in written if not w.startswith("index/")), written


def test_half_created_column_is_not_a_teacher(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _url(tmp_path, fmt)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:

        def crash(*_a: object, **_k: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(type(s._b), "set_column_attrs", crash)
        with pytest.raises(KeyboardInterrupt):
            s.add_teacher("t", BIG)
        monkeypatch.undo()
        assert s.teachers == []
        s.add_teacher("t", BIG)  # no replace=True needed: nothing was ever written
        assert s.teachers == ["t"]


def test_zarr_concurrent_writers_disjoint_shards(tmp_path: Path) -> None:
    """Two processes (like torchrun ranks) write interleaved disjoint shards into one store at once."""
    url = tmp_path / "s.zarr"
    paths = [f"img/{i}.jpg" for i in range(48)]
    with EmbeddingStore.create(url, paths, shard_size=4) as s:
        s.add_teacher("t", BIG)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_write_shards, args=(str(url), list(range(rank, 12, 2)), barrier))
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    v = _values(BIG, 13, n=48)
    with EmbeddingStore.open(url) as s:
        assert s.complete_shards("t").all()
        st = s.status("t")
        assert (st[0::4] == FAILED).all() and (np.delete(st, np.arange(0, 48, 4)) == OK).all()
        assert sorted(s.errors("t")) == sorted((paths[4 * k], f"fail {k}") for k in range(12))
        got = s.read_rows("t", np.arange(48))
        ok = st == OK
        np.testing.assert_array_equal(got[ok], v[ok].astype(np.float16))
        assert not got[~ok].any()


def _hold_hdf5(url: str, ready: object, release: object) -> None:
    with EmbeddingStore.open(url, "r+"):
        ready.set()  # type: ignore[attr-defined]
        release.wait(60)  # type: ignore[attr-defined]


def test_hdf5_second_writer_refused(tmp_path: Path) -> None:
    url = tmp_path / "s.h5"
    EmbeddingStore.create(url, PATHS, format="hdf5").close()
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_hdf5, args=(str(url), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StoreError, match=r"s\.h5.*another process.*zarr"):
            EmbeddingStore.open(url, "r+")
        with pytest.raises(StoreError, match="another process"):
            TargetReader(url)  # no reader while a writer holds it
        assert EmbeddingStore.exists(url)
    finally:
        release.set()
        p.join(60)
    assert p.exitcode == 0
    EmbeddingStore.open(url, "r+").close()  # free again


def test_truncated_hdf5_is_named_truncated_not_locked(tmp_path):
    """A cut-short HDF5 file (HDF5's message names "sblock->base_addr") is not mistaken for a locked one."""
    p = tmp_path / "s.h5"
    with EmbeddingStore.create(p, [f"a/{i}.jpg" for i in range(8)], shard_size=4, format="hdf5") as s:
        s.add_teacher("t", (4, 8))
        s.write_shard("t", 0, np.ones((4, 4, 8), np.float32), np.full(4, OK, np.uint8), [""] * 4)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
    with pytest.raises(StoreError, match="truncated") as e:
        EmbeddingStore.open(p)
    assert "another process" not in str(e.value)
