"""``EmbeddingStore``: create, open, check, write and read a store of frozen-teacher targets.

One row per unique image, fixed at creation; one column (group) per teacher; the layout is in
``olacache.store.format``. Zarr v3 (default; a directory or any fsspec URL) and HDF5 (a single local file, one
writer process) hold the same logical layout through ``zarr_backend`` / ``hdf5_backend``; this module owns
validation, compatibility checks, the write protocol (data, then errors, then status as the completion marker)
and quantisation, so both formats behave identically.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from olacache.inputs.keys import image_set_fingerprint, normalize_image_path
from olacache.store.backend import Backend
from olacache.store.checks import check_new_paths, check_teacher_args
from olacache.store.chunk_cache import ChunkCache
from olacache.store.format import (
    DEFAULT_READ_THREADS,
    DIGEST,
    ERRORS,
    FAILED,
    FORMAT_VERSION,
    INDEX_PATH,
    KINDS,
    MISSING,
    PAD,
    READABLE_VERSIONS,
    RESERVED_COLUMN_ATTRS,
    SCALE,
    STATUS,
    TARGET,
    CorruptChunk,
    StoreError,
    StoreLocked,
    StoreMismatch,
    default_kind,
    describe_differences,
    get_dotted,
    inner_chunk_rows,
    jsonable,
    resolve_url,
)
from olacache.store.integrity import check_shard, describe_bad_rows, is_decode_error, shard_digest
from olacache.store.pread import aligned_empty, plan_reads
from olacache.store.quant import dequantize_int8, encode_shard


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
        if int(fv) not in READABLE_VERSIONS:
            raise StoreError(
                f"{url} has store format_version {fv}, this olacache reads {list(READABLE_VERSIONS)}; "
                "use the olacache version that wrote it or rebuild the store"
            )
        self.version = int(fv)
        if self.version != FORMAT_VERSION and _mode == "r+":
            raise StoreError(
                f"{url} is a format_version {fv} store (readable, not writable by this olacache); convert it "
                f"in place with `olacache upgrade {url}`"
            )
        self.n_images: int = int(attrs["n_images"])
        self.shard_size: int = int(attrs["shard_size"])
        self.fingerprint: str = str(attrs["fingerprint"])
        self.n_shards: int = -(-self.n_images // self.shard_size)
        self._image_paths: list[str] | None = None
        self._meta_cache: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, np.ndarray] = {}
        # column -> shards whose status chunk could not be decoded at the last status() call
        self.damaged_status: dict[str, list[int]] = {}
        # object storage (s3://, gs://, ...) rather than a local path: reads are network round trips
        self.is_remote: bool = resolve_url(url)[1] is None

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

        disp, local = resolve_url(url)
        if format not in ("zarr", "hdf5"):
            raise StoreError(f"{disp}: unknown store format {format!r}; use 'zarr' or 'hdf5'")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise StoreError(f"{disp}: shard_size must be a positive int, got {shard_size!r}")
        paths = list(image_paths)
        if not paths:
            raise StoreError(f"{disp}: cannot create a store with no images")
        check_new_paths(disp, paths)
        attrs = {
            "format_version": FORMAT_VERSION,
            "created_by": created_by or f"olacache {__version__}",
            "fingerprint": image_set_fingerprint(paths),
            "n_images": len(paths),
            "shard_size": shard_size,
        }
        if format == "zarr":
            from olacache.store.zarr_backend import ZarrBackend

            backend: Backend = ZarrBackend.create(disp, local, paths, attrs, shard_size)
        else:
            if local is None:
                raise StoreError(f"{disp}: HDF5 stores must be local files; use format='zarr' for URLs")
            from olacache.store.hdf5_backend import Hdf5Backend

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
        chunk_cache: ChunkCache | None = None,
    ) -> EmbeddingStore:
        """Open an existing store; format auto-detected (HDF5 file vs zarr group).

        ``fast_reads=False`` forces every read through the zarr/h5py APIs (the local byte-range fast path is
        checked against them in the tests and the benchmark). ``read_threads`` > 1 keeps that many reads of a
        batch in flight at once (local fast path only). ``chunk_cache``: keep the target chunks read from an
        object-storage store on local disk too (olacache.store.chunk_cache; ignored for local stores)."""
        if mode not in ("r", "r+"):
            raise StoreError(f"{url}: mode must be 'r' or 'r+', got {mode!r}")
        disp, local = resolve_url(url)
        if local is not None and local.is_file():
            from olacache.store.hdf5_backend import Hdf5Backend, is_hdf5

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
            from olacache.store.zarr_backend import ZarrBackend

            backend = ZarrBackend.open(disp, local, mode, fast_reads=fast_reads, read_threads=read_threads)
            if local is None:
                backend.chunk_cache = chunk_cache
        try:
            return cls(backend, disp, _mode=mode)
        except Exception:
            backend.close()
            raise

    @staticmethod
    def exists(url: str | os.PathLike[str]) -> bool:
        """True iff an olacache embedding store (any format) exists at ``url``."""
        try:
            _, local = resolve_url(url)
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
        """Raise StoreMismatch if the store's rows are not exactly these paths (normalised, in this order).

        The one image-set check (``olacache build`` calls it before any work): the message says how many
        images differ either way, with examples, or that the same images come in another order."""
        fp = image_set_fingerprint(image_paths)
        if fp == self.fingerprint:
            return
        want = [normalize_image_path(p) for p in image_paths]
        have = [p for p in self.image_paths if p]  # without an extension's padding rows
        if self.attrs.get("extended") and set(want) == set(have) and len(want) == len(have):
            return  # an extended store: rows are no longer globally sorted; the SET is what must match
        detail = [f"{len(have)} images in the store vs {len(want)} requested"]
        added, removed = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if added:
            detail.append(f"{len(added)} requested image(s) not in the store, e.g. {added[:3]}")
        if removed:
            detail.append(f"{len(removed)} store image(s) not requested, e.g. {removed[:3]}")
        if not added and not removed:
            i = next(i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
            detail.append(f"the same images in another order: row {i} is {have[i]!r} in the store but "
                          f"{want[i]!r} was requested")
        raise StoreMismatch(
            f"{self.url}: the store was built for a different image set ({'; '.join(detail)}); build a new "
            "store (--out elsewhere) for this image set"
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

    def teacher_kind(self, name: str) -> str:
        """``"spatial"`` or ``"global"`` (docs/method.md §3.4): recorded per column, derived from the target
        shape for columns written before the field existed."""
        kind = self.teacher_attrs(name).get("kind")
        return str(kind) if kind in KINDS else default_kind(self.target_shape(name))

    def require_teacher_attrs(self, name: str, expected: Mapping[str, Any]) -> None:
        """The one column-compatibility check: raise StoreMismatch listing EVERY difference between the
        column's attrs and ``expected`` (weights identity, preprocessing spec, dtype, shape, ...), so a resumed
        build or a trainer never silently mixes targets. Keys may be dotted (``"identity.weights_sha256"``) to
        compare one field of a nested attr; nested dicts are compared leaf by leaf."""
        have = self.teacher_attrs(name)
        want = jsonable(dict(expected), "expected attrs")
        diffs: list[str] = []
        for key, value in want.items():
            diffs += describe_differences(get_dotted(have, key), value, key)
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
        kind: str | None = None,
    ) -> None:
        """Add an empty column. An existing column of that name is an error unless ``replace=True``, which
        deletes and recreates that column only. ``compressor="zstd"`` (zarr only) is off by default: random-ish
        fp16 features compress ~1.09x and compression disables the byte-range fast read path. ``kind``
        (``"spatial"``/``"global"``, default from the shape) is recorded for the trainer (docs/method.md §3.4)."""
        self._check_writable()
        shape, kind, user = check_teacher_args(self.url, name, target_shape, dtype, kind, attrs)
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
            # a fresh id per (re)creation: a reader that sees it change knows the column was replaced under it
            "generation": uuid.uuid4().hex,
            "target_shape": list(shape),
            "dtype": dtype,
            "kind": kind,
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
            f"{name}/{TARGET}",
            (n, *shape),
            dtype,
            chunk_rows=chunk_rows,
            shard_rows=s,
            compressor=compressor,
        )
        if dtype == "int8":
            scale_rows = inner_chunk_rows(int(np.prod(shape[:-1])) * 4, s)
            b.create_array(
                f"{name}/{SCALE}",
                (n, *shape[:-1]),
                "float32",
                chunk_rows=scale_rows,
                shard_rows=s,
                compressor=compressor,
            )
        # status/errors: plain chunks of exactly one shard, so concurrent writers of different shards never
        # share a file.
        b.create_array(f"{name}/{STATUS}", (n,), "uint8", chunk_rows=s, shard_rows=None, compressor=None)
        b.create_array(f"{name}/{ERRORS}", (n,), "str", chunk_rows=s, shard_rows=None, compressor=None)
        # one crc32c per shard of its stored bytes (one chunk per shard, owned by that shard's writer):
        # the chunk checksums cannot see two whole shard files swapped, this can (olacache verify)
        b.create_array(f"{name}/{DIGEST}", (self.n_shards,), "uint32", chunk_rows=1, shard_rows=None,
                       compressor=None)
        # attrs last: a column without target_shape is recognisably half-created.
        b.set_column_attrs(name, col_attrs)

    def set_teacher_attrs(self, name: str, **attrs: Any) -> None:
        """Merge JSON-able attrs into a column's attrs (e.g. per-channel mean/std at build end). Shared
        metadata: call it from one process (rank 0), never from inside a per-shard write."""
        self._check_writable()
        self._meta(name)
        new = jsonable(attrs, f"attrs of teacher {name!r}")
        bad = [k for k in RESERVED_COLUMN_ATTRS if k in new]
        if bad:
            raise StoreError(f"{self.url}: teacher {name!r}: attrs {bad} are set by the store itself")
        merged = {**self._b.column_attrs(name), **new}
        self._b.set_column_attrs(name, merged)

    # ------------------------------------------------------------------ status

    def status(self, name: str) -> np.ndarray:
        """uint8 (N,) MISSING/OK/FAILED. A damaged status chunk (bad checksum, truncated) never crashes the
        caller: its rows read as MISSING (so a build recomputes that shard and a trainer skips it) and the
        shard is listed in ``damaged_status[name]`` (``olacache verify`` reports it)."""
        self._meta(name)
        path = f"{name}/{STATUS}"
        try:
            st = np.asarray(self._b.read_all(path), dtype=np.uint8)
            self.damaged_status[name] = []
            return st
        except Exception as e:
            if not is_decode_error(e):
                raise
        st = np.zeros(self.n_images, dtype=np.uint8)
        bad = self._b.read_rows_into(path, np.arange(self.n_images), st, np.arange(self.n_images))
        st[bad] = MISSING
        self.damaged_status[name] = sorted({int(r) // self.shard_size for r in bad})
        return st

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
        reasons = self._b.read_all(f"{name}/{ERRORS}")
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
        rows = self.shard_rows(shard)
        try:
            data, scale, st, errs = encode_shard(values, status, errors, len(rows), meta["shape"], meta["dtype"])
        except ValueError as e:
            raise StoreError(f"{self.url}: write_shard({name!r}, {shard}): {e} (shard {shard} has "
                             f"{len(rows)} rows)") from None
        need = data.nbytes + (0 if scale is None else scale.nbytes)
        self._b.check_space(need)  # HDF5: a write that fills the disk can corrupt the file; refuse before it
        try:
            self._write_values(name, rows.start, data, scale)
            self._write_errors(name, rows.start, errs)
            if self._b.has_array(f"{name}/{DIGEST}"):  # absent in columns upgraded from format 1
                # padding rows (an extension's, always at the shard's end) are left out, as check_shard expects
                k = int((st != PAD).sum())
                digest = shard_digest(data[:k], None if scale is None else scale[:k])
                self._b.write(f"{name}/{DIGEST}", shard, np.array([digest], dtype=np.uint32))
            self._write_status(name, rows.start, st)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"{self.url}: no space left on the device while writing shard {shard} of {name!r} ({e}); "
                    "every shard completed before it is kept: free space and run the same build again"
                ) from None
            raise

    # Three steps as separate methods so the tests can simulate a crash between them.
    def _write_values(self, name: str, start: int, data: np.ndarray, scale: np.ndarray | None) -> None:
        self._b.write(f"{name}/{TARGET}", start, data)
        if scale is not None:
            self._b.write(f"{name}/{SCALE}", start, scale)

    def _write_errors(self, name: str, start: int, errs: list[str]) -> None:
        self._b.write(f"{name}/{ERRORS}", start, np.array(errs, dtype=object))

    def _write_status(self, name: str, start: int, st: np.ndarray) -> None:
        self._b.flush()  # HDF5: data reaches the file before the completion marker does
        self._b.write(f"{name}/{STATUS}", start, st)
        self._b.flush()

    # ------------------------------------------------------------------ read

    def read_rows(self, name: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float16 (len(rows), *shape) in the requested order (duplicates allowed); int8 columns dequantised.
        Rows are sorted, deduplicated and coalesced into as few reads as possible. A row whose stored chunk
        fails its checksum raises CorruptChunk naming the store, teacher, shard and rows."""
        r = self._check_rows(rows)
        out = aligned_empty((len(r), *self.target_shape(name)), np.float16)
        bad = self._read_into(name, r, out, np.arange(len(r)))
        if len(bad):
            raise CorruptChunk(self.describe_bad_rows(name, bad), bad.tolist())
        return out

    def describe_bad_rows(self, name: str, bad: np.ndarray) -> str:
        """One line naming the store, teacher, shards and row ranges of damaged rows."""
        return describe_bad_rows(self.url, name, self.shard_size, bad)

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

    def _read_into(
        self, name: str, rows: np.ndarray, out: np.ndarray, dest: np.ndarray, must_exist: bool = False
    ) -> np.ndarray:
        """out[dest[k]] = row rows[k] of column ``name`` (as float16). -> sorted unique rows whose stored
        bytes failed a checksum (their slots are zeroed, never garbage)."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.int64)
        meta = self._meta(name)
        uniq, udest, dup_src, dup_dst = plan_reads(rows, dest)
        if meta["dtype"] == "float16":
            bad = self._b.read_rows_into(f"{name}/{TARGET}", uniq, out, udest, must_exist)
        else:
            k = np.arange(len(uniq))
            q = aligned_empty((len(uniq), *meta["shape"]), np.int8)
            s = np.empty((len(uniq), *meta["shape"][:-1]), dtype=np.float32)
            bad = np.union1d(
                self._b.read_rows_into(f"{name}/{TARGET}", uniq, q, k, must_exist),
                self._b.read_rows_into(f"{name}/{SCALE}", uniq, s, k, must_exist),
            )
            out[udest] = dequantize_int8(q, s)
            if len(bad):
                out[udest[np.isin(uniq, bad)]] = 0
        if len(dup_dst):
            out[dup_dst] = out[dup_src]
        return np.unique(bad).astype(np.int64)

    # ------------------------------------------------------------------ integrity

    def check_shard(self, name: str, shard: int, status: np.ndarray | None = None) -> list[str]:
        """Problems of one shard of a column (files exist, parse, pass their checksums and the shard digest);
        [] when whole. Never raises on damage. See olacache.store.integrity.check_shard."""
        return check_shard(self, name, shard, status)

    def nbytes(self, name: str | None = None) -> int:
        """Bytes on disk of one column, or of the whole store."""
        if name is not None:
            self._meta(name)
        return int(self._b.nbytes(name))
