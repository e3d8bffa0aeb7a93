"""Chunk checksums the local fast read paths verify on the bytes they read: zarr's crc32c codec and HDF5's
fletcher32 filter. Each ``*_ok(body, stored)`` takes a chunk's body (uint8, contiguous) and the 4 checksum bytes
stored after it in the file, and says whether they match exactly as zarr / HDF5 themselves would decide."""

from __future__ import annotations

import numpy as np

try:  # zarr >= 3.1 checksums with google-crc32c; 3.0 used the `crc32c` package
    from google_crc32c import value as _crc32c_value
except ImportError:  # pragma: no cover - depends on the installed zarr
    try:
        from crc32c import crc32c as _crc32c_value
    except ImportError:
        _crc32c_value = None  # no checksum function: the crc32c fast path stays off, zarr verifies instead


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only uint8 view: google-crc32c's C function accepts a read-only buffer (not a writable one) and a
    copy to ``bytes`` halved the checksummed read rate."""
    v = a.reshape(-1).view(np.uint8)
    v.flags.writeable = False
    return v


def crc32c(body: np.ndarray) -> int:
    """crc32c of a contiguous array's bytes. google-crc32c holds the GIL while it checksums (two threads ran no
    faster than one: bench/bench_checksums.py), so read threads overlap their reads but not their crc32c."""
    return int(_crc32c_value(_readonly(body)))  # type: ignore[misc]


def crc32c_ok(body: np.ndarray, stored: bytes) -> bool:
    """zarr's crc32c codec: the crc32c of the chunk, stored little-endian after it."""
    return np.uint32(crc32c(body)).tobytes() == stored


_BLOCK = 2048  # words per block in fletcher32; the fastest of 1024-16384 on a 1.18 MB chunk here
_WEIGHTS: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # words -> per-block and per-column weights (one size
# per dataset, so computed once)


def fletcher32(data: np.ndarray) -> int:
    """HDF5's fletcher32 (``H5_checksum_fletcher32``) of a contiguous uint8 buffer, vectorised with numpy
    (whose reductions release the GIL, so ``read_threads`` can overlap it).

    HDF5 sums the buffer as big-endian 16-bit words w_0..w_{n-1} (an odd last byte is the high byte of a last
    word): sum1 = sum(w_i), sum2 = sum((n - i) * w_i), both folded with end-around carry, which is arithmetic
    modulo 65535 except that a non-zero sum that is a multiple of 65535 folds to 0xffff (only an all-zero
    buffer gives 0); the result is (sum2 << 16) | sum1. Since 65536 = 1 (mod 65535), a big-endian word is 256
    times its little-endian reading, so this reads the buffer as native little-endian words v in blocks of
    _BLOCK (no byte swap) and uses sum((n - i) * v_i) = sum_b (n - b*_BLOCK) * rowsum_b - sum_j j * colsum_j:
    two numpy reductions instead of a loop over words."""
    if data.size % 2:
        data = np.concatenate([data, np.zeros(1, np.uint8)])  # a copy, only for an odd-sized chunk
    v = data.view("<u2")
    n = v.size
    m = n // _BLOCK
    w = _WEIGHTS.get(n)
    if w is None:
        w = _WEIGHTS[n] = ((n - _BLOCK * np.arange(m, dtype=np.int64)) % 65535, np.arange(_BLOCK, dtype=np.int64))
    blocks = v[: m * _BLOCK].reshape(m, _BLOCK)
    rows = blocks.sum(axis=1, dtype=np.uint32)  # < _BLOCK * 65535 < 2**32: exact
    cols = blocks.sum(axis=0, dtype=np.uint32 if m <= 65537 else np.uint64)  # < m * 65535: exact
    s1 = int(rows.sum(dtype=np.uint64))
    if m > 65536:  # keep the int64 dot products below 2**63 for chunks over 256 MiB
        rows, cols = rows % 65535, cols % 65535
    s2 = int(np.dot(w[0], rows)) - int(np.dot(w[1], cols))
    if m * _BLOCK < n:
        tail = v[m * _BLOCK :].astype(np.int64)
        s1 += int(tail.sum())
        s2 += int(((n - np.arange(m * _BLOCK, n, dtype=np.int64)) * tail).sum())
    if s1 % 65535 == 0 and not data.any():
        return 0
    return (((256 * s2) % 65535 or 65535) << 16) | ((256 * s1) % 65535 or 65535)


def fletcher32_ok(body: np.ndarray, stored: bytes) -> bool:
    """HDF5's fletcher32 filter: the checksum stored little-endian after the chunk. HDF5 also accepts it with the
    bytes of each 16-bit half swapped (what HDF5 before 1.6.3 wrote on little-endian machines), and so do we."""
    f = np.uint32(fletcher32(body)).tobytes()
    return stored == f or stored == bytes((f[1], f[0], f[3], f[2]))
