"""`olatrain plan`: GPU memory per rank for every stage of a run, under DDP and FSDP, before anything is trained.

The model is built from the real classes (the run's vision tower, LLM, projector, task tokens and predictors) on
the meta device: shapes and dtypes only, no weights read or allocated. Stage rules come from the model itself
(``OLAVLM.set_stage``), so what is trainable, frozen and checkpointed is exactly what training will do.

Per GPU, in bytes (N ranks; "trainable" = requires_grad in that stage):

* parameters: trainable fp32; frozen bf16 on CUDA with bf16 precision (olatrain.parallel.frozen_dtype), else
  fp32. FSDP shards every decoder block, the embeddings/head and the trainable heads across N (the vision tower
  is replicated), and adds the all-gathered unsharded bf16 copy of two blocks (the one computing, one
  prefetched).
* gradients: trainable x 4 B (DDP: whole; plus DDP's reducer buckets, another copy); FSDP: / N plus two
  unsharded blocks' gradients before their reduce-scatter.
* optimizer: AdamW's exp_avg + exp_avg_sq, 8 B per trainable parameter (FSDP: / N).
* activations at micro-batch B and sequence L = data.max_length (worst case: every sample padded to the
  limit): see :func:`activation_bytes`; checked against the tiny model's saved tensors in tests/test_plan.py.
* logits: olatrain applies the LM head at supervised positions only; taken as every text position of the
  sequence (L - image - task tokens), bf16 logits + their fp32 upcast for the loss + its fp32 gradient.

Plus a fixed 2 GiB for the CUDA context, NCCL buffers and allocator slack, and the verdict allows 90% of the
GPU. The largest micro-batch that fits is solved from the per-sample part (activations + logits are linear in B).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

GiB = 1024**3
CONTEXT_BYTES = 2 * GiB
USABLE = 0.90

# config.json of the recipes' hub models, for planning offline (no network): only architecture numbers, which are
# what the planner needs. Used when AutoConfig cannot read the name (not cached, no network).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, tie_word_embeddings=False),
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
}
# OLA-VLM's teacher targets (README): used for a PT stage whose store is not readable here
DEFAULT_TARGETS = {"depth": (576, 1024), "seg": (576, 1536), "gen": (1, 1024)}


class PlanError(RuntimeError):
    pass


@dataclass
class Row:
    """One stage under one parallelism, bytes per GPU."""

    stage: str
    parallel: str
    params: float
    grads: float
    optim: float
    activations: float
    logits: float
    per_sample: float  # activations + logits per sample of the micro-batch
    batch: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.activations + self.logits + CONTEXT_BYTES

    def max_batch(self, gpu_bytes: float) -> int:
        room = gpu_bytes * USABLE - (self.total - self.activations - self.logits)
        return max(0, int(room // self.per_sample)) if self.per_sample > 0 else 0


# ----------------------------------------------------------------------------------------------- meta model
def _hf_config(kind: str, name: str) -> Any:
    from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig

    from olatrain.presets import resolve

    try:
        c = AutoConfig.from_pretrained(resolve(kind, name))
    except (OSError, ValueError) as e:
        if name not in KNOWN_CONFIGS:
            raise PlanError(f"cannot read the config of {name!r} here ({e.__class__.__name__}); use a local "
                            "directory or a cached hub id") from e
        d = dict(KNOWN_CONFIGS[name])
        mtype = d.pop("model_type")
        if mtype == "clip_vision_model":
            return CLIPVisionConfig(**d)
        from transformers import AutoConfig as AC

        return AC.for_model(mtype, **d)
    if kind == "vision" and hasattr(c, "vision_config"):  # a full CLIP checkpoint: its vision half
        c = c.vision_config
    assert isinstance(c, PretrainedConfig)
    return c


def meta_model(cfg: Any, targets: dict[str, tuple[int, int]] | None = None) -> Any:
    """The stage's OLAVLM on the meta device from the real classes (no weights)."""
    import copy

    from transformers import AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

    from olatrain.model.builder import target_specs
    from olatrain.model.vision import VisionEncoder
    from olatrain.model.vlm import OLAVLM

    mc = copy.deepcopy(cfg.model)
    mc.task_token_init = "randn"  # "embed" reads the embedding's std: not available without weights
    if mc.vision.startswith("timm:"):
        raise PlanError("the planner builds HF vision towers only (timm encoders: not supported yet)")
    vcfg = _hf_config("vision", mc.vision)
    lcfg = _hf_config("llm", mc.llm)
    with torch.device("meta"):
        vision = VisionEncoder.__new__(VisionEncoder)
        torch.nn.Module.__init__(vision)
        siglip = vcfg.model_type.startswith("siglip")
        vision.name, vision.layer, vision.kind = mc.vision, mc.vision_layer, "hf"
        vision.n_prefix = 0 if siglip else 1
        vision.model = (SiglipVisionModel if siglip else CLIPVisionModel)(vcfg)
        vision.out_dim, vision.image_size = int(vcfg.hidden_size), int(vcfg.image_size)
        vision.model.requires_grad_(False)
        llm = AutoModelForCausalLM.from_config(lcfg)
        cfg2 = copy.copy(cfg)
        cfg2.model = mc
        specs = target_specs(cfg2, targets or {t: DEFAULT_TARGETS.get(t, (1, lcfg.hidden_size))
                                               for t in cfg.teachers})
        model = OLAVLM(mc, cfg.loss, vision, llm, specs, stage=cfg.train.stage, max_length=cfg.data.max_length)
    return model


# ----------------------------------------------------------------------------------------------- figures
def _bytes(params: list[torch.nn.Parameter], dtype_size: int) -> float:
    return float(sum(p.numel() for p in params) * dtype_size)


def activation_bytes(model: Any, cfg: Any, batch: int, elem: int, grad_ckpt: bool, seq: int | None = None,
                     supervised: int | None = None) -> tuple[float, float]:
    """(activations, logits) saved for backward for one micro-batch of ``batch`` samples at L = max_length
    (or ``seq``); elements are ``elem`` bytes (2 under bf16 autocast, 4 in fp32).

    Per decoder block and token, what autograd keeps, MEASURED with saved_tensors_hooks on a transformers
    LlamaDecoderLayer (sdpa, fp32) at five (H, I, heads, kv) settings and solved for the coefficients:
    trainable block 7.5 H + 2 H_kv + 4 I; frozen block (PT: only input gradients flow) 3.5 H + 2 H_kv + 3 I.
    Unless the attention is flash_attention_2, each block also keeps its own copy of the (B, 1, L, L) additive
    padding mask (measured on the tiny model: one per layer). With gradient checkpointing only each block's
    input (H per token) is kept, plus one block recomputed in full during backward. The projector keeps ~3 H per
    image token; each PT predictor about (L + Q) x 8 x its width. tests/test_plan.py checks the total against
    the saved tensors of the tiny model's real forward."""
    llm = model.llm.config
    h = int(llm.hidden_size)
    inter = int(getattr(llm, "intermediate_size", 4 * h))
    heads = int(llm.num_attention_heads)
    kv = int(getattr(llm, "num_key_value_heads", heads) or heads)
    h_kv = h // heads * kv
    n_layers = model.n_layers
    seq = int(cfg.data.max_length) if seq is None else int(seq)
    trainable = any(p.requires_grad for p in model.decoder_layers[0].parameters())
    per_token = (7.5 * h + 2 * h_kv + 4 * inter) if trainable else (3.5 * h + 2 * h_kv + 3 * inter)
    mask = 0 if cfg.model.attn_implementation == "flash_attention_2" else seq * seq
    per_layer = per_token * seq + mask
    llm_tokens = (n_layers * h * seq + per_layer) if grad_ckpt else n_layers * per_layer
    n_img = int(cfg.model.image_tokens)
    proj = 3 * h * n_img
    pred = 0
    for t in model.teachers:
        q = cfg.model.spatial_queries if model.kinds.get(t) == "spatial" else 1
        for res in model.predictors[t].values():
            pred += (seq + q) * 8 * res.proj_in.out_features
    acts = float(batch * (llm_tokens + proj + pred) * elem)
    n_text = max(0, seq - n_img - sum(model.token_counts.values())) if supervised is None else supervised
    vocab = int(model.llm.get_output_embeddings().weight.shape[0])
    logits = float(batch * n_text * vocab * (elem + 4 + 4))
    return acts, logits


def plan_stage(cfg: Any, world: int, *, cuda: bool = True, targets: dict[str, tuple[int, int]] | None = None,
               seq: int | None = None) -> list[Row]:
    """DDP and FSDP rows for one stage's config."""
    from olatrain.parallel import frozen_dtype

    model = meta_model(cfg, targets)
    model.set_stage(cfg.train.stage)
    bf16 = cuda and cfg.train.precision in ("auto", "bf16")
    frozen_size = torch.empty((), dtype=frozen_dtype(cfg, "cuda" if cuda else "cpu")).element_size()
    elem = 2 if bf16 else 4
    named = dict(model.named_parameters())
    trainable = [p for p in named.values() if p.requires_grad]
    frozen_vision = [p for n, p in named.items() if n.startswith("vision.")]
    # cast_frozen's rule: the vision tower, and the LLM when all of it is frozen (PT); other frozen tensors (the
    # task tokens after PT) stay fp32
    llm_frozen = not any(p.requires_grad for n, p in named.items() if n.startswith("llm."))
    low = [p for n, p in named.items() if not p.requires_grad and n.startswith("llm.") and llm_frozen]
    rest = [p for n, p in named.items() if not p.requires_grad and not n.startswith("vision.")
            and not (n.startswith("llm.") and llm_frozen)]
    tr_b = _bytes(trainable, 4)
    fr_v = _bytes(frozen_vision, frozen_size)
    fr_r = _bytes(low, frozen_size) + _bytes(rest, 4)
    gc = cfg.train.grad_checkpointing == "on" or (cfg.train.grad_checkpointing == "auto" and cuda)
    acts, logits = activation_bytes(model, cfg, cfg.train.batch_size, elem, gc, seq=seq)
    per_sample = (acts + logits) / cfg.train.batch_size
    stage = cfg.train.stage
    rows = [Row(stage, "ddp", tr_b + fr_v + fr_r, tr_b + (tr_b if world > 1 else 0.0), 2 * tr_b, acts, logits,
                per_sample, cfg.train.batch_size)]
    block = max(sum(p.numel() for p in b.parameters()) for b in model.decoder_layers)
    block_train = any(p.requires_grad for p in model.decoder_layers[0].parameters())
    gathered = 2 * block * elem  # two unsharded blocks (computing + prefetched) in the compute dtype
    rows.append(Row(stage, "fsdp", (tr_b + fr_r) / world + fr_v + gathered,
                    tr_b / world + (2 * block * 4 if block_train else 0.0), 2 * tr_b / world, acts, logits,
                    per_sample, cfg.train.batch_size, {"gathered": gathered}))
    return rows


def plan_run(spec: Any, world: int, *, cuda: bool = True, seq: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for name in spec.stages:
        rows += plan_stage(spec.configs[name], world, cuda=cuda, targets=_store_targets(spec.configs[name]),
                           seq=seq)
    return rows


def _store_targets(cfg: Any) -> dict[str, tuple[int, int]] | None:
    if not cfg.teachers or not cfg.data.store:
        return None
    try:
        from olacache.store import TargetReader

        r = TargetReader(cfg.data.store, cfg.teachers)
        return {t: tuple(r.shapes[t]) for t in cfg.teachers}  # type: ignore[misc]
    except Exception:  # not readable here (e.g. planning on a laptop): the OLA-VLM shapes
        return None


def format_table(rows: list[Row], gpu_gb: float, world: int, seq: int | None = None) -> str:
    gpu = gpu_gb * GiB
    head = (f"{'stage':6} {'parallel':8} {'params':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'logits':>8} "
            f"{'total':>8}  {'verdict':12} max micro-batch")
    where = f"sequence {seq} tokens" if seq else "sequence = data.max_length (worst case)"
    lines = [f"memory per GPU (GiB) on {world} x {gpu_gb:g} GB, {where}; {CONTEXT_BYTES / GiB:g} GiB context "
             f"included, {USABLE:.0%} usable", head]
    for r in rows:
        fits = r.total <= gpu * USABLE
        mb = r.max_batch(gpu)
        lines.append(
            f"{r.stage:6} {r.parallel:8} " + " ".join(f"{x / GiB:8.1f}" for x in
                                                      (r.params, r.grads, r.optim, r.activations, r.logits, r.total))
            + f"  {'fits' if fits else 'DOES NOT FIT':12} {mb} (configured {r.batch})")
    return "\n".join(lines)
