"""Extending a store with new images (``olacache build ... --extend``), without recomputing or rewriting any
image already in it.

Rows are fixed at creation; an extension appends rows. If the last shard is partial, the rows up to the next
shard boundary become padding (path ``""``, status ``PAD``) so every new image lands in a NEW shard and no
existing shard file is rewritten (the tail shard's status chunk gains PAD entries; its target bytes are left
alone). The new images follow, sorted. Row order is then no longer globally sorted, which is fine: readers join
by path, and an extended store records ``extended`` so the image-set check compares sets, not orders.

Crash safety (a single writer, rank 0): arrays are first resized and the padding status written, then the
index is extended, then the root attrs (``n_images``, ``fingerprint``) are written LAST as the commit point.
Readers (and a rerun) use only the first ``n_images`` index entries, so a killed extension is invisible, and
rerunning it redoes the same deterministic steps; the build then computes the new (incomplete) shards like any
resumed build.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from olacache.inputs.keys import image_set_fingerprint, normalize_image_path
from olacache.store.format import DIGEST, ERRORS, PAD, SCALE, STATUS, TARGET, StoreError
from olacache.store.store import EmbeddingStore


def real_paths(paths: Sequence[str]) -> list[str]:
    """The image paths of the rows, without the padding rows of an extension."""
    return [p for p in paths if p]


def extend_store(store: EmbeddingStore, requested: Sequence[str]) -> tuple[int, int]:
    """Add every requested path that is not in the store yet. -> (images added, images already there)."""
    store._check_writable()
    want = [normalize_image_path(p) for p in requested]
    have = store.image_paths
    have_set = set(real_paths(have))
    new = sorted(set(want) - have_set)
    reused = len(set(want) & have_set)
    if not new:
        return 0, reused
    n, s = store.n_images, store.shard_size
    n_pad = -(-n // s) * s
    if n_pad > n:
        for t in store.teachers:
            if not store.complete_shards(t)[-1]:
                raise StoreError(
                    f"{store.url}: teacher {t!r}: the last shard is incomplete; finish the build (run it again "
                    "without --extend) before extending the store"
                )
    rows = list(have) + [""] * (n_pad - n) + new
    n2 = len(rows)
    n_shards2 = -(-n2 // s)
    b = store._b
    for t in store.teachers:
        for arr in (TARGET, SCALE, STATUS, ERRORS, DIGEST):
            if b.has_array(f"{t}/{arr}") or arr == ERRORS:
                b.resize(f"{t}/{arr}", n_shards2 if arr == DIGEST else n2)
        if n_pad > n:
            b.write(f"{t}/{STATUS}", n, np.full(n_pad - n, PAD, dtype=np.uint8))
    b.write_index(rows)
    attrs = {**store.attrs, "n_images": n2, "fingerprint": image_set_fingerprint(real_paths(rows)),
             "extended": int(store.attrs.get("extended", 0)) + 1}
    b.set_root_attrs(attrs)  # the commit point
    store.attrs = attrs
    store.n_images, store.fingerprint = n2, attrs["fingerprint"]
    store.n_shards = n_shards2
    store._image_paths = rows
    store._meta_cache.clear()
    return len(new), reused
