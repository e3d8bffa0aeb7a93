"""What a storage format must provide (implemented by ``ZarrBackend`` and ``Hdf5Backend``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

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
    def write(self, path: str, start: int, values: np.ndarray) -> None: ...

    @abstractmethod
    def read_all(self, path: str) -> np.ndarray: ...

    # set by each backend's __init__: raw-read switch, per-array raw readers (None = not applicable), threads
    _fast_reads: bool
    _readers: dict[str, Any]
    _pool: ReadPool

    def read_rows_into(self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """out[dest[k]] = array[rows[k]]; ``rows`` sorted and unique. Uses the backend's raw pread reader for
        that array when it has one (local, uncompressed), else the library's own (batched) reads."""
        if len(rows) == 0:
            return
        if path not in self._readers:
            self._readers[path] = self._raw_reader(path) if self._fast_reads else None
        reader = self._readers[path]
        if reader is not None:
            reader.read_into(rows, out, dest, self._pool)
        else:
            self._library_read_into(path, rows, out, dest)

    @abstractmethod
    def _raw_reader(self, path: str) -> Any | None:
        """A reader with ``read_into(rows, out, dest, pool)`` over the array's bytes, or None."""

    @abstractmethod
    def _library_read_into(self, path: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """The fallback through zarr/h5py."""

    @abstractmethod
    def nbytes(self, column: str | None) -> int: ...

    def flush(self) -> None:  # noqa: B027 - optional hook, zarr writes are durable per call
        pass

    @abstractmethod
    def close(self) -> None: ...
