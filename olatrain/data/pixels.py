"""The base encoder's pixels: its image processor (HF or timm), LLaVA's pad-to-square, and running either.

Used by the dataset, ``olatrain generate`` and probing, so every path turns an image into the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from olatrain.data.errors import DataError
from olatrain.presets import resolve


class TimmImageProcessor:
    """Minimal HF-processor-shaped wrapper around timm's eval transform for ``timm:<name>`` encoders:
    ``proc(images, return_tensors="pt")["pixel_values"]`` and ``image_mean`` (for ``pad`` aspect)."""

    def __init__(self, model_name: str) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        pcfg = timm.models.get_pretrained_cfg(model_name)
        data_cfg = resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
        self.transform = create_transform(**data_cfg)
        self.image_mean = list(data_cfg["mean"])
        self.image_std = list(data_cfg["std"])
        size = int(data_cfg["input_size"][-1])
        self.crop_size = {"height": size, "width": size}

    def __call__(self, images: Any, return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        if not isinstance(images, (list, tuple)):
            images = [images]
        return {"pixel_values": torch.stack([self.transform(im.convert("RGB")) for im in images])}


def load_image_processor(cfg: Any) -> Any:
    """The base encoder's image processor (``"tiny"`` -> the preset's CLIPImageProcessor; ``timm:`` -> timm's
    eval transform wrapped in :class:`TimmImageProcessor`).

    A CLIP processor is always the PIL implementation (LLaVA-1.5's, and the one the gen teacher's pipeline
    reproduces): transformers 5's default ``CLIPImageProcessor`` resizes with torchvision instead, whose bicubic
    differs from PIL's by up to 0.015 in normalised pixels, so the base encoder would see other pixels than
    the reference and than the teachers."""
    name = cfg.model.vision
    if name.startswith("timm:"):
        return TimmImageProcessor(name[len("timm:") :].partition("@")[0])
    from transformers import AutoImageProcessor

    source = resolve("vision", name)
    proc = AutoImageProcessor.from_pretrained(source)
    if type(proc).__name__ in ("CLIPImageProcessor", "CLIPImageProcessorFast"):
        return clip_pil_processor(source)
    return proc


def clip_pil_processor(source: Any) -> Any:
    """The PIL-backed CLIP image processor from ``source``: ``CLIPImageProcessorPil`` (transformers >= 5), or
    the slow ``CLIPImageProcessor``, which is the PIL one in earlier versions."""
    try:
        from transformers import CLIPImageProcessorPil as Pil
    except ImportError:  # transformers 4: the slow class is the PIL implementation
        from transformers import CLIPImageProcessor as Pil
    return Pil.from_pretrained(source)


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
