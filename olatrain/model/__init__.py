"""The MLLM: ``vision`` (frozen encoder), ``sequence`` (assembly, predictor indexing), ``predictors``
(Perceiver resamplers), ``vlm`` (:class:`OLAVLM`) and ``builder`` (:func:`build_model`)."""

from olatrain.model.builder import build_model, resolve_attn_implementation
from olatrain.model.vision import VisionEncoder
from olatrain.model.vlm import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OLAVLM, STAGE_TRAINABLE, TargetSpec

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "OLAVLM",
    "STAGE_TRAINABLE",
    "TargetSpec",
    "VisionEncoder",
    "build_model",
    "resolve_attn_implementation",
]
