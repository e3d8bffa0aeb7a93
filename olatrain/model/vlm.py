"""The MLLM (docs/method.md §1-§6): frozen vision encoder -> 2-layer GELU projector -> HF causal LM, with
OLA-VLM task tokens and (in PT) per-(teacher, layer) embedding predictors trained against cached targets.

Written from the method description; no reference code. Pieces live beside this module: ``vision.py`` (the
encoder), ``sequence.py`` (assembly and predictor indexing as pure functions), ``predictors.py`` (the
resampler), and the losses in ``olatrain/losses.py``. Decisions worth knowing:

* Teacher kinds (docs/method.md §3.4) come from the store's record of each column (``TargetSpec.kind``) or,
  for a stage without a store, from ``model.teacher_kinds`` (a checkpoint's config carries the PT store's
  kinds forward), never from a teacher's name: a fourth teacher trains like the three built-in ones.
* Hidden states are captured with forward hooks on the needed layers only. Layer ``l`` (1-indexed) means HF's
  ``hidden_states[l]``: the output of decoder block ``l``; for the LAST block HF reports the output after the
  final norm, so for ``l == n_layers`` we hook the final norm to keep that exact meaning.
* Task-token init (``model.task_token_init``): "embed" (default) scales the parameters so the INSERTED tokens
  start at the std of the LLM's word embeddings (spatial params get std_e * sqrt(rows per group), since a group
  mean of r iid rows has std/sqrt(r)); "randn" reproduces the reference's std-1 init, which makes the inserted
  tokens ~10x (group means) to ~50x (gen) larger than word embeddings for Llama-style models (§4).
* The LM head is applied only at supervised positions (labels != -100): image/task/prompt positions never
  materialise vocab-sized logits (the reference's fp32 full-vocab logits are its largest memory item).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from olatrain.config import TEACHERS_DEFAULT, LossConfig, ModelConfig
from olatrain.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olatrain.losses import embedding_loss, global_denominators, logit_scale
from olatrain.model.predictors import TaskTokenResampler
from olatrain.model.sequence import (
    Assembled,
    Layout,
    assemble_sequences,
    check_ids,
    gather_positions,
    pool_task_tokens,
    predictor_index,
)
from olatrain.model.vision import VisionEncoder
from olatrain.presets import DEFAULT_LAYERS_32, scale_layers

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "OLAVLM", "STAGE_TRAINABLE", "TargetSpec"]

STAGE_TRAINABLE = {
    "pt": ("projector", "predictors", "task_tokens", "logit_scales"),
    "vpt": ("llm", "projector"),
    "ift": ("llm", "projector"),
}
KINDS = ("spatial", "global")


@dataclass(frozen=True)
class TargetSpec:
    """What the model needs to know about one teacher's targets: their (tokens, channels) shape and kind."""

    shape: tuple[int, int]
    kind: str


def _decoder_parts(lm: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
    """(decoder blocks, final norm) of a HF causal LM (Llama/Mistral/Qwen/Phi-3 style, or GPT-2 style)."""
    base = lm.base_model
    for layers_attr, norm_attr in (("layers", "norm"), ("h", "ln_f"), ("layers", "final_layernorm")):
        layers = getattr(base, layers_attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers, getattr(base, norm_attr, None)
    raise ValueError(f"cannot find the decoder blocks of {type(lm).__name__}")


class OLAVLM(nn.Module):
    """See the module docstring. Build with ``olatrain.model.builder.build_model``.

    ``targets``: one :class:`TargetSpec` per teacher with an embedding loss (PT; empty in other stages).
    ``max_length``: the assembled sequence is truncated to it (``data.max_length``)."""

    def __init__(
        self,
        mc: ModelConfig,
        lc: LossConfig,
        vision: VisionEncoder,
        llm: nn.Module,
        targets: Mapping[str, TargetSpec] | None = None,
        *,
        stage: str = "pt",
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.mc, self.lc = mc, lc
        self.max_length = max_length
        self.vision = vision
        self.llm = llm
        self.hidden_size = int(llm.get_input_embeddings().weight.shape[1])
        self.decoder_layers, self.final_norm = _decoder_parts(llm)
        self.n_layers = len(self.decoder_layers)
        h = self.hidden_size

        act = mc.projector_hidden_act
        if act != "gelu":
            from transformers.activations import ACT2FN

            act_mod = ACT2FN[act]
        else:
            act_mod = nn.GELU()
        self.projector = nn.Sequential(nn.Linear(vision.out_dim, h), act_mod, nn.Linear(h, h))

        # teachers with an embedding loss (PT only); tokens are present in every stage
        targets = dict(targets or {})
        self.teachers: list[str] = list(targets)
        for t, spec in targets.items():
            if len(spec.shape) != 2:
                raise ValueError(f"teacher {t!r}: target shape must be (tokens, channels), got {spec.shape}")
        self.teacher_shapes = {t: tuple(spec.shape) for t, spec in targets.items()}
        self._check_layers()

        known = list(TEACHERS_DEFAULT) + [t for t in mc.task_tokens if t not in TEACHERS_DEFAULT]
        known += [t for t in self.teachers if t not in known]
        self.token_counts = {t: int(mc.task_tokens.get(t, 0)) for t in known}
        self.token_order = [t for t in known if self.token_counts[t] > 0]  # insertion order: gen, depth, seg
        self.kinds = self._resolve_kinds(known, targets)

        init = getattr(mc, "task_token_init", "embed")
        if init not in ("embed", "randn"):
            raise ValueError(f"model.task_token_init must be 'embed' or 'randn', got {init!r}")
        emb_std = float(llm.get_input_embeddings().weight.detach().float().std()) if init == "embed" else 1.0
        self.task_tokens = nn.ParameterDict()
        for t in known:
            n = self.token_counts[t]
            if self._is_spatial(t):
                if n == 0 and t not in self.teachers:
                    continue
                rows = mc.spatial_queries
                if n and rows % n:
                    raise ValueError(
                        f"model.spatial_queries ({rows}) must be divisible by task_tokens.{t} ({n})"
                    )
                # group means of rows/n iid rows have std/sqrt(rows/n): scale so inserted tokens start at emb_std
                std = emb_std * math.sqrt(rows / n) if (init == "embed" and n) else emb_std
                self.task_tokens[t] = nn.Parameter(torch.randn(rows, h) * std)
            elif n > 0:
                self.task_tokens[t] = nn.Parameter(torch.randn(n, h) * emb_std)

        self.predictors = nn.ModuleDict()
        self.logit_scales = nn.ParameterDict()
        for t in self.teachers:
            n_tok, channels = self.teacher_shapes[t]
            if self._is_spatial(t):
                if n_tok != mc.spatial_queries:
                    raise ValueError(
                        f"teacher {t!r}: target has {n_tok} tokens but model.spatial_queries = {mc.spatial_queries}"
                    )
            elif n_tok != 1:
                raise ValueError(
                    f"teacher {t!r}: a global (pooled-query) target must be (1, C), got {(n_tok, channels)}"
                )
            dim = self._predictor_dim(t, channels)
            self.predictors[t] = nn.ModuleDict(
                {
                    str(layer): TaskTokenResampler(
                        h,
                        dim,
                        channels,
                        heads=mc.predictor_heads,
                        head_dim=mc.predictor_head_dim,
                        ff_mult=mc.predictor_ff_mult,
                    )
                    for layer in mc.layers[t]
                }
            )
            # one temperature per teacher, shared by its layers (as in the reference)
            self.logit_scales[t] = nn.Parameter(torch.tensor(float(lc.logit_scale_init)))

        self.stage = stage
        self.set_stage(self.stage)

    # ------------------------------------------------------------------ construction helpers

    def _resolve_kinds(self, known: Sequence[str], targets: Mapping[str, TargetSpec]) -> dict[str, str]:
        """Kind per teacher: the store's (``targets``) > ``model.teacher_kinds``; a teacher that needs one
        (tokens or a loss) and has neither is an error naming the key to set."""
        kinds: dict[str, str] = {}
        for t in known:
            kind = targets[t].kind if t in targets else self.mc.teacher_kinds.get(t)
            if kind is None:
                if self.token_counts[t] == 0:
                    continue
                raise ValueError(
                    f"teacher {t!r} has task tokens but no kind: set model.teacher_kinds.{t}=spatial|global "
                    "(a PT stage reads it from the store; later stages from the checkpoint they start from)"
                )
            if kind not in KINDS:
                raise ValueError(f"teacher {t!r}: kind must be one of {KINDS}, got {kind!r}")
            kinds[t] = kind
        return kinds

    def _is_spatial(self, t: str) -> bool:
        return self.kinds.get(t) == "spatial"

    def _predictor_dim(self, t: str, channels: int) -> int:
        spec = self.mc.predictor_dim.get(t, "target")
        if spec == "hidden":
            return self.hidden_size
        if spec == "target":
            return channels
        if isinstance(spec, int) and spec > 0:
            return spec
        raise ValueError(
            f"model.predictor_dim.{t} must be 'hidden', 'target' or a positive int, got {spec!r}"
        )

    def _check_layers(self) -> None:
        for t in self.teachers:
            layers = self.mc.layers[t]
            if len(set(layers)) != len(layers):
                raise ValueError(f"model.layers.{t} = {layers} lists a layer twice")
            bad = [x for x in layers if not 1 <= x <= self.n_layers]
            if bad:
                hint = scale_layers({t: DEFAULT_LAYERS_32.get(t, layers)}, self.n_layers)[t]
                raise ValueError(
                    f"model.layers.{t} = {layers}: layer(s) {bad} outside 1..{self.n_layers} (the LLM has "
                    f"{self.n_layers} decoder layers). Layers are never rescaled automatically; set them explicitly, "
                    f"e.g. model.layers.{t}={hint} (the 32-layer defaults scaled proportionally)."
                )

    # ------------------------------------------------------------------ stages / checkpoints

    def train(self, mode: bool = True) -> OLAVLM:
        super().train(mode)
        self.vision.train(False)
        return self

    def _in_stage(self, name: str, stage: str) -> bool:
        if stage not in STAGE_TRAINABLE:
            raise ValueError(f"unknown stage {stage!r}; valid: {sorted(STAGE_TRAINABLE)}")
        return name.split(".", 1)[0] in STAGE_TRAINABLE[stage]

    def trainable_parameters(self, stage: str | None = None) -> dict[str, nn.Parameter]:
        """Parameters that train in ``stage`` (default: the current one), by name. Vision is never included.

        PT: projector, predictors, task tokens, logit scales. VPT/IFT: LLM + projector (task tokens frozen)."""
        stage = stage or self.stage
        return {n: p for n, p in self.named_parameters() if self._in_stage(n, stage)}

    def set_stage(self, stage: str) -> None:
        """Set requires_grad for ``stage``; everything else (always the vision encoder) is frozen."""
        keep = set(self.trainable_parameters(stage))
        for n, p in self.named_parameters():
            p.requires_grad_(n in keep)
        self.stage = stage

    def checkpoint_keys(self, stage: str | None = None) -> list[str]:
        """Parameter names a checkpoint of ``stage`` holds: the trainable set, plus (VPT/IFT) the frozen task
        tokens, which the next stage and inference need and which no hub checkpoint provides."""
        stage = stage or self.stage
        keys = list(self.trainable_parameters(stage))
        if stage != "pt":
            keys += [n for n, _ in self.named_parameters() if n.startswith("task_tokens.")]
        return keys

    def trainable_state_dict(self, stage: str | None = None) -> dict[str, torch.Tensor]:
        """The checkpoint content of ``stage`` (see :meth:`checkpoint_keys`), detached, names as in the model.

        Built from named_parameters, so tied weights (e.g. tied LM head) appear once (safetensors-friendly)."""
        keys = set(self.checkpoint_keys(stage))
        return {n: p.detach() for n, p in self.named_parameters() if n in keys}

    @torch.no_grad()
    def load_trainable_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copy ``state_dict`` into the matching parameters; returns (missing, unexpected).

        strict=True (resume within a stage): every key of this stage's checkpoint must be present and no unknown
        key may appear. strict=False (initialise from the previous stage): load the intersection, e.g. an IFT
        model takes projector + task tokens from a PT checkpoint and ignores its predictors/logit scales.
        A shape mismatch is always an error."""
        params = dict(self.named_parameters())
        unexpected = [k for k in state_dict if k not in params]
        missing = [k for k in self.checkpoint_keys() if k not in state_dict]
        if strict and (unexpected or missing):
            raise KeyError(f"checkpoint mismatch: missing={missing[:10]} unexpected={unexpected[:10]}")
        for k, v in state_dict.items():
            if k in params:
                if tuple(params[k].shape) != tuple(v.shape):
                    raise ValueError(
                        f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(params[k].shape)}"
                    )
                params[k].copy_(v.to(params[k].dtype))
        return missing, unexpected

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the LLM blocks (non-reentrant: gradients must reach the inputs_embeds of a frozen LLM)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5 name
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.llm.config.use_cache = False

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the LLM vocabulary (e.g. an added pad token); new rows initialised to the mean (HF default)."""
        self.llm.resize_token_embeddings(vocab_size)

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    # ------------------------------------------------------------------ sequence assembly

    def task_token_block(self) -> torch.Tensor:
        """(T, H) tokens inserted after each image: global raw, spatial as group means, in token_order."""
        parts = pool_task_tokens(self.task_tokens, self.token_counts, self.kinds, self.token_order)
        if not parts:
            return self.projector[0].weight.new_zeros(0, self.hidden_size)
        return torch.cat(parts, dim=0)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) -> (B, N_img, H): frozen encoder (no grad) then the projector."""
        feats = self.vision(pixel_values.to(device=self.device, dtype=self.vision_dtype))
        return self.projector(feats.to(self.projector[0].weight.dtype))

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def assemble(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        has_image: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_length: int | None = None,
    ) -> Assembled:
        """Replace each sample's IMAGE_TOKEN_INDEX by [image embeddings][task tokens], right-pad, truncate
        (see ``sequence.assemble_sequences``). Inputs are right-padded; positions are recorded per sample."""
        b = input_ids.shape[0]
        dev = input_ids.device
        if has_image is None:
            has_image = (input_ids == IMAGE_TOKEN_INDEX).any(dim=1)
        has_image = has_image.to(dev).bool()
        lengths = check_ids(input_ids, attention_mask.to(dev), has_image)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        # the -200 slot is dropped by the assembly; the clamp only keeps the lookup legal
        tok = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        if pixel_values is None:
            pixel_values = torch.zeros(b, 3, self.vision.image_size, self.vision.image_size, device=dev)
        # Every row is encoded (text-only rows hold zeros): simple, and the projector always joins the graph.
        feats = self.encode_images(pixel_values)
        return assemble_sequences(
            input_ids, tok, labels, lengths, has_image, feats, self.task_token_block(),
            [(t, self.token_counts[t]) for t in self.token_order],
            list(self.token_counts) + [t for t in self.teachers if t not in self.token_counts],
            max_length,
        )

    # ------------------------------------------------------------------ hidden-state capture

    def _capture_module(self, layer: int) -> nn.Module:
        # hidden_states[n_layers] in HF is the final-norm output; earlier ones are raw block outputs
        if layer == self.n_layers and self.final_norm is not None:
            return self.final_norm
        return self.decoder_layers[layer - 1]

    @contextmanager
    def capture_hidden_states(self, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Forward hooks on the requested layers only (1-indexed, = HF hidden_states[l]); removed on exit."""
        store: dict[int, torch.Tensor] = {}

        def save(layer: int, _module: nn.Module, _inputs: Any, output: Any) -> None:
            store[layer] = output[0] if isinstance(output, (tuple, list)) else output

        handles = []
        try:
            for layer in sorted(set(layers)):
                if not 1 <= layer <= self.n_layers:
                    raise ValueError(f"layer {layer} outside 1..{self.n_layers}")
                handles.append(self._capture_module(layer).register_forward_hook(partial(save, layer)))
            yield store
        finally:
            for hd in handles:
                hd.remove()

    # ------------------------------------------------------------------ predictor inputs

    predictor_index = staticmethod(predictor_index)

    def _queries(self, t: str, hs: torch.Tensor, layout: Layout) -> torch.Tensor:
        if self._is_spatial(t):
            return self.task_tokens[t]  # (spatial_queries, H), broadcast over the batch by the predictor
        seq = hs.shape[1]
        n = self.token_counts.get(t, 0)
        if n > 0:
            start, count = layout.spans[t][0], n
        else:
            # documented fallback: no tokens for a global teacher -> pool the layer's image-token states
            start, count = layout.image_start, layout.n_image_tokens
        pos = (start[:, None] + torch.arange(count, device=hs.device)[None, :]).clamp(max=seq - 1)
        return gather_positions(hs, pos).mean(dim=1, keepdim=True)  # (B, 1, H)

    # ------------------------------------------------------------------ forward

    def _ce(self, hidden: torch.Tensor, labels: torch.Tensor, denom: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token CE, mean over supervised tokens (0 with graph if none), LM head on those positions only.
        ``denom`` overrides the local token count (global count / world under DDP)."""
        tgt = labels[:, 1:]
        sel = tgt != IGNORE_INDEX
        h = hidden[:, :-1][sel]
        logits = self.llm.get_output_embeddings()(h).float()
        ce = F.cross_entropy(logits, tgt[sel], reduction="sum")
        return ce / (sel.sum().clamp(min=1) if denom is None else denom)

    def forward(self, batch: Mapping[str, Any], *, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Batch contract: input_ids, attention_mask, labels, pixel_values, has_image; in PT also targets and
        target_mask (dicts by teacher). ``max_length`` defaults to the model's (data.max_length)."""
        if max_length is None:
            max_length = self.max_length
        dev = self.device
        asm = self.assemble(
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            batch.get("pixel_values"),
            batch.get("has_image"),
            batch.get("labels").to(dev) if batch.get("labels") is not None else None,
            max_length,
        )
        layout = asm.layout
        need = sorted({layer for t in self.teachers for layer in self.mc.layers[t]})
        with self.capture_hidden_states(need) as hs:
            out = self.llm.base_model(
                inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask, use_cache=False
            )
        targets, tmasks = batch.get("targets") or {}, batch.get("target_mask") or {}
        masks: dict[str, torch.Tensor] = {}
        for t in self.teachers:
            if t not in targets or t not in tmasks:
                raise KeyError(f"PT batch lacks targets/target_mask for teacher {t!r}")
            masks[t] = tmasks[t].to(dev).bool() & layout.block_ok
        denoms = global_denominators(asm.labels, masks)
        loss_ce = self._ce(out.last_hidden_state, asm.labels, None if denoms is None else denoms["ce"])
        result: dict[str, torch.Tensor] = {"loss_ce": loss_ce.detach()}
        total = loss_ce + self._ddp_touch(asm)

        lc = self.lc
        seq = asm.inputs_embeds.shape[1]
        for t in self.teachers:
            target = targets[t].to(dev, non_blocking=True)
            mask = masks[t]
            scale = logit_scale(self.logit_scales[t], lc.logit_scale_max)
            pos, kv_mask = predictor_index(layout, t, seq)
            term = total.new_zeros(())
            sl1_sum, nce_sum = 0.0, 0.0
            for layer in self.mc.layers[t]:
                h = hs[layer]
                pred = self.predictors[t][str(layer)](gather_positions(h, pos), self._queries(t, h, layout), kv_mask)
                el = embedding_loss(
                    pred, target, mask, scale, lc.contrastive_weight, lc.smooth_l1_beta, lc.gather_negatives,
                    denom=None if denoms is None else denoms[t],
                )
                term = term + el.total
                sl1_sum = sl1_sum + el.sl1.detach()
                nce_sum = nce_sum + el.nce.detach()
            weighted = float(lc.weights.get(t, 0.0)) * term
            total = total + weighted
            result[f"loss_{t}"] = weighted.detach()
            result[f"loss_{t}_sl1"] = torch.as_tensor(sl1_sum)
            result[f"loss_{t}_nce"] = torch.as_tensor(nce_sum)
            result[f"logit_scale_{t}"] = scale.detach()
        result["loss"] = total
        return result

    def _ddp_touch(self, asm: Assembled) -> torch.Tensor:
        """0 * (trainable inputs that a batch may not use): a text-only batch (or contrastive_weight 0) then still
        gives the projector, task tokens and logit scales a (zero) gradient, so DDP never waits for a parameter
        that took no part in the step."""
        z = asm.image_features.sum() * 0.0
        for p in [*self.task_tokens.values(), *self.logit_scales.values()]:  # scales: unused when c = 0
            if p.requires_grad:
                z = z + p.sum() * 0.0
        return z
