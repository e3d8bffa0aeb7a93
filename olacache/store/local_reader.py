"""Local fast read path of the Zarr backend: rows of a sharded, uncompressed zarr v3 array read by byte offset
straight into the batch (``pread``), with every checksum zarr itself would check (see ``LocalShardedReader``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.sharding import ShardingCodecIndexLocation

from olacache.store.checksums import _crc32c_value as _crc32c
from olacache.store.checksums import crc32c_ok
from olacache.store.format import CorruptChunk
from olacache.store.pread import ReadPool, Run, plan_checked_runs, plan_runs, read_checked_runs, read_runs

_MAX_U64 = np.uint64(2**64 - 1)


def sharded_layout(arr: zarr.Array) -> tuple[int, int, bool, bool] | None:
    """(shard rows, inner chunk rows, index at end, inner crc32c) if ``arr`` has exactly the layout the byte-range
    readers understand (sharded, uncompressed little-endian inner chunks, crc32c-checked index), else None."""
    meta = arr.metadata
    if (
        _crc32c is None
        or sys.byteorder != "little"
        or getattr(meta, "zarr_format", None) != 3
    ):
        return None
    if arr.dtype.kind not in "iuf" or getattr(meta, "storage_transformers", ()):
        return None
    codecs = meta.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sc = codecs[0]
    inner = sc.codecs
    if (
        len(inner) not in (1, 2)
        or not isinstance(inner[0], BytesCodec)
        or inner[0].endian not in (None, Endian.little)
        or (len(inner) == 2 and not isinstance(inner[1], Crc32cCodec))
    ):
        return None
    ic = sc.index_codecs
    if not (
        len(ic) == 2
        and isinstance(ic[0], BytesCodec)
        and ic[0].endian in (None, Endian.little)
        and isinstance(ic[1], Crc32cCodec)
    ):
        return None
    shard_shape = tuple(meta.chunk_grid.chunk_shape)
    chunk_shape = tuple(sc.chunk_shape)
    rest = tuple(arr.shape[1:])
    if shard_shape[1:] != rest or chunk_shape[1:] != rest or shard_shape[0] % chunk_shape[0]:
        return None
    return shard_shape[0], chunk_shape[0], sc.index_location == ShardingCodecIndexLocation.end, len(inner) == 2


def inner_crc(arr: zarr.Array) -> bool:
    """A format-2 sharded array: inner chunks carry crc32c and are all written (a missing one is damage)."""
    codecs = arr.metadata.codecs
    return (len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
            and any(isinstance(c, Crc32cCodec) for c in codecs[0].codecs))


def is_checksum_error(e: BaseException) -> bool:
    """A decode failure of stored bytes (crc32c mismatch, a truncated shard or chunk), as opposed to an I/O
    error of the storage itself (which is raised as is)."""
    return isinstance(e, ValueError | IndexError) or "checksum" in str(e).lower()


class LocalShardedReader:
    """Reads rows of an uncompressed, sharded, local zarr v3 array by byte offset (see the module docstring).

    Returns exactly what zarr returns, and checks what zarr checks: each shard index's crc32c, and (format 2)
    each inner chunk's crc32c, verified on the bytes read (a bad chunk's rows are zeroed and reported, never
    returned). Format-1 arrays (no inner checksum) read missing shards/chunks as the fill value like zarr.

    Kept instead of a library codec pipeline because it is clearly faster warm on a local disk: bench/README.md
    "Store reads" (format 2, crc32c checked, two runs, same run each: 4.6-4.9x zarr-python's read_rows; ratio to
    memmap 0.64-0.66 vs zarr-python 0.14); a side-by-side run reported in issue 10 put zarr-python + zarrs at
    0.39 and tensorstore at 0.24 (not re-measured in this repository's bench). Its crc32c costs 20-38% of the
    read rate (with / without checksums 0.62-0.80 in seven runs): the checksum's own compute, see bench/README.md
    "What makes the reads fast"."""

    def __init__(
        self, array_dir: Path, arr: zarr.Array, shard_rows: int, chunk_rows: int, index_at_end: bool,
        inner_crc: bool, url: str,
    ) -> None:
        self._dir = array_dir
        self._url = url
        self._name = arr.path
        self._meta = arr.metadata
        self._ndim = arr.ndim
        self._n = arr.shape[0]
        self.shard_rows = shard_rows
        self.chunk_rows = chunk_rows
        self.row_nbytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        self._crc = inner_crc
        self._chunk_nbytes = chunk_rows * self.row_nbytes + (4 if inner_crc else 0)
        self._n_inner = shard_rows // chunk_rows
        self._index_nbytes = self._n_inner * 16 + 4
        self._index_at_end = index_at_end
        self._fill = arr.metadata.fill_value
        # shard -> ((inode, mtime_ns, size), offsets_and_lengths (n_inner, 2) uint64). Revalidated by fstat
        # on every read: zarr rewrites a shard by writing a new file and renaming it over the old one.
        self._index: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    @classmethod
    def for_array(cls, arr: zarr.Array, local: Path | None, url: str = "") -> LocalShardedReader | None:
        """The fast reader if ``arr`` has exactly the layout it understands, else None (use the zarr API)."""
        lay = sharded_layout(arr)
        if local is None or lay is None:
            return None
        shard_rows, chunk_rows, index_at_end, crc = lay
        return cls(
            local / arr.path,
            arr,
            shard_rows=shard_rows,
            chunk_rows=chunk_rows,
            index_at_end=index_at_end,
            inner_crc=crc,
            url=url or str(local),
        )
    def _shard_file(self, shard: int) -> Path:
        return self._dir / self._meta.encode_chunk_key((shard,) + (0,) * (self._ndim - 1))

    def _where(self, shard: int, lo: int, hi: int) -> str:
        teacher = self._name.split("/")[0]
        return f"{self._url}: teacher {teacher!r} ({self._name}) shard {shard}, rows {lo}-{hi - 1}"

    def _load_index(self, fd: int, size: int, shard: int) -> np.ndarray:
        lo = shard * self.shard_rows
        hi = min(lo + self.shard_rows, self._n)
        if size < self._index_nbytes:
            raise CorruptChunk(f"{self._where(shard, lo, hi)}: shard file is {size} bytes, shorter than its "
                               "index; it is corrupt (olacache verify --repair)", list(range(lo, hi)))
        raw = os.pread(fd, self._index_nbytes, size - self._index_nbytes if self._index_at_end else 0)
        body, crc = raw[:-4], raw[-4:]
        if np.uint32(_crc32c(body)).tobytes() != crc:  # type: ignore[misc]
            raise CorruptChunk(f"{self._where(shard, lo, hi)}: shard index checksum mismatch; the shard is "
                               "corrupt (olacache verify --repair)", list(range(lo, hi)))
        idx = np.frombuffer(body, dtype="<u8").reshape(self._n_inner, 2)
        present = idx[:, 0] != _MAX_U64
        if np.any(idx[present, 1] != self._chunk_nbytes) or np.any(
            idx[present, 0] + idx[present, 1] > np.uint64(size)
        ):
            raise CorruptChunk(f"{self._where(shard, lo, hi)}: inner chunks are not {self._chunk_nbytes} bytes "
                               "inside the file; the shard is corrupt", list(range(lo, hi)))
        return idx

    def _shard_index(self, shard: int, fd: int) -> np.ndarray:
        st = os.fstat(fd)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._index.get(shard)
        if cached is not None and cached[0] == key:
            return cached[1]
        idx = self._load_index(fd, st.st_size, shard)
        self._index[shard] = (key, idx)
        return idx

    def read_into(
        self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, pool: ReadPool, must_exist: bool = False
    ) -> np.ndarray:
        """out[dest[k]] = row rows[k] (rows sorted, unique). Plans every shard first, then issues all reads
        (concurrently when the pool has threads). -> rows whose bytes are damaged (zeroed in ``out``)."""
        shards = rows // self.shard_rows
        cuts = (np.nonzero(np.diff(shards))[0] + 1).tolist()
        fds: list[int] = []
        runs: list[Run] = []
        bad: list[int] = []
        try:
            for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True):
                shard = int(shards[a])
                path = self._shard_file(shard)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    if self._crc and must_exist:  # format 2 writes every shard whole: a missing one is damage
                        bad += rows[a:b].tolist()
                        out[dest[a:b]] = 0
                        continue
                    out[dest[a:b]] = self._fill  # zarr omits an all-fill shard (write_empty_chunks=False)
                    continue
                fds.append(fd)
                try:
                    idx = self._shard_index(shard, fd)
                except CorruptChunk:
                    bad += rows[a:b].tolist()
                    out[dest[a:b]] = 0
                    continue
                local = rows[a:b] - shard * self.shard_rows
                starts = idx[local // self.chunk_rows, 0]
                present = starts != _MAX_U64
                if not present.all():
                    missing = dest[a:b][~present]
                    if self._crc and must_exist:
                        bad += rows[a:b][~present].tolist()
                        out[missing] = 0
                    else:
                        out[missing] = self._fill  # an all-fill inner chunk is omitted from the shard
                if self._crc:
                    runs += self._checked_runs(fd, shard, starts[present].astype(np.int64), local[present],
                                               dest[a:b][present])
                    continue
                offsets = (
                    starts[present].astype(np.int64) + (local[present] % self.chunk_rows) * self.row_nbytes
                )
                runs += plan_runs(fd, offsets, dest[a:b][present], self.row_nbytes)
            if self._crc:
                bad += self._read_checked(runs, out, pool.get())
            else:
                read_runs(runs, out, self.row_nbytes, str(self._dir), pool.get())
        finally:
            for fd in fds:
                os.close(fd)
        return np.asarray(sorted(bad), dtype=np.int64)

    # ---------------------------------------------------------------- format 2: checksummed inner chunks
    def _checked_runs(
        self, fd: int, shard: int, starts: np.ndarray, local: np.ndarray, dest: np.ndarray
    ) -> list[Any]:
        """The needed inner chunks (each read whole, with its 4-byte crc), as runs of adjacent chunks."""
        chunk = local // self.chunk_rows
        return plan_checked_runs(fd, starts, shard * self.shard_rows + chunk * self.chunk_rows,
                                 local % self.chunk_rows, dest, self._chunk_nbytes)

    def _read_checked(self, runs: list[Any], out: np.ndarray, pool: Any) -> list[int]:
        return read_checked_runs(runs, out, self.row_nbytes, self.chunk_rows, crc32c_ok, str(self._dir), pool)
