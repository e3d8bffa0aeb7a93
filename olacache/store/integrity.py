"""Integrity of stored targets (store format 2): what a damaged chunk or shard looks like to a caller.

Three layers, cheapest first: each inner chunk carries a crc32c (zarr codec; HDF5 fletcher32) checked on every
read, fast path included; a missing shard file of a complete shard is damage (format 2 writes every chunk); and
each shard's stored bytes have a crc32c "digest" written with the shard, which only ``verify`` checks (it
reads whole shards) and which catches what chunk checksums cannot: two whole shard files swapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from olacache.store.format import DIGEST, PAD, SCALE, TARGET

if TYPE_CHECKING:
    from olacache.store.store import EmbeddingStore


def describe_bad_rows(url: str, name: str, shard_size: int, bad: np.ndarray) -> str:
    """One line naming the store, teacher, shards and row ranges of damaged rows."""
    shards = sorted({int(r) // shard_size for r in bad})
    parts = []
    for sh in shards[:5]:
        rs = [int(r) for r in bad if int(r) // shard_size == sh]
        parts.append(f"shard {sh} rows {min(rs)}-{max(rs)}")
    more = f" (+{len(shards) - 5} more shards)" if len(shards) > 5 else ""
    return (f"{url}: teacher {name!r}: {len(bad)} row(s) fail their checksum ({'; '.join(parts)}{more}); "
            f"the store is damaged: `olacache verify --repair {url}` marks those shards for recompute")


def check_shard(store: EmbeddingStore, name: str, shard: int, status: np.ndarray | None = None) -> list[str]:
    """Problems of one shard of a column: its files must exist, parse and pass their checksums, and its
    stored bytes must match the shard digest written with it (format 2). Never raises on damage.
    ``status``: the column's status (saves a read per shard); padding rows (an extension's) at the shard's
    end were not there when the digest was written and are left out of it."""
    meta = store._meta(name)
    arrays = [TARGET] + ([SCALE] if meta["dtype"] == "int8" else [])
    problems: list[str] = []
    kept: dict[str, list[np.ndarray]] = {}  # the shard's values as checked: the digest reuses them (one read)
    for a in arrays:
        kept[a] = []
        problems += [f"{store.url}: teacher {name!r}: {p}" for p in
                     store._b.check_shard(f"{name}/{a}", shard, store.shard_size, kept[a])]
    if problems or not store._b.has_array(f"{name}/{DIGEST}"):
        return problems
    try:
        digests = store._digests.get(name)
        if digests is None:
            digests = store._digests[name] = np.asarray(store._b.read_all(f"{name}/{DIGEST}"))
        want = int(digests[shard])
        st = (store.status(name) if status is None else status)[store.shard_rows(shard).start:
                                                               store.shard_rows(shard).stop]
        k = int((st != PAD).sum())
        data = np.ascontiguousarray(kept[TARGET][0][:k]).tobytes()
        sc = np.ascontiguousarray(kept[SCALE][0][:k]).tobytes() if meta["dtype"] == "int8" else b""
    except Exception as e:
        return [f"{store.url}: teacher {name!r} shard {shard}: digest unreadable ({type(e).__name__}: {e})"]
    if _crc_bytes(data, sc) != want:
        rows = store.shard_rows(shard)
        problems.append(
            f"{store.url}: teacher {name!r} shard {shard} (rows {rows.start}-{rows.stop - 1}): stored bytes do "
            "not match the shard's digest (a shard file swapped or replaced from elsewhere)"
        )
    return problems


def _crc_bytes(data: bytes, scale: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.extend(google_crc32c.value(data), scale)) if scale else int(google_crc32c.value(data))


def shard_digest(data: np.ndarray, scale: np.ndarray | None) -> int:
    """crc32c of a shard's stored target bytes, then its scale bytes (int8 columns)."""
    return _crc_bytes(np.ascontiguousarray(data).tobytes(),
                      b"" if scale is None else np.ascontiguousarray(scale).tobytes())


def is_decode_error(e: BaseException) -> bool:
    """Stored bytes that do not decode (zarr: ValueError/IndexError from a codec; h5py: OSError from a
    filter or a truncated chunk) as opposed to a bad call."""
    return isinstance(e, ValueError | IndexError | OSError) and not isinstance(
        e, FileNotFoundError | PermissionError
    )
