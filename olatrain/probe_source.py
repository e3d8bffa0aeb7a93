"""What a probe (or ``olatrain show``) looks at: the model under test, resolved from a run directory, a checkpoint
or a bare config (the untrained baseline), plus the one frozen forward that yields its hidden states.

The frozen model is built WITHOUT predictors (a probe trains its own heads; docs/method.md §9) and loads the
checkpoint's trainable weights over the base model: projector and task tokens from a PT checkpoint, also the
LLM from VPT/IFT ones. No teacher is imported: targets come from the store the run's config names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olatrain import checkpoint as ckpt
from olatrain.config import (
    STAGES,
    Config,
    ConfigError,
    config_from_dict,
    deep_merge,
    load_run,
    parse_overrides,
)
from olatrain.config import validate as validate_config


class ProbeError(RuntimeError):
    """A user mistake in what to probe (a path that is not a run or checkpoint, a missing store, ...)."""


@dataclass
class Source:
    """The model under test: its resolved config and where its weights come from (None = untrained)."""

    cfg: Config
    checkpoint: Path | None
    kind: str  # "checkpoint" | "baseline"
    label: str
    step: int | None = None
    stage: str | None = None

    def describe(self) -> dict[str, Any]:
        mc = self.cfg.model
        return {"source": self.kind, "path": str(self.checkpoint) if self.checkpoint else None,
                "label": self.label, "stage": self.stage, "step": self.step, "llm": mc.llm, "vision": mc.vision,
                "task_tokens": dict(mc.task_tokens), "store": self.cfg.data.store,
                "annotations": self.cfg.data.annotations, "image_aspect": self.cfg.data.image_aspect}


def find_checkpoint(path: Path) -> Path:
    """``<run>/<stage>/final`` (or any checkpoint dir) as is; a run dir -> its last finished stage's final/;
    a stage dir -> its final/."""
    path = Path(path)
    if (path / ckpt.WEIGHTS).is_file() and (path / ckpt.STATE).is_file():
        return path
    if (path / "final" / ckpt.WEIGHTS).is_file():
        return path / "final"
    done = [path / s / "final" for s in STAGES if ckpt.is_done(path / s / "final")]
    if done:
        return done[-1]
    raise ProbeError(f"{path} is neither a checkpoint (model.safetensors + state.json), a stage directory nor a "
                     "run directory with a finished stage; pass <run>, <run>/<stage>/final, or --baseline CONFIG")


def _with_overrides(cfg_dict: dict[str, Any], sets: list[str] | None, where: str) -> Config:
    try:
        cfg = config_from_dict(deep_merge(cfg_dict, parse_overrides(sets)))
        validate_config(cfg)
    except ConfigError as e:
        raise ProbeError(f"{where}: {e}") from None
    return cfg


def resolve_source(path: Path | None, *, baseline: Path | None = None, sets: list[str] | None = None) -> Source:
    """The model to probe: a trained checkpoint (``path``) or, with ``baseline``, the untrained model a config
    describes (its last stage's settings, no weights loaded beyond the base encoder and LLM)."""
    if (path is None) == (baseline is None):
        raise ProbeError("give exactly one of: a run or checkpoint directory, or --baseline CONFIG")
    if baseline is not None:
        try:
            spec = load_run(baseline, sets)
        except ConfigError as e:
            raise ProbeError(str(e)) from None
        cfg = spec.configs[spec.stages[-1]]
        return Source(cfg, None, "baseline", f"baseline:{Path(baseline).stem}", stage=cfg.train.stage)
    ck = find_checkpoint(Path(path))
    try:
        state = ckpt.load_state(ck)
    except (OSError, ValueError) as e:
        raise ProbeError(f"{ck}: unreadable state.json: {e}") from None
    if "config" not in state:
        raise ProbeError(f"{ck}: state.json holds no config (not an olatrain checkpoint)")
    cfg = _with_overrides(state["config"], sets, str(ck / ckpt.STATE))
    label = ck.parent.parent.name if ck.name == "final" else ck.name
    return Source(cfg, ck, "checkpoint", label, step=state.get("step"), stage=state.get("stage"))


def frozen_config(cfg: Config) -> Config:
    """The config the frozen model is built from: no predictors (any stage but PT has none)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage="ift"))


def load_frozen_model(src: Source, device: torch.device, tokenizer: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The model under test, every parameter frozen, in eval mode."""
    from olatrain.model import build_model

    model = build_model(frozen_config(src.cfg), {}, device=device, dtype=dtype, tokenizer=tokenizer)
    if src.checkpoint is not None:
        weights = ckpt.load_weights(src.checkpoint)
        params = dict(model.named_parameters())
        used = [k for k in weights if k in params]
        if not used:
            raise ProbeError(f"{src.checkpoint}: none of its weights belong to this model")
        model.load_trainable_state_dict({k: weights[k] for k in used}, strict=False)
    model.requires_grad_(False)
    model.eval()
    return model


@torch.no_grad()
def frozen_hidden_states(model: Any, batch: dict[str, Any], layers: list[int]) -> tuple[dict[int, torch.Tensor],
                                                                                        torch.Tensor, Any]:
    """ONE forward of the frozen LLM; -> ({layer: (B, L, H) hidden states}, (B, L) bool valid-position mask,
    the sequence layout). Layer l is HF's hidden_states[l] (docs/method.md §5.1), captured with hooks."""
    asm = model.assemble(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                         batch.get("has_image"), None, model.max_length)
    with model.capture_hidden_states(layers) as hs:
        model.llm.base_model(inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask, use_cache=False)
    return dict(hs), asm.attention_mask.bool(), asm.layout
