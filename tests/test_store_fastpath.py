"""The local fast read paths verify the same checksums as the libraries: HDF5's fletcher32 (computed here in
numpy) equals what HDF5 wrote and rejects what h5py rejects; the pread readers (zarr crc32c, HDF5 fletcher32)
return the same values and the same damaged rows as zarr-python / h5py, with and without read threads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from olacache.store import OK, EmbeddingStore
from olacache.store.checksums import _crc32c_value, crc32c, fletcher32, fletcher32_ok
from olacache.store.hdf5_backend import _H5RawReader
from olacache.store.pread import ReadPool

N, SHARD = 24, 8
PATHS = [f"img/{i:04d}.jpg" for i in range(N)]
SHAPES = {"big": (64, 1024), "small": (2, 32)}  # one image per chunk / several images per chunk


def _fletcher32_reference(data: bytes) -> int:
    """A line-by-line port of HDF5's H5_checksum_fletcher32 (H5checksum.c), the scalar loop itself."""
    length, s1, s2, p = len(data) // 2, 0, 0, 0
    while length:
        tlen = min(length, 360)
        length -= tlen
        for _ in range(tlen):
            s1 += (data[p] << 8) | data[p + 1]
            p += 2
            s2 += s1
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[p] << 8
        s2 += s1
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    return ((s2 << 16) | s1) & 0xFFFFFFFF


def test_fletcher32_equals_hdf5s_loop_on_edge_cases() -> None:
    rng = np.random.default_rng(0)
    cases = [np.zeros(k, np.uint8) for k in (0, 1, 2, 9)]  # all zero: 0, not 0xffff
    cases += [np.full(k, 255, np.uint8) for k in (1, 2, 720, 721, 4097, 9000)]  # sums that fold to 0xffff
    cases += [np.array([255, 255, 0, 0], np.uint8), np.array([0, 1], np.uint8)]
    # odd sizes, the 360-word fold boundary, and around the 2048-word block of the vectorised sum
    cases += [rng.integers(0, 256, k, dtype=np.uint8) for k in (1, 3, 719, 720, 721, 4095, 4096, 4097, 12289)]
    for c in cases:
        assert fletcher32(c) == _fletcher32_reference(c.tobytes()), len(c)


def _h5_chunks(path: Path) -> list[tuple[str, np.ndarray, bytes]]:
    """(dataset, chunk body, stored checksum) of every chunk h5py wrote with fletcher32."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        for name, dt, shape in (("f16", "f2", (5, 300, 33)), ("i8_odd", "i1", (4, 1, 1023)), ("f32", "f4", (3, 5000))):
            x = (rng.standard_normal(shape) * 50).astype(dt)
            x[1] = 0  # an all-zero chunk
            f.create_dataset(name, data=x, chunks=(1, *shape[1:]), fletcher32=True)
    got = []
    with h5py.File(path, "r") as f:
        for name, ds in f.items():
            for c in range(ds.shape[0]):
                mask, raw = ds.id.read_direct_chunk((c,) + (0,) * (ds.ndim - 1))
                assert mask == 0
                got.append((name, np.frombuffer(raw[:-4], np.uint8), raw[-4:]))
    return got


def test_fletcher32_equals_chunks_h5py_wrote_and_a_flip_fails_both(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    for name, body, stored in _h5_chunks(path):
        assert fletcher32_ok(body, stored), name
        flipped = body.copy()
        flipped[len(body) // 3] ^= 0x01
        assert not fletcher32_ok(flipped, stored), name
        f = np.uint32(fletcher32(body)).tobytes()
        assert fletcher32_ok(body, bytes((f[1], f[0], f[3], f[2])))  # the pre-1.6.3 byte order HDF5 accepts
        assert not fletcher32_ok(body, f[::-1]) or f == f[::-1]
    # the same flipped byte in the file: h5py itself refuses the chunk, and so does our check
    with h5py.File(path, "r") as f:
        info = f["f16"].id.get_chunk_info_by_coord((2, 0, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 100)
        b = fh.read(1)
        fh.seek(info.byte_offset + 100)
        fh.write(bytes([b[0] ^ 1]))
    with h5py.File(path, "r") as f:
        with pytest.raises(OSError):
            f["f16"][2]
        raw = f["f16"].id.read_direct_chunk((2, 0, 0))[1]
        assert not fletcher32_ok(np.frombuffer(raw[:-4], np.uint8), raw[-4:])


def test_crc32c_of_a_writable_row_equals_google_crc32c() -> None:
    x = np.random.default_rng(2).integers(0, 256, 100_003, dtype=np.uint8)
    assert crc32c(x) == int(_crc32c_value(bytes(x)))  # type: ignore[misc]
    assert crc32c(x[:0]) == 0
    assert x.flags.writeable  # the read-only view is a view: the batch stays writable


def _make(url: Path, fmt: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vals = {}
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        for name, shape in SHAPES.items():
            s.add_teacher(name, shape)
            vals[name] = v = rng.standard_normal((N, *shape), dtype=np.float32).astype(np.float16)
            for sh in range(s.n_shards):
                r = s.shard_rows(sh)
                s.write_shard(name, sh, v[r.start : r.stop], np.full(len(r), OK, np.uint8), [""] * len(r))
    return vals


def _flip_row(url: Path, fmt: str, col: str, row: int) -> None:
    if fmt == "hdf5":
        with h5py.File(url, "r") as f:
            ds = f[f"{col}/target"]
            off = ds.id.get_chunk_info_by_coord((row - row % ds.chunks[0], 0, 0)).byte_offset
            off += (row % ds.chunks[0]) * int(np.prod(SHAPES[col])) * 2 + 5
        path = url
    else:
        rn = int(np.prod(SHAPES[col])) * 2
        path = url / col / "target" / "c" / str(row // SHARD) / "0" / "0"
        off = (rn + 4) * (row % SHARD) + 5 if col == "big" else (row % SHARD) * rn + 5
    with open(path, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)
        fh.seek(off)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_fast_path_reports_the_library_paths_bad_rows(tmp_path: Path, fmt: str) -> None:
    url = tmp_path / ("s.h5" if fmt == "hdf5" else "s.zarr")
    vals = _make(url, fmt)
    _flip_row(url, fmt, "big", 9)
    _flip_row(url, fmt, "small", 17)
    want_bad = {"big": [9], "small": list(range(16, 24))}  # "small": the whole 8-row chunk fails
    rows = np.random.default_rng(3).permutation(N)
    for col in SHAPES:
        got = {}
        for fast, threads in ((True, 1), (True, 3), (False, 1)):
            with EmbeddingStore.open(url, fast_reads=fast, read_threads=threads) as s:
                out = np.full((N, *SHAPES[col]), 7, np.float16)
                bad = s._read_into(col, rows, out, np.arange(N), must_exist=True)
                # HDF5 chunks of several images are read through h5py (faster there, see _H5RawReader)
                on = fast and (fmt == "zarr" or col == "big")
                assert (s._b._readers[f"{col}/target"] is not None) == on  # type: ignore[attr-defined]
            assert bad.tolist() == want_bad[col], (fast, threads)
            got[(fast, threads)] = out
            good = ~np.isin(rows, want_bad[col])
            np.testing.assert_array_equal(out[good], vals[col][rows[good]])
            assert not out[~good].any()  # zeroed, never garbage
        np.testing.assert_array_equal(got[(True, 1)], got[(False, 1)])


def test_hdf5_rewritten_shard_reads_back_its_new_values(tmp_path: Path) -> None:
    # (HDF5 rewrites a same-size fletcher32 chunk in place here; the reader also drops its cached offsets
    # whenever the file's mtime/size/inode change, in case a version moves it)
    url = tmp_path / "s.h5"
    vals = _make(url, "hdf5")
    with EmbeddingStore.open(url, mode="r+") as s:
        np.testing.assert_array_equal(s.read_rows("big", [1, 9]), vals["big"][[1, 9]])
        new = -vals["big"][SHARD : 2 * SHARD]
        s.write_shard("big", 1, new, np.full(SHARD, OK, np.uint8), [""] * SHARD)
        np.testing.assert_array_equal(s.read_rows("big", [1, 9]), np.stack([vals["big"][1], new[1]]))


def test_hdf5_unwritten_chunk_is_fill_unless_it_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=(6, 4, 8), dtype="f2", chunks=(1, 4, 8), fletcher32=True, fillvalue=0)
        ds[0:2] = 1.5
        ds[4:6] = 2.5
    with h5py.File(path, "r") as f:
        r = _H5RawReader.for_dataset(f["x"], path)
        assert r is not None
        rows = np.arange(6)
        for must_exist, bad_want in ((False, []), (True, [2, 3])):
            out = np.full((6, 4, 8), 9, np.float16)
            bad = r.read_into(rows, out, rows, ReadPool(1), must_exist=must_exist)
            assert bad.tolist() == bad_want
            np.testing.assert_array_equal(out, np.repeat([1.5, 1.5, 0, 0, 2.5, 2.5], 32).reshape(6, 4, 8))
        r.close()
    # read through h5py instead: any filter besides fletcher32 (here gzip); fletcher32 chunks of several images
    with h5py.File(path, "a") as f:
        f.create_dataset("z", shape=(4, 8), dtype="f2", chunks=(1, 8), fletcher32=True, compression="gzip")
        f.create_dataset("y", shape=(4, 8), dtype="f2", chunks=(2, 8), fletcher32=True)
        assert _H5RawReader.for_dataset(f["z"], path) is None
        assert _H5RawReader.for_dataset(f["y"], path) is None
