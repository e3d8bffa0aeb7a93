"""depth teacher: Depth-Anything-V2 (DINOv2 backbone) intermediate features.

Target (per image, float32, shape ``(576, C)``; C = 1024 for ViT-L):
    element-wise mean of the LayerNorm-ed *patch* tokens of the backbone's 4 output layers. For
    Depth-Anything-V2-Large these are blocks 4, 11, 17, 23 (0-indexed), i.e. the HF config's
    ``out_indices = [5, 12, 18, 24]`` (HF counts the embedding output as stage 0). The LayerNorm is the
    backbone's final norm, applied to each intermediate map as DA-v2's ``get_intermediate_layers(norm=True)``
    does; the CLS token (and any register tokens) is dropped.
Layout: token ``i = y * 24 + x`` over the 24x24 patch grid (row-major), channels last.

Preprocessing (docs/method.md §3.1): PIL squash to 336x336 (aspect ratio NOT kept; PIL's default bicubic),
/255, ImageNet mean/std. DA-v2's own ``Resize`` (keep-aspect, multiple of 14) is a no-op at 336x336 and is
not reproduced.

Deviation / switch: the reference runs ``cv2.cvtColor(BGR2RGB)`` on an array that is already RGB, so the
released model was distilled towards features of a *BGR* image. ``options={"bgr_quirk": True}`` reproduces that
swap (for checkpoint-faithful targets); the default ``False`` feeds RGB, which is what DINOv2 was trained on.
The switch is part of :meth:`spec`, so stores built either way never mix.

Position embeddings (docs/method.md §3.1): the reference's DINOv2 (facebookresearch/dinov2, used by
Depth-Anything-V2) brings its 37x37 position-embedding grid to the 24x24 patch grid of a 336-px input with
``interpolate(scale_factor=((24 + 0.1) / 37, (24 + 0.1) / 37), mode="bicubic", antialias=False)`` (its
``interpolate_offset = 0.1``), while transformers' Dinov2 uses ``size=(24, 24)``: the sampling grids differ and
the embeddings differ (cosine 0.978 on random weights). :func:`dinov2_reference_interpolation` installs the
reference formula on the loaded backbone, so targets do not depend on the installed transformers version;
``_load`` checks that the backbone really calls it.

Only the DINOv2 backbone is kept after loading; the DPT neck/head are not needed for the target and are dropped
to save memory (the reference keeps them, and a duplicate head, on every GPU).
"""

from __future__ import annotations

import gc
import math
import types
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import IMAGENET_MEAN, IMAGENET_STD, ImagePipeline, Teacher, write_preset_marker

IMAGE_SIZE = 336
"""Square input side; 336 / patch 14 = 24 -> 576 tokens, the MLLM's image-token count."""

INTERPOLATE_OFFSET = 0.1
"""DINOv2's ``interpolate_offset`` (the reference's value; 0 would mean ``size=`` interpolation)."""


def reference_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINOv2's original ``interpolate_pos_encoding`` on a (1, 1 + M*M, C) table -> (1, 1 + grid_h*grid_w, C).

    Bicubic, ``align_corners=False``, no antialias, ``scale_factor=((h + offset) / M, (w + offset) / M)``,
    computed in float32 and cast back, as facebookresearch/dinov2 does. Unchanged when the grid already fits."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"depth teacher: position-embedding table of {n} patches is not a square grid")
    if grid_h == m and grid_w == m:
        return pos_embed
    dtype = pos_embed.dtype
    pe = pos_embed.float()
    dim = pe.shape[-1]
    patch = torch.nn.functional.interpolate(
        pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=((grid_h + INTERPOLATE_OFFSET) / m, (grid_w + INTERPOLATE_OFFSET) / m),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    if tuple(patch.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"depth teacher: interpolated grid {tuple(patch.shape[-2:])} != {(grid_h, grid_w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((pe[:, :1], patch), dim=1).to(dtype)


def dinov2_reference_interpolation(embeddings: torch.nn.Module) -> None:
    """Replace a transformers ``Dinov2Embeddings``' ``interpolate_pos_encoding`` with the reference's formula
    (on this instance only). Its call counter lets the caller check that the installed transformers version
    still goes through this method."""
    patch = embeddings.patch_embeddings.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch

    def interpolate_pos_encoding(self: torch.nn.Module, emb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._olakit_interp_calls += 1
        return reference_pos_embed(self.position_embeddings, height // ph, width // pw)

    embeddings._olakit_interp_calls = 0
    embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, embeddings)


def blocks_from_backbone_config(config: Any) -> list[int]:
    """0-indexed transformer blocks behind a DINOv2 backbone config's output stages.

    HF names the embedding output ``stem`` and block ``k``'s output ``stage{k+1}``, so DA-V2-Large's
    ``out_indices = [5, 12, 18, 24]`` are blocks 4, 11, 17, 23 — the reference's ``get_intermediate_layers``.
    """
    return [list(config.stage_names).index(stage) - 1 for stage in config.out_features]


class DepthTeacher(Teacher):
    name: ClassVar[str] = "depth"
    default_source: ClassVar[str] = "depth-anything/Depth-Anything-V2-Large-hf"
    option_defaults: ClassVar[dict[str, Any]] = {"bgr_quirk": False}
    layout: ClassVar[str] = "(tokens=24*24 row-major patch grid, channels)"
    kind: ClassVar[str | None] = "spatial"
    # 2: position embeddings interpolated as the reference does (scale_factor with interpolate_offset 0.1);
    # stores built with 1 (transformers' size=(24, 24)) are refused on resume, naming spec.spec_version
    spec_version: ClassVar[int] = 2

    @classmethod
    def save_tiny(cls, out_dir: Path, seed: int = 0) -> None:
        """DepthAnythingForDepthEstimation with a 4-layer, 32-wide DINOv2 (patch 14, pos-emb grid 37x37 as in
        the real 518-px model, so the 336-px interpolation path is the real one) and small DPT neck/head."""
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

        out_dir = Path(out_dir)
        backbone = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_ratio=4,
            image_size=518,
            patch_size=14,
            layerscale_value=1.0,
            out_indices=[1, 2, 3, 4],
            apply_layernorm=True,
            reshape_hidden_states=False,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone,
            patch_size=14,
            reassemble_hidden_size=32,
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            depth_estimation_type="relative",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DepthAnythingForDepthEstimation(config)
        model.save_pretrained(out_dir)
        _save_image_processor(out_dir)
        write_preset_marker(out_dir, seed)

    def _load(self) -> torch.nn.Module:
        from transformers import DepthAnythingForDepthEstimation

        full = DepthAnythingForDepthEstimation.from_pretrained(self.source, dtype=torch.float32)
        backbone = full.backbone
        del full  # neck + DPT head are not part of the target
        gc.collect()

        cfg = backbone.config
        if not getattr(cfg, "apply_layernorm", True):
            raise ValueError(
                f"depth teacher {self.source!r}: backbone has apply_layernorm=False, but the target is defined "
                "on LayerNorm-ed tokens"
            )
        # We drop the prefix tokens ourselves, from the token sequence (reshape_hidden_states=True would drop
        # exactly one CLS and reshape, which breaks for register tokens). It is read at forward time.
        cfg.reshape_hidden_states = False
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        if IMAGE_SIZE % patch:
            raise ValueError(f"depth teacher: patch size {patch} does not divide the {IMAGE_SIZE}-px input")
        self._grid = IMAGE_SIZE // patch
        self._hidden = int(cfg.hidden_size)
        self._blocks = blocks_from_backbone_config(cfg)
        if len(self._blocks) != 4:
            # Not fatal for the definition (mean over the output layers), but every DA-v2 checkpoint has 4.
            raise ValueError(f"depth teacher: expected 4 backbone output layers, got {backbone.out_features}")
        dinov2_reference_interpolation(backbone.embeddings)
        with torch.no_grad():
            backbone.embeddings(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        if backbone.embeddings._olakit_interp_calls != 1:
            raise RuntimeError(
                "depth teacher: this transformers version no longer calls Dinov2Embeddings."
                "interpolate_pos_encoding, so the reference position-embedding interpolation cannot be installed"
            )

        steps: list[tuple[Any, ...]] = [("resize", IMAGE_SIZE, IMAGE_SIZE, "bicubic")]
        if self.options["bgr_quirk"]:
            steps.append(("swap_rb",))
        self.pipeline = ImagePipeline(steps=tuple(steps), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return backbone

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self._grid * self._grid, self._hidden)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.model(pixel_values=pixels).feature_maps  # each (B, prefix + grid^2, C), LayerNorm-ed
        n = self._grid * self._grid
        total = None
        for fm in maps:
            patches = fm[:, fm.shape[1] - n :, :]  # drop CLS (+ registers): they come first
            total = patches if total is None else total + patches
        return total / len(maps)  # sum then divide, as the reference does

    def _target_spec(self) -> dict[str, Any]:
        return {
            "module": "DINOv2 backbone of DepthAnythingForDepthEstimation",
            "blocks_0indexed": self._blocks,
            "norm": "backbone final LayerNorm applied to each block output",
            "tokens": "patch tokens only (CLS/register tokens dropped)",
            "reduction": "mean over the output blocks",
            "grid": [self._grid, self._grid],
            "pos_embed_interpolation": f"dinov2 original: bicubic, scale_factor=(grid+{INTERPOLATE_OFFSET})/M, "
                                       "no antialias, fp32",
        }


def _save_image_processor(out_dir: Path) -> None:
    """Mirror the real repo layout (it ships a preprocessor_config.json). The teacher does not read it: the
    reference's 336-px squash is not what the DA image processor does (keep-aspect resize to 518)."""
    from transformers import DPTImageProcessor

    DPTImageProcessor(
        do_resize=True,
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_pad=False,
    ).save_pretrained(out_dir)
