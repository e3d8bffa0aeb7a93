"""The store join before training: which image samples have usable targets, and what to do about the rest.

Rows are looked up by the normalised image path (``olacache.inputs.keys``); a sample is usable when every
required teacher's row is OK. ``data.min_store_coverage`` refuses a store that does not fit the annotations;
``data.missing_targets`` skips or refuses the samples without targets (docs/method.md §8).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from olacache.store import FAILED, MISSING, OK
from olatrain.config import Config
from olatrain.data.dataset import ConversationDataset
from olatrain.data.errors import DataError


def _status(reader: Any, teacher: str) -> np.ndarray:
    """uint8 status column (MISSING/OK/FAILED per store row)."""
    return np.asarray(reader.status(teacher), dtype=np.uint8)


def check_targets(dataset: ConversationDataset, reader: Any, cfg: Config) -> dict[str, Any]:
    """Decide, before training, which image samples have usable targets for every required teacher.

    Required teachers are ``dataset.requested_teachers``. Refuses (``DataError``) when a teacher has no
    column in the store, or when the fraction of the dataset's unique images with OK rows for all teachers is
    below ``cfg.data.min_store_coverage`` (message: per-teacher coverage, counts not-in-store / missing /
    failed, example paths). Otherwise, with ``cfg.data.missing_targets``:

    - ``"skip"``: image samples lacking a usable row are dropped from the dataset (``set_active``);
    - ``"error"``: any such sample is an error naming the first few.

    Text-only samples are always kept (next-token loss only). Idempotent: it starts from all samples.
    Returns ``{"samples", "kept", "skipped", "images", "usable_images", "coverage", "per_teacher"}``.
    """
    teachers = list(dataset.requested_teachers)
    allidx = np.arange(dataset.n_samples, dtype=np.int64)
    dataset.set_active(allidx)
    n_img_samples = int((dataset._key_idx >= 0).sum())
    report: dict[str, Any] = {"samples": dataset.n_samples, "kept": dataset.n_samples, "skipped": 0,
                              "images": len(dataset._keys), "usable_images": len(dataset._keys),
                              "coverage": 1.0, "per_teacher": {}}
    if not teachers or n_img_samples == 0:
        return report
    have = list(getattr(reader, "teachers", []) or [])
    absent = [t for t in teachers if t not in have]
    if absent:
        raise DataError(
            f"store {getattr(reader, 'url', '?')} has no column for teacher(s) {absent} (it has {have}); run "
            f"`olacache build` for them, or drop them from model.layers / loss.weights"
        )
    keys = [dataset._keys[j] for j in range(len(dataset._keys))]
    rows = np.asarray(reader.rows_for(keys), dtype=np.int64)
    in_store = rows >= 0
    usable = in_store.copy()
    why: dict[str, np.ndarray] = {}
    per_teacher: dict[str, float] = {}
    for t in teachers:
        st = np.full(len(keys), 255, dtype=np.uint8)  # 255 = not in the store
        st[in_store] = _status(reader, t)[rows[in_store]]
        why[t] = st
        ok_t = st == OK
        per_teacher[t] = float(ok_t.mean()) if len(keys) else 1.0
        usable &= ok_t
    coverage = float(usable.mean()) if len(keys) else 1.0
    report.update(usable_images=int(usable.sum()), coverage=coverage, per_teacher=per_teacher)

    def describe(max_examples: int = 5) -> str:
        parts = []
        for t in teachers:
            st = why[t]
            parts.append(
                f"{t}: {per_teacher[t]:.1%} ok ({int((st == 255).sum())} not in store, "
                f"{int((st == MISSING).sum())} not computed yet, {int((st == FAILED).sum())} failed)"
            )
        bad = np.nonzero(~usable)[0][:max_examples]
        ex = ", ".join(repr(keys[j]) for j in bad)
        return "; ".join(parts) + (f"; e.g. {ex}" if len(bad) else "")

    if coverage < float(cfg.data.min_store_coverage):
        raise DataError(
            f"store {getattr(reader, 'url', '?')} covers only {coverage:.1%} of the {len(keys)} images of "
            f"{dataset.annotations} (data.min_store_coverage={cfg.data.min_store_coverage}): {describe()}. "
            f"Finish/resume `olacache build` for these annotations, or point data.store at the right store"
        )
    bad_sample = (dataset._key_idx >= 0) & ~usable[np.maximum(dataset._key_idx, 0)]
    n_bad = int(bad_sample.sum())
    if n_bad == 0:
        return report
    if cfg.data.missing_targets == "error":
        first = np.nonzero(bad_sample)[0][:5]
        ex = ", ".join(
            f"{json.loads(dataset._samples[int(i)])['id']!r} ({dataset._keys[int(dataset._key_idx[i])]})"
            for i in first
        )
        raise DataError(
            f"{n_bad} image sample(s) of {dataset.annotations} lack usable targets in store "
            f"{getattr(reader, 'url', '?')} (data.missing_targets=error), e.g. {ex}. {describe(0)}. Set "
            f"data.missing_targets=skip to train without them"
        )
    if cfg.data.missing_targets != "skip":
        raise DataError(f"data.missing_targets must be 'skip' or 'error', got {cfg.data.missing_targets!r}")
    dataset.set_active(allidx[~bad_sample])
    report.update(kept=len(dataset), skipped=n_bad)
    return report
