"""A fourth teacher in one small module: a timm ViT's patch tokens.

This is the worked example of the extension point (used by tests/test_teachers.py): subclass ``Teacher``,
implement ``save_tiny`` / ``_load`` / ``_forward`` / ``target_shape`` / ``_target_spec``, then one line:

    register_teacher(VitTinyTeacher)        # or: TEACHERS["vit_tiny"] = VitTinyTeacher in the registry

The architecture is real (timm ``vit_tiny_patch16_224``); the "tiny" preset is it with random weights, saved in
timm's Hub layout (config.json + model.safetensors) and loaded back through ``local-dir:`` like a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from olacache.teachers.base import ImagePipeline, Teacher, write_preset_marker

ARCH = "vit_tiny_patch16_224"


class VitTinyTeacher(Teacher):
    name: ClassVar[str] = "vit_tiny"
    default_source: ClassVar[str] = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    layout: ClassVar[str] = "(tokens=14*14 row-major patch grid, channels)"

    @classmethod
    def save_tiny(cls, out_dir: Path, seed: int = 0) -> None:
        import timm
        from timm.models import save_for_hf

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(ARCH, pretrained=False)
        save_for_hf(model, str(out_dir), safe_serialization=True)
        write_preset_marker(Path(out_dir), seed)

    def _load(self) -> torch.nn.Module:
        import timm

        prefix = "local-dir:" if self.local_dir is not None else "hf-hub:"
        model = timm.create_model(prefix + self.source, pretrained=True)
        cfg = model.pretrained_cfg
        _, h, w = cfg["input_size"]
        self.pipeline = ImagePipeline(
            steps=(("resize", h, w, cfg.get("interpolation", "bicubic")),),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )
        gh, gw = model.patch_embed.grid_size
        self._tokens, self._dim, self._prefix = gh * gw, model.embed_dim, model.num_prefix_tokens
        return model

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self._tokens, self._dim)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)[:, self._prefix :, :]

    def _target_spec(self) -> dict[str, Any]:
        return {"module": f"timm {ARCH} forward_features (final norm)", "tokens": "patch tokens"}
