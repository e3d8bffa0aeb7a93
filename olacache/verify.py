"""`olacache info` and `olacache verify`: what a store holds, and whether it is whole and faithful."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from olacache.shard_structure import check_structure
from olacache.store import FAILED, FORMAT_VERSION, MISSING, OK, EmbeddingStore, image_set_fingerprint
from olacache.store.format import DIGEST, PAD, StoreError


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
    if quick and integrity:
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
    try:  # from the status already read (on object storage every status read is a request per shard)
        done = ~np.logical_or.reduceat(st == MISSING, np.arange(0, len(st), s.shard_size)) if len(st) else \
            np.zeros(0, dtype=bool)
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
