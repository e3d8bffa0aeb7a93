"""Zarr v3 backend of the embedding store (default format; local directory or any fsspec URL).

Reads: zarr-python pays a trip through its event-loop thread per call (~1.5-2 ms here) and decodes every inner
chunk through its codec pipeline, which caps random single-image reads at a few hundred images/s. For the
layout this store writes by default (sharding codec, uncompressed little-endian inner chunks, crc32c-checked
index at the end of each shard file) the bytes of image ``r`` are simply ``index[r].offset`` within the shard
file, so on a local filesystem ``LocalShardedReader`` reads each shard's index once (cached, revalidated by
``stat``), verifies its crc32c, and preads the images straight into the output batch. Anything else (remote
fsspec stores, compressed columns, foreign layouts) goes through zarr's async API: the batch's contiguous runs
are read concurrently on zarr's event loop in one ``sync`` call.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from olacache.store.backend import Backend
from olacache.store.format import INDEX_PATH, StoreError
from olacache.store.pread import ReadPool, Run, contiguous_runs, plan_runs, read_runs

try:  # zarr >= 3.1 checksums shard indexes with google-crc32c; 3.0 used the `crc32c` package
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - depends on the installed zarr
    try:
        from crc32c import crc32c as _crc32c
    except ImportError:
        _crc32c = None  # no checksum function: LocalShardedReader stays off, zarr verifies instead

_MAX_U64 = np.uint64(2**64 - 1)
_INDEX_CHUNK_ROWS = 65536


def _compressors(name: str | None, url: str) -> Any:
    if name is None:
        return None
    if name == "zstd":
        # Level 3: the usual speed/ratio knee; random fp16 features only reach ~1.09x anyway.
        return (ZstdCodec(level=3),)
    raise StoreError(f"{url}: unknown compressor {name!r}; use None or 'zstd'")


class ZarrBackend(Backend):
    format = "zarr"

    def __init__(
        self, url: str, local: Path | None, group: zarr.Group, *, fast_reads: bool, read_threads: int = 1
    ) -> None:
        self.url = url
        self._pool = ReadPool(read_threads)
        self._local = local
        self._g = group
        self._fast_reads = fast_reads
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: dict[str, LocalShardedReader | None] = {}

    # ------------------------------------------------------------------ open / create

    @staticmethod
    def _store(url: str, local: Path | None, read_only: bool) -> Any:
        if local is not None:
            return LocalStore(local, read_only=read_only)
        try:
            return FsspecStore.from_url(url, read_only=read_only)
        except Exception as e:  # fsspec raises anything from ImportError to ValueError here
            raise StoreError(f"{url}: cannot open this URL through fsspec: {e}") from e

    @classmethod
    def create(
        cls, url: str, local: Path | None, paths: list[str], attrs: dict[str, Any], shard_size: int
    ) -> ZarrBackend:
        if local is not None and local.exists():
            # An existing EMPTY directory is fine (e.g. made by a job script); anything else is refused.
            if not local.is_dir() or any(local.iterdir()):
                raise StoreError(f"{url}: something already exists there; refusing to create a store over it")
        store = cls._store(url, local, read_only=False)
        if local is None and not sync(store.is_empty("")):
            raise StoreError(f"{url}: something already exists there; refusing to create a store over it")
        # Root attrs are written LAST: a crash mid-create leaves a group without format_version, which open()
        # reports as "not an olacache store" instead of a store with a short index.
        g = zarr.create_group(store, overwrite=False, attributes={})
        n = len(paths)
        idx = g.create_array(INDEX_PATH, shape=(n,), dtype=str, chunks=(min(n, _INDEX_CHUNK_ROWS),))
        idx[:] = np.array(paths, dtype=object)
        g.update_attributes(attrs)
        return cls(url, local, g, fast_reads=True)

    @classmethod
    def open(
        cls, url: str, local: Path | None, mode: str, *, fast_reads: bool, read_threads: int = 1
    ) -> ZarrBackend:
        store = cls._store(url, local, read_only=(mode == "r"))
        try:
            g = zarr.open_group(store, mode=mode)
        except Exception as e:
            raise StoreError(
                f"{url} is not a zarr group ({type(e).__name__}: {e}); an embedding store is a zarr v3 group "
                "or an HDF5 file made by EmbeddingStore.create"
            ) from None
        return cls(url, local, g, fast_reads=fast_reads, read_threads=read_threads)

    # ------------------------------------------------------------------ metadata

    def root_attrs(self) -> dict[str, Any]:
        return dict(self._g.attrs)

    def list_columns(self) -> list[str]:
        return [k for k in self._g.group_keys() if k != "index"]

    def create_column(self, name: str) -> None:
        self._g.create_group(name)

    def delete_column(self, name: str) -> None:
        self._forget(name)
        del self._g[name]

    def _forget(self, column: str) -> None:
        for d in (self._arrays, self._readers):
            for k in [k for k in d if k.startswith(column + "/")]:
                del d[k]

    def column_attrs(self, name: str) -> dict[str, Any]:
        return dict(self._g[name].attrs)

    def set_column_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        self._g[name].attrs.put(attrs)

    # ------------------------------------------------------------------ arrays

    def create_array(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: str,
        *,
        chunk_rows: int,
        shard_rows: int | None,
        compressor: str | None,
    ) -> None:
        rest = tuple(shape[1:])
        self._g.create_array(
            path,
            shape=shape,
            dtype=str if dtype == "str" else dtype,
            chunks=(chunk_rows, *rest),
            shards=None if shard_rows is None else (shard_rows, *rest),
            # strings keep zarr's default compression: error/path text compresses well and is never hot.
            compressors="auto" if dtype == "str" else _compressors(compressor, self.url),
            fill_value="" if dtype == "str" else 0,
        )
        self._forget(path.split("/")[0])

    def _arr(self, path: str) -> zarr.Array:
        a = self._arrays.get(path)
        if a is None:
            try:
                a = self._g[path]
            except KeyError:
                raise StoreError(f"{self.url}: array {path!r} is missing; the store is incomplete") from None
            assert isinstance(a, zarr.Array)
            self._arrays[path] = a
        return a

    def write(self, path: str, start: int, values: np.ndarray) -> None:
        # One call for the whole shard: zarr encodes the shard once (per-image writes re-encode it each time).
        self._arr(path)[start : start + len(values)] = values

    def read_all(self, path: str) -> np.ndarray:
        return np.asarray(self._arr(path)[:])

    def _raw_reader(self, path: str) -> LocalShardedReader | None:
        return LocalShardedReader.for_array(self._arr(path), self._local)

    def _library_read_into(self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        # zarr API path: every contiguous run is one getitem; all of them run concurrently on zarr's event
        # loop in ONE sync() call (N synchronous calls would pay N loop round trips).
        arr = self._arr(path)
        aarr = getattr(arr, "async_array", None) or arr._async_array
        runs = contiguous_runs(rows)

        async def _gather() -> list[Any]:
            return await asyncio.gather(
                *(aarr.getitem(slice(int(rows[a]), int(rows[b - 1]) + 1)) for a, b in runs)
            )

        blocks = sync(_gather())
        for (a, b), blk in zip(runs, blocks, strict=True):
            out[dest[a:b]] = np.asarray(blk)

    def nbytes(self, column: str | None) -> int:
        if self._local is not None:
            root = self._local if column is None else self._local / column
            return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        return int(sync(self._g.store.getsize_prefix(column or "")))

    def close(self) -> None:
        self._arrays.clear()
        self._readers.clear()
        self._pool.close()
        self._g.store.close()


class LocalShardedReader:
    """Reads rows of an uncompressed, sharded, local zarr v3 array by byte offset (see the module docstring).

    Returns exactly what zarr returns: missing shard files and missing inner chunks read as the fill value,
    and each shard index's crc32c is verified like zarr does."""

    def __init__(
        self, array_dir: Path, arr: zarr.Array, shard_rows: int, chunk_rows: int, index_at_end: bool
    ) -> None:
        self._dir = array_dir
        self._meta = arr.metadata
        self._ndim = arr.ndim
        self.shard_rows = shard_rows
        self.chunk_rows = chunk_rows
        self.row_nbytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        self._n_inner = shard_rows // chunk_rows
        self._index_nbytes = self._n_inner * 16 + 4
        self._index_at_end = index_at_end
        self._fill = arr.metadata.fill_value
        # shard -> ((inode, mtime_ns, size), offsets_and_lengths (n_inner, 2) uint64). Revalidated by fstat
        # on every read: zarr rewrites a shard by writing a new file and renaming it over the old one.
        self._index: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    @classmethod
    def for_array(cls, arr: zarr.Array, local: Path | None) -> LocalShardedReader | None:
        """The fast reader if ``arr`` has exactly the layout it understands, else None (use the zarr API)."""
        meta = arr.metadata
        if (
            local is None
            or _crc32c is None
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
            len(inner) != 1
            or not isinstance(inner[0], BytesCodec)
            or inner[0].endian not in (None, Endian.little)
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
        return cls(
            local / arr.path,
            arr,
            shard_rows=shard_shape[0],
            chunk_rows=chunk_shape[0],
            index_at_end=sc.index_location == ShardingCodecIndexLocation.end,
        )

    def _shard_file(self, shard: int) -> Path:
        return self._dir / self._meta.encode_chunk_key((shard,) + (0,) * (self._ndim - 1))

    def _load_index(self, fd: int, size: int, path: Path) -> np.ndarray:
        if size < self._index_nbytes:
            raise StoreError(f"{path}: shard file is {size} bytes, shorter than its index; it is corrupt")
        raw = os.pread(fd, self._index_nbytes, size - self._index_nbytes if self._index_at_end else 0)
        body, crc = raw[:-4], raw[-4:]
        if np.uint32(_crc32c(body)).tobytes() != crc:  # type: ignore[misc]
            raise StoreError(f"{path}: shard index checksum mismatch; the shard is corrupt, rebuild it")
        idx = np.frombuffer(body, dtype="<u8").reshape(self._n_inner, 2)
        present = idx[:, 0] != _MAX_U64
        expected = self.chunk_rows * self.row_nbytes
        if np.any(idx[present, 1] != expected):
            raise StoreError(f"{path}: inner chunks are not {expected} raw bytes; unexpected layout")
        return idx

    def _shard_index(self, shard: int, fd: int, path: Path) -> np.ndarray:
        st = os.fstat(fd)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._index.get(shard)
        if cached is not None and cached[0] == key:
            return cached[1]
        idx = self._load_index(fd, st.st_size, path)
        self._index[shard] = (key, idx)
        return idx

    def read_into(self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, pool: ReadPool) -> None:
        """out[dest[k]] = row rows[k] (rows sorted, unique). Plans every shard first, then issues all reads
        (concurrently when the pool has threads)."""
        shards = rows // self.shard_rows
        cuts = (np.nonzero(np.diff(shards))[0] + 1).tolist()
        fds: list[int] = []
        runs: list[Run] = []
        try:
            for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True):
                shard = int(shards[a])
                path = self._shard_file(shard)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    out[dest[a:b]] = self._fill  # zarr omits an all-fill shard (write_empty_chunks=False)
                    continue
                fds.append(fd)
                idx = self._shard_index(shard, fd, path)
                local = rows[a:b] - shard * self.shard_rows
                starts = idx[local // self.chunk_rows, 0]
                present = starts != _MAX_U64
                if not present.all():
                    out[dest[a:b][~present]] = self._fill  # an all-fill inner chunk is omitted from the shard
                offsets = (
                    starts[present].astype(np.int64) + (local[present] % self.chunk_rows) * self.row_nbytes
                )
                runs += plan_runs(fd, offsets, dest[a:b][present], self.row_nbytes)
            read_runs(runs, out, self.row_nbytes, str(self._dir), pool.get())
        finally:
            for fd in fds:
                os.close(fd)
