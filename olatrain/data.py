"""Training data: LLaVA conversations + cached teacher targets, joined by normalised image path.

Pieces
- ``ConversationDataset``: annotations (``olacache.annotations``) -> per-sample items (tokens via
  ``olatrain.templates``, pixels via ``olacache.images.load_rgb`` + the base encoder's processor). Items are
  built lazily in the DataLoader workers; ``__getitems__`` builds a whole batch and fetches its targets from
  the store in ONE ``TargetReader.fetch`` call (sorted, de-duplicated rows: the store reads fast only in
  batches).
- ``check_targets``: before step 1, which image samples have usable targets; refuse / skip / error.
- ``collate``: items -> the batch dict (see its docstring for the exact contents).
- ``build_dataloader``: an infinite, deterministic, rank-sharded, resumable stream of batches
  (``StepBatchSampler`` documents exactly which sample indices rank r gets at step s).

Memory: the samples are kept packed (one UTF-8 JSON blob + offsets in numpy arrays), not as a list of dicts.
DataLoader workers touching millions of small Python objects copy-on-write the whole list into every worker
(refcount updates dirty the pages; pytorch issue 13246); flat numpy buffers stay shared after fork and pickle
as one memcpy under spawn/forkserver.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from olacache.annotations import load_annotations
from olacache.images import ImageError, load_rgb
from olatrain.config import Config
from olatrain.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TemplateError, tokenize_conversation

# store status values (olacache.store): only OK rows are usable targets
_ST_MISSING, _ST_OK, _ST_FAILED = 0, 1, 2


class DataError(ValueError):
    """Bad training data or an unusable store/dataset combination; the message says what to do."""


# ----------------------------------------------------------------------------------------------- packing


class PackedStrings:
    """An immutable list of strings stored as one UTF-8 buffer + int64 offsets (fork/pickle friendly)."""

    def __init__(self, items: Sequence[str]) -> None:
        enc = [s.encode("utf-8") for s in items]
        self._offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in enc], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(enc), dtype=np.uint8) if enc else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._data[a:b].tobytes().decode("utf-8")


# ----------------------------------------------------------------------------------------------- dataset


class ConversationDataset(Dataset):
    """LLaVA conversations (+ images, + cached targets).

    Index space: ``0 .. len(self)-1`` over the ACTIVE samples (all of them until ``check_targets`` with
    policy "skip" (or ``set_active``) drops some); ``active_indices`` maps them to positions in the annotation
    file.

    Per-sample token budget: an image sample's ``IMAGE_TOKEN_INDEX`` becomes ``image_tokens +
    sum(task_tokens)`` positions in the model, so its ids are truncated to ``max_length - image_tokens -
    sum(task_tokens) + 1``; text-only samples (no image, no task tokens) to ``max_length``.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        image_processor: Any,
        reader: Any | None,
        teachers: Sequence[str],
        *,
        image_tokens: int | None = None,
    ) -> None:
        from olacache.store import normalize_image_path

        self.template = cfg.model.chat_template
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.reader = reader
        self.teachers = list(teachers) if reader is not None else []
        self.requested_teachers = list(teachers)
        self.image_root = Path(cfg.data.image_root)
        self.annotations = str(cfg.data.annotations)
        self.aspect = cfg.data.image_aspect
        if self.aspect not in ("square", "pad"):
            raise DataError(f"data.image_aspect must be 'square' or 'pad', got {self.aspect!r}")
        self.max_length = int(cfg.data.max_length)
        self.image_tokens = int(cfg.model.image_tokens if image_tokens is None else image_tokens)
        self.task_tokens = int(sum(int(v) for v in cfg.model.task_tokens.values()))
        self.image_block = self.image_tokens + self.task_tokens
        if self.max_length <= self.image_block:
            raise DataError(
                f"data.max_length={self.max_length} cannot hold an image: it needs {self.image_tokens} image + "
                f"{self.task_tokens} task-token positions plus text; raise data.max_length"
            )
        # padding is masked (attention 0, label -100), so eos is a fine stand-in when there is no pad token
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither pad_token nor eos_token; add a pad token")
        self.pad_id = int(pad)

        samples = load_annotations(cfg.data.annotations)
        keys: list[str] = []
        key_of: dict[str, int] = {}  # normalised key -> key number
        raw_of: dict[str, int] = {}  # raw annotation path -> key number (LLaVA-665K reuses COCO paths)
        key_idx = np.full(len(samples), -1, dtype=np.int64)
        for i, s in enumerate(samples):
            if not s["conversations"]:
                raise DataError(
                    f"{self.annotations}: sample {s['id']!r} (entry {i}) has no conversation; training needs "
                    f"LLaVA conversations (a bare image list / directory is input for `olacache build` only)"
                )
            img = s.get("image")
            if img is None:
                continue
            j = raw_of.get(img)
            if j is None:
                try:
                    k = normalize_image_path(img)
                except ValueError as e:
                    raise DataError(f"{self.annotations}: sample {s['id']!r} (entry {i}): {e}") from None
                j = key_of.get(k)
                if j is None:
                    j = key_of[k] = len(keys)
                    keys.append(k)
                raw_of[img] = j
            key_idx[i] = j
        # compact C-encoder settings: this re-serialisation is most of the start-up cost after json.load
        enc = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))
        self._samples = PackedStrings([enc.encode(s) for s in samples])
        self._keys = PackedStrings(keys)
        self._key_idx = key_idx
        self._active = np.arange(len(samples), dtype=np.int64)
        del samples, key_of, raw_of
        self._pixel_shape = self._probe_pixel_shape()

    # ------------------------------------------------------------------ index space

    @property
    def n_samples(self) -> int:
        """Samples in the annotation file (active or not)."""
        return len(self._samples)

    @property
    def active_indices(self) -> np.ndarray:
        return self._active.copy()

    def set_active(self, indices: Sequence[int] | np.ndarray) -> None:
        """Restrict the dataset to these annotation positions (e.g. rank 0's ``check_targets`` result
        broadcast to the other ranks, so every rank shards the very same list)."""
        a = np.asarray(indices, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.n_samples):
            raise DataError(f"active indices out of range [0, {self.n_samples})")
        self._active = a.copy()

    def __len__(self) -> int:
        return len(self._active)

    def sample(self, i: int) -> dict[str, Any]:
        """The annotation dict of active sample ``i`` (decoded from the packed buffer)."""
        return json.loads(self._samples[int(self._active[i])])

    def image_key(self, i: int) -> str | None:
        """The store join key (normalised image path) of active sample ``i``; None when text-only."""
        k = int(self._key_idx[int(self._active[i])])
        return None if k < 0 else self._keys[k]

    # ------------------------------------------------------------------ items

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One item; its targets (if any) as per-sample ``targets``/``target_ok`` entries."""
        items = self.__getitems__([i])
        item = items[0]
        if items.targets is not None:
            item["targets"] = {t: v[0] for t, v in items.targets.items()}
            item["target_ok"] = {t: bool(v[0]) for t, v in items.ok.items()}
        return item

    def __getitems__(self, indices: Sequence[int]) -> _Items:
        """A batch of items plus its targets from ONE ``reader.fetch`` (called by the DataLoader's fetcher
        with the whole index list of a batch, inside the worker)."""
        items = _Items(self._item(int(i)) for i in indices)
        items.epoch = getattr(indices, "epoch", None)
        items.step = getattr(indices, "step", None)
        if self.reader is not None and self.teachers:
            paths = [it["image_path"] if it["has_image"] else None for it in items]
            uniq = sorted({p for p in paths if p is not None})
            b = len(items)
            targets = {t: torch.zeros((b, *self.reader.shapes[t]), dtype=torch.float16) for t in self.teachers}
            ok = {t: torch.zeros(b, dtype=torch.bool) for t in self.teachers}
            if uniq:
                got, got_ok = self.reader.fetch(uniq)  # one batched read; rows de-duplicated across samples
                where = {p: n for n, p in enumerate(uniq)}
                dst = [n for n, p in enumerate(paths) if p is not None]
                src = torch.tensor([where[paths[n]] for n in dst], dtype=torch.long)
                dst_t = torch.tensor(dst, dtype=torch.long)
                for t in self.teachers:
                    targets[t][dst_t] = got[t].index_select(0, src)
                    ok[t][dst_t] = got_ok[t].index_select(0, src)
            items.targets, items.ok = targets, ok
        return items

    def _item(self, i: int) -> dict[str, Any]:
        s = self.sample(i)
        sid = s["id"]
        key = self.image_key(i)
        has_image = key is not None
        try:
            ids, labels = tokenize_conversation(
                s["conversations"], self.tokenizer, self.template, has_image=has_image, sample_id=sid
            )
        except TemplateError as e:
            raise DataError(f"{self.annotations}: {e}") from None
        ids, labels = self._truncate(ids, labels, has_image, sid)
        if has_image:
            img = self._load_image(s["image"], key, sid)
            pixels = self._pixels(img)
        else:
            pixels = torch.zeros(self._pixel_shape, dtype=torch.float32)
        return {
            "id": sid,
            "image_path": key,
            "has_image": has_image,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixels,
        }

    def _truncate(
        self, ids: list[int], labels: list[int], has_image: bool, sid: str
    ) -> tuple[list[int], list[int]]:
        budget = self.max_length - (self.image_block - 1 if has_image else 0)
        if len(ids) <= budget:
            return ids, labels
        if has_image and ids.index(IMAGE_TOKEN_INDEX) >= budget:
            # cutting inside or before the image block would leave an image sample without its image
            raise DataError(
                f"sample {sid!r}: the image placeholder sits at token {ids.index(IMAGE_TOKEN_INDEX)}, beyond "
                f"data.max_length={self.max_length} minus the {self.image_block}-position image block; raise "
                f"data.max_length or shorten the text before <image>"
            )
        return ids[:budget], labels[:budget]

    def _load_image(self, raw: str, key: str, sid: str) -> Image.Image:
        try:
            return load_rgb(self.image_root / key)
        except ImageError as e:
            if e.reason == "missing file" and raw != key:
                # the key is normalised (NFC, '/' separators); the file on disk is named as annotated
                try:
                    return load_rgb(self.image_root / raw)
                except ImageError:
                    pass
            raise DataError(
                f"sample {sid!r}: cannot load image {e.path}: {e.reason} (data.image_root={self.image_root}); "
                f"fix or remove the sample (`olacache build` records such images as failed)"
            ) from None

    def _pixels(self, img: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            img = pad_to_square(img, processor_mean_color(self.image_processor))
        return run_processor(self.image_processor, img)

    def _probe_pixel_shape(self) -> tuple[int, ...]:
        # the processor decides the output size (crop vs resize, 336 vs 768, ...): ask it once
        return tuple(run_processor(self.image_processor, Image.new("RGB", (8, 8))).shape)


class _Items(list):
    """A batch's items plus its batch-level targets, handed from ``__getitems__`` to ``collate`` in the
    worker (no per-sample split and re-stack of multi-MB target tensors)."""

    targets: dict[str, torch.Tensor] | None = None
    ok: dict[str, torch.Tensor] | None = None
    epoch: int | None = None
    step: int | None = None


# ----------------------------------------------------------------------------------------------- images


def processor_mean_color(processor: Any) -> tuple[int, int, int]:
    """The reference's pad colour: the processor's mean as ``int(255 * m)`` per channel."""
    mean = getattr(processor, "image_mean", None)
    if mean is None:  # a torchvision/timm Compose: look for its Normalize
        for tr in getattr(processor, "transforms", []) or []:
            if hasattr(tr, "mean"):
                mean = tr.mean
                break
    if mean is None:
        raise DataError(f"cannot find the normalisation mean of image processor {type(processor).__name__}")
    m = [float(x) for x in (mean if hasattr(mean, "__len__") else [mean] * 3)]
    if len(m) == 1:
        m = m * 3
    return tuple(int(255 * x) for x in m[:3])  # type: ignore[return-value]


def pad_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically (LLaVA's expand2square: offset = diff // 2)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def run_processor(processor: Any, img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 from an HF image processor or a plain PIL -> tensor transform (timm/torchvision)."""
    if hasattr(processor, "preprocess"):
        out = processor(images=img, return_tensors="pt")["pixel_values"]
        return out[0].float()
    out = processor(img)
    return out.float() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- targets


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
        ok_t = st == _ST_OK
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
                f"{int((st == _ST_MISSING).sum())} not computed yet, {int((st == _ST_FAILED).sum())} failed)"
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


# ----------------------------------------------------------------------------------------------- collate


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
    """
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
    return {
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


class _Collate:
    """Picklable collate bound to a pad id (spawn/forkserver workers pickle the collate_fn)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.pad_id)


# ----------------------------------------------------------------------------------------------- sampling


class _BatchIndices(list):
    """A rank's index list for one step; carries its position to ``__getitems__`` (pickles with attrs)."""

    epoch: int = 0
    step: int = 0


class StepBatchSampler(Sampler[list[int]]):
    """Infinite, deterministic, rank-sharded batches addressed by global step.

    With N = ``n`` samples, B = per-rank ``batch_size``, W = ``world_size``, G = B * W:

    - epoch e's order is ``perm_e = np.random.default_rng([seed, e]).permutation(N)`` (``arange(N)`` when
      ``shuffle=False``);
    - ``drop_last=True``: ``steps_per_epoch = N // G``; step s is global batch ``k = s % steps_per_epoch`` of
      epoch ``e = s // steps_per_epoch``, i.e. ``perm_e[k*G : (k+1)*G]`` (the last ``N % G`` samples of each
      epoch's order are not used in that epoch);
    - ``drop_last=False``: the orders of epochs 0, 1, 2, ... are concatenated into one stream and step s is
      ``stream[s*G : (s+1)*G]`` (a batch may straddle two epochs; nothing is dropped or padded);
    - rank r takes the contiguous block ``global_batch[r*B : (r+1)*B]``.

    So at every step the ranks' batches are disjoint, their union is the global batch, and concatenating them
    in rank order (what ``all_gather`` returns) equals, element for element, the batch a single process with
    ``batch_size = B*W`` gets at that step — the DDP-vs-single-process equivalence the tests rely on.
    Iteration starts at ``start_step`` (resume) without touching earlier batches and never ends.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.n, self.batch_size, self.rank, self.world_size = int(n), int(batch_size), int(rank), int(world_size)
        self.shuffle, self.seed, self.start_step, self.drop_last = shuffle, int(seed), int(start_step), drop_last
        self.global_batch_size = self.batch_size * self.world_size
        if self.n == 0:
            raise DataError("the dataset is empty (no samples left to train on)")
        if drop_last and self.n < self.global_batch_size:
            raise DataError(
                f"{self.n} samples cannot fill one global batch of {self.global_batch_size} "
                f"({self.batch_size} per rank x {self.world_size} ranks) with drop_last; use a smaller batch"
            )
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over the data (fractional with drop_last=False)."""
        if self.drop_last:
            return self.n // self.global_batch_size
        return self.n / self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        p = self._perm_cache.get(epoch)
        if p is None:
            if self.shuffle:
                p = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                p = np.arange(self.n)
            if len(self._perm_cache) >= 2:  # a batch spans at most two epochs
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = p
        return p

    def global_batch(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch of the batch's first sample, the G sample indices of global step ``step``)."""
        g = self.global_batch_size
        if self.drop_last:
            spe = self.n // g
            epoch, k = divmod(step, spe)
            return epoch, self.permutation(epoch)[k * g : (k + 1) * g]
        start = step * g
        epoch, off = divmod(start, self.n)
        first = epoch
        parts = []
        need = g
        while need > 0:
            chunk = self.permutation(epoch)[off : off + need]
            parts.append(chunk)
            need -= len(chunk)
            epoch, off = epoch + 1, 0
        return first, np.concatenate(parts)

    def indices(self, step: int) -> _BatchIndices:
        epoch, gb = self.global_batch(step)
        out = _BatchIndices(int(x) for x in gb[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
        out.epoch, out.step = epoch, step
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1


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
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        ctx = multiprocessing_context
        if ctx is None and "fork" in mp.get_all_start_methods():
            ctx = "fork"
        kwargs.update(persistent_workers=True, multiprocessing_context=ctx)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_Collate(dataset.pad_id),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )

