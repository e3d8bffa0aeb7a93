"""The frozen base vision encoder (docs/method.md §2): HF CLIP/SigLIP or timm -> (B, N_img, d) patch features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from olatrain.presets import resolve


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword (transformers 5 renamed torch_dtype -> dtype)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


class VisionEncoder(nn.Module):
    """Frozen image encoder -> (B, N_img, d) patch features (prefix tokens such as CLS dropped).

    ``name``: a HF CLIP / SigLIP vision checkpoint (hub id or local dir; a full CLIPModel checkpoint such as
    openai/clip-vit-large-patch14-336 works, its vision half is loaded), or ``timm:<model>[@<weights file>]``.
    timm models are created by name WITHOUT downloading (``pretrained=False``); real weights must be given as a
    local file after ``@`` (loaded through timm's ``pretrained_cfg_overlay``), otherwise the encoder is random.
    ``layer`` follows HF ``hidden_states`` numbering: -2 = penultimate block output (LLaVA-1.5), k>0 = block k.
    """

    def __init__(self, name: str, layer: int = -2, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.name = name
        self.layer = layer
        if layer == 0:
            raise ValueError(
                "model.vision_layer 0 (patch embeddings) is not supported; use -2 or a block number"
            )
        if name.startswith("timm:"):
            self.kind = "timm"
            self.model = self._build_timm(name[len("timm:") :])
            self.n_prefix = 0  # forward_intermediates already drops prefix (CLS/register) tokens
            self.out_dim = int(self.model.num_features)
            cfg = getattr(self.model, "pretrained_cfg", {}) or {}
            self.image_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        else:
            from transformers import AutoConfig

            path = resolve("vision", name)
            mtype = AutoConfig.from_pretrained(path).model_type
            if mtype.startswith("siglip"):
                from transformers import SiglipVisionModel as cls

                self.n_prefix = 0
            elif mtype.startswith("clip"):
                from transformers import CLIPVisionModel as cls

                self.n_prefix = 1  # CLS
            else:
                raise ValueError(
                    f"unsupported vision model type {mtype!r} at {name!r}; use CLIP, SigLIP or timm:"
                )
            self.kind = "hf"
            self.model = cls.from_pretrained(path, **dtype_kwarg(dtype))
            self.out_dim = int(self.model.config.hidden_size)
            self.image_size = int(self.model.config.image_size)
        self.model.requires_grad_(False)
        self.model.eval()

    @staticmethod
    def _build_timm(spec: str) -> nn.Module:
        import timm

        model_name, _, weights = spec.partition("@")
        if weights:
            return timm.create_model(
                model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": weights}
            )
        return timm.create_model(model_name, pretrained=False, num_classes=0)

    def train(self, mode: bool = True) -> VisionEncoder:
        # always frozen and in eval mode (no dropout / BN statistics updates), whatever the parent does
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            feats = out.hidden_states[self.layer]
        else:
            idx = self.layer if self.layer < 0 else self.layer - 1  # timm indices are 0-based blocks
            feats = self.model.forward_intermediates(
                pixel_values, indices=[idx], intermediates_only=True, norm=False
            )[0]
            if feats.dim() == 4:  # NCHW feature map (CNNs, and ViTs by default) -> (B, H*W, C)
                feats = feats.flatten(2).transpose(1, 2)
        return feats[:, self.n_prefix :]
