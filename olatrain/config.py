"""Run configuration: plain dataclasses, loaded from YAML, overridden with ``--set key=value``.

A YAML file holds the shared sections (``model``, ``data``, ``loss``, ``train``) and an ordered ``stages``
mapping whose entries override those sections per stage (e.g. PT at lr 1e-3 with ``square`` images, then IFT
at 2e-5 with ``pad``). Precedence, lowest first: dataclass defaults < YAML shared sections < YAML
``stages.<name>`` < ``--set key=`` < ``--set stages.<name>.key=``. ``--set stages.pt.train.lr=1e-3`` targets one
stage; ``--set train.max_steps=5`` all (and beats the YAML's per-stage values).

YAML is read with YAML 1.2 scalars (``1e-3`` is a float; only true/false are booleans, ``on`` stays "on") and
every value is type-checked against its dataclass field (``olacache.common.configio``, shared with
``olacache build --config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olacache.common.configio import (
    ConfigError,
    build_dataclass,
    deep_merge,
    load_yaml_file,
    parse_overrides,
)
from olacache.common.files import parse_size

__all__ = ["ConfigError", "Config", "RunSpec", "config_from_dict", "deep_merge", "load_run", "parse_overrides"]

TEACHERS_DEFAULT = ("gen", "depth", "seg")  # also the reference's task-token order


@dataclass
class ModelConfig:
    # "tiny" = the local random-init preset (real classes); otherwise a hub id or local directory.
    # A timm encoder is named "timm:<model_name>".
    vision: str = "tiny"
    vision_layer: int = -2  # penultimate layer, CLS dropped (LLaVA-1.5)
    llm: str = "tiny"
    tokenizer: str | None = None  # default: same as llm
    # "auto" = the tokenizer's own chat template; or a named template from olatrain.data.templates
    chat_template: str = "auto"
    projector_hidden_act: str = "gelu"
    # task tokens per teacher, inserted right after the image tokens in this order; 0 disables a teacher's tokens
    task_tokens: dict[str, int] = field(default_factory=lambda: {"gen": 8, "depth": 8, "seg": 8})
    # 1-indexed decoder-block outputs (hidden_states[l] in HF numbering) read by the predictors
    layers: dict[str, list[int]] = field(
        default_factory=lambda: {"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}
    )
    # number of rows of the (n_rows, H) depth/seg query parameter (= spatial target tokens, 576 for 24x24)
    spatial_queries: int = 576
    # image tokens the vision encoder yields per image (24x24 = 576 for ViT-L/14@336 and ConvNeXt-XXL@768);
    # the data pipeline budgets data.max_length with it (the model should check it against its encoder)
    image_tokens: int = 576
    # predictor width per teacher: "hidden" (LLM width; the reference's depth head), "target" (teacher
    # channels; the reference's seg/gen heads) or an int
    predictor_dim: dict[str, Any] = field(
        default_factory=lambda: {"depth": "hidden", "seg": "target", "gen": "target"}
    )
    predictor_heads: int = 4
    predictor_head_dim: int = 32
    predictor_ff_mult: int = 1
    # "auto": flash_attention_2 when flash-attn is importable and on CUDA, else sdpa
    attn_implementation: str = "auto"
    # task-token init: "embed" = inserted tokens start at the std of the LLM's word embeddings; "randn" = the
    # reference's std-1 parameters (inserted tokens 10-50x larger than word embeddings; docs/method.md §4)
    task_token_init: str = "embed"
    # how each teacher's task tokens and predictor queries are shaped (docs/method.md §3.4): "spatial" = a
    # (spatial_queries, H) parameter whose group means are the inserted tokens and which is the predictor's
    # query; "global" = an (n, H) token parameter and one pooled query. In PT the kind the store records for the
    # column wins; a checkpoint's config carries it to the next stage.
    teacher_kinds: dict[str, str] = field(
        default_factory=lambda: {"depth": "spatial", "seg": "spatial", "gen": "global"}
    )


@dataclass
class DataConfig:
    annotations: str = "examples/sample.json"
    image_root: str = "examples/images"
    store: str | None = None  # embedding store built by `olacache build`; required for PT with cached targets
    max_length: int = 2048
    image_aspect: str = "square"  # "square" (processor resize + center crop) or "pad" (pad to square first)
    # what to do with an image sample whose targets are missing/failed in the store:
    # "skip" drops the sample (counted in the log), "error" stops before step 1
    missing_targets: str = "skip"
    # refuse to start when fewer than this fraction of the dataset's images have usable targets
    min_store_coverage: float = 0.5
    num_workers: int = 2
    shuffle: bool = True
    # an image that cannot be decoded/preprocessed while training: "skip" replaces it by the next usable sample
    # (deterministic, counted, listed in <stage>/skipped.jsonl); "error" decodes every image before step 1 and
    # stops on the first failure (olatrain/data/skips.py)
    bad_images: str = "skip"
    # batches each DataLoader worker reads ahead from the store in the background (the batch it makes now plus
    # this many of its next ones); None = 2 for object storage (s3://...), 0 for a local store
    store_readahead: int | None = None
    # a local directory that keeps the target chunks read from an object-storage store, for repeated epochs and
    # sweeps (bounded by store_cache_size; shared by workers and ranks; ignored for a local store)
    store_cache: str | None = None
    store_cache_size: str = "50GB"


@dataclass
class LossConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"depth": 0.5, "seg": 0.5, "gen": 0.5})
    contrastive_weight: float = 0.3
    smooth_l1_beta: float = 1.0
    logit_scale_init: float = 2.0  # log space: exp(2.0) ~ 7.39
    logit_scale_max: float = 100.0
    gather_negatives: bool = True  # all-gather targets across ranks for InfoNCE negatives


@dataclass
class TrainConfig:
    stage: str = "pt"  # pt | vpt | ift (set from the stage name)
    init_from: str | None = None  # checkpoint dir of the previous stage; default: previous stage's final
    targets: str = "cached"  # "cached" (read the store) or "online" (run the olacache teachers live)
    teacher_preset: str = "tiny"  # for targets=online: the preset the store was built with
    # for targets=online: per-teacher checkpoint dirs/hub ids and options (e.g. {depth: {bgr_quirk: true}}),
    # to match the weights/preprocessing a store was built with
    teacher_sources: dict[str, str] = field(default_factory=dict)
    teacher_options: dict[str, dict] = field(default_factory=dict)
    max_steps: int = 100
    # end this invocation after this many more steps, leaving a resumable checkpoint (schedule unchanged);
    # for time-sliced jobs and the resume test
    stop_after: int | None = None
    batch_size: int = 4  # per process micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 1
    save_every: int = 50
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: str = "auto"  # auto (on for CUDA) | on | off
    device: str = "auto"
    # torch intra-op threads for a CPU run (torch.set_num_threads); None = torch's default (one per core).
    # On a small shared machine fewer is faster: OpenMP threads spin-wait, and 2 threads on 2 cores with any other
    # busy process made the tiny run ~6x slower than 1 thread (configs/tiny.yaml sets 1)
    cpu_threads: int | None = None
    # a step whose loss or gradient norm is not finite is not applied (counted, its samples listed in
    # <stage>/skipped.jsonl); this many in a row stop the run with an error
    max_bad_steps: int = 3
    # "ddp" (every rank holds the whole model) or "fsdp" (FSDP2: parameters, gradients and AdamW state sharded
    # per decoder layer; sharded DCP checkpoints, final/ consolidated). See olatrain/parallel.py.
    parallel: str = "ddp"
    # experiment trackers that get the same rows as metrics.jsonl: [tensorboard] and/or [wandb] (optional extras,
    # imported only when listed; olatrain/tracking.py)
    report_to: list[str] = field(default_factory=list)
    # end `olatrain run` with the run summary (<run>/summary.json, printed) and loss PNGs per stage (report.py)
    summary: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"

    @property
    def teachers(self) -> list[str]:
        """Teachers with an embedding loss in this run (PT only; other stages train NTP alone)."""
        if self.train.stage != "pt":
            return []
        return [t for t in TEACHERS_DEFAULT if self.model.layers.get(t) and self.loss.weights.get(t, 0) > 0] + [
            t for t in self.model.layers if t not in TEACHERS_DEFAULT and self.model.layers[t]
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGES = ("pt", "vpt", "ift")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with Config.to_dict() (checkpoints carry theirs)."""
    return build_dataclass(Config, data, "config")


@dataclass
class RunSpec:
    """A whole run: its stages in order, each resolved to a full Config."""

    stages: list[str]
    configs: dict[str, Config]
    raw: dict[str, Any]

    @property
    def output_dir(self) -> Path:
        return Path(self.configs[self.stages[0]].output_dir)


# Path-valued keys of a run config. In a config FILE, relative values are relative to the file's directory (so a
# config works from any working directory); `--set` values stay relative to the working directory.
PATH_KEYS = (("data", "annotations"), ("data", "image_root"), ("data", "store"), ("output_dir",),
             ("train", "init_from"))
# model names are hub ids or "tiny" unless they look local: these move only when written ./x or ../x, or when
# the directory exists next to the config
MAYBE_LOCAL_KEYS = (("model", "vision"), ("model", "llm"), ("model", "tokenizer"))


def resolve_config_paths(section: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a config mapping (the shared sections or one stage's) with its relative paths made relative to
    ``base``; URLs ("s3://..."), absolute paths and non-strings are left alone."""
    out = deep_merge(section, {})

    def fix(keys: tuple[str, ...], maybe_local: bool) -> None:
        node = out
        for k in keys[:-1]:
            node = node.get(k)
            if not isinstance(node, dict):
                return
        v = node.get(keys[-1])
        if not isinstance(v, str) or not v or "://" in v or Path(v).expanduser().is_absolute():
            return
        if maybe_local and not (v.startswith(("./", "../")) or (base / v).is_dir()):
            return
        node[keys[-1]] = os.path.normpath(base / v)

    for keys in PATH_KEYS:
        fix(keys, False)
    for keys in MAYBE_LOCAL_KEYS:
        fix(keys, True)
    sources = (out.get("train") or {}).get("teacher_sources") if isinstance(out.get("train"), dict) else None
    if isinstance(sources, dict):
        for t in list(sources):
            fix(("train", "teacher_sources", t), True)
    return out


def load_run(path: str | Path | None, overrides: list[str] | None = None) -> RunSpec:
    raw: dict[str, Any] = load_yaml_file(path) if path is not None else {}
    if path is not None:
        base = Path(path).resolve().parent
        stages_in_file = raw.get("stages")
        raw = resolve_config_paths({k: v for k, v in raw.items() if k != "stages"}, base)
        if isinstance(stages_in_file, dict):
            raw["stages"] = {n: resolve_config_paths(v, base) if isinstance(v, dict) else v
                             for n, v in stages_in_file.items()}
        elif stages_in_file is not None:
            raw["stages"] = stages_in_file
    cli = parse_overrides(overrides)
    yaml_stages = raw.pop("stages", None) or {}
    cli_stages = cli.get("stages") or {}
    if not isinstance(yaml_stages, dict) or not isinstance(cli_stages, dict):
        raise ConfigError("`stages` must be a mapping of stage name -> overrides, e.g. {pt: {}, ift: {...}}")
    stages_raw = deep_merge(yaml_stages, cli_stages) or {"pt": {}}
    non_stage_cli = {k: v for k, v in cli.items() if k != "stages"}
    configs: dict[str, Config] = {}
    for name in stages_raw:
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; valid: {list(STAGES)}")
        # the most specific wins: a `--set stages.pt.x=` beats a `--set x=`, which beats the YAML stage section
        merged = deep_merge(deep_merge(raw, yaml_stages.get(name) or {}), non_stage_cli)
        merged = deep_merge(merged, cli_stages.get(name) or {})
        merged.setdefault("train", {})["stage"] = name
        cfg = build_dataclass(Config, merged, "config")
        validate(cfg)
        validate_report_to(cfg)
        configs[name] = cfg
    return RunSpec(stages=list(stages_raw), configs=configs, raw={**raw, "stages": stages_raw})


def validate(cfg: Config) -> None:
    t, d = cfg.train, cfg.data
    if t.targets not in ("cached", "online"):
        raise ConfigError(f"train.targets must be 'cached' or 'online', got {t.targets!r}")
    if d.image_aspect not in ("square", "pad"):
        raise ConfigError(f"data.image_aspect must be 'square' or 'pad', got {d.image_aspect!r}")
    if d.missing_targets not in ("skip", "error"):
        raise ConfigError(f"data.missing_targets must be 'skip' or 'error', got {d.missing_targets!r}")
    for key, value, allowed in (("train.precision", t.precision, ("auto", "bf16", "fp32")),
                                ("train.grad_checkpointing", t.grad_checkpointing, ("auto", "on", "off"))):
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    if d.bad_images not in ("skip", "error"):
        raise ConfigError(f"data.bad_images must be 'skip' or 'error', got {d.bad_images!r}")
    if d.store_readahead is not None and d.store_readahead < 0:
        raise ConfigError(f"data.store_readahead must be >= 0 batches (or none for auto), got {d.store_readahead}")
    try:
        parse_size(d.store_cache_size)
    except ValueError as e:
        raise ConfigError(f"data.store_cache_size: {e}") from None
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {t.parallel!r}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0 = load data in the main process), got {d.num_workers}")
    if t.cpu_threads is not None and t.cpu_threads < 1:
        raise ConfigError(f"train.cpu_threads must be >= 1 (or none for torch's default), got {t.cpu_threads}")
    if t.max_steps < 1 or t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.max_steps, train.batch_size and train.grad_accum must be >= 1")
    for name, layers in cfg.model.layers.items():
        if not isinstance(layers, list) or not all(isinstance(x, int) and x >= 1 for x in layers):
            raise ConfigError(f"model.layers.{name} must be a list of 1-indexed layer numbers, got {layers!r}")
    for name, kind in cfg.model.teacher_kinds.items():
        if kind not in ("spatial", "global"):
            raise ConfigError(f"model.teacher_kinds.{name} must be 'spatial' or 'global', got {kind!r}")
    for name, n in cfg.model.task_tokens.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"model.task_tokens.{name} must be an int >= 0")
        if cfg.model.teacher_kinds.get(name) == "spatial" and n and cfg.model.spatial_queries % n:
            raise ConfigError(
                f"model.spatial_queries ({cfg.model.spatial_queries}) must be divisible by "
                f"model.task_tokens.{name} ({n}): the inserted tokens are group means"
            )


def store_read_options(cfg: Config) -> dict[str, Any]:
    """TargetReader keyword arguments from ``data.store_readahead`` / ``store_cache`` / ``store_cache_size``."""
    d = cfg.data
    return {"readahead": d.store_readahead, "cache_dir": d.store_cache, "cache_bytes": parse_size(d.store_cache_size)}


def validate_report_to(cfg: Config) -> None:
    bad = [x for x in cfg.train.report_to if x not in ("tensorboard", "wandb")]
    if bad:
        raise ConfigError(f"train.report_to: unknown tracker(s) {bad}; choose from [tensorboard, wandb]")


def dump(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=str)
