"""Online targets: the one (lazy) door from the trainer to the live olacache teachers.

This is the reference's way of working (teachers resident next to the MLLM, run on every batch) and exists
as the baseline the cache is measured against (`train.targets: online`). Nothing else in olatrain imports
teacher code; the boundary tests check that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from olacache.inputs.images import ImageError, load_under_root


class OnlineTargets:
    def __init__(self, teachers: Sequence[str], *, preset: str, image_root: str | Path,
                 device: str | torch.device = "cpu", sources: dict[str, str] | None = None,
                 options: dict[str, dict] | None = None):
        from olacache.teachers import load_teacher  # lazy on purpose: see the module docstring

        self.root = Path(image_root)
        self.device = torch.device(device)
        sources, options = sources or {}, options or {}
        self.teachers = {t: load_teacher(t, preset=preset, source=sources.get(t), device=self.device,
                                         options=options.get(t))
                         for t in teachers}
        self.shapes = {t: tuple(m.target_shape) for t, m in self.teachers.items()}
        self.kinds = {t: m.target_kind for t, m in self.teachers.items()}

    def __call__(self, image_paths: Sequence[str | None], has_image: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Targets for a batch, float16 like the store (so cached and online losses are comparable)."""
        b = len(image_paths)
        imgs, idx = [], []
        for i, p in enumerate(image_paths):
            if p is None or not bool(has_image[i]):
                continue
            try:
                imgs.append(self._load(p))
                idx.append(i)
            except ImageError:
                continue
        targets, ok = {}, {}
        for t, m in self.teachers.items():
            out = torch.zeros((b, *self.shapes[t]), dtype=torch.float16)
            mask = torch.zeros(b, dtype=torch.bool)
            if imgs:
                out[idx] = m(imgs).to(torch.float16).cpu()
                mask[idx] = True
            targets[t], ok[t] = out, mask
        return targets, ok

    def _load(self, key: str) -> Any:
        """The batch carries store keys (NFC-normalised paths); ``load_under_root`` also finds a file named in
        NFD (macOS) and refuses one that resolves outside the image root, exactly as ``olacache build`` does."""
        return load_under_root(self.root, key)
