"""Build an :class:`~olatrain.model.vlm.OLAVLM` from a run config: load the encoder and LLM, pick attention."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

from olatrain.config import Config
from olatrain.model.vision import VisionEncoder, dtype_kwarg
from olatrain.model.vlm import OLAVLM, TargetSpec
from olatrain.presets import resolve


def resolve_attn_implementation(name: str, device: torch.device | str) -> str:
    """``auto`` -> flash_attention_2 when flash-attn is importable and the model lives on CUDA, else sdpa."""
    if name != "auto":
        return name
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def target_specs(cfg: Config, targets: Mapping[str, Any] | None) -> dict[str, TargetSpec]:
    """The :class:`TargetSpec` of every teacher with an embedding loss in ``cfg`` (PT). ``targets`` maps a
    teacher to a TargetSpec or to a bare shape, whose kind then comes from ``model.teacher_kinds`` (or, for a
    teacher not listed there, from the shape: more than one token is spatial)."""
    have = dict(targets or {})
    out: dict[str, TargetSpec] = {}
    for t in cfg.teachers:
        if t not in have:
            raise ValueError(f"teacher {t!r} has an embedding loss but no target shape (have {sorted(have)})")
        v = have[t]
        if isinstance(v, TargetSpec):
            out[t] = v
            continue
        shape = tuple(int(x) for x in v)
        kind = cfg.model.teacher_kinds.get(t) or ("spatial" if len(shape) >= 2 and shape[0] > 1 else "global")
        out[t] = TargetSpec(shape, kind)  # type: ignore[arg-type]
    return out


def build_model(
    cfg: Config,
    targets: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    tokenizer: Any = None,
) -> OLAVLM:
    """Load the vision encoder and LLM (``"tiny"`` -> local presets, else hub id / local dir), add projector,
    task tokens and (PT) predictors. ``targets`` per teacher (a :class:`TargetSpec` from the store, or a bare
    shape such as ``(576, C)``); only the teachers in ``cfg.teachers`` get predictors. ``vocab_size`` (or
    ``len(tokenizer)``) larger than the LLM's vocabulary grows its embeddings (e.g. the pad token
    load_tokenizer adds to Llama-3). The model gets the config sections it uses (model, loss)."""
    from transformers import AutoModelForCausalLM

    mc = cfg.model
    specs = target_specs(cfg, targets)
    vision = VisionEncoder(mc.vision, mc.vision_layer, dtype=dtype)
    llm = AutoModelForCausalLM.from_pretrained(
        resolve("llm", mc.llm),
        attn_implementation=resolve_attn_implementation(mc.attn_implementation, device),
        **dtype_kwarg(dtype),
    )
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    if vocab_size is not None and vocab_size > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(vocab_size)
    model = OLAVLM(mc, cfg.loss, vision, llm, specs, stage=cfg.train.stage, max_length=cfg.data.max_length)
    return model.to(device=device, dtype=dtype)
