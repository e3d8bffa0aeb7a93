"""gen teacher: the Stable-Diffusion-2.1-unCLIP image encoder (OpenCLIP ViT-H/14).

Target (per image, float32, shape ``(1, C)``; C = 1024 for ViT-H): ``CLIPVisionModelWithProjection(...)
.image_embeds``, the projected and NOT L2-normalised embedding the unCLIP pipeline conditions on.
Layout: a single token, channels last.

Loading: only the two sub-folders the target needs are read, ``image_encoder/`` with
``CLIPVisionModelWithProjection.from_pretrained(source, subfolder="image_encoder")`` and ``feature_extractor/``
(the CLIP image-processor config). The reference loads the whole diffusers pipeline (UNet, text encoder, VAE:
~1.9B params, ~3.9 GB fp16 per GPU) to use ~632M of it; diffusers is never imported here.

Preprocessing: the feature extractor's values (SD-2.1-unCLIP: shortest side -> 224 bicubic, center crop 224,
/255, CLIP mean/std) applied with PIL on the uint8 image, which is what the reference's (transformers 4.x, PIL
based) ``CLIPImageProcessor`` did. Transformers 5's default ``CLIPImageProcessor`` is the torchvision backend,
whose antialiased tensor resize differs slightly; we follow the PIL path (``CLIPImageProcessorPil``
semantics) and read the configuration through that class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import CLIP_MEAN, CLIP_STD, ImagePipeline, Teacher, interpolation_name, write_preset_marker

ENCODER_SUBFOLDER = "image_encoder"
PROCESSOR_SUBFOLDER = "feature_extractor"


class GenTeacher(Teacher):
    name: ClassVar[str] = "gen"
    default_source: ClassVar[str] = "stabilityai/stable-diffusion-2-1-unclip"
    weights_subfolder: ClassVar[str | None] = ENCODER_SUBFOLDER
    layout: ClassVar[str] = "(1 token, channels)"
    kind: ClassVar[str | None] = "global"

    @classmethod
    def save_tiny(cls, out_dir: Path, seed: int = 0) -> None:
        """The unCLIP repo layout (image_encoder/, feature_extractor/) with a 2-layer, 32-wide CLIP ViT/14 at
        224 px (16x16 patches + CLS, as ViT-H/14) and a 32-d projection."""
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

        out_dir = Path(out_dir)
        config = CLIPVisionConfig(
            image_size=224,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModelWithProjection(config)
        model.save_pretrained(out_dir / ENCODER_SUBFOLDER)
        CLIPImageProcessorPil(
            do_resize=True,
            size={"shortest_edge": 224},
            resample=3,
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
            do_convert_rgb=True,
        ).save_pretrained(out_dir / PROCESSOR_SUBFOLDER)
        write_preset_marker(out_dir, seed)

    def _load(self) -> torch.nn.Module:
        from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(
            self.source, subfolder=ENCODER_SUBFOLDER, dtype=torch.float32
        )
        processor = CLIPImageProcessorPil.from_pretrained(self.source, subfolder=PROCESSOR_SUBFOLDER)
        self.pipeline = _pipeline_from_processor(processor)
        self._dim = int(model.config.projection_dim)
        return model

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (1, self._dim)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds.unsqueeze(1)

    def _target_spec(self) -> dict[str, Any]:
        return {
            "module": "CLIPVisionModelWithProjection (unCLIP image_encoder)",
            "output": "image_embeds",
            "normalized": False,
        }


def _pipeline_from_processor(processor: Any) -> ImagePipeline:
    steps: list[tuple[Any, ...]] = []
    interp = interpolation_name(processor.resample if processor.resample is not None else 3)
    if processor.do_resize:
        size = processor.size
        if size.shortest_edge:
            steps.append(("resize_shortest", int(size.shortest_edge), interp))
        elif size.height and size.width:
            steps.append(("resize", int(size.height), int(size.width), interp))
        else:
            raise ValueError(f"gen teacher: unsupported feature_extractor size {size}")
    if processor.do_center_crop:
        steps.append(("center_crop", int(processor.crop_size.height), int(processor.crop_size.width)))
    if processor.do_normalize:
        mean = tuple(float(m) for m in processor.image_mean)
        std = tuple(float(s) for s in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    return ImagePipeline(steps=tuple(steps), mean=mean, std=std, rescale=rescale)
