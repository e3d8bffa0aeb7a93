"""The MLLM: frozen vision encoder -> 2-layer GELU projector -> HF causal LM, with OLA-VLM task tokens and
(in PT) per-(teacher, layer) embedding predictors trained against cached teacher targets.

Written from the method description (``reference/ola-vlm-method.md``); no reference code. Decisions worth knowing:

* Sequence layout per image sample: ``[text before <image>][N_img image embeddings][task tokens][text after]``,
  task tokens in the order gen, depth, seg (teachers with a count > 0). Every offset is RECORDED per sample from
  the actual position of ``IMAGE_TOKEN_INDEX`` (the reference hard-codes 38/13 system tokens and 576 image tokens).
* Text-only samples get neither image embeddings nor task tokens (task tokens belong to an image, "+24 tokens per
  image"), and never contribute an embedding loss.
* Hidden states are captured with forward hooks on the needed layers only. Layer ``l`` (1-indexed) means HF's
  ``hidden_states[l]``: the output of decoder block ``l``; for the LAST block HF reports the output after the final
  norm, so for ``l == n_layers`` we hook the final norm to keep that exact meaning.
* Predictor K/V input per (teacher, layer): positions ``[0, image_end)`` ++ the teacher's own task-token span ++
  ``[text_start, valid_len)``; other teachers' task tokens and padding are excluded (the reference keeps padding).
* Task-token init (``model.task_token_init``): "embed" (default) scales the parameters so the INSERTED tokens start
  at the std of the LLM's word embeddings (depth/seg params get std_e * sqrt(rows per group), since a group mean of
  r iid rows has std/sqrt(r)); "randn" reproduces the reference's std-1 init, which makes the inserted tokens ~10x
  (group means) to ~50x (gen) larger than word embeddings for Llama-style models (method section 4).
* The LM head is applied only at supervised positions (labels != -100): image/task/prompt positions never
  materialise vocab-sized logits (the reference's fp32 full-vocab logits are its largest memory item).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TEACHERS_DEFAULT, Config
from .losses import embedding_loss, logit_scale
from .predictors import TaskTokenResampler
from .presets import DEFAULT_LAYERS_32, resolve, scale_layers
from .templates import IGNORE_INDEX as _IGNORE_INDEX
from .templates import IMAGE_TOKEN_INDEX as _IMAGE_TOKEN_INDEX

# the data pipeline owns these (olatrain.templates, which never imports the model); re-exported here
IMAGE_TOKEN_INDEX: int = _IMAGE_TOKEN_INDEX  # -200: one per image sample in input_ids
IGNORE_INDEX: int = _IGNORE_INDEX  # -100
# teachers whose task tokens are group means of a (spatial_queries, H) parameter that also serves as the
# predictor's queries; every other teacher is "global" (gen): an (n, H) token parameter and one pooled query
SPATIAL_TEACHERS = ("depth", "seg")
STAGE_TRAINABLE = {
    "pt": ("projector", "predictors", "task_tokens", "logit_scales"),
    "vpt": ("llm", "projector"),
    "ift": ("llm", "projector"),
}


# ----------------------------------------------------------------------------------------------- vision


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
            self.model = cls.from_pretrained(path, **_dtype_kwarg(dtype))
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


# ----------------------------------------------------------------------------------------------- helpers


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    # transformers 5 renamed torch_dtype -> dtype
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def resolve_attn_implementation(name: str, device: torch.device | str) -> str:
    """``auto`` -> flash_attention_2 when flash-attn is importable and the model lives on CUDA, else sdpa."""
    if name != "auto":
        return name
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def _decoder_parts(lm: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
    """(decoder blocks, final norm) of a HF causal LM (Llama/Mistral/Qwen/Phi-3 style, or GPT-2 style)."""
    base = lm.base_model
    for layers_attr, norm_attr in (("layers", "norm"), ("h", "ln_f"), ("layers", "final_layernorm")):
        layers = getattr(base, layers_attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers, getattr(base, norm_attr, None)
    raise ValueError(f"cannot find the decoder blocks of {type(lm).__name__}")


@dataclass
class Layout:
    """Where things are in the assembled sequence, per sample (all (B,) long tensors unless noted).

    For text-only samples image_start = image_end = text_start = 0 and every span is (0, 0)."""

    image_start: torch.Tensor
    image_end: torch.Tensor
    spans: dict[str, tuple[torch.Tensor, torch.Tensor]]  # teacher -> (start, end) of its task tokens
    text_start: torch.Tensor
    valid_len: torch.Tensor  # real (non-pad) length after truncation
    block_ok: torch.Tensor  # (B,) bool: image sample whose image + task-token block survived truncation
    has_image: torch.Tensor  # (B,) bool
    n_image_tokens: int


@dataclass
class Assembled:
    inputs_embeds: torch.Tensor  # (B, L', H)
    attention_mask: torch.Tensor  # (B, L') long
    labels: torch.Tensor  # (B, L') long, IGNORE_INDEX at image/task/pad positions
    layout: Layout
    image_features: torch.Tensor  # (B, N_img, H) projector output (also for text-only rows, see _ddp_touch)


# ----------------------------------------------------------------------------------------------- model


class OLAVLM(nn.Module):
    """See the module docstring. Build with :func:`build_model`."""

    def __init__(
        self,
        cfg: Config,
        vision: VisionEncoder,
        llm: nn.Module,
        teacher_shapes: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model
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
        self.teachers: list[str] = list(cfg.teachers)
        shapes = {t: tuple(int(x) for x in s) for t, s in (teacher_shapes or {}).items()}
        for t in self.teachers:
            if t not in shapes:
                raise ValueError(
                    f"teacher {t!r} has an embedding loss but no target shape (have {sorted(shapes)})"
                )
            if len(shapes[t]) != 2:
                raise ValueError(f"teacher {t!r}: target shape must be (tokens, channels), got {shapes[t]}")
        self.teacher_shapes = {t: shapes[t] for t in self.teachers}
        self._check_layers()

        known = list(TEACHERS_DEFAULT) + [t for t in mc.task_tokens if t not in TEACHERS_DEFAULT]
        known += [t for t in self.teachers if t not in known]
        self.token_counts = {t: int(mc.task_tokens.get(t, 0)) for t in known}
        self.token_order = [t for t in known if self.token_counts[t] > 0]  # insertion order: gen, depth, seg

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
            self.logit_scales[t] = nn.Parameter(torch.tensor(float(cfg.loss.logit_scale_init)))

        self.stage = cfg.train.stage
        self.set_stage(self.stage)

    # ------------------------------------------------------------------ construction helpers

    def _is_spatial(self, t: str) -> bool:
        if t in SPATIAL_TEACHERS:
            return True
        shape = self.teacher_shapes.get(t)
        return shape is not None and shape[0] > 1

    def _predictor_dim(self, t: str, channels: int) -> int:
        spec = self.cfg.model.predictor_dim.get(t, "target")
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
            layers = self.cfg.model.layers[t]
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
        """(T, H) tokens inserted after each image: gen raw, depth/seg as group means, in token_order."""
        parts = []
        for t in self.token_order:
            p = self.task_tokens[t]
            n = self.token_counts[t]
            if self._is_spatial(t):
                parts.append(p.view(n, p.shape[0] // n, p.shape[1]).mean(dim=1))
            else:
                parts.append(p)
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
        """Replace each sample's IMAGE_TOKEN_INDEX by [image embeddings][task tokens], right-pad, truncate.

        Inputs are right-padded (attention_mask a prefix of ones). Positions are recorded per sample."""
        b, seq = input_ids.shape
        dev = input_ids.device
        is_img = input_ids == IMAGE_TOKEN_INDEX
        n_img_tok = is_img.sum(dim=1)
        if has_image is None:
            has_image = n_img_tok > 0
        has_image = has_image.to(dev).bool()
        if bool((n_img_tok != has_image.long()).any()):
            raise ValueError(
                f"each image sample needs exactly one IMAGE_TOKEN_INDEX ({IMAGE_TOKEN_INDEX}) and text-only samples "
                f"none; got counts {n_img_tok.tolist()} for has_image {has_image.tolist()}"
            )
        attention_mask = attention_mask.to(dev)
        lengths = attention_mask.long().sum(dim=1)
        ar = torch.arange(seq, device=dev)
        if bool(((ar[None, :] < lengths[:, None]).long() != attention_mask.long()).any()):
            raise ValueError("attention_mask must be right-padded (ones then zeros)")
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)

        embed = self.llm.get_input_embeddings()
        # the -200 slot is dropped below; the clamp only keeps the lookup legal
        tok = embed(input_ids.clamp(min=0))
        if pixel_values is None:
            pixel_values = torch.zeros(b, 3, self.vision.image_size, self.vision.image_size, device=dev)
        # Every row is encoded (text-only rows hold zeros): simple, and the projector always joins the graph.
        feats = self.encode_images(pixel_values)
        n_img = feats.shape[1]
        block = self.task_token_block()
        k = n_img + block.shape[0]
        dtype = tok.dtype
        feats_c, block_c = feats.to(dtype), block.to(dtype)

        img_pos = torch.where(has_image, is_img.long().argmax(dim=1), torch.zeros_like(lengths))
        rows_e, rows_l = [], []
        lens_host = lengths.tolist()
        pos_host = img_pos.tolist()
        has_host = has_image.tolist()
        for i in range(b):
            n, p = lens_host[i], pos_host[i]
            if has_host[i]:
                rows_e.append(torch.cat([tok[i, :p], feats_c[i], block_c, tok[i, p + 1 : n]], dim=0))
                rows_l.append(
                    torch.cat(
                        [labels[i, :p], labels.new_full((k,), IGNORE_INDEX), labels[i, p + 1 : n]], dim=0
                    )
                )
            else:
                rows_e.append(tok[i, :n])
                rows_l.append(labels[i, :n])
        full_len = torch.tensor([r.shape[0] for r in rows_e], device=dev)
        out_len = int(full_len.max()) if b else 0
        if max_length is not None:
            out_len = min(out_len, max_length)
        h = tok.shape[-1]
        emb = tok.new_zeros(b, out_len, h)
        lab = labels.new_full((b, out_len), IGNORE_INDEX)
        for i in range(b):
            m = min(rows_e[i].shape[0], out_len)
            emb[i, :m] = rows_e[i][:m]
            lab[i, :m] = rows_l[i][:m]
        valid = full_len.clamp(max=out_len)
        att = (torch.arange(out_len, device=dev)[None, :] < valid[:, None]).long()

        zero = torch.zeros_like(img_pos)
        image_start = torch.where(has_image, img_pos, zero)
        image_end = torch.where(has_image, img_pos + n_img, zero)
        spans: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        cursor = image_end
        for t in self.token_order:
            end = torch.where(has_image, cursor + self.token_counts[t], zero)
            spans[t] = (cursor, end)
            cursor = end
        for t in set(self.token_counts) | set(self.teachers):
            # 0-token teachers: an empty span right after the image
            spans.setdefault(t, (image_end, image_end))
        text_start = torch.where(has_image, img_pos + k, zero)
        block_ok = has_image & (text_start <= valid)
        layout = Layout(image_start, image_end, spans, text_start, valid, block_ok, has_image, n_img)
        return Assembled(emb, att, lab, layout, feats)

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

    @staticmethod
    def predictor_index(layout: Layout, teacher: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, seq_len) gather positions and validity mask for ``teacher``'s predictor K/V:
        [0, image_end) ++ own task-token span ++ [text_start, valid_len); padding positions point at 0."""
        valid = layout.valid_len
        img_end = layout.image_end.clamp(max=valid)
        s, e = layout.spans[teacher]
        s, e = s.clamp(max=valid), e.clamp(max=valid)
        span = e - s
        ts = layout.text_start.clamp(max=valid)
        n_text = valid - ts
        total = img_end + span + n_text
        j = torch.arange(seq_len, device=valid.device)[None, :]
        a, sp = img_end[:, None], span[:, None]
        pos = torch.where(j < a, j, torch.where(j < a + sp, s[:, None] + (j - a), ts[:, None] + (j - a - sp)))
        mask = j < total[:, None]
        return torch.where(mask, pos, torch.zeros_like(pos)), mask

    @staticmethod
    def _gather(hs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return hs.gather(1, pos[..., None].expand(-1, -1, hs.shape[-1]))

    def _queries(self, t: str, hs: torch.Tensor, layout: Layout) -> torch.Tensor:
        if self._is_spatial(t):
            return self.task_tokens[t]  # (spatial_queries, H), broadcast over the batch by the predictor
        seq = hs.shape[1]
        n = self.token_counts.get(t, 0)
        if n > 0:
            start, count = layout.spans[t][0], n
        else:
            # documented fallback: no gen tokens -> pool the layer's image-token states into the one query
            start, count = layout.image_start, layout.n_image_tokens
        pos = (start[:, None] + torch.arange(count, device=hs.device)[None, :]).clamp(max=seq - 1)
        return self._gather(hs, pos).mean(dim=1, keepdim=True)  # (B, 1, H)

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

    def _loss_denominators(self, labels: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Under DDP, normalise every mean by the GLOBAL count / world instead of the local count.

        DDP averages gradients over ranks; with local means, ranks holding fewer supervised tokens (or fewer
        image samples) would weigh more than in a single process on the same global batch. With
        sum_local / (count_global / world) the rank average is exactly sum_global / count_global.
        Returns None in a single process (plain local means)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        keys = ["ce", *masks]
        counts = torch.stack([(labels[:, 1:] != IGNORE_INDEX).sum(), *[m.sum() for m in masks.values()]]).double()
        counts = counts.to(labels.device)
        dist.all_reduce(counts)
        world = dist.get_world_size()
        return {k: (c.clamp(min=1) / world).float() for k, c in zip(keys, counts, strict=True)}

    def forward(self, batch: Mapping[str, Any], *, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Batch contract: input_ids, attention_mask, labels, pixel_values, has_image; in PT also targets and
        target_mask (dicts by teacher). ``max_length`` defaults to cfg.data.max_length."""
        if max_length is None:
            max_length = self.cfg.data.max_length
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
        need = sorted({layer for t in self.teachers for layer in self.cfg.model.layers[t]})
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
        denoms = self._loss_denominators(asm.labels, masks)
        loss_ce = self._ce(out.last_hidden_state, asm.labels, None if denoms is None else denoms["ce"])
        result: dict[str, torch.Tensor] = {"loss_ce": loss_ce.detach()}
        total = loss_ce + self._ddp_touch(asm)

        lc = self.cfg.loss
        seq = asm.inputs_embeds.shape[1]
        for t in self.teachers:
            target = targets[t].to(dev, non_blocking=True)
            mask = masks[t]
            scale = logit_scale(self.logit_scales[t], lc.logit_scale_max)
            pos, kv_mask = self.predictor_index(layout, t, seq)
            term = total.new_zeros(())
            sl1_sum, nce_sum = 0.0, 0.0
            for layer in self.cfg.model.layers[t]:
                h = hs[layer]
                pred = self.predictors[t][str(layer)](
                    self._gather(h, pos), self._queries(t, h, layout), kv_mask
                )
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

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        *,
        attention_mask: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy decoding with image + task tokens in place. ``input_ids`` right-padded as in training (prompt
        ending with the assistant header). Returns (B, n_new) new token ids only (pad after EOS)."""
        dev = self.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None:
            pixel_values = pixel_values.to(dev)
        asm = self.assemble(input_ids, attention_mask, pixel_values, has_image)
        emb, valid = asm.inputs_embeds, asm.layout.valid_len
        # HF generation of a batch needs LEFT padding: right-align every row
        b, seq, _ = emb.shape
        shift = (seq - valid)[:, None]
        src = (torch.arange(seq, device=dev)[None, :] - shift) % seq
        emb = emb.gather(1, src[..., None].expand_as(emb))
        att = (torch.arange(seq, device=dev)[None, :] >= shift).long()
        gcfg = self.llm.generation_config
        if eos_token_id is None:
            eos_token_id = (
                gcfg.eos_token_id if gcfg.eos_token_id is not None else self.llm.config.eos_token_id
            )
        if pad_token_id is None:
            pad_token_id = (
                gcfg.pad_token_id if gcfg.pad_token_id is not None else self.llm.config.pad_token_id
            )
        if pad_token_id is None:
            pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        generate_kwargs.setdefault("do_sample", False)
        return self.llm.generate(
            inputs_embeds=emb,
            attention_mask=att,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **generate_kwargs,
        )


# ----------------------------------------------------------------------------------------------- builder


def build_model(
    cfg: Config,
    teacher_shapes: Mapping[str, Iterable[int]] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    tokenizer: Any = None,
) -> OLAVLM:
    """Load the vision encoder and LLM (``"tiny"`` -> local presets, else hub id / local dir), add projector,
    task tokens and (PT) predictors. ``teacher_shapes`` from the store, e.g. {"depth": (576, C)}; only the
    teachers in ``cfg.teachers`` get predictors. ``vocab_size`` (or ``len(tokenizer)``) larger than the LLM's
    vocabulary grows its embeddings (e.g. the pad token load_tokenizer adds to Llama-3)."""
    from transformers import AutoModelForCausalLM

    mc = cfg.model
    vision = VisionEncoder(mc.vision, mc.vision_layer, dtype=dtype)
    llm = AutoModelForCausalLM.from_pretrained(
        resolve("llm", mc.llm),
        attn_implementation=resolve_attn_implementation(mc.attn_implementation, device),
        **_dtype_kwarg(dtype),
    )
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    if vocab_size is not None and vocab_size > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(vocab_size)
    model = OLAVLM(cfg, vision, llm, teacher_shapes)
    return model.to(device=device, dtype=dtype)
