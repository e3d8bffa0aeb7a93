"""The build's moving parts: which rows go in which batch, decoding in workers, shard buffers and the writer.

A shard is the unit of work and of crash safety: batches never cross a shard, a shard's targets are buffered
until every row has a result (OK or FAILED), and a background thread writes whole shards (status last).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olacache.inputs.images import ImageError, load_under_root
from olacache.store import FAILED, MISSING, OK, PAD, EmbeddingStore, StoreError


class ShardImages(torch.utils.data.Dataset):
    """Items are whole batches (lists of rows inside one shard): decode once, preprocess for every teacher
    that still needs that shard. Runs in DataLoader workers; holds only picklable preprocessors."""

    def __init__(self, image_root: Path, paths: Sequence[str], batches: list[tuple[int, list[int]]],
                 shard_teachers: dict[int, list[str]], preprocessors: dict[str, Callable], *,
                 allow_outside: bool = False):
        self.root = image_root
        self.allow_outside = allow_outside
        self.paths = paths
        self.batches = batches
        self.shard_teachers = shard_teachers
        self.pre = preprocessors

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, rows = self.batches[i]
        teachers = self.shard_teachers[shard]
        ok_rows: list[int] = []
        failed: dict[int, str] = {}
        pix: dict[str, list[torch.Tensor]] = {t: [] for t in teachers}
        pad: list[int] = []
        for r in rows:
            if not self.paths[r]:  # a padding row of an extended store (path ""): no image, status PAD
                pad.append(r)
                continue
            try:
                img = load_under_root(self.root, self.paths[r], allow_outside=self.allow_outside)
                per = {t: self.pre[t](img) for t in teachers}
            except ImageError as e:
                # the full path tried: a wrong root or a moved file is then obvious from the reason alone
                failed[r] = f"{e.reason}: {e.path}"
                continue
            except Exception as e:  # a preprocessor choking on a valid-but-odd image: record, don't abort
                failed[r] = f"preprocessing failed: {type(e).__name__}: {e}"
                continue
            ok_rows.append(r)
            for t in teachers:
                pix[t].append(per[t])
        return {
            "shard": shard,
            "rows": rows,
            "ok_rows": ok_rows,
            "failed": failed,
            "pad": pad,
            "pixels": {t: torch.stack(v) if v else None for t, v in pix.items()},
        }


def identity_collate(x: Any) -> Any:
    return x


def plan_work(store: EmbeddingStore, teachers: list[str], retry_failed: bool) -> dict[int, dict[str, list[int] | None]]:
    """{shard: {teacher: rows to compute}}; None means the whole shard (it is incomplete for that teacher).

    With ``retry_failed``, a complete shard with FAILED rows gets just those rows: the shard is then rewritten
    whole through the store's one write path, its OK rows carrying their stored values (read back; lossless
    for float16; int8 re-quantises to the same integers, its per-row scale moving by float16 rounding at most),
    so only the failed rows are recomputed: the cost follows the failures, not the shards they fall in."""
    work: dict[int, dict[str, list[int] | None]] = {}
    for t in teachers:
        complete = store.complete_shards(t)
        failed = np.flatnonzero(store.status(t) == FAILED) if retry_failed else np.empty(0, dtype=np.int64)
        for s in range(store.n_shards):
            if not complete[s]:
                work.setdefault(s, {})[t] = None
        for r in failed:
            s = int(r) // store.shard_size
            if complete[s]:
                rows = work.setdefault(s, {}).setdefault(t, [])
                rows.append(int(r))
    return work


def plan_batches(shards: Sequence[int], shard_rows: Callable[[int], range], batch_size: int) -> list[tuple[int, list[int]]]:
    """Fixed batch composition: a shard's rows in order, cut every batch_size. Independent of which shards
    are pending, so a resumed build forwards exactly the batches of an uninterrupted one."""
    out = []
    for s in shards:
        rows = list(shard_rows(s))
        out += [(s, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return out


# ----------------------------------------------------------------------------------------------- writer
class ShardWriter:
    """Background thread that writes whole shards; the bounded queue applies back-pressure (at most
    `depth` finished shards wait in host memory). Errors surface in the main thread at the next put/close."""

    def __init__(self, store: EmbeddingStore, depth: int = 2, on_written: Callable[[int, str], None] | None = None):
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.failed_at: tuple[int, str] | None = None
        self.on_written = on_written
        self.thread = threading.Thread(target=self._run, name="olacache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            shard, teacher, values, status, errors = item
            try:
                self.store.write_shard(teacher, shard, values, status, errors)
                if self.on_written:
                    self.on_written(shard, teacher)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
                self.failed_at = (shard, teacher)

    def put(self, shard: int, teacher: str, values: np.ndarray, status: np.ndarray, errors: list[str]) -> None:
        self._check()
        self.q.put((shard, teacher, values, status, errors))

    def _check(self) -> None:
        if self.error is not None:
            shard, teacher = self.failed_at or (-1, "?")
            # a StoreError (one `error:` line in the CLI) whose cause keeps the OSError (disk full, permission)
            raise StoreError(f"{self.store.url}: writing shard {shard} of {teacher!r} failed: "
                             f"{type(self.error).__name__}: {self.error}") from self.error

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()


class ShardBuffer:
    """Accumulates one shard's targets for one teacher until every row has a result."""

    def __init__(self, rows: range, shape: tuple[int, ...]):
        self.start = rows.start
        self.n = len(rows)
        self.values = np.zeros((self.n, *shape), dtype=np.float32)
        self.status = np.full(self.n, MISSING, dtype=np.uint8)
        self.errors = [""] * self.n

    def load_existing(self, store: EmbeddingStore, teacher: str, rows: Sequence[int], status: np.ndarray,
                      reasons: dict[str, str]) -> None:
        """Start from the shard as stored (values, ``status`` and ``reasons`` of the whole column) with ``rows``
        to be computed again (retry of failed rows); OK rows keep their stored values when the shard is
        rewritten whole."""
        idx = np.arange(self.start, self.start + self.n)
        self.values[:] = store.read_rows(teacher, idx)
        self.status[:] = status[idx]
        paths = store.image_paths
        self.errors = [reasons.get(paths[i], "") if self.status[k] != OK else "" for k, i in enumerate(idx)]
        self.status[np.asarray(rows, dtype=np.int64) - self.start] = MISSING

    def put_ok(self, rows: Sequence[int], values: np.ndarray) -> None:
        idx = np.asarray(rows) - self.start
        self.values[idx] = values
        self.status[idx] = OK

    def put_pad(self, row: int) -> None:
        self.status[row - self.start] = PAD

    def put_failed(self, row: int, reason: str) -> None:
        self.status[row - self.start] = FAILED
        self.errors[row - self.start] = reason

    @property
    def done(self) -> bool:
        return bool((self.status != MISSING).all())


def forward_isolating_failures(teacher: Any, pixels: torch.Tensor, rows: list[int]) -> tuple[list[int], np.ndarray | None, dict[int, str]]:
    """Batched forward; if the batch raises, retry image by image so one bad input fails alone."""
    try:
        return rows, teacher.forward(pixels).numpy(), {}
    except Exception:
        ok, vals, failed = [], [], {}
        for i, r in enumerate(rows):
            try:
                vals.append(teacher.forward(pixels[i : i + 1]).numpy())
                ok.append(r)
            except Exception as e:
                failed[r] = f"teacher forward failed: {type(e).__name__}: {e}"
        return ok, (np.concatenate(vals) if vals else None), failed
