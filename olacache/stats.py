"""Per-channel statistics of a stored column (mean/std per target channel, recorded in the column attrs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from olacache.store import OK, EmbeddingStore


def channel_stats(store: EmbeddingStore, teacher: str, max_rows: int = 256, seed: int = 0) -> dict[str, Any]:
    """Per-channel mean/std over up to `max_rows` random OK images (stored in the column attrs)."""
    ok = np.flatnonzero(store.status(teacher) == OK)
    if len(ok) == 0:
        return {}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ok, size=min(max_rows, len(ok)), replace=False))
    # accumulate in float64 over small row chunks: one float64 copy of 256 seg rows would be 1.8 GB
    c = store.target_shape(teacher)[-1]
    s1, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(rows), 16):
        x = store.read_rows(teacher, rows[i : i + 16]).reshape(-1, c)
        s1 += x.sum(0, dtype=np.float64)
        s2 += np.square(x, dtype=np.float64).sum(0)
        n += len(x)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), "stats_rows": int(len(rows))}
