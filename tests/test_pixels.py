"""The trainer's base-encoder pixels follow the PIL path of LLaVA-1.5 (and of the teachers), checked against an
independent PIL + numpy computation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from PIL import Image

from olatrain.data.pixels import load_image_processor, run_processor

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _reference_clip_pixels(img: Image.Image, side: int = 336) -> torch.Tensor:
    """LLaVA-1.5 / OpenAI CLIP preprocessing written out: shortest edge to `side` with PIL bicubic (long edge
    int(side * long / short)), centre crop (offsets (H - h) // 2), /255, CLIP mean/std, in float64."""
    w, h = img.size
    if w <= h:
        size = (side, int(side * h / w))
    else:
        size = (int(side * w / h), side)
    r = img.resize(size, Image.Resampling.BICUBIC)
    top, left = (r.height - side) // 2, (r.width - side) // 2
    x = np.asarray(r, dtype=np.float64)[top : top + side, left : left + side] / 255.0
    x = (x - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("name", ["chelsea.jpg", "astronaut.jpg", "coffee.jpg"])
def test_clip_processor_is_the_pil_path(name: str) -> None:
    proc = load_image_processor(SimpleNamespace(model=SimpleNamespace(vision="tiny")))
    img = Image.open(EXAMPLES / "images" / name).convert("RGB")
    got = run_processor(proc, img)
    ref = _reference_clip_pixels(img)
    assert got.shape == ref.shape == (3, 336, 336)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
