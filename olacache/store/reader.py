"""The trainer-facing reader: targets for a batch of image paths in one call, safe inside DataLoader workers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from olacache.inputs.keys import normalize_image_path
from olacache.store.format import DEFAULT_READ_THREADS, OK, StoreError
from olacache.store.pread import aligned_empty
from olacache.store.store import EmbeddingStore

if TYPE_CHECKING:
    import torch

log = logging.getLogger("olacache.store")
# How often (seconds) a reader re-reads its columns' generation ids: a column replaced under a running reader
# (build --overwrite-teacher) is then noticed within this long instead of being read as zeros marked OK.
GENERATION_CHECK_S = 5.0


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
        self._kinds = {t: store.teacher_kind(t) for t in self._teachers}
        self._generations = {t: store.teacher_attrs(t).get("generation") for t in self._teachers}

    def _reset(self) -> None:
        self._pid: int | None = None
        self._store: EmbeddingStore | None = None
        self._row_of: dict[str, int] | None = None
        self._ok: dict[str, np.ndarray] = {}
        self._checked_at = 0.0
        self._reported: set[tuple[str, int]] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_pid", "_store", "_row_of", "_ok", "_checked_at", "_reported"):
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
    def kinds(self) -> dict[str, str]:
        """Teacher -> ``"spatial"`` | ``"global"``, as recorded in the store (docs/method.md §3.4)."""
        return dict(self._kinds)

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

    def check_generation(self, force: bool = False) -> None:
        """Raise StoreError if a column this reader reads was replaced since it was opened (its generation id
        changed). Re-read at most every GENERATION_CHECK_S seconds unless ``force``."""
        now = time.monotonic()
        if not force and now - self._checked_at < GENERATION_CHECK_S:
            return
        self._checked_at = now
        store = self._store_()
        for t in self._teachers:
            try:
                gen = store._b.column_attrs(t).get("generation")
            except Exception:
                gen = "<column gone>"
            if gen != self._generations.get(t):
                raise StoreError(
                    f"{store.url}: teacher column {t!r} was replaced while this run read it (generation "
                    f"{self._generations.get(t)} -> {gen}); restart the run on the new targets"
                )

    def fetch(self, paths: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One batched read. -> (targets[teacher] float16 (B, *shape), zeros where unavailable;
        ok[teacher] bool (B,) = the path is in the store, its status is OK and its stored bytes passed their
        checksum; damaged rows count as failed targets and are logged once per shard)."""
        import torch

        store = self._store_()
        self.check_generation()
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
            bad = store._read_into(t, rows[idx], out, idx, must_exist=True)
            if len(bad):
                hit = np.isin(rows, bad) & ok
                ok[hit] = False
                out[hit] = 0
                new = sorted({int(r) // store.shard_size for r in bad} - {s for (tt, s) in self._reported if tt == t})
                if new:
                    self._reported.update((t, s) for s in new)
                    log.warning("%s (treated as failed targets)", store.describe_bad_rows(t, bad))
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
