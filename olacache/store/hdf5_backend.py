"""HDF5 backend of the embedding store: one local file, groups/datasets/attrs mirroring the zarr layout.

- One writer PROCESS. HDF5 file locking makes a second writer (or a reader while a writer is open) fail at
  open; that is reported as a StoreError. Distributed (multi-rank) builds need format="zarr".
- Attrs are one HDF5 attribute per key. Format 2: native HDF5 types where the value is a scalar (int, float,
  bool, str) or a non-empty list of numbers or of strings (``h5dump`` shows ``n_images`` as an integer); other
  values (dicts, None, mixed lists) hold their JSON text and are named in the object's ``olacache_json``
  attribute. Format 1 held JSON text for every key (no ``olacache_json`` attribute).
- Format 2 numeric datasets use the fletcher32 checksum filter: a damaged chunk fails its read (in h5py, or in
  the raw reader, which verifies the same checksum) and is reported (CorruptChunk) instead of returned.
- Targets are chunked (1, *shape) for big targets and (k, *shape) ~128 KiB for small ones (tiny chunks made
  HDF5 reads hundreds of times slower elsewhere). Chunks are uncompressed, so reads use the chunk byte offsets
  HDF5 reports and pread them straight into the output batch (verifying fletcher32 where the dataset has it);
  datasets with any other filter fall back to h5py.
- Deleting a column (add_teacher(replace=True)) does not shrink the file; ``h5repack`` reclaims the space.
- Not crash-proof the way zarr is: a writer killed mid-flush can corrupt HDF5 metadata. write_shard flushes
  the data before it writes status, so the completion-marker ordering holds at the file level.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from olacache.store.backend import Backend
from olacache.store.checksums import fletcher32_ok
from olacache.store.format import INDEX_PATH, StoreError, StoreLocked
from olacache.store.pread import (
    ReadPool,
    contiguous_runs,
    plan_checked_runs,
    plan_runs,
    read_checked_runs,
    read_runs,
)

_INDEX_CHUNK_ROWS = 65536
_STR = h5py.string_dtype("utf-8")


def is_hdf5(path: Path) -> bool:
    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def _open_file(url: str, path: Path, mode: str) -> h5py.File:
    try:
        # best-effort: keep locking where the filesystem supports it, do not fail on ones (NFS, Lustre) that
        # do not.
        return h5py.File(path, mode, locking="best-effort")
    except (OSError, BlockingIOError) as e:
        msg = str(e).lower()
        if "truncated file" in msg:
            raise StoreError(
                f"{url}: the HDF5 file is truncated ({e}); it was cut short (a copy or a build that died "
                "mid-write): copy it again, or rebuild the store"
            ) from None
        # a word, not a substring: a truncated file's message names "sblock->base_addr"
        if re.search(r"\block", msg) or getattr(e, "errno", None) in (
            errno.EAGAIN, errno.EWOULDBLOCK
        ):
            raise StoreLocked(
                f"{url}: the HDF5 file is held by another process (HDF5 stores allow one writer and no readers "
                "while it writes; distributed builds need format='zarr'). Wait for that process or close it."
            ) from None
        raise StoreError(f"{url}: cannot open as HDF5 ({e})") from None


JSON_KEYS = "olacache_json"
HDF5_SPACE_MARGIN = 16 * 2**20  # bytes kept free beyond a shard (HDF5 metadata, B-tree growth)


def _native(value: Any) -> Any | None:
    """The native HDF5 form of an attr value, or None if it needs JSON."""
    if isinstance(value, bool | int | float) and not (isinstance(value, int) and abs(value) >= 2**63):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, bool) for v in value) or all(isinstance(v, str) for v in value):
            return np.array(value, dtype=bool if isinstance(value[0], bool) else _STR)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return np.array(value, dtype=np.int64)
        if all(isinstance(v, float) for v in value):
            return np.array(value, dtype=np.float64)
    return None


def write_attrs(obj: h5py.Group, attrs: dict[str, Any]) -> None:
    """Replace ``obj``'s attrs with ``attrs`` (format 2 encoding, see the module docstring)."""
    a = obj.attrs
    for k in list(a.keys()):
        if k not in attrs and k != JSON_KEYS:
            del a[k]
    as_json = []
    for k, v in attrs.items():
        nat = _native(v)
        if nat is None:
            a[k] = json.dumps(v)
            as_json.append(k)
        else:
            a[k] = nat
    a[JSON_KEYS] = json.dumps(sorted(as_json))


def read_attrs(obj: h5py.Group) -> dict[str, Any]:
    a = obj.attrs
    if JSON_KEYS not in a:  # format 1: every value is JSON text
        return {k: _dec_json(v) for k, v in a.items()}
    as_json = set(json.loads(_text(a[JSON_KEYS])))
    out: dict[str, Any] = {}
    for k, v in a.items():
        if k == JSON_KEYS:
            continue
        out[k] = _dec_json(v) if k in as_json else _py(v)
    return out


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _py(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v.tolist()]
    return v.item() if isinstance(v, np.generic) else v


def _dec_json(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


class Hdf5Backend(Backend):
    format = "hdf5"

    def __init__(
        self, url: str, path: Path, f: h5py.File, *, fast_reads: bool, read_threads: int = 1
    ) -> None:
        self.url = url
        self._pool = ReadPool(read_threads)
        self._path = path
        self._f = f
        self._fast_reads = fast_reads
        self._readers: dict[str, _H5RawReader | None] = {}

    @classmethod
    def create(
        cls, url: str, path: Path, paths: list[str], attrs: dict[str, Any], shard_size: int
    ) -> Hdf5Backend:
        if path.exists():
            raise StoreError(f"{url}: something already exists there; refusing to create a store over it")
        path.parent.mkdir(parents=True, exist_ok=True)
        f = _open_file(url, path, "w-")
        n = len(paths)
        # maxshape None along rows: the store can be extended later (--extend resizes every dataset)
        ds = f.create_dataset(INDEX_PATH, shape=(n,), dtype=_STR, chunks=(max(1, min(n, _INDEX_CHUNK_ROWS)),),
                              maxshape=(None,))
        ds[:] = np.array(paths, dtype=object)
        # Root attrs last, as in zarr: a half-created file has no format_version.
        write_attrs(f, attrs)
        f.flush()
        return cls(url, path, f, fast_reads=True)

    @classmethod
    def open(cls, url: str, path: Path, mode: str, *, fast_reads: bool, read_threads: int = 1) -> Hdf5Backend:
        return cls(url, path, _open_file(url, path, mode), fast_reads=fast_reads, read_threads=read_threads)

    # ------------------------------------------------------------------ metadata

    def root_attrs(self) -> dict[str, Any]:
        return read_attrs(self._f)

    def list_columns(self) -> list[str]:
        return [k for k, v in self._f.items() if isinstance(v, h5py.Group) and k != "index"]

    def create_column(self, name: str) -> None:
        self._f.create_group(name)

    def delete_column(self, name: str) -> None:
        for k in [k for k in self._readers if k.startswith(name + "/")]:
            r = self._readers.pop(k)
            if r is not None:
                r.close()
        del self._f[name]

    def column_attrs(self, name: str) -> dict[str, Any]:
        return read_attrs(self._f[name])

    def set_column_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        if JSON_KEYS not in self._f.attrs:
            raise StoreError(f"{self.url} is a format-1 store; run `olacache upgrade {self.url}` first")
        write_attrs(self._f[name], attrs)

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
        if compressor is not None:
            raise StoreError(
                f"{self.url}: compressor={compressor!r} is not supported by the HDF5 backend (no built-in zstd "
                "filter; random fp16 features compress ~1.09x anyway); use format='zarr' or no compressor"
            )
        # HDF5 rejects chunks larger than a fixed-size dataset.
        chunks = (min(chunk_rows, shape[0]), *shape[1:])
        grow = (None, *shape[1:])  # extendable along rows (--extend)
        if dtype == "str":
            self._f.create_dataset(path, shape=shape, dtype=_STR, chunks=chunks, maxshape=grow)
        else:
            self._f.create_dataset(path, shape=shape, dtype=dtype, chunks=chunks, fillvalue=0, fletcher32=True,
                                   maxshape=grow)

    # ------------------------------------------------------------------ --extend (olacache.store.extend)

    def _growable(self, path: str) -> h5py.Dataset:
        ds = self._ds(path)
        if ds.maxshape[0] is not None:
            raise StoreError(
                f"{self.url}: this HDF5 store was created with fixed-size datasets ({path!r}), so it cannot be "
                "extended; build a new store for all the images (or use a zarr store, which always extends)"
            )
        return ds

    def resize(self, path: str, n_rows: int) -> None:
        ds = self._growable(path)
        if ds.shape[0] != n_rows:
            ds.resize(n_rows, axis=0)
        r = self._readers.pop(path, None)
        if r is not None:
            r.close()

    def write_index(self, paths: list[str]) -> None:
        ds = self._growable(INDEX_PATH)
        old = ds.shape[0]
        if old != len(paths):
            ds.resize(len(paths), axis=0)
        start = min(old, len(paths))
        if len(paths) > start:
            ds[start:] = np.array(paths[start:], dtype=object)

    def set_root_attrs(self, attrs: dict[str, Any]) -> None:
        self._f.flush()  # everything the extension wrote reaches the file before its commit point
        write_attrs(self._f, attrs)
        self._f.flush()

    def _ds(self, path: str) -> h5py.Dataset:
        try:
            ds = self._f[path]
        except KeyError:
            raise StoreError(f"{self.url}: dataset {path!r} is missing; the store is incomplete") from None
        assert isinstance(ds, h5py.Dataset)
        return ds

    def write(self, path: str, start: int, values: np.ndarray) -> None:
        self._ds(path)[start : start + len(values)] = values

    def check_space(self, nbytes: int) -> None:
        # HDF5 metadata is not crash-safe: an ENOSPC mid-write has been seen to corrupt the file ("Bus error",
        # every computed shard lost). So a shard is written only if it fits with room for metadata to spare.
        import shutil

        free = shutil.disk_usage(self._path.parent).free
        want = int(nbytes * 1.1) + HDF5_SPACE_MARGIN
        if free < want:
            raise StoreError(
                f"{self.url}: not enough free disk space to write the next shard safely ({free / 2**20:.0f} MiB "
                f"free, {want / 2**20:.0f} MiB needed); every complete shard is kept: free space and run the same "
                "build again"
            )

    def has_array(self, path: str) -> bool:
        return isinstance(self._f.get(path), h5py.Dataset)

    def read_all(self, path: str) -> np.ndarray:
        ds = self._ds(path)
        if path == INDEX_PATH:
            # only the committed rows: an extension killed before its commit point left a longer index
            n = int(read_attrs(self._f).get("n_images", ds.shape[0]))
            return np.asarray(ds.asstr()[:n], dtype=object)
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[:], dtype=object)
        return ds[:]

    def _raw_reader(self, path: str) -> _H5RawReader | None:
        return _H5RawReader.for_dataset(self._ds(path), self._path)

    def _library_read_into(
        self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, must_exist: bool = False
    ) -> np.ndarray:
        # h5py path: one hyperslab read per contiguous run (h5py fancy indexing is ~50x slower). A run that
        # fails its fletcher32 check is re-read one chunk at a time to find exactly the bad rows.
        ds = self._ds(path)
        bad: list[int] = []
        for a, b in contiguous_runs(rows):
            try:
                out[dest[a:b]] = ds[int(rows[a]) : int(rows[b - 1]) + 1]
                continue
            except OSError:
                pass
            c = int(ds.chunks[0])
            for r, d in zip(rows[a:b].tolist(), dest[a:b].tolist(), strict=True):
                k = r // c
                try:
                    out[d] = ds[k * c : min(k * c + c, ds.shape[0])][r - k * c]
                except OSError:
                    out[d] = 0
                    bad.append(r)
        return np.asarray(bad, dtype=np.int64)

    def check_shard(
        self, path: str, shard: int, shard_rows: int, keep: list[np.ndarray] | None = None
    ) -> list[str]:
        try:
            ds = self._ds(path)
        except Exception as e:
            return [f"{path}: {e}"]
        lo, hi = shard * shard_rows, min((shard + 1) * shard_rows, ds.shape[0])
        where = f"{path} shard {shard} (rows {lo}-{hi - 1})"
        return self._check_shard_values(path, ds, lo, hi, where, "fletcher32 checksum", keep)

    def nbytes(self, column: str | None) -> int:
        if column is None:
            self._f.flush()
            return os.path.getsize(self._path)
        total = 0

        def visit(_name: str, obj: Any) -> None:
            nonlocal total
            if isinstance(obj, h5py.Dataset):
                # Allocated chunk bytes; variable-length strings count their references, not the heap text.
                total += obj.id.get_storage_size()

        self._f[column].visititems(visit)
        return total

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        for r in self._readers.values():
            if r is not None:
                r.close()
        self._readers.clear()
        self._pool.close()
        if self._f.id.valid:
            self._f.close()


class _H5RawReader:
    """preads rows of a chunked dataset, unfiltered, or fletcher32-only with one image per chunk, at the chunk
    byte offsets HDF5 reports.

    Fletcher32 (format 2): each chunk is read whole with the 4-byte checksum HDF5 stored after it, and verified
    (olacache.store.checksums.fletcher32, HDF5's algorithm vectorised) before its row counts as read; a chunk
    that fails has its row reported, like h5py's read error. Kept instead of h5py only where it is clearly faster
    warm on a local disk (bench/README.md "Store reads", same run each): one image per chunk, 1.48-1.49x h5py
    for (576, 1024) fp16 images (two runs; 1.39-1.58x in two earlier ones; 1.35x at (256, 1024), 1.66x at
    (64, 1024)); with 64 small images per chunk, (1, 1024), it ran at 0.35-0.52x h5py, so those datasets are
    read through h5py.

    Offsets of allocated chunks are cached while the file is unchanged (its inode, mtime and size, checked by
    ``fstat`` on every read: HDF5 may move a rewritten filtered chunk); unallocated chunks are re-queried each
    time (they may be written later) and read as the fill value, or, for rows that must exist in a
    checksummed dataset, reported as damaged."""

    def __init__(self, ds: h5py.Dataset, path: Path, checked: bool) -> None:
        self._ds = ds
        self._path = path
        self._checked = checked
        self.chunk_rows = int(ds.chunks[0])
        self.row_nbytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
        self._chunk_nbytes = self.chunk_rows * self.row_nbytes + (4 if checked else 0)
        n_chunks = -(-ds.shape[0] // self.chunk_rows)
        self._off = np.full(n_chunks, -1, dtype=np.int64)  # -1: unknown or unallocated, -2: not as expected
        self._key: tuple[int, int, int] | None = None
        self._fill = ds.fillvalue
        self._fd: int | None = None

    @classmethod
    def for_dataset(cls, ds: h5py.Dataset, path: Path) -> _H5RawReader | None:
        if ds.chunks is None or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
            return None
        if ds.dtype.kind not in "iuf" or ds.dtype.byteorder == ">" or ds.file.userblock_size:
            return None
        if not hasattr(ds.id, "get_chunk_info_by_coord") or sys.byteorder != "little":
            return None
        dcpl = ds.id.get_create_plist()
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        if filters not in ([], [h5py.h5z.FILTER_FLETCHER32]):
            return None
        if filters and int(ds.chunks[0]) != 1:
            # several images per chunk (small targets, int8 scales): h5py is faster (its chunk cache verifies a
            # chunk once and serves the chunk's other rows from memory): bench/README.md "Store reads"
            return None
        return cls(ds, path, checked=bool(filters))

    def _chunk_offsets(self, chunks: np.ndarray) -> np.ndarray:
        offs = self._off[chunks]
        unknown = np.unique(chunks[offs == -1])
        if len(unknown):
            zeros = (0,) * (self._ds.ndim - 1)
            for c in unknown.tolist():
                info = self._ds.id.get_chunk_info_by_coord((c * self.chunk_rows, *zeros))
                if info.byte_offset is None:
                    continue
                if info.size != self._chunk_nbytes or info.filter_mask:
                    if self._checked:  # damaged metadata, or a chunk written without its checksum
                        self._off[c] = -2
                        continue
                    raise StoreError(
                        f"{self._path}: chunk {c} of {self._ds.name} is not {self._chunk_nbytes} raw bytes"
                    )
                self._off[c] = info.byte_offset
            offs = self._off[chunks]
        return offs

    def read_into(
        self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, pool: ReadPool, must_exist: bool = False
    ) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        st = os.fstat(self._fd)
        if self._key != (st.st_ino, st.st_mtime_ns, st.st_size):
            self._off[:] = -1
            self._key = (st.st_ino, st.st_mtime_ns, st.st_size)
        chunks = rows // self.chunk_rows
        offs = self._chunk_offsets(chunks)
        present = offs >= 0
        bad = rows[(offs == -2) | ((offs == -1) & must_exist & self._checked)]
        out[dest[offs == -2]] = 0
        out[dest[offs == -1]] = 0 if must_exist and self._checked else self._fill
        if not self._checked:
            offsets = offs[present] + (rows[present] % self.chunk_rows) * self.row_nbytes
            runs = plan_runs(self._fd, offsets, dest[present], self.row_nbytes)
            read_runs(runs, out, self.row_nbytes, str(self._path), pool.get())
            return np.zeros(0, dtype=np.int64)  # unfiltered (format 1) data carries no checksum to fail
        runs = plan_checked_runs(self._fd, offs[present], chunks[present] * self.chunk_rows,
                                 rows[present] % self.chunk_rows, dest[present], self._chunk_nbytes)
        failed = read_checked_runs(runs, out, self.row_nbytes, self.chunk_rows, fletcher32_ok, str(self._path),
                                   pool.get())
        return np.union1d(bad, np.asarray(failed, dtype=np.int64)).astype(np.int64)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
