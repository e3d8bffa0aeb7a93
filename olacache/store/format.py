"""The store's on-disk vocabulary: layout names, status codes, errors and the small rules both backends share.

Logical layout (Zarr v3 group, or one HDF5 file mirroring it)::

    <store>/                      attrs: format_version, created_by, fingerprint, n_images, shard_size
      index/image_path   (N,)     normalised relative image paths (the join key, olacache.inputs.keys)
      <teacher>/target   (N, *shape) float16 | int8   one image per inner chunk, shard_size images per shard
      <teacher>/scale    (N, *shape[:-1]) float32     int8 columns only: per-vector absmax scale
      <teacher>/status   (N,)     uint8 MISSING/OK/FAILED, chunked by shard_size, written LAST per shard
      <teacher>/errors   (N,)     failure reason per row ('' when ok), chunked by shard_size
      <teacher>/digest   (n_shards,) uint32  crc32c of each shard's stored target (+scale) bytes (format 2)

Format 2 (this version) vs 1: in Zarr, the two string arrays are stored in core Zarr v3 data types so every
Zarr client reads them (``olacache.store.strings``): ``index/path_utf8`` + ``index/path_offsets`` and
``<teacher>/error_utf8``; every numeric chunk carries a crc32c (inside the sharding codec for target/scale);
HDF5 attributes are native where they are scalars or arrays and numeric datasets use the fletcher32 filter.
Format-1 stores open read-only; ``olacache upgrade`` converts them in place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2
# Versions this code reads; older ones read-only until `olacache upgrade` converts them.
READABLE_VERSIONS = (1, 2)
MISSING, OK, FAILED = 0, 1, 2
# a row with no image: padding up to a shard boundary before the rows an extension added (olacache.store.extend)
PAD = 3

FLOAT16_MAX = 65504.0
INDEX_PATH = "index/image_path"
TARGET, SCALE, STATUS, ERRORS = "target", "scale", "status", "errors"
DIGEST = "digest"
DTYPES = ("float16", "int8")
# How the trainer treats a column (docs/method.md §3.4): "spatial" = a (tokens, C) grid whose task tokens are
# group means of a (tokens, H) parameter that is also the predictor's query; "global" = one (1, C) vector
# predicted from one pooled query.
KINDS = ("spatial", "global")
# Keys add_teacher owns inside a column's attrs; set_teacher_attrs may not change them because readers
# derive the on-disk layout (and the trainer the teacher kind) from them.
RESERVED_COLUMN_ATTRS = ("target_shape", "dtype", "codec", "kind", "generation")
COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# Inner chunks of small targets group images so a chunk is ~128 KiB (zarr/HDF5 per-chunk overhead dominates
# below that); big targets (>= 128 KiB per image) get one image per chunk so a random read touches one chunk.
SMALL_CHUNK_BYTES = 128 * 1024
DEFAULT_READ_THREADS = 1


class StoreError(Exception):
    """A bad store or a bad call. The message names the store and what to do."""


class StoreMismatch(StoreError):
    """An existing store differs from what the caller asked for; the message names the difference."""


class CorruptChunk(StoreError):
    """Stored bytes failed their checksum (or a chunk/shard that must exist is gone). ``rows`` are the store
    rows that cannot be trusted; the message names the store, teacher, shard and row range."""

    def __init__(self, msg: str, rows: list[int] | None = None) -> None:
        super().__init__(msg)
        self.rows = list(rows or [])


class StoreLocked(StoreError):
    """An HDF5 store is held by another process (HDF5 allows one writer and no readers while it writes)."""


def resolve_url(url: str | os.PathLike[str]) -> tuple[str, Path | None]:
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
    want = max(1, SMALL_CHUNK_BYTES // max(1, row_nbytes))
    best = 1
    for c in range(1, min(want, shard_size) + 1):
        if shard_size % c == 0:
            best = c
    return best


def default_kind(target_shape: tuple[int, ...]) -> str:
    """The kind of a column that does not record one (stores written before the field existed): a (tokens, C)
    target with more than one token is a spatial grid; anything else is global."""
    return "spatial" if len(target_shape) >= 2 and int(target_shape[0]) > 1 else "global"


def jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} must be JSON-serialisable: {e}") from None


def row_problem(row: np.ndarray) -> str | None:
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


_ABSENT = "<unset>"


def get_dotted(attrs: Mapping[str, Any], key: str) -> Any:
    """``attrs["a"]["b"]`` for ``key="a.b"``; ``_ABSENT`` when any level is missing."""
    node: Any = attrs
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def describe_differences(have: Any, want: Any, prefix: str) -> list[str]:
    """Every differing leaf between two JSON-like values, as ``"key: store has X, requested Y"`` lines;
    dicts are compared key by key (recursively), anything else by equality."""
    if isinstance(have, Mapping) and isinstance(want, Mapping):
        out: list[str] = []
        for k in sorted(set(have) | set(want)):
            out += describe_differences(have.get(k, _ABSENT), want.get(k, _ABSENT), f"{prefix}.{k}")
        return out
    if have != want:
        return [f"{prefix}: store has {have!r}, requested {want!r}"]
    return []
