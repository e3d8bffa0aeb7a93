"""The picklable, weight-free image pipeline each teacher exposes (runs in the build's DataLoader workers).

:class:`ImagePipeline` is an explicit list of PIL steps plus a normalisation, so a store can record exactly
what a teacher saw (its :meth:`ImagePipeline.spec`) and ``olacache build`` can run it in worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ImagePipeline", "interpolation_name"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's integer resample codes (as stored in HF ``preprocessor_config.json`` "resample") <-> names used in specs.
_PIL_CODE_TO_NAME = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_NAME_TO_PIL = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def interpolation_name(resample: int | str) -> str:
    """Map a PIL/HF resample code (or a name) to the canonical name used in specs."""
    if isinstance(resample, str):
        name = resample.lower()
        if name not in _NAME_TO_PIL:
            raise ValueError(f"unknown interpolation {resample!r}; valid: {sorted(_NAME_TO_PIL)}")
        return name
    try:
        return _PIL_CODE_TO_NAME[int(resample)]
    except KeyError:
        raise ValueError(
            f"unknown PIL resample code {resample!r}; valid: {sorted(_PIL_CODE_TO_NAME)}"
        ) from None


@dataclass(frozen=True)
class ImagePipeline:
    """RGB PIL image -> float32 CHW tensor, as an explicit list of steps.

    Steps (applied in order, all on the uint8 image, the way the reference's PIL/HF-slow paths do it):

    * ``("resize", height, width, interp)`` — squash to an exact size (aspect ratio not kept);
    * ``("resize_shortest", edge, interp)`` — shortest side to ``edge``, long side ``int(edge * long / short)``
      (HF ``get_resize_output_image_size(default_to_square=False)`` / torchvision semantics);
    * ``("center_crop", height, width)`` — top/left offsets ``(H - h) // 2``, ``(W - w) // 2`` as in HF;
    * ``("swap_rb",)`` — RGB -> BGR channel swap (reproduces a reference quirk; see the depth teacher).

    Then ``x * rescale`` and ``(x - mean) / std`` per channel, computed in float64 and rounded once to float32
    (the reference's numpy paths are float64 too; rounding once keeps the result independent of op order),
    implemented as a 256-entry lookup table per channel.

    The dataclass is frozen and holds only tuples and floats, so it pickles cheaply into worker processes, and
    :meth:`spec` is a faithful JSON description of what it does.
    """

    steps: tuple[tuple[Any, ...], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        for step in self.steps:
            kind = step[0]
            if kind == "resize":
                _, h, w, interp = step
                interpolation_name(interp)
                if int(h) <= 0 or int(w) <= 0:
                    raise ValueError(f"bad resize step {step}")
            elif kind == "resize_shortest":
                _, edge, interp = step
                interpolation_name(interp)
                if int(edge) <= 0:
                    raise ValueError(f"bad resize_shortest step {step}")
            elif kind == "center_crop":
                _, h, w = step
                if int(h) <= 0 or int(w) <= 0:
                    raise ValueError(f"bad center_crop step {step}")
            elif kind != "swap_rb":
                raise ValueError(f"unknown pipeline step {kind!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean/std must have 3 entries (RGB)")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the input's aspect ratio."""
        size: tuple[int, int] | None = None
        for step in self.steps:
            if step[0] in ("resize", "center_crop"):
                size = (int(step[1]), int(step[2]))
            elif step[0] == "resize_shortest":
                size = None
        return size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            # Converting here would silently pick a policy for alpha/palette/CMYK/16-bit images; the caller
            # (the image source) owns that decision and must hand over RGB.
            raise ValueError(
                f"expected an RGB PIL image, got mode {image.mode!r}; convert it before preprocessing"
            )
        swap = False
        for step in self.steps:
            kind = step[0]
            if kind == "resize":
                _, h, w, interp = step
                if image.size != (w, h):
                    image = image.resize((int(w), int(h)), resample=_NAME_TO_PIL[interpolation_name(interp)])
            elif kind == "resize_shortest":
                _, edge, interp = step
                w, h = image.size
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = int(edge), int(int(edge) * long / short)
                new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
                if (new_w, new_h) != (w, h):
                    image = image.resize((new_w, new_h), resample=_NAME_TO_PIL[interpolation_name(interp)])
            elif kind == "center_crop":
                _, ch, cw = step
                w, h = image.size
                top, left = (h - int(ch)) // 2, (w - int(cw)) // 2
                image = image.crop((left, top, left + int(cw), top + int(ch)))
            elif kind == "swap_rb":
                swap = not swap
        arr = np.asarray(image, dtype=np.uint8)
        lut = self._lut
        out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
        for c in range(3):
            # output channel c is input channel 2 - c under the BGR quirk; mean/std stay indexed by c
            np.take(lut[c], arr[:, :, 2 - c if swap else c], out=out[c])
        return torch.from_numpy(out)

    @cached_property
    def _lut(self) -> np.ndarray:
        """(3, 256) float32 table of ``(v * rescale - mean_c) / std_c``, computed in float64 and rounded once.

        Inputs are uint8, so a table lookup gives bit-for-bit the float64 result at ~6x less CPU than the
        arithmetic (this runs per image in the DataLoader workers; seg images are 800x800)."""
        v = np.arange(256, dtype=np.float64)[None, :] * self.rescale
        mean = np.asarray(self.mean, dtype=np.float64)[:, None]
        std = np.asarray(self.std, dtype=np.float64)[:, None]
        return ((v - mean) / std).astype(np.float32)

    def spec(self) -> dict[str, Any]:
        """JSON-able description; includes the channel order actually fed to the network."""
        swaps = sum(1 for s in self.steps if s[0] == "swap_rb")
        return {
            "steps": [list(s) for s in self.steps],
            "channel_order": "BGR" if swaps % 2 else "RGB",
            "rescale": self.rescale,
            "mean": list(self.mean),
            "std": list(self.std),
            "output_size": list(self.output_size) if self.output_size else None,
            "dtype": "float32",
            "layout": "CHW",
        }
