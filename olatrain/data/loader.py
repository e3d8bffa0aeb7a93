"""Items -> batches (``collate``) and the endless, resumable DataLoader over them (``build_dataloader``).

Errors in workers: torch re-raises a worker's exception in the main process with the worker's traceback
pasted into its message. The dataset returns a ``DataError`` as a value instead (``items.error``), ``collate``
passes it on as ``batch["error"]`` and ``StepLoader`` raises it in the main process: one clean line."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from olatrain.data.dataset import ConversationDataset
from olatrain.data.errors import DataError
from olatrain.data.sampler import StepBatchSampler
from olatrain.data.templates import IGNORE_INDEX


def collate(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Items -> batch dict (CPU tensors):

    - ``input_ids`` (B, L) long, right-padded with ``pad_id``; ``IMAGE_TOKEN_INDEX`` (-200) once per image
      sample; ``attention_mask`` (B, L) long, 1 on tokens; ``labels`` (B, L) long, ``IGNORE_INDEX`` (-100)
      on padding and unsupervised tokens. L = longest sample (before the model inserts image/task tokens).
    - ``pixel_values`` (B, 3, H, W) float32 (zeros for text-only); ``has_image`` (B,) bool.
    - ``targets`` {teacher: (B, *shape) float16} (zeros where unavailable) and ``target_mask``
      {teacher: (B,) bool = has_image & the store row is OK}; both ``{}`` without a store reader.
    - ``ids`` list[str]; ``image_paths`` list[str | None] (normalised store keys, relative to data.image_root).
    - ``epoch``, ``step``: int, the sampler position of this batch (None when not from ``build_dataloader``).
    - ``skipped``: list of records (``olatrain.data.skips``) of the images replaced and target rows masked
      while making this batch (present only when there are any).

    A batch the dataset could not make (``items.error``) collates to ``{"error": message}``.
    """
    error = getattr(items, "error", None)
    if error is not None:
        return {"error": error}
    b = len(items)
    if b == 0:
        raise DataError("cannot collate an empty batch")
    lens = [int(it["input_ids"].shape[0]) for it in items]
    seq = max(lens)
    input_ids = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((b, seq), dtype=torch.long)
    for i, it in enumerate(items):
        n = lens[i]
        input_ids[i, :n] = it["input_ids"]
        labels[i, :n] = it["labels"]
        attn[i, :n] = 1
    has_image = torch.tensor([bool(it["has_image"]) for it in items], dtype=torch.bool)
    pixel_values = torch.stack([it["pixel_values"] for it in items])

    targets: dict[str, torch.Tensor] = {}
    ok: dict[str, torch.Tensor] = {}
    if getattr(items, "targets", None) is not None:
        targets, ok = dict(items.targets), dict(items.ok)  # type: ignore[attr-defined]
    elif "targets" in items[0]:
        for t in items[0]["targets"]:
            targets[t] = torch.stack([it["targets"][t] for it in items])
            ok[t] = torch.tensor([bool(it["target_ok"][t]) for it in items], dtype=torch.bool)
    out = {
        "input_ids": input_ids,
        "attention_mask": attn,
        "labels": labels,
        "pixel_values": pixel_values,
        "has_image": has_image,
        "targets": targets,
        "target_mask": {t: ok[t] & has_image for t in targets},
        "ids": [it["id"] for it in items],
        "image_paths": [it["image_path"] for it in items],
        "epoch": getattr(items, "epoch", None),
        "step": getattr(items, "step", None),
    }
    skipped = getattr(items, "skipped", None)
    if skipped:
        out["skipped"] = list(skipped)
    return out


class _Collate:
    """Picklable collate bound to a pad id (spawn/forkserver workers pickle the collate_fn)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.pad_id)


class StepLoader(DataLoader):
    """A DataLoader whose batches that failed in a worker are raised in the main process as one
    ``DataError`` carrying the dataset's message alone."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # made now, not lazily: starting the workers draws their base seed from the global RNG, and the
        # trainer relies on that happening before it restores a checkpoint's RNG state
        return _RaiseErrors(super().__iter__())


class _RaiseErrors:
    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it

    def __iter__(self) -> _RaiseErrors:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._it)
        if isinstance(batch, dict) and "error" in batch:
            raise DataError(batch["error"])
        return batch


def build_dataloader(
    dataset: ConversationDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    start_step: int = 0,
    drop_last: bool = True,
    multiprocessing_context: str | None = None,
    prefetch_factor: int | None = None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """An endless DataLoader of batch dicts (see ``collate``), sharded and ordered by ``StepBatchSampler``
    (``loader.batch_sampler``); iteration begins at micro-step ``start_step``.

    Workers: persistent (the store reader opens lazily once per worker and keeps its handles/row index).
    ``multiprocessing_context`` defaults to "fork" where available: the dataset is packed numpy buffers (no
    copy-on-write blow-up) and the store reader reopens after a fork (zarr also resets its event loop in
    forked children); pass "forkserver"/"spawn" to avoid fork altogether (everything here pickles).
    """
    sampler = StepBatchSampler(
        len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
        start_step=start_step, drop_last=drop_last,
    )
    dataset.set_batch_plan(sampler)  # store read-ahead (ConversationDataset._read_ahead)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        ctx = multiprocessing_context
        if ctx is None and "fork" in mp.get_all_start_methods():
            ctx = "fork"
        kwargs.update(persistent_workers=True, multiprocessing_context=ctx)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return StepLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_Collate(dataset.pad_id),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )
