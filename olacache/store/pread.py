"""Batched row reads: sort/deduplicate a request, coalesce adjacent rows, and pread them straight into the batch.

Used by both backends' raw readers (local, uncompressed layouts, where the bytes of row ``r`` sit at a known
offset) and by the library fallbacks (one read per contiguous run of rows). Checksummed layouts (zarr's crc32c
codec inside the sharding codec, HDF5's fletcher32 filter: a chunk's body followed by a 4-byte checksum) read
whole chunks and verify each before any of its bytes count as read (``plan_checked_runs``/``read_checked_runs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from olacache.store.format import StoreError


def plan_reads(rows: np.ndarray, dest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort + deduplicate a row request.

    -> (unique sorted rows, the out-slot each is read into, dup_src, dup_dst) where after reading the unique
    rows ``out[dup_dst] = out[dup_src]`` fills the duplicates. Each distinct row is read once."""
    order = np.argsort(rows, kind="stable")
    rs, ds = rows[order], dest[order]
    first = np.ones(len(rs), dtype=bool)
    first[1:] = rs[1:] != rs[:-1]
    first_pos = np.maximum.accumulate(np.where(first, np.arange(len(rs)), 0))
    return rs[first], ds[first], ds[first_pos[~first]], ds[~first]


def contiguous_runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[(i0, i1)) index ranges into sorted_rows where the rows are consecutive integers."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.nonzero(np.diff(sorted_rows) != 1)[0] + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_rows)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 4096) -> np.ndarray:
    """np.empty whose data starts on a page boundary.

    Measured here: the kernel copy behind pread runs ~2x slower when the destination sits a few bytes past the
    source's offset modulo 4 KiB (glibc puts big allocations at page + 16 bytes, and zarr's inner chunks start
    on page boundaries: 4,200 vs 7,900 images/s). numpy still backs it with transparent huge pages."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dt).reshape(shape)


_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)

# A run: (fd, file offset, out rows) — out rows whose bytes lie back to back in the file from that offset.
Run = tuple[int, int, np.ndarray]


def plan_runs(fd: int, offsets: np.ndarray, dest: np.ndarray, row_nbytes: int) -> list[Run]:
    """Group rows whose bytes are adjacent in the file into runs of at most IOV_MAX rows."""
    n = len(offsets)
    if n == 0:
        return []
    brk = np.nonzero(np.diff(offsets) != row_nbytes)[0] + 1
    bounds = [0, *brk.tolist(), n]
    runs: list[Run] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for a2 in range(a, b, _IOV_MAX):
            runs.append((fd, int(offsets[a2]), dest[a2 : min(b, a2 + _IOV_MAX)]))
    return runs


def read_runs(runs: Sequence[Run], out: np.ndarray, row_nbytes: int, what: str, pool: Any = None) -> None:
    """Execute runs: ONE preadv per run whose iovecs point at the run's (arbitrary) output slots, so the bytes
    land in the batch directly with no intermediate buffer. With a thread pool (os.preadv releases the GIL)
    several runs are in flight at once, which is what cold or network storage needs."""
    if not runs:
        return
    flat = out.reshape(out.shape[0], -1)  # a view; rows of 1-D arrays become 1-element vectors
    if not out.flags.c_contiguous or flat.strides[0] != row_nbytes:
        raise AssertionError(f"{what}: output rows are not {row_nbytes} contiguous bytes")

    def one(run: Run) -> None:
        fd, offset, dest = run
        bufs = [memoryview(flat[d]).cast("B") for d in dest]
        if os.preadv(fd, bufs, offset) == len(dest) * row_nbytes:
            return
        # Short read (signal / odd filesystem): finish row by row, then insist on every byte.
        for k, mv in enumerate(bufs):
            pos = 0
            while pos < row_nbytes:
                chunk = os.pread(fd, row_nbytes - pos, offset + k * row_nbytes + pos)
                if not chunk:
                    raise StoreError(
                        f"{what}: short read at byte {offset + k * row_nbytes + pos}; the file is truncated or "
                        "being rewritten"
                    )
                mv[pos : pos + len(chunk)] = chunk
                pos += len(chunk)

    if pool is None or len(runs) == 1:
        for r in runs:
            one(r)
    else:
        for _ in pool.map(one, runs):  # re-raises the first error
            pass


class ReadPool:
    """A lazily created, per-process thread pool for read_runs (threads do not survive fork, so a forked
    DataLoader worker builds its own)."""

    def __init__(self, threads: int) -> None:
        self.threads = int(threads)
        self._pool: Any = None
        self._pid = -1

    def get(self) -> Any:
        if self.threads <= 1:
            return None
        if self._pid != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="olacache-read")
            self._pid = os.getpid()
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=False)
        self._pool = None


# A checked run: (fd, file offset, chunks) — whole chunks lying back to back in the file from that offset, each
# its body then a 4-byte checksum. A chunk: (its first row, the wanted rows' indexes within it, their out slots).
CheckedRun = tuple[int, int, list[tuple[int, np.ndarray, np.ndarray]]]


def plan_checked_runs(
    fd: int, chunk_off: np.ndarray, row0: np.ndarray, in_chunk: np.ndarray, dest: np.ndarray, chunk_nbytes: int
) -> list[CheckedRun]:
    """Group the chunks that hold the wanted rows into runs of chunks adjacent in the file (one preadv each).
    Per wanted row: its chunk's file offset, the chunk's first row, the row's index within the chunk, its out
    slot. Each chunk is read (and verified) once however many of its rows are wanted."""
    if len(chunk_off) == 0:
        return []
    order = np.argsort(chunk_off, kind="stable")
    off, r0, ic, ds = chunk_off[order], row0[order], in_chunk[order], dest[order]
    cuts = [0, *(np.nonzero(np.diff(off))[0] + 1).tolist(), len(off)]
    runs: list[CheckedRun] = []
    cur: list[tuple[int, np.ndarray, np.ndarray]] = []
    cur_off = prev_end = -1
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        o = int(off[a])
        item = (int(r0[a]), ic[a:b], ds[a:b])
        if cur and o == prev_end and len(cur) < _IOV_MAX // 2:  # two iovecs per chunk on the direct path
            cur.append(item)
        else:
            if cur:
                runs.append((fd, cur_off, cur))
            cur, cur_off = [item], o
        prev_end = o + chunk_nbytes
    if cur:
        runs.append((fd, cur_off, cur))
    return runs


def read_checked_runs(
    runs: Sequence[CheckedRun],
    out: np.ndarray,
    row_nbytes: int,
    chunk_rows: int,
    check: Callable[[np.ndarray, bytes], bool],
    what: str,
    pool: Any = None,
) -> list[int]:
    """Execute checked runs: one preadv per run, then ``check(body, stored 4 bytes)`` per chunk. A chunk of one
    row is read straight into its out slot (its checksum into a side buffer), so a good row costs no copy; a
    bigger chunk is read into a scratch buffer and its wanted rows are copied out once it passed. A chunk that
    fails (or is cut short: a truncated file) has its wanted slots zeroed. -> its wanted rows (never data).
    With a thread pool, runs are read and checked concurrently (preadv and numpy's fletcher32 release the GIL;
    google-crc32c holds it)."""
    if not runs:
        return []
    flat = out.reshape(out.shape[0], -1)  # a view; rows of 1-D arrays become 1-element vectors
    if not out.flags.c_contiguous or flat.strides[0] != row_nbytes:
        raise AssertionError(f"{what}: output rows are not {row_nbytes} contiguous bytes")
    flat_u8 = flat.view(np.uint8)
    cn = chunk_rows * row_nbytes + 4
    direct = chunk_rows == 1

    def one(run: CheckedRun) -> list[int]:
        fd, offset, items = run
        sums = np.empty((len(items), 4), dtype=np.uint8)
        if direct:
            bufs: list[Any] = []
            for j, (_r0, _ic, dst) in enumerate(items):
                bufs += [memoryview(flat_u8[int(dst[0])]), memoryview(sums[j])]
        else:
            tmp = np.empty((len(items), cn), dtype=np.uint8)
            bufs = [memoryview(tmp)]
        got = os.preadv(fd, bufs, offset)
        bad: list[int] = []
        for j, (r0, in_chunk, dst) in enumerate(items):
            if direct:
                body, stored = flat_u8[int(dst[0])], sums[j].tobytes()
            else:
                body, stored = tmp[j, :-4], tmp[j, -4:].tobytes()
            if got < (j + 1) * cn or not check(body, stored):
                flat_u8[dst] = 0
                bad += (r0 + in_chunk).tolist()
            elif not direct:
                flat_u8[dst] = body.reshape(chunk_rows, row_nbytes)[in_chunk]
            elif len(dst) > 1:  # the same row wanted twice (callers deduplicate; never leave a slot unread)
                flat_u8[dst[1:]] = body
        return bad

    results = [one(r) for r in runs] if pool is None or len(runs) <= 1 else list(pool.map(one, runs))
    return [x for r in results for x in r]
