"""``ConversationDataset``: LLaVA conversations (+ images, + cached targets), built lazily in DataLoader workers.

Annotations come from ``olacache.inputs.annotations``, tokens from ``olatrain.data.templates``, pixels from
``olacache.inputs.images.load_under_root`` + the base encoder's processor (``olatrain.data.pixels``). ``__getitems__``
builds a whole batch and fetches its targets from the store in ONE ``TargetReader.fetch`` call (sorted,
de-duplicated rows: the store reads fast only in batches). The rest of the pipeline: ``targets.py`` (which
samples have usable targets), ``sampler.py`` (which samples a rank gets at a step), ``loader.py`` (collate and
the DataLoader).

Bad data never stops training silently (``skips.py``): an image that fails to load is replaced by the next
usable sample and recorded, a store row holding non-finite values is masked like a failed target and recorded;
the records travel with the batch (``batch["skipped"]``) to the training loop, which writes them to
``skipped.jsonl``. An error inside a DataLoader worker comes back as a clean ``DataError`` message (see
``loader.py``), never as a worker traceback.

Text is bounded before tokenisation: each turn (and the conversation) is cut at ``data.max_length *
MAX_CHARS_PER_TOKEN`` characters, which can only drop text that the token truncation drops anyway.

Memory: the samples are kept packed (one UTF-8 JSON blob + offsets in numpy arrays), not as a list of dicts.
DataLoader workers touching millions of small Python objects copy-on-write the whole list into every worker
(refcount updates dirty the pages; pytorch issue 13246); flat numpy buffers stay shared after fork and pickle
as one memcpy under spawn/forkserver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from olacache.inputs.annotations import load_annotations
from olacache.inputs.images import ImageError, load_under_root, missing_under_root
from olacache.inputs.keys import normalize_image_path
from olatrain.config import Config
from olatrain.data.errors import DataError
from olatrain.data.pixels import pad_to_square, processor_mean_color, run_processor
from olatrain.data.skips import (
    BAD_IMAGE_POLICIES,
    MAX_REPLACEMENT_TRIES,
    image_record,
    nonfinite_rows,
    scan_images,
    target_record,
)
from olatrain.data.templates import IMAGE_TOKEN_INDEX, TemplateError, tokenize_conversation

# An upper bound on the characters one token covers in the vocabularies we train with (the longest tokens are
# runs of spaces/punctuation; a few dozen characters at most). The first max_length * 64 characters of a text
# always make at least max_length tokens, so cutting there before tokenising changes nothing after the token
# truncation, while a 50 MB caption costs 128K characters (data.max_length=2048) instead of gigabytes.
MAX_CHARS_PER_TOKEN = 64


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
        self.max_chars = self.max_length * MAX_CHARS_PER_TOKEN
        self.bad_images = getattr(cfg.data, "bad_images", "skip")
        if self.bad_images not in BAD_IMAGE_POLICIES:
            raise DataError(f"data.bad_images must be one of {list(BAD_IMAGE_POLICIES)}, got {self.bad_images!r}")
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
        self._plan: Any = None  # the batch sampler, for store read-ahead (set_batch_plan)

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
        if items.error is not None:
            raise DataError(items.error)
        item = items[0]
        if items.targets is not None:
            item["targets"] = {t: v[0] for t, v in items.targets.items()}
            item["target_ok"] = {t: bool(v[0]) for t, v in items.ok.items()}
        return item

    def __getitems__(self, indices: Sequence[int]) -> _Items:
        """A batch of items plus its targets from ONE ``reader.fetch`` (called by the DataLoader's fetcher
        with the whole index list of a batch, inside the worker). Inside a worker a ``DataError`` is returned
        as ``items.error`` (re-raised by the loader in the main process with its message alone)."""
        try:
            return self._batch(indices)
        except DataError as e:
            if get_worker_info() is None:
                raise
            failed = _Items()
            failed.error = str(e)
            return failed

    def set_batch_plan(self, plan: Any) -> None:
        """The batch sampler (``plan.indices(step)`` -> that step's sample indices), so a worker can start the
        store reads of the batches it will make next (``data.store_readahead``)."""
        self._plan = plan

    def _read_ahead(self, indices: Sequence[int]) -> None:
        """Start the store reads of this batch and of the next ``reader.readahead`` batches THIS process will
        make, in the background (TargetReader.prefetch): on object storage each read is network round trips,
        which then overlap the image decoding and the batches before. DataLoader workers take batches in
        turn (torch's round robin), so the worker making step s makes s + W next (W workers; W = 1 without
        workers). A wrong guess (a replaced image, another order) only costs a read: ``fetch`` matches by
        the batch's exact paths."""
        plan, step = getattr(self, "_plan", None), getattr(indices, "step", None)
        depth = int(getattr(self.reader, "readahead", 0) or 0)
        if plan is None or step is None or depth <= 0 or not self.teachers:
            return
        info = get_worker_info()
        w = 1 if info is None else info.num_workers
        for k in range(depth + 1):
            batch = indices if k == 0 else plan.indices(step + k * w)
            paths = sorted({p for p in (self.image_key(int(i)) for i in batch) if p is not None})
            if paths:
                self.reader.prefetch(paths)

    def _batch(self, indices: Sequence[int]) -> _Items:
        if self.reader is not None:
            self._read_ahead(indices)
        items = _Items()
        items.skipped = []
        for i in indices:
            items.append(self._item_or_replacement(int(i), items.skipped))
        items.epoch = getattr(indices, "epoch", None)
        items.step = getattr(indices, "step", None)
        if self.reader is not None and self.teachers:
            paths = [it["image_path"] if it["has_image"] else None for it in items]
            uniq = sorted({p for p in paths if p is not None})
            b = len(items)
            targets = {t: torch.zeros((b, *self.reader.shapes[t]), dtype=torch.float16) for t in self.teachers}
            ok = {t: torch.zeros(b, dtype=torch.bool) for t in self.teachers}
            if uniq:
                got, got_ok = self._fetch(uniq)  # one batched read; rows de-duplicated across samples
                where = {p: n for n, p in enumerate(uniq)}
                dst = [n for n, p in enumerate(paths) if p is not None]
                src = torch.tensor([where[paths[n]] for n in dst], dtype=torch.long)
                dst_t = torch.tensor(dst, dtype=torch.long)
                for t in self.teachers:
                    bad = got_ok[t] & nonfinite_rows(got[t])
                    if bool(bad.any()):  # a corrupted row: failed target, never a NaN in the loss
                        got_ok[t] = got_ok[t] & ~bad
                        got[t][bad] = 0
                        for n in dst:
                            if bool(bad[where[paths[n]]]):
                                items.skipped.append(target_record(items[n]["id"], paths[n], t))
                    targets[t][dst_t] = got[t].index_select(0, src)
                    ok[t][dst_t] = got_ok[t].index_select(0, src)
            items.targets, items.ok = targets, ok
        return items

    def _fetch(self, paths: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        from olacache.store import StoreError

        try:
            return self.reader.fetch(paths)
        except (StoreError, OSError) as e:
            raise DataError(self._replaced_column() or (
                f"cannot read targets from store {getattr(self.reader, 'url', '?')} ({' '.join(str(e).split())}); "
                f"check it with `olacache verify`"
            )) from None

    def _replaced_column(self) -> str | None:
        """The reader's one line if a column it reads was replaced under this run (``--overwrite-teacher``):
        that explains any read error, and `olacache verify` would find nothing wrong with the new column."""
        from olacache.store import StoreError

        check = getattr(self.reader, "check_generation", None)  # any reader with fetch() will do here
        try:
            if check is not None:
                check(force=True)
        except StoreError as e:
            return " ".join(str(e).split())
        return None

    def _item_or_replacement(self, i: int, skipped: list[dict[str, Any]]) -> dict[str, Any]:
        """Active sample ``i``, or under ``data.bad_images=skip``, when its image cannot be used, the next
        active sample (wrapping) whose image can. Sample ``i``'s failure is appended to ``skipped`` (the
        samples passed over on the way are recorded when they are asked for themselves)."""
        n = len(self)
        first: list[dict[str, Any]] = []
        for k in range(min(n, MAX_REPLACEMENT_TRIES)):
            j = (i + k) % n
            try:
                item = self._item(j)
            except _BadImage as e:
                if self.bad_images == "error":
                    raise DataError(
                        f"sample {e.sid!r}: cannot use image {e.path}: {e.reason} (data.image_root="
                        f"{self.image_root}, data.bad_images=error); fix or remove the sample, or set "
                        f"data.bad_images=skip"
                    ) from None
                first.append(image_record(e.sid, e.key, e.reason, e.path))
                continue
            if first:
                first[0]["replaced_by"] = item["id"]
                skipped.append(first[0])
            return item
        e0 = first[0]
        raise DataError(
            f"{len(first)} images in a row could not be used (from sample {e0['id']!r}: {e0['path']}: "
            f"{e0['reason']}); is data.image_root={self.image_root} right? Check the files, or fix "
            f"{self.annotations}"
        )

    def _distinct_images(self) -> Iterator[tuple[int, str]]:
        """(active index, store key) of each image's first active sample, in sample order."""
        seen: set[str] = set()
        for i in range(len(self)):
            key = self.image_key(i)
            if key is not None and key not in seen:
                seen.add(key)
                yield i, key

    def check_image_root(self, probe: int = 32) -> None:
        """Refuse a wrong ``data.image_root`` before step 1: when none of the first ``probe`` distinct images
        of the active samples exists there (a cheap stat each), replacing them one by one would only train on
        the text-only samples."""
        tried: list[Path] = []
        for i, key in self._distinct_images():
            raw = self.sample(i)["image"]
            # the same lookup the loader uses (as written, NFC, NFD): an NFD-named file is not a wrong root
            if any(missing_under_root(self.image_root, rel) is None for rel in dict.fromkeys((key, raw))):
                return
            tried.append(self.image_root / key)
            if len(tried) >= probe:
                break
        if tried:
            raise DataError(
                f"none of the first {len(tried)} images of {self.annotations} exists under data.image_root="
                f"{self.image_root} (first path tried: {tried[0]}); set data.image_root to the directory the "
                f"annotation paths are relative to"
            )

    def scan_bad_images(self, threads: int, *, rank: int = 0, world: int = 1) -> list[tuple[str, str]]:
        """Decode every image of the active samples (the ``data.bad_images=error`` pre-scan), or this rank's
        share of them (every ``world``-th distinct image from ``rank``); -> [(sample id and path, reason)] of
        the failures."""
        jobs: list[tuple[str, str]] = []
        for i, key in self._distinct_images():
            s = self.sample(i)
            jobs.append((str(i), f"sample {s['id']!r} ({key})"))

        def load(job: str) -> None:
            i = int(job)
            s = self.sample(i)
            self._pixels(self._load_image(s["image"], self.image_key(i) or "", s["id"]))

        return scan_images(jobs[rank::world], load, threads)

    def _item(self, i: int) -> dict[str, Any]:
        s = self.sample(i)
        sid = s["id"]
        key = self.image_key(i)
        has_image = key is not None
        try:
            ids, labels = tokenize_conversation(
                s["conversations"], self.tokenizer, self.template, has_image=has_image, sample_id=sid,
                max_chars=self.max_chars,
            )
        except TemplateError as e:
            raise DataError(f"{self.annotations}: {e}") from None
        ids, labels = self._truncate(ids, labels, has_image, sid)
        if has_image:
            img = self._load_image(s["image"], key, sid)
            try:
                pixels = self._pixels(img)
            except DataError:
                raise
            except Exception as e:  # the processor on an image it cannot handle: that image is bad data
                raise _BadImage(sid, key, str(self.image_root / key), f"cannot preprocess: {e}") from None
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
        # load_under_root: the build's lookup (as written, NFC, NFD) and its containment check (a symlink
        # leading outside data.image_root is a bad image, as it is a failed row in the store)
        try:
            return load_under_root(self.image_root, key)
        except ImageError as e:
            if e.reason == "missing file" and raw != key:
                # the key is normalised ('/' separators, '.' dropped); the file on disk is named as annotated
                try:
                    return load_under_root(self.image_root, raw)
                except ImageError:
                    pass
            raise _BadImage(sid, key, e.path, e.reason) from None

    def _pixels(self, img: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            img = pad_to_square(img, processor_mean_color(self.image_processor))
        return run_processor(self.image_processor, img)

    def _probe_pixel_shape(self) -> tuple[int, ...]:
        # the processor decides the output size (crop vs resize, 336 vs 768, ...): ask it once
        return tuple(run_processor(self.image_processor, Image.new("RGB", (8, 8))).shape)


class _BadImage(Exception):
    """An image sample whose image cannot be used (decoding or preprocessing failed); handled by the policy."""

    def __init__(self, sid: str, key: str, path: str, reason: str) -> None:
        super().__init__(sid, key, path, reason)
        self.sid, self.key, self.path, self.reason = sid, key, path, reason


class _Items(list):
    """A batch's items plus its batch-level targets, handed from ``__getitems__`` to ``collate`` in the
    worker (no per-sample split and re-stack of multi-MB target tensors), the records of what was skipped,
    and, from a worker, the message of a ``DataError`` instead of the items."""

    targets: dict[str, torch.Tensor] | None = None
    ok: dict[str, torch.Tensor] | None = None
    epoch: int | None = None
    step: int | None = None
    skipped: list[dict[str, Any]] | None = None
    error: str | None = None
