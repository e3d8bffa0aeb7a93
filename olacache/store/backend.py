"""What a storage format must provide (implemented by ``ZarrBackend`` and ``Hdf5Backend``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from olacache.store.format import StoreError
from olacache.store.pread import ReadPool


class Backend(ABC):
    """What a storage format must provide; implemented by zarr_backend.ZarrBackend and hdf5_backend.Hdf5Backend.
    Paths are ``"<column>/<array>"`` or ``"index/image_path"``."""

    format: str

    @abstractmethod
    def root_attrs(self) -> dict[str, Any]: ...

    @abstractmethod
    def list_columns(self) -> list[str]:
        """Every column group, including a half-created one (without ``target_shape`` in its attrs)."""

    @abstractmethod
    def create_column(self, name: str) -> None: ...

    @abstractmethod
    def delete_column(self, name: str) -> None: ...

    @abstractmethod
    def column_attrs(self, name: str) -> dict[str, Any]: ...

    @abstractmethod
    def set_column_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        """Replace the column's attrs with ``attrs``."""

    @abstractmethod
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
        """dtype: a numpy dtype name or "str". Chunks are (chunk_rows, *shape[1:]); shard_rows (zarr sharding
        codec; ignored by HDF5) groups chunks into one file per store shard."""

    @abstractmethod
    def write(self, path: str, start: int, values: np.ndarray) -> None:
        """``values`` of a ``"str"`` array are a sequence of str (the backend encodes them)."""

    @abstractmethod
    def read_all(self, path: str) -> np.ndarray: ...

    @abstractmethod
    def has_array(self, path: str) -> bool: ...

    def check_space(self, nbytes: int) -> None:  # noqa: B027 - optional hook
        """Raise StoreError if a write of ``nbytes`` would not fit (local stores; remote ones cannot tell)."""

    def resize(self, path: str, n_rows: int) -> None:
        raise StoreError(f"{self.format} stores cannot be extended")

    def write_index(self, paths: list[str]) -> None:
        raise StoreError(f"{self.format} stores cannot be extended")

    def set_root_attrs(self, attrs: dict[str, Any]) -> None:
        raise StoreError(f"{self.format} stores cannot be extended")

    # set by each backend's __init__: raw-read switch, per-array raw readers (None = not applicable), threads
    _fast_reads: bool
    _readers: dict[str, Any]
    _pool: ReadPool
    # optional local cache of object-storage chunks (olacache.store.chunk_cache); local stores ignore it
    chunk_cache: Any = None

    def read_rows_into(
        self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, must_exist: bool = False
    ) -> np.ndarray:
        """out[dest[k]] = array[rows[k]]; ``rows`` sorted and unique. Uses the backend's raw pread reader for
        that array when it has one (local, uncompressed), else the library's own (batched) reads.

        -> int64 array of the rows whose chunk failed its checksum (or is gone though it must exist); their
        slots in ``out`` are zeroed. Never garbage: a caller either drops those rows or raises.
        ``must_exist``: the rows are complete (status OK), so a missing shard file or chunk is damage too
        (otherwise it reads as the fill value, like a never-written row)."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.int64)
        if path not in self._readers:
            self._readers[path] = self._raw_reader(path) if self._fast_reads else None
        reader = self._readers[path]
        if reader is not None:
            return reader.read_into(rows, out, dest, self._pool, must_exist)
        return self._library_read_into(path, rows, out, dest, must_exist)

    @abstractmethod
    def _raw_reader(self, path: str) -> Any | None:
        """A reader with ``read_into(rows, out, dest, pool)`` over the array's bytes, or None."""

    @abstractmethod
    def _library_read_into(
        self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, must_exist: bool = False
    ) -> np.ndarray:
        """The fallback through zarr/h5py; returns the bad rows like read_rows_into."""

    @abstractmethod
    def check_shard(
        self, path: str, shard: int, shard_rows: int, keep: list[np.ndarray] | None = None
    ) -> list[str]:
        """Problems of one shard of a sharded array (file gone, unparsable, a chunk failing its checksum), as
        messages naming the row range; [] when it is whole. Never raises for damaged data. ``keep``: when
        whole, the shard's values are appended to it (so a caller can checksum them without reading again)."""

    def _check_shard_values(
        self, path: str, arr: Any, lo: int, hi: int, where: str, checksum: str, keep: list[np.ndarray] | None
    ) -> list[str]:
        """The value half of ``check_shard`` for both backends: rows lo..hi-1 of ``arr`` (a zarr array or an
        h5py dataset: ``shape``, ``dtype``, ``chunks``) read through the library, one message per inner chunk
        failing ``checksum``; [] when whole (the values then appended to ``keep``)."""
        scratch = np.empty((hi - lo, *arr.shape[1:]), dtype=arr.dtype)
        try:
            bad = self._library_read_into(path, np.arange(lo, hi), scratch, np.arange(hi - lo))
        except Exception as e:
            return [f"{where}: unreadable ({type(e).__name__}: {str(e)[:200]})"]
        if len(bad):
            c = int(arr.chunks[0])
            return [f"{where}: inner chunk rows {k * c}-{min(k * c + c, arr.shape[0]) - 1} fails its {checksum}"
                    for k in sorted({int(r) // c for r in bad})]
        if keep is not None:
            keep.append(scratch)
        return []

    @abstractmethod
    def nbytes(self, column: str | None) -> int: ...

    def flush(self) -> None:  # noqa: B027 - optional hook, zarr writes are durable per call
        pass

    @abstractmethod
    def close(self) -> None: ...
