"""Zarr v3 backend of the embedding store (default format; local directory or any fsspec URL).

Reads: zarr-python pays a trip through its event-loop thread per call (~1.5-2 ms here) and decodes every inner
chunk through its codec pipeline, which caps random single-image reads at a few hundred images/s. For the
layout this store writes by default (sharding codec, uncompressed little-endian inner chunks, crc32c-checked
index at the end of each shard file) the bytes of image ``r`` are simply ``index[r].offset`` within the shard
file, so on a local filesystem ``LocalShardedReader`` reads each shard's index once (cached, revalidated by
``stat``), verifies its crc32c, and preads the images straight into the output batch. Anything else (remote
fsspec stores get ``RemoteShardedReader`` (olacache.store.remote_reader) for the same layout; compressed
columns and foreign layouts go through zarr's async API: the batch's contiguous runs are read concurrently on
zarr's event loop in one ``sync`` call.

Format 2: text lives in uint8 arrays (``olacache.store.strings``), every numeric chunk carries a crc32c (inside
the sharding codec for target/scale, so a flipped bit names one inner chunk), and sharded arrays write every
inner chunk even when it is all zeros, so a missing shard file or chunk is always damage, never "fill".
``LocalShardedReader`` checks the crc32c of every inner chunk it reads (google-crc32c, hardware CRC).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, GzipCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from olacache.store.backend import Backend
from olacache.store.format import DIGEST, INDEX_PATH, StoreError
from olacache.store.local_reader import LocalShardedReader, inner_crc, is_checksum_error
from olacache.store.pread import ReadPool, contiguous_runs
from olacache.store.strings import ERROR_BYTES, decode_concat, decode_fixed, encode_concat, encode_fixed

_INDEX_CHUNK_ROWS = 65536
_TEXT_CHUNK_BYTES = 1 << 20
# format-2 names of the text arrays (olacache.store.strings); format 1 kept zarr "string" arrays at the
# logical names INDEX_PATH and <column>/errors
PATH_UTF8, PATH_OFFSETS, ERROR_UTF8 = "index/path_utf8", "index/path_offsets", "error_utf8"


def _compressors(name: str | None, url: str, version: int = 2) -> Any:
    if name is None:
        out: tuple[Any, ...] = ()
    elif name == "zstd":
        # Level 3: the usual speed/ratio knee; random fp16 features only reach ~1.09x anyway.
        out = (ZstdCodec(level=3),)
    else:
        raise StoreError(f"{url}: unknown compressor {name!r}; use None or 'zstd'")
    # crc32c last: it checksums exactly the bytes stored (Zarr v3 core codec, read by every client).
    out = out + ((Crc32cCodec(),) if version >= 2 else ())
    return out or None


def _text_codecs() -> tuple[Any, ...]:
    # gzip is a core Zarr v3 codec (zstd is an extension some clients lack); text is never hot.
    return (GzipCodec(level=5), Crc32cCodec())


def _is_errors(path: str) -> bool:
    return path.count("/") == 1 and path.endswith("/errors")


class ZarrBackend(Backend):
    format = "zarr"

    def __init__(
        self, url: str, local: Path | None, group: zarr.Group, *, fast_reads: bool, read_threads: int = 1
    ) -> None:
        self.url = url
        # the store's format version decides the text arrays' names and whether new chunks get checksums
        self.version = int(group.attrs.get("format_version", 2) or 2)
        self._pool = ReadPool(read_threads)
        self._local = local
        self._g = group
        self._fast_reads = fast_reads
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: dict[str, LocalShardedReader | None] = {}
        self._shard_seen: dict[str, set[int]] = {}

    # ------------------------------------------------------------------ open / create

    @staticmethod
    def _store(url: str, local: Path | None, read_only: bool) -> Any:
        if local is not None:
            return LocalStore(local, read_only=read_only)
        from olacache.store.remote import storage_options

        opts = storage_options()
        if url.split("://")[0] in ("s3", "s3a"):
            # s3fs caches directory listings per process: another writer's new column (or shard) would stay
            # invisible to a long-lived process (seen: a column added by a build missing from `teachers`).
            opts.setdefault("use_listings_cache", False)
        try:
            return FsspecStore.from_url(url, read_only=read_only, storage_options=opts or None)
        except Exception as e:  # fsspec raises anything from ImportError to ValueError here
            raise StoreError(f"{url}: cannot open this URL through fsspec: {e}") from e

    @classmethod
    def create(
        cls, url: str, local: Path | None, paths: list[str], attrs: dict[str, Any], shard_size: int
    ) -> ZarrBackend:
        if local is not None and local.exists() and not local.is_dir():
            raise StoreError(f"{url}: something already exists there; refusing to create a store over it")
        store = cls._store(url, local, read_only=False)
        overwrite = False
        if not sync(store.is_empty("")):
            # An existing EMPTY directory is fine (e.g. made by a job script), and so is a creation that was
            # killed before its root attrs (the commit point) were written: that is redone from scratch.
            if not cls._half_created(store):
                raise StoreError(f"{url}: something already exists there; refusing to create a store over it")
            overwrite = True
        # Root attrs are written LAST: a crash mid-create leaves a group without format_version, which the
        # next create() recognises (above) and redoes.
        g = zarr.create_group(store, overwrite=overwrite, attributes={})
        data, offsets = encode_concat(paths)
        for name, arr in ((PATH_OFFSETS, offsets), (PATH_UTF8, data)):
            a = g.create_array(
                name, shape=arr.shape, dtype=arr.dtype, chunks=(max(1, min(len(arr), _TEXT_CHUNK_BYTES)),),
                compressors=_text_codecs(), fill_value=0,
            )
            if len(arr):
                a[:] = arr
        g.update_attributes(attrs)
        return cls(url, local, g, fast_reads=True)

    @staticmethod
    def _half_created(store: Any) -> bool:
        """A zarr group without format_version that holds nothing but (part of) the index."""
        try:
            g = zarr.open_group(store, mode="r")
        except Exception:
            return False
        if "format_version" in g.attrs:
            return False
        return set(g.keys()) <= {"index"}

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
        if dtype == "str":
            if not _is_errors(path):
                raise StoreError(f"{self.url}: no text encoding for array {path!r}")
            # format 2: fixed-width UTF-8 rows (olacache.store.strings), one chunk per shard like status
            self._g.create_array(
                f"{path.split('/')[0]}/{ERROR_UTF8}", shape=(shape[0], ERROR_BYTES), dtype="uint8",
                chunks=(chunk_rows, ERROR_BYTES), compressors=_text_codecs(), fill_value=0,
                attributes={"encoding": f"utf-8, zero-padded to {ERROR_BYTES} bytes per row"},
            )
        else:
            self._g.create_array(
                path,
                shape=shape,
                dtype=dtype,
                chunks=(chunk_rows, *rest),
                shards=None if shard_rows is None else (shard_rows, *rest),
                compressors=_compressors(compressor, self.url, self.version),
                fill_value=0,
                # every inner chunk is written, all-zero ones too: a missing one is then always damage
                config={"write_empty_chunks": shard_rows is not None},
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
            if inner_crc(a):
                # a runtime setting, not stored in the metadata: every format-2 sharded array is written with
                # all its chunks (an all-zero shard too), so a missing shard file is always damage
                a = a.with_config({"write_empty_chunks": True})
            self._arrays[path] = a
        return a

    def resize(self, path: str, n_rows: int) -> None:
        text = self._text_v2(path)
        arr = self._arr(text if text is not None else path)
        if arr.shape[0] != n_rows:
            arr.resize((n_rows, *arr.shape[1:]))
        self._forget(path.split("/")[0])

    def write_index(self, paths: list[str]) -> None:
        """Extend the index to ``paths`` (whose head is the current index): only the tail is written."""
        data, offsets = encode_concat(paths)
        for name, arr in ((PATH_OFFSETS, offsets), (PATH_UTF8, data)):
            a = self._arr(name)
            old = a.shape[0]
            if old != len(arr):
                a.resize((len(arr),))
            start = max(0, min(old, len(arr)) - 1)
            if len(arr) > start:
                a[start:] = arr[start:]
            self._arrays.pop(name, None)

    def set_root_attrs(self, attrs: dict[str, Any]) -> None:
        self._g.update_attributes(attrs)

    def has_array(self, path: str) -> bool:
        try:
            self._arr(path)
            return True
        except StoreError:
            return False

    def _text_v2(self, path: str) -> str | None:
        """The format-2 array holding the logical text array ``path``, or None (format 1: zarr strings)."""
        if self.version < 2:
            return None
        if path == INDEX_PATH:
            return PATH_UTF8
        if _is_errors(path):
            return f"{path.split('/')[0]}/{ERROR_UTF8}"
        return None

    def write(self, path: str, start: int, values: np.ndarray) -> None:
        text = self._text_v2(path)
        if text is not None:
            values = encode_fixed([str(v) for v in values])
            path = text
        # One call for the whole shard: zarr encodes the shard once (per-image writes re-encode it each time).
        self._arr(path)[start : start + len(values)] = values

    def read_all(self, path: str) -> np.ndarray:
        text = self._text_v2(path)
        if text == PATH_UTF8:
            # only the committed rows: an extension killed before its commit point left a longer index
            n = int(self._g.attrs.get("n_images", self._arr(PATH_OFFSETS).shape[0] - 1))
            return np.array(
                decode_concat(self._arr(PATH_UTF8)[:], self._arr(PATH_OFFSETS)[: n + 1]), dtype=object
            )
        if text is not None:
            return decode_fixed(self._arr(text)[:])
        return np.asarray(self._arr(path)[:])

    def _raw_reader(self, path: str) -> Any:
        if self._local is None:
            # object storage: cached shard indexes + one gather of coalesced byte ranges per batch
            from olacache.store.remote_reader import RemoteShardedReader

            column = path.split("/")[0]
            return RemoteShardedReader.for_array(self._arr(path), self._g.store, self.chunk_cache,
                                                 lambda: self._shard_identity(column))
        return LocalShardedReader.for_array(self._arr(path), self._local, self.url)

    def _shard_identity(self, column: str) -> tuple[Any, np.ndarray] | None:
        """(column generation id, per-shard digests): what names a chunk's content in a chunk cache; None for
        a column without digests (format 1), which is then read without the cache."""
        if not self.has_array(f"{column}/{DIGEST}"):
            return None
        generation = self.column_attrs(column).get("generation")
        return generation, np.asarray(self._arr(f"{column}/{DIGEST}")[:], dtype=np.int64)

    def _library_read_into(
        self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, must_exist: bool = False
    ) -> np.ndarray:
        # zarr API path: every contiguous run is one getitem; all of them run concurrently on zarr's event
        # loop in ONE sync() call (N synchronous calls would pay N loop round trips). A run that fails (a
        # chunk's crc32c) is re-read one inner chunk at a time to find exactly the bad rows.
        arr = self._arr(path)
        aarr = getattr(arr, "async_array", None) or arr._async_array
        runs = contiguous_runs(rows)

        async def _gather(spans: list[tuple[int, int]]) -> list[Any]:
            return await asyncio.gather(
                *(aarr.getitem(slice(a, b)) for a, b in spans), return_exceptions=True
            )

        blocks = sync(_gather([(int(rows[a]), int(rows[b - 1]) + 1) for a, b in runs]))
        bad: list[int] = []
        for (a, b), blk in zip(runs, blocks, strict=True):
            if not isinstance(blk, BaseException):
                out[dest[a:b]] = np.asarray(blk)
                continue
            if not is_checksum_error(blk):
                raise blk
            c = int(arr.chunks[0])  # inner chunk rows (zarr's .chunks is the inner chunk shape)
            sub = rows[a:b]
            chunks = np.unique(sub // c)
            parts = sync(_gather([(int(k) * c, min(int(k) * c + c, arr.shape[0])) for k in chunks]))
            for k, part in zip(chunks.tolist(), parts, strict=True):
                sel = (sub // c) == k
                if isinstance(part, BaseException):
                    if not is_checksum_error(part):
                        raise part
                    out[dest[a:b][sel]] = 0
                    bad += sub[sel].tolist()
                else:
                    out[dest[a:b][sel]] = np.asarray(part)[sub[sel] - k * c]
        if must_exist and inner_crc(arr):
            bad += self._rows_of_missing_shards(arr, rows, out, dest)
        return np.unique(np.asarray(bad, dtype=np.int64))

    def _rows_of_missing_shards(
        self, arr: zarr.Array, rows: np.ndarray, out: np.ndarray, dest: np.ndarray
    ) -> list[int]:
        """zarr reads a missing shard as the fill value; for complete rows that is damage. Existence is
        remembered per shard (a shard seen once is not asked again: one request per shard per process)."""
        per = int(arr.shards[0])
        seen = self._shard_seen.setdefault(arr.path, set())
        shards = np.unique(rows // per)
        todo = [int(s) for s in shards if int(s) not in seen]
        if not todo:
            return []
        keys = [self._shard_key(arr, s) for s in todo]

        async def _exists() -> list[bool]:
            return await asyncio.gather(*(self._g.store.exists(k) for k in keys))

        bad: list[int] = []
        for s, ok in zip(todo, sync(_exists()), strict=True):
            if ok:
                seen.add(s)
            else:
                hit = rows // per == s
                out[dest[hit]] = 0
                bad += rows[hit].tolist()
        return bad

    @staticmethod
    def _shard_key(arr: zarr.Array, shard: int) -> str:
        key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
        return f"{arr.path}/{key}" if arr.path else key

    def check_shard(
        self, path: str, shard: int, shard_rows: int, keep: list[np.ndarray] | None = None
    ) -> list[str]:
        arr = self._arr(path)
        lo, hi = shard * shard_rows, min((shard + 1) * shard_rows, arr.shape[0])
        where = f"{path} shard {shard} (rows {lo}-{hi - 1})"
        full_key = self._shard_key(arr, shard)
        try:
            if not sync(self._g.store.exists(full_key)):
                return [f"{where}: shard file {full_key} is missing"]
        except Exception as e:
            return [f"{where}: cannot check shard file {full_key}: {type(e).__name__}: {e}"]
        return self._check_shard_values(path, arr, lo, hi, where, "crc32c", keep)

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
