"""`olacache info` and `olacache verify`: what a store holds, and whether it is whole and faithful."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from olacache.store import FAILED, FORMAT_VERSION, MISSING, OK, EmbeddingStore, image_set_fingerprint
from olacache.store.format import DIGEST, PAD, SCALE, TARGET, StoreError


def store_info(url: str) -> dict[str, Any]:
    """One JSON-able object describing the store; per teacher at least shape, dtype, n_ok, n_failed,
    n_missing, bytes (the `--json` contract for scripts)."""
    with EmbeddingStore.open(url, mode="r") as s:
        out: dict[str, Any] = {
            "store": str(url),
            "format": s.format,
            "format_version": s.attrs.get("format_version"),
            "created_by": s.attrs.get("created_by"),
            "n_images": s.n_images,
            "shard_size": s.shard_size,
            "n_shards": s.n_shards,
            "fingerprint": s.fingerprint,
            "bytes": s.nbytes(),
            "teachers": {},
        }
        for t in s.teachers:
            a = s.teacher_attrs(t)
            st = s.status(t)
            nbytes = s.nbytes(t)
            ident = a.get("identity", {})
            out["teachers"][t] = {
                "shape": list(s.target_shape(t)),
                "dtype": a.get("dtype"),
                "codec": a.get("codec", "raw"),
                "weights": ident.get("source"),
                "weights_sha256": ident.get("weights_sha256"),
                "random_init": bool(ident.get("random_init", False)),
                "n_ok": int((st == OK).sum()),
                "n_failed": int((st == FAILED).sum()),
                "n_missing": int((st == MISSING).sum()),
                "shards_complete": int(s.complete_shards(t).sum()),
                "bytes": nbytes,
                "bytes_per_image": nbytes / max(1, s.n_images),
                "int8_cosine_mean": a.get("int8_cosine_mean"),
                "int8_cosine_min": a.get("int8_cosine_min"),
                "spec": a.get("spec"),
            }
        return out


@dataclass
class VerifyReport:
    store: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per teacher: (image path, reason) of every FAILED row
    failed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # quick mode: what was not checked (said with the result, so OK is never read as "every byte checked")
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


PARITY_MIN = {"float16": 0.999, "int8": 0.99}


def verify_store(url: str, recompute: int = 0, *, image_root: str | None = None, device: str = "cpu",
                 seed: int = 0, integrity: bool = True, repair: bool = False, quick: bool = False,
                 teachers: list[str] | None = None) -> VerifyReport:
    """Structure, completeness and (``integrity``) every complete shard's files and checksums. ``repair``
    marks exactly the shards with damage incomplete so the next ``olacache build`` recomputes them.
    ``quick``: the shard checks read each shard's size and index only, never target bytes (no chunk checksums,
    no shard digests, no sample of values); ``teachers``: only these columns."""
    rep = VerifyReport(str(url))
    damaged: dict[str, list[int]] = {}
    with EmbeddingStore.open(url, mode="r") as s:
        columns = _columns(s, teachers)
        if s.attrs.get("format_version") != FORMAT_VERSION:
            rep.warnings.append(f"format_version {s.attrs.get('format_version')} (current {FORMAT_VERSION}): "
                                f"readable; `olacache upgrade {url}` converts it in place")
        if len(s.image_paths) != s.n_images:
            rep.problems.append(f"index holds {len(s.image_paths)} paths but n_images is {s.n_images}")
        real = [p for p in s.image_paths if p]  # without an extension's padding rows (path "")
        if image_set_fingerprint(real) != s.fingerprint:
            rep.problems.append("the index does not match the stored image-set fingerprint")
        if len(set(real)) != len(real):
            rep.problems.append("the index holds duplicate image paths")
        if not s.teachers:
            rep.warnings.append("the store has no teacher columns yet")
        for t in columns:
            a = s.teacher_attrs(t)
            st = s.status(t)
            if s.damaged_status.get(t):
                damaged.setdefault(t, []).extend(s.damaged_status[t])
                rep.problems.append(f"{t}: status chunk of shard(s) {s.damaged_status[t]} is damaged "
                                    "(unreadable); those rows count as missing")
            if integrity:
                damaged_t = check_integrity(s, t, st, rep, quick=quick)
                if damaged_t:
                    damaged.setdefault(t, []).extend(damaged_t)
            if len(st) != s.n_images:
                rep.problems.append(f"{t}: status has {len(st)} rows, expected {s.n_images}")
                continue
            if tuple(a.get("target_shape", ())) != tuple(s.target_shape(t)):
                rep.problems.append(f"{t}: attrs say shape {a.get('target_shape')}, array has {s.target_shape(t)}")
            n_missing = int((st == MISSING).sum())
            if n_missing:
                done = s.complete_shards(t)
                rep.problems.append(
                    f"{t}: {n_missing} image(s) missing in {int((~done).sum())} incomplete shard(s) "
                    "(an interrupted build: run the same `olacache build` again to finish it)"
                )
            bad_status = set(np.unique(st).tolist()) - {MISSING, OK, FAILED, PAD}
            if bad_status:
                rep.problems.append(f"{t}: unknown status codes {sorted(bad_status)}")
            errs = s.errors(t)
            failed_paths = {p for p, _ in errs}
            n_failed = int((st == FAILED).sum())
            if len(failed_paths) != n_failed:
                rep.problems.append(f"{t}: {n_failed} failed rows but {len(failed_paths)} error records")
            if errs and n_failed == s.n_images:
                rep.problems.append(f"{t}: every image failed (first: {errs[0][0]}: {errs[0][1]}); a wrong image "
                                    "root? Fix it, then run the build again with --retry-failed")
            if errs:
                rep.failed[t] = errs
                rep.warnings.append(
                    f"{t}: {n_failed} failed image(s) (listed with their reasons); after fixing the files or "
                    "the image root, run the build again with --retry-failed to recompute just those rows"
                )
            ok_rows = np.flatnonzero(st == OK)
            if damaged.get(t):  # never probe or recompute against rows known to be damaged
                bad_rows = np.concatenate([np.asarray(s.shard_rows(k)) for k in set(damaged[t])])
                ok_rows = np.setdiff1d(ok_rows, bad_rows)
            if len(ok_rows) and not quick:  # a sample of target values: quick mode reads none
                rng = np.random.default_rng(seed)
                probe = np.sort(rng.choice(ok_rows, size=min(64, len(ok_rows)), replace=False))
                vals = s.read_rows(t, probe)
                if not np.isfinite(vals).all():
                    rep.problems.append(f"{t}: non-finite values among stored OK rows")
            if recompute > 0 and len(ok_rows):
                rep.parity[t] = _parity(s, t, ok_rows, recompute, image_root, device, seed)
                lim = PARITY_MIN.get(a.get("dtype", "float16"), 0.999)
                if rep.parity[t].get("error"):
                    rep.problems.append(f"{t}: recompute failed: {rep.parity[t]['error']}")
                elif rep.parity[t]["cosine_min"] < lim:
                    rep.problems.append(
                        f"{t}: recomputed targets differ from the store (min cosine "
                        f"{rep.parity[t]['cosine_min']:.5f} < {lim}): different weights or preprocessing?"
                    )
    if repair and damaged:
        repair_shards(url, damaged, rep)
    if quick:
        only = "".join(f" --teacher {t}" for t in teachers or [])
        rep.notes.append(f"quick check: shard files, sizes and indexes only; no target bytes were read (chunk "
                         f"checksums, shard digests and values not checked): `olacache verify {url}{only}` "
                         "reads them all")
    return rep


def _columns(s: EmbeddingStore, teachers: list[str] | None) -> list[str]:
    if not teachers:
        return s.teachers
    unknown = [t for t in teachers if t not in s.teachers]
    if unknown:
        raise StoreError(f"{s.url}: no teacher column {', '.join(map(repr, unknown))}; the store has "
                         f"{', '.join(s.teachers) or 'none'} (--teacher NAME)")
    return list(dict.fromkeys(teachers))


def check_integrity(s: EmbeddingStore, t: str, st: np.ndarray, rep: VerifyReport, quick: bool = False) -> list[int]:
    """Every complete shard of column ``t``: files exist, their sizes and indexes fit the layout, and (unless
    ``quick``) their chunks pass their checksums and match the shard digest. Problems go to ``rep`` (one line per
    bad chunk); -> the damaged shards."""
    bad: list[int] = []
    try:
        done = s.complete_shards(t)
    except Exception as e:  # damaged metadata is reported, never a crash
        rep.problems.append(f"{t}: cannot read completeness ({type(e).__name__}: {e})")
        return bad
    shards = np.flatnonzero(done).tolist()
    try:
        structure = check_structure(s, t, shards, st)
    except Exception as e:  # noqa: BLE001 - damaged metadata is reported, never a crash
        rep.problems.append(f"{s.url}: teacher {t!r}: cannot read the shard layout ({type(e).__name__}: {e})")
        return shards
    if structure is None and quick:
        rep.warnings.append(f"{t}: the quick check does not know this column's layout; its shards were read in "
                            "full")
    if quick and structure is not None and s._b.has_array(f"{t}/{DIGEST}"):
        try:  # the digests are metadata: a damaged digest array is reported (full verify compares them)
            s._b.read_all(f"{t}/{DIGEST}")
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"{s.url}: teacher {t!r}: shard digests unreadable ({type(e).__name__}: {e})")
    read_data = not quick or structure is None
    for shard in shards:
        probs = (structure or {}).get(shard, [])
        if not probs and read_data:  # a shard whose structure is damaged is not read: its lines say enough
            try:
                probs = s.check_shard(t, shard, st)
            except Exception as e:
                probs = [f"{t}: shard {shard}: check failed ({type(e).__name__}: {e})"]
        if probs:
            rep.problems += probs
            bad.append(shard)
    if s.version >= 2 and not s._b.has_array(f"{t}/digest"):
        rep.warnings.append(f"{t}: column upgraded from format 1: its chunks carry no checksums (rebuild it "
                            "with --overwrite-teacher to add them)")
    return bad


def repair_shards(url: str, damaged: dict[str, list[int]], rep: VerifyReport) -> None:
    """Mark damaged shards incomplete (status MISSING): the next `olacache build` with the same arguments
    recomputes exactly those shards and nothing else."""
    from olacache.store.lease import acquire

    lease = acquire(url, log=lambda m: rep.warnings.append(m))
    with EmbeddingStore.open(url, mode="r+") as s:
        for t, shards in damaged.items():
            for shard in sorted(set(shards)):
                rows = s.shard_rows(shard)
                s._write_status(t, rows.start, np.full(len(rows), MISSING, dtype=np.uint8))
            rep.warnings.append(f"{t}: repair: marked {len(set(shards))} damaged shard(s) {sorted(set(shards))} "
                                "incomplete; run the same `olacache build` again to recompute them")
    lease.release()


def _parity(s: EmbeddingStore, t: str, ok_rows: np.ndarray, k: int, image_root: str | None, device: str,
            seed: int) -> dict[str, Any]:
    """Re-run the live teacher on k random OK images and compare with the stored targets."""
    from olacache.inputs.images import load_under_root
    from olacache.teachers import load_teacher

    a = s.teacher_attrs(t)
    root = Path(image_root or a.get("image_root", "."))
    ident = a.get("identity", {})
    preset = a.get("preset", "tiny")
    # tiny presets are deterministic: regenerate them locally rather than trusting a cache path from
    # another machine; the weights hash below still has to match
    source = None if preset == "tiny" else ident.get("source")
    try:
        teacher = load_teacher(t, preset=preset, source=source, device=device, options=a.get("options"))
    except Exception as e:  # no hub access for real weights, say
        return {"error": f"could not load teacher {t!r} ({preset}): {e}"}
    if teacher.identity().get("weights_sha256") != ident.get("weights_sha256"):
        return {"error": f"live {t} weights differ from the ones the store was built with ({ident.get('source')})"}
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(ok_rows, size=min(k, len(ok_rows)), replace=False))
    stored = s.read_rows(t, rows).astype(np.float64)
    try:
        imgs = [load_under_root(root, s.image_paths[r], allow_outside=True) for r in rows]
    except Exception as e:
        return {"error": f"cannot read images under {root} (pass --image-root): {e}"}
    live = np.concatenate([teacher([im]).numpy() for im in imgs]).astype(np.float64)
    a2, b2 = stored.reshape(len(rows), -1), live.reshape(len(rows), -1)
    cos = (a2 * b2).sum(1) / np.maximum(np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1), 1e-30)
    return {"n": int(len(rows)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_diff": float(np.abs(a2 - b2).max())}


# ------------------------------------------------------------------ quick mode: structure without target bytes
# A full verify reads every target byte (hours at LLaVA-558K scale, ~1.65 TB). These checks read only what
# describes the bytes: each shard object's size and its index (zarr: the crc32c-checked index at the end of the
# shard file; HDF5: the chunk allocation table), a few small requests per shard. Full verify runs them too,
# first, and reads a shard's data only when its structure is whole, so both modes report a structural problem
# with the same line.
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
                if not await store.exists(key):
                    return "missing"
                size = await store.getsize(key)
                buf = await store.get(key, default_buffer_prototype(), byte_range=want) if size >= index_nbytes \
                    else None
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
