"""``olatrain probe``: how much of each teacher's target every LLM layer of a frozen model carries
(docs/method.md §9, the paper's probe figure), measured on cached targets.

    resolve the model (run dir, checkpoint, or --baseline config)         (probe_source)
    split the images: train / eval, by image, seeded                      (split_images)
    for each step: ONE no-grad forward of the frozen MLLM, hidden states of every requested layer captured with
        hooks, then every (teacher, layer) probe trains on them at once   (train_probes)
    eval: the same single forward per eval batch; cosine(probe output, target) per image, averaged
    write probe.json / probe.csv / probe.png atomically                    (write_outputs)

A probe is the predictors' single-block Perceiver resampler (docs/method.md §5.3) with its own learned queries,
trained with smooth-L1 + contrastive (§6) and its own temperature. Resuming: the probes' state is saved every
``probe.save_every`` steps (atomically) and a rerun with the same arguments continues from it; a rerun after the
results exist trains only the (teacher, layer) pairs that are not in probe.json yet (none -> it returns at once).
Under torchrun the batches are split over ranks, gradients are averaged, eval sums are all-reduced and rank 0
writes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from olacache.common.configio import ConfigError, build_dataclass
from olacache.common.files import atomic_write
from olatrain.probe_outputs import assemble_result, pair_key, write_outputs
from olatrain.probe_source import ProbeError, Source, frozen_hidden_states, load_frozen_model

STATE_FILE = "probe_state.pt"


@dataclass
class ProbeConfig:
    """Probe settings (``--set probe.<key>=...`` on the command line, ``probe:`` in a sweep file)."""

    teachers: list[str] = field(default_factory=list)  # [] = every teacher the store holds
    layers: Any = "all"  # "all" or a list of 1-indexed layers (HF hidden_states numbering)
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    eval_fraction: float = 0.2  # share of the images held out for the score
    split_seed: int = 0
    seed: int = 0
    contrastive_weight: float = 0.3
    smooth_l1_beta: float = 1.0
    logit_scale_init: float = 2.0
    dim: int | None = None  # resampler width; None = the teacher's channels (as the reference's probes)
    heads: int = 4
    head_dim: int = 32
    save_every: int = 100  # probe state for a resumed run; 0 = only the results at the end
    num_workers: int | None = None  # None = the run's data.num_workers
    device: str = "auto"
    # what the model reads with each image: "fixed" = the paper's probing prompt, the same for every image
    # (docs/method.md §9: no caption can leak into the probes); "dataset" = the image's first conversation
    prompt: str = "fixed"


# the reference's probe prompt (image first, a one-token dummy answer)
FIXED_PROMPT = [{"from": "human", "value": "<image>\nDescribe the image in two lines."}, {"from": "gpt", "value": "n"}]
# settings that do not change a probe's result (they may differ between a run and its resumption)
_NOT_IN_FINGERPRINT = ("teachers", "layers", "save_every", "num_workers", "device")


def probe_config(values: dict[str, Any] | None) -> ProbeConfig:
    try:
        pc = build_dataclass(ProbeConfig, dict(values or {}), "probe")
    except ConfigError as e:
        raise ProbeError(str(e)) from None
    if pc.steps < 1 or pc.batch_size < 1:
        raise ProbeError("probe.steps and probe.batch_size must be >= 1")
    if pc.prompt not in ("fixed", "dataset"):
        raise ProbeError(f"probe.prompt must be 'fixed' or 'dataset', got {pc.prompt!r}")
    if not 0.0 < pc.eval_fraction < 1.0:
        raise ProbeError(f"probe.eval_fraction must be in (0, 1), got {pc.eval_fraction}")
    return pc


def parse_layers(spec: Any, n_layers: int) -> list[int]:
    """``all`` | [3, 5] | "3,5" | "2-4,6" -> sorted 1-indexed layers, each checked against the LLM's depth."""
    if spec in (None, "all"):
        return list(range(1, n_layers + 1))
    items = spec if isinstance(spec, list) else [s for s in str(spec).replace(" ", "").split(",") if s]
    out: set[int] = set()
    for it in items:
        try:
            if isinstance(it, str) and "-" in it:
                a, b = (int(x) for x in it.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(it))
        except ValueError:
            raise ProbeError(f"--layers {spec!r}: expected 'all' or a list like 2,5 or 1-4") from None
    bad = sorted(x for x in out if not 1 <= x <= n_layers)
    if bad or not out:
        raise ProbeError(f"--layers {spec!r}: layer(s) {bad} outside 1..{n_layers} (the LLM has {n_layers} layers)")
    return sorted(out)


# ----------------------------------------------------------------------------------------------- the split
def split_images(keys: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split BY IMAGE: unique images ordered by sha256(seed, key), the first round(f * n) held out
    (at least one, and at least one left to train on). Independent of the input order and of duplicates."""
    uniq = sorted(set(keys))
    order = sorted(uniq, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    n_eval = min(len(uniq) - 1, max(1, round(eval_fraction * len(uniq)))) if len(uniq) > 1 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def one_sample_per_image(dataset: Any) -> dict[str, int]:
    """image key -> the annotation position of its first active sample (each image counts once, as in the
    reference's probe data; text-only samples carry no target)."""
    first: dict[str, int] = {}
    act = dataset.active_indices
    for i in range(len(dataset)):
        k = dataset.image_key(i)
        if k is not None and k not in first:
            first[k] = int(act[i])
    return first


# ----------------------------------------------------------------------------------------------- the probe
class ProbeHead(nn.Module):
    """One (teacher, layer) probe: learned queries -> TaskTokenResampler over the layer's hidden states."""

    def __init__(self, hidden: int, tokens: int, channels: int, pc: ProbeConfig) -> None:
        from olatrain.model.predictors import TaskTokenResampler

        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, hidden) * hidden ** -0.5)
        self.resampler = TaskTokenResampler(hidden, pc.dim or channels, channels, heads=pc.heads,
                                            head_dim=pc.head_dim, ff_mult=1)
        self.log_scale = nn.Parameter(torch.tensor(float(pc.logit_scale_init)))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.resampler(h, self.queries, mask)


# ----------------------------------------------------------------------------------------------- run
@dataclass
class ProbeJob:
    """Everything a probe run needs after set-up."""

    src: Source
    pc: ProbeConfig
    out: Path
    rt: Any
    amp: torch.dtype | None
    model: Any
    dataset: Any
    reader: Any
    teachers: list[str]
    layers: list[int]
    pairs: list[tuple[str, int]]
    train_keys: list[str]
    eval_keys: list[str]
    train_idx: np.ndarray
    eval_idx: np.ndarray
    fingerprint: str
    previous: dict[str, Any] | None


def _fingerprint(src: Source, pc: ProbeConfig) -> str:
    settings = {k: v for k, v in dataclasses.asdict(pc).items() if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"settings": settings, "model": src.describe(), "config": src.cfg.to_dict()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(src: Source, pc: ProbeConfig, out: Path, log: Callable[[str], None]) -> ProbeJob:
    from olacache.store import StoreError, TargetReader
    from olatrain.config import store_read_options
    from olatrain.data import ConversationDataset, DataError, check_targets, load_image_processor
    from olatrain.presets import load_tokenizer
    from olatrain.train import seed_everything, trainer_runtime

    cfg = copy.deepcopy(src.cfg)
    cfg.train.device = pc.device
    if pc.num_workers is not None:
        cfg.data.num_workers = pc.num_workers
    rt, amp = trainer_runtime(cfg)
    if not cfg.data.store:
        raise ProbeError("probing reads targets from a store: the model's config has no data.store; "
                         "pass --set data.store=STORE")
    try:
        reader = TargetReader(cfg.data.store, pc.teachers or None, **store_read_options(cfg))
    except StoreError as e:
        raise ProbeError(f"cannot use store {cfg.data.store}: {e}") from None
    teachers = reader.teachers
    for t in teachers:
        if len(reader.shapes[t]) != 2:
            raise ProbeError(f"teacher {t!r}: target shape {reader.shapes[t]} is not (tokens, channels)")

    tokenizer = load_tokenizer(cfg)
    try:
        dataset = ConversationDataset(cfg, tokenizer, load_image_processor(cfg), reader, teachers)
        kept = check_targets(dataset, reader, cfg)
    except DataError as e:
        raise ProbeError(str(e)) from None
    first = one_sample_per_image(dataset)
    if pc.prompt == "fixed" and first:
        # the usable images, each once, with the fixed prompt: a small annotation file beside the results
        ann = out / "probe_samples.json"
        if rt.main:
            samples = [{"id": f"probe-{i}", "image": k, "conversations": FIXED_PROMPT}
                       for i, k in enumerate(sorted(first))]
            atomic_write(ann, lambda p: p.write_text(json.dumps(samples)))
        rt.barrier()
        cfg.data.annotations = str(ann)
        try:
            dataset = ConversationDataset(cfg, tokenizer, dataset.image_processor, reader, teachers)
        except DataError as e:
            raise ProbeError(str(e)) from None
        first = one_sample_per_image(dataset)
    train_keys, eval_keys = split_images(list(first), pc.eval_fraction, pc.split_seed)
    if not eval_keys or len(train_keys) < pc.batch_size * rt.world:
        raise ProbeError(f"{len(first)} images with targets cannot give a held-out set and a training batch of "
                         f"{pc.batch_size} x {rt.world} rank(s); use more images or a smaller probe.batch_size")
    if rt.main and kept.get("skipped"):
        log(f"[probe] skipped {kept['skipped']} sample(s) whose targets are missing/failed in the store")

    seed_everything(pc.seed)
    model = load_frozen_model(src, rt.device, tokenizer)
    layers = parse_layers(pc.layers, model.n_layers)
    fp = _fingerprint(src, pc)  # of the model as given (device/workers are not part of the result)
    src = dataclasses.replace(src, cfg=cfg)
    previous = None
    if (out / "probe.json").is_file():
        previous = json.loads((out / "probe.json").read_text())
        if previous.get("fingerprint") != fp:
            raise ProbeError(f"{out} holds probe results of another model or other probe settings "
                             f"(fingerprint {previous.get('fingerprint')} != {fp}); choose another --out")
    done = {(r["teacher"], r["layer"]) for r in (previous or {}).get("results", [])}
    pairs = [(t, layer) for t in teachers for layer in layers if (t, layer) not in done]
    return ProbeJob(src, pc, out, rt, amp, model, dataset, reader, teachers, layers, pairs, train_keys, eval_keys,
                    np.array([first[k] for k in train_keys], dtype=np.int64),
                    np.array([first[k] for k in eval_keys], dtype=np.int64), fp, previous)


def _finished(src: Source, pc: ProbeConfig, out: Path) -> dict[str, Any] | None:
    """probe.json's content when it already holds every requested pair for this model and these settings."""
    path = out / "probe.json"
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    if previous.get("fingerprint") != _fingerprint(src, pc) or not src.cfg.data.store:
        return None  # prepare() refuses a foreign directory with the full message
    from olacache.store import StoreError, TargetReader

    try:
        teachers = TargetReader(src.cfg.data.store, pc.teachers or None).teachers
        layers = parse_layers(pc.layers, int(previous["model"]["n_layers"]))
    except (StoreError, ProbeError, KeyError, ValueError):
        return None
    done = {(r["teacher"], r["layer"]) for r in previous.get("results", [])}
    return previous if all((t, la) in done for t in teachers for la in layers) else None


def run_probe(src: Source, pc: ProbeConfig, out: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Probe ``src`` and write DIR/probe.json, probe.csv, probe.png, split.json; -> the probe.json content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = _finished(src, pc, out)
    if previous is not None:  # decided from probe.json + the store's teacher list: no model, no data loaded
        if os.environ.get("RANK", "0") == "0":
            log(f"[probe] {out}: every requested (teacher, layer) is already in probe.json; nothing to do")
        return previous
    job = prepare(src, pc, out, log)
    rt = job.rt
    if not job.pairs:
        if rt.main:
            log(f"[probe] {out}: every requested (teacher, layer) is already in probe.json; nothing to do")
        return job.previous or {}
    if rt.main:
        log(f"[probe] {src.label}: {len(job.pairs)} probes ({', '.join(job.teachers)} x layers "
            f"{job.layers[0]}..{job.layers[-1]}), {len(job.train_keys)} train / {len(job.eval_keys)} eval images, "
            f"{pc.steps} steps x {pc.batch_size}x{rt.world}, device {rt.device}")
    t0 = time.perf_counter()
    heads, losses, timing = train_probes(job, log)
    scores = evaluate(job, heads)
    wall = time.perf_counter() - t0
    result = assemble_result(job, scores, losses, timing, wall)
    if rt.main:
        write_outputs(out, result, job)
        (out / STATE_FILE).unlink(missing_ok=True)
        log(f"[probe] wrote {out / 'probe.json'} ({len(result['results'])} entries) in {wall:.1f}s")
    rt.barrier()
    return result


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from olatrain.train import to_device

    return to_device(batch, device)


def train_probes(job: ProbeJob, log: Callable[[str], None]) -> tuple[nn.ModuleDict, dict[str, list[float]],
                                                                     dict[str, float]]:
    from olatrain.data import build_dataloader
    from olatrain.train import cosine_with_warmup

    pc, rt, model = job.pc, job.rt, job.model
    torch.manual_seed(pc.seed)
    heads = nn.ModuleDict({
        pair_key(t, layer): ProbeHead(model.hidden_size, job.reader.shapes[t][0], job.reader.shapes[t][1], pc)
        for t, layer in job.pairs
    }).to(rt.device)
    params = list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(pc.steps, pc.warmup_ratio))
    start = 0
    state_path = job.out / STATE_FILE
    losses: dict[str, list[float]] = {k: [] for k in heads}
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("fingerprint") == job.fingerprint and st.get("pairs") == [list(p) for p in job.pairs]:
            heads.load_state_dict(st["heads"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            start, losses = int(st["step"]), st["losses"]
            if rt.main:
                log(f"[probe] resumed from {state_path} at step {start}")
    train_set = copy.copy(job.dataset)
    train_set.set_active(job.train_idx)
    loader = build_dataloader(train_set, pc.batch_size, shuffle=True, seed=pc.seed, rank=rt.rank,
                              world_size=rt.world, num_workers=job.src.cfg.data.num_workers, start_step=start,
                              drop_last=True)
    layers = sorted({layer for _, layer in job.pairs})
    batches = iter(loader)
    t_fwd = t_probe = 0.0
    heads.train()
    for step in range(start, pc.steps):
        batch = _to_device(next(batches), rt.device)
        t0 = time.perf_counter()
        with torch.autocast(rt.device.type, dtype=job.amp or torch.float32, enabled=job.amp is not None):
            hs, valid, _ = frozen_hidden_states(model, batch, layers)
        t1 = time.perf_counter()
        step_losses = probe_backward(heads, job.pairs, hs, valid, batch, pc, job.amp)
        if rt.distributed:  # the mean of the ranks' gradients, as DDP would give
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= rt.world
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_fwd += t1 - t0
        t_probe += time.perf_counter() - t1
        for k, v in rt.all_reduce_mean(step_losses).items():
            losses[k].append(v)
        done = step + 1
        if rt.main and (done % max(1, pc.steps // 10) == 0 or done == pc.steps):
            mean = float(np.mean([v[-1] for v in losses.values()]))
            log(f"[probe] step {done}/{pc.steps} mean probe loss {mean:.4f}")
        if rt.main and pc.save_every > 0 and done % pc.save_every == 0 and done < pc.steps:
            st = {"step": done, "heads": heads.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "losses": losses, "fingerprint": job.fingerprint,
                  "pairs": [list(p) for p in job.pairs]}
            atomic_write(state_path, lambda p, st=st: torch.save(st, p))
        rt.barrier()
    n = max(1, pc.steps - start)
    return heads, losses, {"frozen_forward_s_per_step": t_fwd / n, "probes_s_per_step": t_probe / n}


def probe_backward(heads: nn.ModuleDict, pairs: list[tuple[str, int]], hs: dict[int, torch.Tensor],
                   valid: torch.Tensor, batch: dict[str, Any], pc: ProbeConfig, amp: torch.dtype | None
                   ) -> dict[str, float]:
    """Every probe's loss on one batch of captured hidden states, summed and back-propagated (into the probes
    only: the hidden states come from a no-grad forward); -> {pair key: loss}."""
    from olatrain.losses import embedding_loss, logit_scale

    total = None
    losses = {}
    dev = valid.device.type
    with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
        for t, layer in pairs:
            k = pair_key(t, layer)
            pred = heads[k](hs[layer], valid)
            el = embedding_loss(pred, batch["targets"][t], batch["target_mask"][t], logit_scale(heads[k].log_scale),
                                pc.contrastive_weight, pc.smooth_l1_beta)
            total = el.total if total is None else total + el.total
            losses[k] = float(el.total.detach())
    total.backward()
    return losses


@torch.no_grad()
def evaluate(job: ProbeJob, heads: nn.ModuleDict) -> dict[str, dict[str, float]]:
    """cosine(flatten(probe output), flatten(target)) per held-out image, one frozen forward per batch;
    -> {pair key: {"cos", "cos_std", "n_eval"}} summed over ranks."""
    from torch.utils.data import DataLoader

    from olatrain.data import collate

    rt, pc = job.rt, job.pc
    heads.eval()
    mine = job.eval_idx[rt.rank::rt.world]
    eval_set = copy.copy(job.dataset)
    eval_set.set_active(mine)
    chunks = [list(range(i, min(i + pc.batch_size, len(mine)))) for i in range(0, len(mine), pc.batch_size)]
    loader = DataLoader(eval_set, batch_sampler=chunks, collate_fn=lambda items: collate(items, eval_set.pad_id))
    layers = sorted({layer for _, layer in job.pairs})
    keys = [pair_key(t, layer) for t, layer in job.pairs]
    sums = torch.zeros(len(keys), 3, dtype=torch.float64)  # sum cos, sum cos^2, n
    for batch in loader:
        batch = _to_device(batch, rt.device)
        with torch.autocast(rt.device.type, dtype=job.amp or torch.float32, enabled=job.amp is not None):
            hs, valid, _ = frozen_hidden_states(job.model, batch, layers)
            for j, (t, layer) in enumerate(job.pairs):
                pred = heads[keys[j]](hs[layer], valid).float()
                tgt = batch["targets"][t].float()
                ok = batch["target_mask"][t].bool()
                cos = torch.nn.functional.cosine_similarity(pred.flatten(1), tgt.flatten(1), dim=1)[ok].double()
                sums[j] += torch.stack([cos.sum(), (cos * cos).sum(), cos.new_tensor(float(ok.sum()))]).cpu()
    if rt.distributed:
        dev = rt.device if rt.device.type == "cuda" else torch.device("cpu")
        s = sums.to(dev)
        torch.distributed.all_reduce(s)
        sums = s.cpu()
    out = {}
    for j, k in enumerate(keys):
        total, sq, n = sums[j].tolist()
        mean = total / n if n else float("nan")
        out[k] = {"cos": mean, "cos_std": math.sqrt(max(0.0, sq / n - mean * mean)) if n else float("nan"),
                  "n_eval": int(n)}
    return out
