"""seg teacher: OneFormer (COCO, Swin-L) backbone, last stage.

Target (per image, float32, shape ``(576, C)``; C = 1536 for Swin-L):
    the Swin backbone's LAST stage feature map (stride 32, after the backbone's per-stage LayerNorm, i.e.
    ``SwinBackbone(...).feature_maps[-1]``; the input of the pixel decoder, NOT a pixel-decoder level),
    resized with bilinear interpolation (``align_corners=False``) from 25x25 to 24x24.
Layout: token index ``i = y * 24 + x`` (row-major over the 24x24 grid), channels last; i.e. the (C, 24, 24) map
    ``.permute(1, 2, 0).reshape(576, C)``. (The reference keeps (C, 24, 24); we store token-major so all
    spatial teachers share one layout and a row is one contiguous (576, C) block.)

Preprocessing (docs/method.md §3.2): PIL squash to 768x768 (PIL's default bicubic), then what
``OneFormerProcessor`` does for the checkpoint, reproduced here without tokenising the task text: resize by the
``shortest_edge``/``longest_edge`` rule (800/1333 for COCO Swin-L -> 800x800) with the checkpoint's ``resample``
(bilinear) on the uint8 image as the reference's PIL-based processor did, rescale, normalise. Those values are
read from the checkpoint's ``preprocessor_config.json`` (documented defaults if absent) and recorded in spec().
We do not instantiate ``OneFormerImageProcessor``: it downloads class metadata from the Hub at construction.

Loading: ``OneFormerForUniversalSegmentation.from_pretrained`` (the checkpoint's own class, so every key matches)
and only ``model.pixel_level_module.encoder`` (the Swin backbone, ~197M of ~219M params for Swin-L) is kept; the
pixel decoder, transformer decoder and task/text encoders are dropped after loading.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePipeline,
    Teacher,
    interpolation_name,
    load_json_config,
    write_preset_marker,
)

SQUASH_SIZE = 768
"""The reference squashes every image to 768x768 before the OneFormer processor."""
GRID = 24
"""Output grid side: 24x24 = 576 tokens, the MLLM's image-token count."""

# OneFormerImageProcessor's class defaults (= shi-labs/oneformer_coco_swin_large per the method notes).
_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 800, "longest_edge": 1333},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1.0 / 255.0,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}


def shortest_edge_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """(H, W) after HF's shortest/longest-edge resize (``get_size_with_aspect_ratio``)."""
    size = shortest
    raw_size = None
    if longest is not None:
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > longest:
            raw_size = longest * lo / hi
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        w = size
        h = int((raw_size if raw_size is not None else size) * height / width)
    else:
        h = size
        w = int((raw_size if raw_size is not None else size) * width / height)
    return h, w


class SegTeacher(Teacher):
    name: ClassVar[str] = "seg"
    default_source: ClassVar[str] = "shi-labs/oneformer_coco_swin_large"
    layout: ClassVar[str] = "(tokens=y*24+x over the 24x24 grid, channels)"
    kind: ClassVar[str | None] = "spatial"

    @classmethod
    def save_tiny(cls, out_dir: Path, seed: int = 0) -> None:
        """OneFormerForUniversalSegmentation with a 4-stage Swin (patch 4, window 12 as Swin-L, embed 16,
        depth 1 per stage -> last stage 128 ch at stride 32) and a minimal pixel/transformer decoder."""
        from transformers import OneFormerConfig, OneFormerForUniversalSegmentation, SwinConfig

        out_dir = Path(out_dir)
        backbone = SwinConfig(
            image_size=384,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            window_size=12,
            drop_path_rate=0.3,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        config = OneFormerConfig(
            backbone_config=backbone,
            num_labels=133,
            num_queries=4,
            conv_dim=32,  # GroupNorm(32, conv_dim) in the pixel decoder: multiples of 32 only
            mask_dim=32,
            hidden_dim=32,
            encoder_feedforward_dim=32,
            dim_feedforward=32,
            encoder_layers=1,
            decoder_layers=2,
            num_attention_heads=2,
            query_dec_layers=1,
            text_encoder_width=16,
            text_encoder_num_layers=1,
            text_encoder_proj_layers=1,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = OneFormerForUniversalSegmentation(config)
        model.save_pretrained(out_dir)
        _save_image_processor(out_dir)
        write_preset_marker(out_dir, seed)

    def _load(self) -> torch.nn.Module:
        from transformers import OneFormerForUniversalSegmentation

        full = OneFormerForUniversalSegmentation.from_pretrained(self.source, dtype=torch.float32)
        encoder = full.model.pixel_level_module.encoder
        del full  # only the backbone is part of the target
        gc.collect()

        last = encoder.stage_names[-1]
        if last not in encoder.out_features:
            raise ValueError(
                f"seg teacher {self.source!r}: backbone out_features {encoder.out_features} lack the last "
                f"stage {last!r}"
            )
        self._stage_index = list(encoder.out_features).index(last)
        self._stage = last
        self._channels = int(encoder.channels[self._stage_index])
        self.pipeline = self._build_pipeline()
        return encoder

    def _build_pipeline(self) -> ImagePipeline:
        cfg = dict(_PROCESSOR_DEFAULTS)
        cfg.update(load_json_config(self.source, "preprocessor_config.json") or {})
        steps: list[tuple[Any, ...]] = [("resize", SQUASH_SIZE, SQUASH_SIZE, "bicubic")]
        if cfg["do_resize"]:
            size = cfg["size"]
            if isinstance(size, int):  # legacy configs: size=int, max_size=int
                shortest, longest = size, cfg.get("max_size")
            elif "shortest_edge" in size:
                shortest, longest = size["shortest_edge"], size.get("longest_edge")
            else:
                raise ValueError(f"seg teacher: unsupported processor size {size!r}")
            h, w = shortest_edge_size(SQUASH_SIZE, SQUASH_SIZE, int(shortest), longest)
            steps.append(("resize", h, w, interpolation_name(cfg["resample"])))
        mean = tuple(float(m) for m in cfg["image_mean"]) if cfg["do_normalize"] else (0.0, 0.0, 0.0)
        std = tuple(float(s) for s in cfg["image_std"]) if cfg["do_normalize"] else (1.0, 1.0, 1.0)
        rescale = float(cfg["rescale_factor"]) if cfg["do_rescale"] else 1.0
        return ImagePipeline(steps=tuple(steps), mean=mean, std=std, rescale=rescale)

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (GRID * GRID, self._channels)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.model(pixel_values=pixels).feature_maps[self._stage_index]  # (B, C, h, w), stride 32
        fmap = F.interpolate(fmap.float(), size=(GRID, GRID), mode="bilinear", align_corners=False)
        b, c = fmap.shape[:2]
        return fmap.permute(0, 2, 3, 1).reshape(b, GRID * GRID, c)

    def _target_spec(self) -> dict[str, Any]:
        return {
            "module": "OneFormer pixel_level_module.encoder (Swin backbone)",
            "stage": self._stage,
            "norm": "backbone per-stage LayerNorm (hidden_states_norms)",
            "resample": {"mode": "bilinear", "align_corners": False, "size": [GRID, GRID]},
            "grid": [GRID, GRID],
        }


def _save_image_processor(out_dir: Path) -> None:
    """Write the processor config the real checkpoint ships (the teacher reads resize/normalise values from it)."""
    import json

    cfg = {
        "image_processor_type": "OneFormerImageProcessor",
        "processor_class": "OneFormerProcessor",
        **_PROCESSOR_DEFAULTS,
        "ignore_index": 255,
        "do_reduce_labels": False,
        "num_text": 134,
        "num_labels": 133,
    }
    (Path(out_dir) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
