"""The embedding store: the only contract between ``olacache`` (writes targets) and ``olatrain`` (reads them).

One row per unique image, fixed at creation; one column (group) per teacher::

    <store>/                      attrs: format_version, created_by, fingerprint, n_images, shard_size
      index/image_path   (N,)     normalised relative image paths (the join key for annotations)
      <teacher>/target   (N, *shape) float16 | int8   one image per inner chunk, shard_size images per shard
      <teacher>/scale    (N, *shape[:-1]) float32     int8 columns only: per-vector absmax scale
      <teacher>/status   (N,)     uint8 MISSING/OK/FAILED, chunked by shard_size, written LAST per shard
      <teacher>/errors   (N,)     failure reason per row ('' when ok), chunked by shard_size

Zarr v3 (default; a directory or any fsspec URL) and HDF5 (a single local file, one writer process) hold the
same logical layout. The backends live in ``store_zarr.py`` / ``store_hdf5.py``; this module owns validation,
the write protocol (data, then errors, then status as the completion marker) and quantisation, so both formats
behave identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MISSING, OK, FAILED = 0, 1, 2

FLOAT16_MAX = 65504.0
INDEX_PATH = "index/image_path"
_TARGET, _SCALE, _STATUS, _ERRORS = "target", "scale", "status", "errors"
_DTYPES = ("float16", "int8")
# Keys add_teacher owns inside a column's attrs; set_teacher_attrs may not change them because readers
# derive the on-disk layout from them.
_RESERVED_COLUMN_ATTRS = ("target_shape", "dtype", "codec")
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# Inner chunks of small targets group images so a chunk is ~128 KiB (zarr/HDF5 per-chunk overhead dominates
# below that); big targets (>= 128 KiB per image) get one image per chunk so a random read touches one chunk.
_SMALL_CHUNK_BYTES = 128 * 1024
DEFAULT_READ_THREADS = 1


class StoreError(Exception):
    """A bad store or a bad call. The message names the store and what to do."""


class StoreMismatch(StoreError):
    """An existing store differs from what the caller asked for; the message names the difference."""


class StoreLocked(StoreError):
    """An HDF5 store is held by another process (HDF5 allows one writer and no readers while it writes)."""


# ----------------------------------------------------------------------------------------------- join key


def normalize_image_path(path: str) -> str:
    """Normalise a relative image path into the store's join key.

    NFC unicode (macOS file names come back NFD), ``\\`` -> ``/``, surrounding whitespace stripped, ``.``
    segments and repeated ``/`` dropped, ``..`` resolved; absolute paths, drive letters, empty paths, NUL and
    ``..`` escaping the root are rejected with ValueError naming the path.
    """
    if not isinstance(path, str):
        raise ValueError(f"image path must be a str, got {type(path).__name__}: {path!r}")
    p = unicodedata.normalize("NFC", path).strip().replace("\\", "/")
    if not p:
        raise ValueError(f"empty image path: {path!r}")
    if "\x00" in p:
        raise ValueError(f"image path contains NUL: {path!r}")
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p) or "://" in p:
        raise ValueError(f"image path must be relative to the image root, got absolute path/URL: {path!r}")
    parts: list[str] = []
    for seg in p.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                raise ValueError(f"image path escapes the image root with '..': {path!r}")
            parts.pop()
            continue
        parts.append(seg)
    if not parts:
        raise ValueError(f"image path names no file: {path!r}")
    return "/".join(parts)


def image_set_fingerprint(paths: Sequence[str]) -> str:
    """sha256 hex of the ordered, normalised paths (NUL-separated: NUL cannot occur in a path)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(normalize_image_path(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- helpers


def _resolve_url(url: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """-> (display url, local path or None for a remote fsspec URL). ``file://`` URLs count as local so the
    local fast read path applies to them too."""
    if isinstance(url, os.PathLike):
        p = Path(os.fspath(url)).expanduser().absolute()
        return str(p), p
    if not isinstance(url, str) or not url:
        raise StoreError(f"store url must be a non-empty str or path, got {url!r}")
    if url.startswith("file://"):
        p = Path(url[len("file://") :]).expanduser().absolute()
        return url, p
    if "://" in url:
        return url, None
    return url, Path(url).expanduser().absolute()


def inner_chunk_rows(row_nbytes: int, shard_size: int) -> int:
    """Images per inner chunk: the largest divisor of shard_size whose chunk stays <= ~128 KiB (>= 1).
    A divisor, so inner chunks never straddle shards (zarr requires it; it also keeps writers disjoint)."""
    want = max(1, _SMALL_CHUNK_BYTES // max(1, row_nbytes))
    best = 1
    for c in range(1, min(want, shard_size) + 1):
        if shard_size % c == 0:
            best = c
    return best


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} must be JSON-serialisable: {e}") from None


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


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 per vector along the LAST axis -> (q int8 like x, scale float32 x.shape[:-1]).
    An all-zero vector gets scale 1 so dequantisation never divides by or multiplies with 0/NaN."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.rint(x / scale[..., None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 * scale -> float16 (computed in float32; the range was checked at write time)."""
    out = q.astype(np.float32)
    out *= scale[..., None]
    return out.astype(np.float16)


def _row_problem(row: np.ndarray) -> str | None:
    """Why a row cannot be stored, or None. Two reductions, no temporaries: NaN propagates through max/min
    and +-inf shows up as an infinite extreme."""
    if row.size == 0:
        return None
    hi, lo = float(np.max(row)), float(np.min(row))
    if not (np.isfinite(hi) and np.isfinite(lo)):
        return "non-finite values"
    amax = max(abs(hi), abs(lo))
    if amax > FLOAT16_MAX:
        return f"exceeds float16 range (max |x|={amax:.6g})"
    return None


# ----------------------------------------------------------------------------------------------- backends


class Backend(ABC):
    """What a storage format must provide; implemented by store_zarr.ZarrBackend and store_hdf5.Hdf5Backend.
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


# ----------------------------------------------------------------------------------------------- store


class EmbeddingStore:
    """A store of frozen-teacher targets, one row per unique image. See the module docstring for the layout.

    Write protocol (both formats): a shard is written whole by one writer: target (+scale) in one call, then
    errors, then status LAST. Status is the completion marker, so a crash leaves an incomplete shard (recomputed
    on resume), never a complete shard with bad data. Zarr: different processes may write different shards of
    one store concurrently (every per-shard array is chunked so a shard owns its files, and write_shard never
    touches shared metadata). HDF5: one writer process; distributed builds need format="zarr".
    """

    def __init__(self, backend: Backend, url: str, *, _mode: str) -> None:
        # Use create()/open(); the constructor only wires an opened backend.
        self._b = backend
        self.url = url
        self.format: str = backend.format
        self._mode = _mode
        attrs = backend.root_attrs()
        self.attrs: dict[str, Any] = attrs
        fv = attrs.get("format_version")
        if fv is None:
            raise StoreError(
                f"{url} is a {self.format} container but not an olacache embedding store (no format_version "
                "attr); point at a store made by `olacache build` / EmbeddingStore.create"
            )
        if int(fv) != FORMAT_VERSION:
            raise StoreError(
                f"{url} has store format_version {fv}, this olacache reads {FORMAT_VERSION}; "
                "use the olacache version that wrote it or rebuild the store"
            )
        self.n_images: int = int(attrs["n_images"])
        self.shard_size: int = int(attrs["shard_size"])
        self.fingerprint: str = str(attrs["fingerprint"])
        self.n_shards: int = -(-self.n_images // self.shard_size)
        self._image_paths: list[str] | None = None
        self._meta_cache: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        image_paths: Sequence[str],
        *,
        shard_size: int = 256,
        format: str = "zarr",
        created_by: str | None = None,
    ) -> EmbeddingStore:
        """Create an empty store whose rows are ``image_paths`` in the given order (normalised, unique).
        Refuses if something already exists at ``url``."""
        from olacache import __version__

        disp, local = _resolve_url(url)
        if format not in ("zarr", "hdf5"):
            raise StoreError(f"{disp}: unknown store format {format!r}; use 'zarr' or 'hdf5'")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise StoreError(f"{disp}: shard_size must be a positive int, got {shard_size!r}")
        paths = list(image_paths)
        if not paths:
            raise StoreError(f"{disp}: cannot create a store with no images")
        for p in paths:
            try:
                norm = normalize_image_path(p)
            except ValueError as e:
                raise StoreError(f"{disp}: {e}") from None
            if norm != p:
                raise StoreError(
                    f"{disp}: image path {p!r} is not normalised (normalize_image_path gives {norm!r}); "
                    "normalise paths before creating the store"
                )
        if len(set(paths)) != len(paths):
            seen: set[str] = set()
            dup = next(p for p in paths if p in seen or seen.add(p))  # type: ignore[func-returns-value]
            raise StoreError(f"{disp}: duplicate image path {dup!r}; store rows are unique images")
        attrs = {
            "format_version": FORMAT_VERSION,
            "created_by": created_by or f"olacache {__version__}",
            "fingerprint": image_set_fingerprint(paths),
            "n_images": len(paths),
            "shard_size": shard_size,
        }
        if format == "zarr":
            from olacache.store_zarr import ZarrBackend

            backend: Backend = ZarrBackend.create(disp, local, paths, attrs, shard_size)
        else:
            if local is None:
                raise StoreError(f"{disp}: HDF5 stores must be local files; use format='zarr' for URLs")
            from olacache.store_hdf5 import Hdf5Backend

            backend = Hdf5Backend.create(disp, local, paths, attrs, shard_size)
        store = cls(backend, disp, _mode="r+")
        store._image_paths = paths
        return store

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        mode: str = "r",
        *,
        fast_reads: bool = True,
        read_threads: int = DEFAULT_READ_THREADS,
    ) -> EmbeddingStore:
        """Open an existing store; format auto-detected (HDF5 file vs zarr group).

        ``fast_reads=False`` forces every read through the zarr/h5py APIs (the local byte-range fast path is
        checked against them in the tests and the benchmark). ``read_threads`` > 1 keeps that many reads of a
        batch in flight at once (local fast path only)."""
        if mode not in ("r", "r+"):
            raise StoreError(f"{url}: mode must be 'r' or 'r+', got {mode!r}")
        disp, local = _resolve_url(url)
        if local is not None and local.is_file():
            from olacache.store_hdf5 import Hdf5Backend, is_hdf5

            if not is_hdf5(local):
                raise StoreError(
                    f"{disp} is a file but not an HDF5 file; an embedding store is an HDF5 file or a zarr "
                    "directory"
                )
            backend: Backend = Hdf5Backend.open(
                disp, local, mode, fast_reads=fast_reads, read_threads=read_threads
            )
        elif local is not None and not local.exists():
            raise StoreError(f"{disp}: no embedding store there (path does not exist)")
        else:
            from olacache.store_zarr import ZarrBackend

            backend = ZarrBackend.open(disp, local, mode, fast_reads=fast_reads, read_threads=read_threads)
        try:
            return cls(backend, disp, _mode=mode)
        except Exception:
            backend.close()
            raise

    @staticmethod
    def exists(url: str | os.PathLike[str]) -> bool:
        """True iff an olacache embedding store (any format) exists at ``url``."""
        try:
            _, local = _resolve_url(url)
            if local is not None and not local.exists():
                return False
            with EmbeddingStore.open(url, "r"):
                return True
        except StoreLocked:
            return True  # an HDF5 store that a writer holds right now still exists
        except StoreError:
            return False

    def close(self) -> None:
        self._b.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({self.url!r}, format={self.format!r}, n_images={self.n_images}, "
            f"shard_size={self.shard_size}, teachers={self.teachers})"
        )

    # ------------------------------------------------------------------ rows

    @property
    def image_paths(self) -> list[str]:
        # Lazy: `info`-style callers should not pay for reading N strings.
        if self._image_paths is None:
            self._image_paths = [str(s) for s in self._b.read_all(INDEX_PATH)]
        return self._image_paths

    def shard_rows(self, shard: int) -> range:
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"{self.url}: shard {shard} out of range [0, {self.n_shards})")
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.n_images))

    def require_image_set(self, image_paths: Sequence[str]) -> None:
        """Raise StoreMismatch naming the first difference if the store's rows are not exactly these paths."""
        fp = image_set_fingerprint(image_paths)
        if fp == self.fingerprint:
            return
        want = [normalize_image_path(p) for p in image_paths]
        have = self.image_paths
        if len(want) != len(have):
            diff = f"{len(have)} images in the store vs {len(want)} requested"
        else:
            i = next(i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
            diff = f"row {i} is {have[i]!r} in the store but {want[i]!r} was requested"
        raise StoreMismatch(
            f"{self.url}: the store was built for a different image set ({diff}); "
            "build a new store for this image set"
        )

    # ------------------------------------------------------------------ columns

    @property
    def teachers(self) -> list[str]:
        # A column without target_shape is a half-created one (crash inside add_teacher): not a teacher.
        return sorted(c for c in self._b.list_columns() if "target_shape" in self._b.column_attrs(c))

    def _meta(self, name: str) -> dict[str, Any]:
        m = self._meta_cache.get(name)
        if m is None:
            if name not in self.teachers:
                raise StoreError(f"{self.url}: no teacher column {name!r}; available: {self.teachers}")
            a = self._b.column_attrs(name)
            m = {"shape": tuple(int(s) for s in a["target_shape"]), "dtype": str(a["dtype"])}
            self._meta_cache[name] = m
        return m

    def teacher_attrs(self, name: str) -> dict[str, Any]:
        self._meta(name)
        return self._b.column_attrs(name)

    def target_shape(self, name: str) -> tuple[int, ...]:
        return self._meta(name)["shape"]

    def target_dtype(self, name: str) -> str:
        return self._meta(name)["dtype"]

    def require_teacher_attrs(self, name: str, expected: Mapping[str, Any]) -> None:
        """Raise StoreMismatch naming every key whose stored value differs from ``expected`` (weights identity,
        preprocessing, layers, ...) — so a resumed build or a trainer never silently mixes teachers."""
        have = self.teacher_attrs(name)
        want = _jsonable(dict(expected), "expected attrs")
        diffs = [
            f"{k}: store has {have.get(k, '<unset>')!r}, requested {v!r}"
            for k, v in want.items()
            if have.get(k) != v
        ]
        if diffs:
            raise StoreMismatch(
                f"{self.url}: teacher column {name!r} differs from the request: " + "; ".join(diffs)
            )

    def _check_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")

    def add_teacher(
        self,
        name: str,
        target_shape: tuple[int, ...],
        *,
        dtype: str = "float16",
        attrs: Mapping[str, Any] | None = None,
        replace: bool = False,
        compressor: str | None = None,
    ) -> None:
        """Add an empty column. An existing column of that name is an error unless ``replace=True``, which
        deletes and recreates that column only. ``compressor="zstd"`` (zarr only) is off by default: random-ish
        fp16 features compress ~1.09x and compression disables the byte-range fast read path."""
        self._check_writable()
        if not isinstance(name, str) or not _COLUMN_NAME.match(name) or name == "index":
            raise StoreError(
                f"{self.url}: bad teacher name {name!r}; use letters, digits, '_', '-', '.', starting with a "
                "letter (and not 'index')"
            )
        if dtype not in _DTYPES:
            raise StoreError(f"{self.url}: teacher {name!r}: dtype must be one of {_DTYPES}, got {dtype!r}")
        shape = tuple(int(s) for s in target_shape)
        if not shape or any(s < 1 for s in shape):
            raise StoreError(
                f"{self.url}: teacher {name!r}: target_shape must be non-empty and positive, got {target_shape!r}"
            )
        user = _jsonable(dict(attrs or {}), f"attrs of teacher {name!r}")
        bad = [k for k in _RESERVED_COLUMN_ATTRS if k in user]
        if bad:
            raise StoreError(f"{self.url}: teacher {name!r}: attrs {bad} are set by the store itself")
        if name in self._b.list_columns() and name not in self.teachers:
            self._b.delete_column(name)  # half-created by a crashed add_teacher; it holds nothing
        elif name in self._b.list_columns():
            if not replace:
                old = self._b.column_attrs(name)
                old_shape, old_dtype = tuple(old.get("target_shape", ())), old.get("dtype")
                if (old_shape, old_dtype) != (shape, dtype):
                    raise StoreMismatch(
                        f"{self.url}: teacher column {name!r} already exists with target_shape={old_shape} "
                        f"dtype={old_dtype}, requested target_shape={shape} dtype={dtype}; pass replace=True "
                        "to recompute it"
                    )
                raise StoreError(
                    f"{self.url}: teacher column {name!r} already exists; resume it (skip complete_shards) or "
                    "pass replace=True to recompute it"
                )
            self._b.delete_column(name)
        self._meta_cache.pop(name, None)
        itemsize = 2 if dtype == "float16" else 1
        row_nbytes = int(np.prod(shape)) * itemsize
        chunk_rows = inner_chunk_rows(row_nbytes, self.shard_size)
        col_attrs = {
            "teacher": name,
            **user,
            "target_shape": list(shape),
            "dtype": dtype,
            "codec": {
                "compressor": compressor,
                "inner_chunk_rows": chunk_rows,
                "shard_rows": self.shard_size,
                **(
                    {"quantization": "symmetric absmax int8 per vector along the last axis"}
                    if dtype == "int8"
                    else {}
                ),
            },
        }
        b, n, s = self._b, self.n_images, self.shard_size
        b.create_column(name)
        b.create_array(
            f"{name}/{_TARGET}",
            (n, *shape),
            dtype,
            chunk_rows=chunk_rows,
            shard_rows=s,
            compressor=compressor,
        )
        if dtype == "int8":
            scale_rows = inner_chunk_rows(int(np.prod(shape[:-1])) * 4, s)
            b.create_array(
                f"{name}/{_SCALE}",
                (n, *shape[:-1]),
                "float32",
                chunk_rows=scale_rows,
                shard_rows=s,
                compressor=compressor,
            )
        # status/errors: plain chunks of exactly one shard, so concurrent writers of different shards never
        # share a file.
        b.create_array(f"{name}/{_STATUS}", (n,), "uint8", chunk_rows=s, shard_rows=None, compressor=None)
        b.create_array(f"{name}/{_ERRORS}", (n,), "str", chunk_rows=s, shard_rows=None, compressor=None)
        # attrs last: a column without target_shape is recognisably half-created.
        b.set_column_attrs(name, col_attrs)

    def set_teacher_attrs(self, name: str, **attrs: Any) -> None:
        """Merge JSON-able attrs into a column's attrs (e.g. per-channel mean/std at build end). Shared
        metadata: call it from one process (rank 0), never from inside a per-shard write."""
        self._check_writable()
        self._meta(name)
        new = _jsonable(attrs, f"attrs of teacher {name!r}")
        bad = [k for k in _RESERVED_COLUMN_ATTRS if k in new]
        if bad:
            raise StoreError(f"{self.url}: teacher {name!r}: attrs {bad} are set by the store itself")
        merged = {**self._b.column_attrs(name), **new}
        self._b.set_column_attrs(name, merged)

    # ------------------------------------------------------------------ status

    def status(self, name: str) -> np.ndarray:
        self._meta(name)
        return np.asarray(self._b.read_all(f"{name}/{_STATUS}"), dtype=np.uint8)

    def complete_shards(self, name: str) -> np.ndarray:
        """bool (n_shards,): a shard is complete iff none of its status entries is MISSING."""
        missing = self.status(name) == MISSING
        starts = np.arange(0, self.n_images, self.shard_size)
        return ~np.logical_or.reduceat(missing, starts)

    def errors(self, name: str) -> list[tuple[str, str]]:
        """(image_path, reason) for every FAILED row."""
        st = self.status(name)
        failed = np.nonzero(st == FAILED)[0]
        if len(failed) == 0:
            return []
        reasons = self._b.read_all(f"{name}/{_ERRORS}")
        paths = self.image_paths
        return [(paths[i], str(reasons[i]) or "failed (no reason recorded)") for i in failed]

    # ------------------------------------------------------------------ write

    def write_shard(
        self, name: str, shard: int, values: np.ndarray, status: np.ndarray, errors: Sequence[str]
    ) -> None:
        """Write one whole shard. ``values`` float (n_rows, *target_shape); ``status`` uint8 OK/FAILED per row;
        ``errors`` a reason per row ('' when ok). Rows not OK are stored as zeros. Rows whose values are
        non-finite or exceed the float16 range become FAILED with a reason (int8 columns dequantise to float16,
        so the same range applies)."""
        self._check_writable()
        meta = self._meta(name)
        shape, dtype = meta["shape"], meta["dtype"]
        rows = self.shard_rows(shard)
        n = len(rows)
        values = np.asarray(values)
        if values.shape != (n, *shape):
            raise StoreError(
                f"{self.url}: write_shard({name!r}, {shard}): values shape {values.shape} != {(n, *shape)} "
                f"(shard {shard} has {n} rows)"
            )
        if values.dtype.kind != "f":
            raise StoreError(
                f"{self.url}: write_shard({name!r}, {shard}): values must be floating, got {values.dtype}"
            )
        st = np.array(status, dtype=np.uint8, copy=True).reshape(-1)
        if st.shape != (n,):
            raise StoreError(f"{self.url}: write_shard({name!r}, {shard}): status shape {st.shape} != ({n},)")
        if not np.isin(st, (OK, FAILED)).all():
            raise StoreError(
                f"{self.url}: write_shard({name!r}, {shard}): status entries must be OK ({OK}) or FAILED "
                f"({FAILED}); a shard is written whole"
            )
        errs = [str(e) for e in errors]
        if len(errs) != n:
            raise StoreError(
                f"{self.url}: write_shard({name!r}, {shard}): {len(errs)} error strings for {n} rows"
            )

        for i in np.nonzero(st == OK)[0]:
            why = _row_problem(values[i])
            if why is not None:
                st[i], errs[i] = FAILED, why
        for i in range(n):
            if st[i] == OK:
                errs[i] = ""
            elif not errs[i]:
                errs[i] = "failed (no reason given)"

        ok = st == OK
        data: np.ndarray
        scale: np.ndarray | None = None
        if dtype == "float16":
            if ok.all():
                data = values.astype(np.float16, copy=False)
            else:
                data = np.zeros((n, *shape), dtype=np.float16)
                for i in np.nonzero(ok)[0]:
                    data[i] = values[i]
        else:
            data = np.zeros((n, *shape), dtype=np.int8)
            scale = np.ones((n, *shape[:-1]), dtype=np.float32)
            # Per row keeps the float32 temporaries at one image, not one shard.
            for i in np.nonzero(ok)[0]:
                data[i], scale[i] = quantize_int8(values[i])
        self._write_values(name, rows.start, data, scale)
        self._write_errors(name, rows.start, errs)
        self._write_status(name, rows.start, st)

    # Three steps as separate methods so the tests can simulate a crash between them.
    def _write_values(self, name: str, start: int, data: np.ndarray, scale: np.ndarray | None) -> None:
        self._b.write(f"{name}/{_TARGET}", start, data)
        if scale is not None:
            self._b.write(f"{name}/{_SCALE}", start, scale)

    def _write_errors(self, name: str, start: int, errs: list[str]) -> None:
        self._b.write(f"{name}/{_ERRORS}", start, np.array(errs, dtype=object))

    def _write_status(self, name: str, start: int, st: np.ndarray) -> None:
        self._b.flush()  # HDF5: data reaches the file before the completion marker does
        self._b.write(f"{name}/{_STATUS}", start, st)
        self._b.flush()

    # ------------------------------------------------------------------ read

    def read_rows(self, name: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float16 (len(rows), *shape) in the requested order (duplicates allowed); int8 columns dequantised.
        Rows are sorted, deduplicated and coalesced into as few reads as possible."""
        r = self._check_rows(rows)
        out = aligned_empty((len(r), *self.target_shape(name)), np.float16)
        self._read_into(name, r, out, np.arange(len(r)))
        return out

    def _check_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise StoreError(
                f"{self.url}: rows must be a 1-D integer array, got shape {r.shape} dtype {r.dtype}"
            )
        r = r.astype(np.int64, copy=False)
        if r.size and (r.min() < 0 or r.max() >= self.n_images):
            raise StoreError(
                f"{self.url}: rows out of range [0, {self.n_images}): min {r.min()}, max {r.max()}"
            )
        return r

    def _read_into(self, name: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """out[dest[k]] = row rows[k] of column ``name`` (as float16)."""
        if len(rows) == 0:
            return
        meta = self._meta(name)
        uniq, udest, dup_src, dup_dst = plan_reads(rows, dest)
        if meta["dtype"] == "float16":
            self._b.read_rows_into(f"{name}/{_TARGET}", uniq, out, udest)
        else:
            k = np.arange(len(uniq))
            q = aligned_empty((len(uniq), *meta["shape"]), np.int8)
            s = np.empty((len(uniq), *meta["shape"][:-1]), dtype=np.float32)
            self._b.read_rows_into(f"{name}/{_TARGET}", uniq, q, k)
            self._b.read_rows_into(f"{name}/{_SCALE}", uniq, s, k)
            out[udest] = dequantize_int8(q, s)
        if len(dup_dst):
            out[dup_dst] = out[dup_src]

    def nbytes(self, name: str | None = None) -> int:
        """Bytes on disk of one column, or of the whole store."""
        if name is not None:
            self._meta(name)
        return int(self._b.nbytes(name))


# ----------------------------------------------------------------------------------------------- trainer side


class TargetReader:
    """Trainer-facing reader.

    Picklable; opens the store lazily on first use in EACH process (it remembers ``os.getpid()`` and reopens
    after a fork) so it is safe inside DataLoader workers: zarr's event-loop thread and h5py handles do not
    survive fork, and handles must not be pickled. Status is snapshotted per process at open: a row counts as
    available iff its status was OK then (for a finished store that is the store).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        teachers: Sequence[str] | None = None,
        *,
        read_threads: int = DEFAULT_READ_THREADS,
    ) -> None:
        self.url = url
        self.read_threads = read_threads
        self._requested = None if teachers is None else list(teachers)
        self._reset()
        # Validate the teacher names now, in the constructing process, so a typo fails before any worker
        # starts. The handles this opens are dropped on fork/pickle.
        store = self._store_()
        available = store.teachers
        if self._requested is None:
            self._teachers = available
        else:
            unknown = [t for t in self._requested if t not in available]
            if unknown:
                raise StoreError(f"{store.url}: unknown teacher(s) {unknown}; the store has {available}")
            self._teachers = list(self._requested)
        self._shapes = {t: store.target_shape(t) for t in self._teachers}

    def _reset(self) -> None:
        self._pid: int | None = None
        self._store: EmbeddingStore | None = None
        self._row_of: dict[str, int] | None = None
        self._ok: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_pid", "_store", "_row_of", "_ok"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _store_(self) -> EmbeddingStore:
        pid = os.getpid()
        if self._store is None or self._pid != pid:
            if self._store is not None:
                # Inherited across fork: never close/use it here (closing can touch library state owned by the
                # parent's threads); park it so it is not garbage-collected either.
                _ABANDONED.append(self._store)
            self._reset()
            self._store = EmbeddingStore.open(self.url, "r", read_threads=self.read_threads)
            self._pid = pid
        return self._store

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._reset()

    @property
    def teachers(self) -> list[str]:
        return list(self._teachers)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def image_paths(self) -> list[str]:
        return self._store_().image_paths

    def rows_for(self, paths: Sequence[str | None]) -> np.ndarray:
        """int64 row per path (normalised here), -1 for None or a path not in the store. An invalid path
        (absolute, escaping the root) raises ValueError: that is a data bug, not a missing target."""
        store = self._store_()
        if self._row_of is None:
            self._row_of = {p: i for i, p in enumerate(store.image_paths)}
        row_of = self._row_of
        out = np.full(len(paths), -1, dtype=np.int64)
        for k, p in enumerate(paths):
            if p is not None:
                r = row_of.get(p)
                if r is None:
                    r = row_of.get(normalize_image_path(p), -1)
                out[k] = r
        return out

    def status(self, teacher: str) -> np.ndarray:
        """uint8 (N,) status of one teacher column (MISSING/OK/FAILED), read in this process."""
        if teacher not in self._teachers:
            raise StoreError(
                f"{self.url}: teacher {teacher!r} is not read by this reader; it reads {self._teachers}"
            )
        return self._store_().status(teacher)

    def _ok_mask(self, teacher: str) -> np.ndarray:
        m = self._ok.get(teacher)
        if m is None:
            m = self._store_().status(teacher) == OK
            self._ok[teacher] = m
        return m

    def fetch(self, paths: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One batched read. -> (targets[teacher] float16 (B, *shape), zeros where unavailable;
        ok[teacher] bool (B,) = the path is in the store and its status is OK)."""
        import torch

        store = self._store_()
        rows = self.rows_for(paths)
        targets: dict[str, torch.Tensor] = {}
        oks: dict[str, torch.Tensor] = {}
        have = rows >= 0
        for t in self._teachers:
            ok = np.zeros(len(rows), dtype=bool)
            ok[have] = self._ok_mask(t)[rows[have]]
            idx = np.nonzero(ok)[0]
            tensor, out = _new_batch((len(rows), *self._shapes[t]))
            if len(idx) < len(rows):
                out[~ok] = 0
            store._read_into(t, rows[idx], out, idx)
            targets[t] = tensor
            oks[t] = torch.from_numpy(ok)
        return targets, oks


def _new_batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised float16 batch as (tensor, numpy view of the same memory).

    - Inside a DataLoader worker it is allocated in shared memory up front (as torch's default_collate does),
      so handing the batch to the main process passes a file descriptor instead of copying the whole batch
      (38 MB for 32 x 576 x 1024) into shared memory a second time.
    - Elsewhere numpy allocates it: numpy asks for transparent huge pages on big arrays and torch.empty does
      not; first-touch page faults on a 38 MB torch.empty batch cost ~20 ms here vs ~5 ms for np.empty,
      more than the reads themselves. Page-aligned (see aligned_empty); shared memory already is."""
    import torch

    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=torch.float16)
            storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
            t = proto.new(storage).view(shape)
            return t, t.numpy()
        except Exception:  # private torch API; an ordinary tensor is always correct, only slower
            pass
    a = aligned_empty(shape, np.float16)
    return torch.from_numpy(a), a


# Store handles inherited through fork; kept referenced so their finalisers never run in the child.
_ABANDONED: list[EmbeddingStore] = []
