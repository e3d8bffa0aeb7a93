"""The checks of `olacache verify` that read no target bytes (all of `--quick`; the full check runs them first).

A full verify reads every target byte (hours at LLaVA-558K scale, ~1.65 TB). These checks read only what
describes the bytes: each shard object's size and its index (zarr: the crc32c-checked index at the end of the
shard file; HDF5: the chunk allocation table), a few small requests per shard, all in flight at once. Full verify
reads a shard's data only when its structure is whole, so both modes report a structural problem with the same
line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from olacache.store.format import PAD, SCALE, TARGET

if TYPE_CHECKING:
    from olacache.store import EmbeddingStore

_QUICK_IN_FLIGHT = 64  # concurrent requests per column (object storage: latency, not bandwidth, bounds this)


def check_structure(s: EmbeddingStore, t: str, shards: list[int], st: np.ndarray) -> dict[int, list[str]] | None:
    """Problems of the given complete shards of column ``t`` found without reading target bytes:
    shard -> lines (only shards with problems). None: a layout these checks do not understand (the caller
    reads those shards in full instead)."""
    a = s.teacher_attrs(t)
    out: dict[int, list[str]] = {}
    for arr in [TARGET] + ([SCALE] if a.get("dtype") == "int8" else []):
        path = f"{t}/{arr}"
        if s.format == "zarr":
            found = _zarr_structure(s._b, path, shards, _real_rows(s, shards, st))
        else:
            found = _hdf5_structure(s._b, path, shards, s.shard_size)
        if found is None:
            return None
        for shard, lines in found.items():
            out.setdefault(shard, []).extend(f"{s.url}: teacher {t!r}: {x}" for x in lines)
    return out


def _real_rows(s: EmbeddingStore, shards: list[int], st: np.ndarray) -> dict[int, int]:
    """Rows of each shard that are not an extension's padding (padding sits at a shard's end and was never
    written into an existing shard file)."""
    out = {}
    for k in shards:
        r = s.shard_rows(k)
        out[k] = int((st[r.start:r.stop] != PAD).sum())
    return out


def _zarr_layout(arr: Any) -> tuple[int, int, bool, int | None] | None:
    """(shard rows, inner chunk rows, index at end, fixed stored chunk bytes or None when compressed) of a
    sharded array whose index is little-endian uint64 pairs + crc32c (zarr's default), else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sc = codecs[0]
    ic = sc.index_codecs
    if not (len(ic) == 2 and isinstance(ic[0], BytesCodec) and isinstance(ic[1], Crc32cCodec)
            and getattr(ic[0].endian, "value", ic[0].endian) in (None, "little")):
        return None
    shard_shape, chunk_shape = tuple(arr.metadata.chunk_grid.chunk_shape), tuple(sc.chunk_shape)
    if shard_shape[1:] != tuple(arr.shape[1:]) or chunk_shape[1:] != shard_shape[1:] or shard_shape[0] % chunk_shape[0]:
        return None
    inner = sc.codecs
    fixed = None
    if isinstance(inner[0], BytesCodec) and all(isinstance(c, Crc32cCodec) for c in inner[1:]) and len(inner) <= 2:
        row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        fixed = chunk_shape[0] * row + 4 * (len(inner) - 1)
    return shard_shape[0], chunk_shape[0], sc.index_location == ShardingCodecIndexLocation.end, fixed


def _zarr_structure(b: Any, path: str, shards: list[int], real: dict[int, int]) -> dict[int, list[str]] | None:
    import asyncio

    from google_crc32c import value as crc32c
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from olacache.store.local_reader import inner_crc

    arr = b._arr(path)
    lay = _zarr_layout(arr)
    if lay is None:
        return None
    shard_rows, chunk_rows, at_end, fixed = lay
    n_inner = shard_rows // chunk_rows
    index_nbytes = n_inner * 16 + 4
    every_chunk = inner_crc(arr)  # format 2 writes every inner chunk: one absent from the index is damage
    store = b._g.store
    want = SuffixByteRequest(index_nbytes) if at_end else RangeByteRequest(0, index_nbytes)

    async def one(key: str, sem: asyncio.Semaphore) -> tuple[int, bytes] | str:
        async with sem:
            try:
                size = await store.getsize(key)  # local: stat; object storage: one HEAD
                buf = None if size < index_nbytes else \
                    await store.get(key, default_buffer_prototype(), byte_range=want)
            except FileNotFoundError:
                return "missing"
            except Exception as e:  # noqa: BLE001 - an unreadable object is reported, never a crash
                return f"cannot check shard file {key}: {type(e).__name__}: {e}"
            return size, (b"" if buf is None else buf.to_bytes())

    async def gather(keys: list[str]) -> list[Any]:
        sem = asyncio.Semaphore(_QUICK_IN_FLIGHT)
        return await asyncio.gather(*(one(k, sem) for k in keys))

    keys = [b._shard_key(arr, k) for k in shards]
    out: dict[int, list[str]] = {}
    for shard, key, got in zip(shards, keys, sync(gather(keys)), strict=True):
        lo, hi = shard * shard_rows, min((shard + 1) * shard_rows, arr.shape[0])
        where = f"{path} shard {shard} (rows {lo}-{hi - 1})"
        if isinstance(got, str):
            out[shard] = [f"{where}: shard file {key} is missing" if got == "missing" else f"{where}: {got}"]
            continue
        size, raw = got
        n_possible = -(-(hi - lo) // chunk_rows)
        n_required = -(-min(real.get(shard, hi - lo), hi - lo) // chunk_rows) if every_chunk else 0
        probs = _index_problems(where, key, size, raw, index_nbytes, at_end, fixed, chunk_rows, lo,
                                n_required, n_possible, crc32c)
        if probs:
            out[shard] = probs
    return out


def _index_problems(where: str, key: str, size: int, raw: bytes, index_nbytes: int, at_end: bool,
                    fixed: int | None, chunk_rows: int, lo: int, n_required: int, n_possible: int,
                    crc32c: Any) -> list[str]:
    """One shard file's size and index against its layout (see _zarr_structure)."""
    if fixed is not None:
        sizes = [index_nbytes + m * fixed for m in range(n_required, n_possible + 1)]
        if size not in sizes:
            implied = str(sizes[0]) if len(sizes) == 1 else f"one of {sizes[0]}..{sizes[-1]} (step {fixed})"
            return [f"{where}: shard file {key} is {size} bytes; its layout implies {implied} (truncated, or "
                    "not written by this store)"]
    elif size < index_nbytes:
        return [f"{where}: shard file {key} is {size} bytes, shorter than its {index_nbytes}-byte index"]
    body, crc = raw[:-4], raw[-4:]
    if len(raw) != index_nbytes or int(crc32c(body)).to_bytes(4, "little") != crc:
        return [f"{where}: the shard index of {key} fails its crc32c"]
    idx = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
    present = idx[:, 0] != np.uint64(2**64 - 1)

    def rows(k: int) -> str:
        return f"{lo + k * chunk_rows}-{lo + (k + 1) * chunk_rows - 1}"

    probs = [f"{where}: inner chunk rows {rows(k)} is not in the shard index (never written)"
             for k in range(n_required) if not present[k]]
    probs += [f"{where}: the shard index lists inner chunk rows {rows(k)}, past the array's end"
              for k in range(n_possible, len(idx)) if present[k]]
    data_lo, data_hi = (0, size - index_nbytes) if at_end else (index_nbytes, size)
    off, n = idx[present, 0].astype(np.int64), idx[present, 1].astype(np.int64)
    ks = np.flatnonzero(present)
    for k, o, m in zip(ks.tolist(), off.tolist(), n.tolist(), strict=True):
        if fixed is not None and m != fixed:
            probs.append(f"{where}: inner chunk rows {rows(k)} is {m} bytes; the layout implies {fixed}")
        elif o < data_lo or o + m > data_hi:
            probs.append(f"{where}: inner chunk rows {rows(k)} lies outside the shard file ({size} bytes)")
    order = np.argsort(off)
    if not probs and (np.any(off[order][1:] < (off + n)[order][:-1]) or int(n.sum()) != data_hi - data_lo):
        probs.append(f"{where}: the inner chunks of {key} overlap or leave gaps ({int(n.sum())} bytes of chunks "
                     f"in {data_hi - data_lo} bytes of data)")
    return probs


def _hdf5_structure(b: Any, path: str, shards: list[int], shard_rows: int) -> dict[int, list[str]] | None:
    """HDF5: each chunk of the shards allocated, stored through its filters (fletcher32), of the size the layout
    implies and inside the file, from the chunk table alone (HDF5 checksums that table itself)."""
    import os

    ds = b._ds(path)
    if ds.chunks is None or not hasattr(ds.id, "chunk_iter"):
        return None
    c = int(ds.chunks[0])
    row = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    fixed = None if ds.compression or ds.shuffle or ds.scaleoffset is not None else \
        c * row + (4 if ds.fletcher32 else 0)
    table: dict[int, tuple[int, int, int]] = {}
    ds.id.chunk_iter(lambda i: table.__setitem__(i.chunk_offset[0] // c, (i.byte_offset, i.size, i.filter_mask)))
    fsize = os.path.getsize(b._path)
    out: dict[int, list[str]] = {}
    for shard in shards:
        lo, hi = shard * shard_rows, min((shard + 1) * shard_rows, ds.shape[0])
        where = f"{path} shard {shard} (rows {lo}-{hi - 1})"
        probs = []
        for k in range(lo // c, -(-hi // c)):
            rows = f"{k * c}-{min(k * c + c, ds.shape[0]) - 1}"
            got = table.get(k)
            if got is None:
                probs.append(f"{where}: chunk rows {rows} is not allocated (never written)")
                continue
            off, size, mask = got
            if mask:
                probs.append(f"{where}: chunk rows {rows} was stored without its filters (mask {mask})")
            elif fixed is not None and size != fixed:
                probs.append(f"{where}: chunk rows {rows} is {size} bytes; the layout implies {fixed}")
            elif off + size > fsize:
                probs.append(f"{where}: chunk rows {rows} lies past the end of the file ({fsize} bytes)")
        if probs:
            out[shard] = probs
    return out
