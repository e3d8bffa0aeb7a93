"""The trainer-facing reader: targets for a batch of image paths in one call, safe inside DataLoader workers."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from olacache.inputs.keys import normalize_image_path
from olacache.store.chunk_cache import ChunkCache
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

    Object storage (``s3://`` ...): ``readahead`` batches can be read in the background (``prefetch``) while the
    caller does other work, so the network round trips of the next batches overlap this one's; default 2 for
    a remote store, 0 (off) for a local one, whose reads take milliseconds. ``cache_dir`` keeps the chunks read
    from a remote store on local disk too (at most ``cache_bytes``; olacache.store.chunk_cache).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        teachers: Sequence[str] | None = None,
        *,
        read_threads: int = DEFAULT_READ_THREADS,
        readahead: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int = 50 * 10**9,
    ) -> None:
        self.url = url
        self.read_threads = read_threads
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.cache_bytes = int(cache_bytes)
        if readahead is not None and readahead < 0:
            raise StoreError(f"readahead must be >= 0 batches, got {readahead}")
        self._requested = None if teachers is None else list(teachers)
        self._reset()
        # Validate the teacher names now, in the constructing process, so a typo fails before any worker
        # starts. The handles this opens are dropped on fork/pickle.
        store = self._store_()
        self.is_remote = store.is_remote
        if self.cache_dir is not None and self.is_remote:
            ChunkCache(self.cache_dir, self.cache_bytes).require_writable()
        self.readahead = (2 if self.is_remote else 0) if readahead is None else int(readahead)
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
        # read-ahead: batch (its paths) -> the background read of it; threads do not survive a fork
        self._ahead: OrderedDict[tuple[str | None, ...], Future[Any]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._teacher_pool: ThreadPoolExecutor | None = None  # remote stores: the teachers of a batch at once
        self.readahead_stats = {"started": 0, "used": 0, "direct": 0}  # this process's reads, by kind
        # local backends' raw readers were not written for concurrent use: their reads take turns
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_pid", "_store", "_row_of", "_ok", "_checked_at", "_reported", "_ahead", "_pool", "_lock",
                  "readahead_stats", "_teacher_pool"):
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
            cache = None if self.cache_dir is None else ChunkCache(self.cache_dir, self.cache_bytes)
            self._store = EmbeddingStore.open(self.url, "r", read_threads=self.read_threads, chunk_cache=cache)
            self._pid = pid
        return self._store

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            for pool in (self._pool, self._teacher_pool):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
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

    def prefetch(self, paths: Sequence[str | None]) -> bool:
        """Start reading the targets of a batch that ``fetch`` will be asked for later (same paths, same order)
        in a background thread; at most ``readahead + 1`` such reads are kept (the batch being made now and
        the next ``readahead``). -> whether a read was started.
        A prefetched batch that is never fetched is dropped (a wrong guess costs bandwidth, never results)."""
        if self.readahead <= 0:
            return False
        key = tuple(paths)
        self._store_()  # (re)open here, in the calling thread, after a fork
        if key in self._ahead:
            return False
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.readahead + 1, thread_name_prefix="olacache-readahead")
        self._ahead[key] = self._pool.submit(self._read, list(paths))
        self.readahead_stats["started"] += 1
        while len(self._ahead) > self.readahead + 1:
            self._ahead.popitem(last=False)[1].cancel()
        return True

    def fetch(self, paths: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One batched read. -> (targets[teacher] float16 (B, *shape), zeros where unavailable;
        ok[teacher] bool (B,) = the path is in the store, its status is OK and its stored bytes passed their
        checksum; damaged rows count as failed targets and are logged once per shard). Taken from a
        ``prefetch`` of the same paths when there is one (its errors are raised here)."""
        self._store_()
        ahead = self._ahead.pop(tuple(paths), None)
        if ahead is not None:
            self.readahead_stats["used"] += 1
            return ahead.result()
        self.readahead_stats["direct"] += 1
        return self._read(paths)

    def _read(self, paths: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.is_remote:  # the remote reader is safe to use from several threads at once
            return self._read_now(paths)
        with self._lock:
            return self._read_now(paths)

    def _read_now(self, paths: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        import torch

        store = self._store_()
        self.check_generation()
        rows = self.rows_for(paths)
        if self.is_remote and len(self._teachers) > 1:
            # object storage: the teachers' reads go out together (one round trip set, not one per teacher)
            with self._lock:  # read-ahead threads may get here together (the lock is free on remote stores)
                if self._teacher_pool is None:
                    self._teacher_pool = ThreadPoolExecutor(len(self._teachers),
                                                            thread_name_prefix="olacache-teacher")
            done = list(self._teacher_pool.map(lambda t: self._read_teacher(store, t, rows), self._teachers))
        else:
            done = [self._read_teacher(store, t, rows) for t in self._teachers]
        targets = {t: tensor for t, (tensor, _ok) in zip(self._teachers, done, strict=True)}
        oks = {t: torch.from_numpy(ok) for t, (_tensor, ok) in zip(self._teachers, done, strict=True)}
        return targets, oks

    def _read_teacher(self, store: EmbeddingStore, t: str, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """One teacher's rows -> (float16 batch, ok mask); damaged rows are zeroed, masked and logged."""
        have = rows >= 0
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
        return tensor, ok


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
