"""The training loop, top to bottom: one stage at a time, plain PyTorch, DDP under torchrun.

    for each stage (pt -> [vpt] -> ift):
        model  = vision encoder (frozen) -> projector -> LLM (+ task tokens) [+ predictors in PT]
        data   = LLaVA conversations + cached targets joined by image path (batched store reads in workers)
        loop   = AdamW, cosine schedule with warmup, grad accumulation + clipping, bf16 autocast on CUDA
        output = metrics.jsonl, atomic checkpoints, final/ (the next stage initialises from it)

No teacher is imported here: targets come from the store (olacache.store.TargetReader). The only way to get
live teachers is `train.targets: online`, which goes through olatrain.online (one lazily imported adapter).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olatrain import checkpoint as ckpt
from olatrain.config import Config, RunSpec


# ----------------------------------------------------------------------------------------------- setup
@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype (bf16 on CUDA), None = fp32

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: Config) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.train.device == "auto":
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and cfg.train.cpu_threads is not None:
        torch.set_num_threads(cfg.train.cpu_threads)  # process-wide (DataLoader workers use 1 regardless)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    amp = torch.bfloat16 if prec == "bf16" else None
    return Env(rank, world, local, device, amp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_with_warmup(max_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warm = max(0, math.ceil(max_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        prog = (step - warm) / max(1, max_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return f


def all_reduce_mean(values: dict[str, float], env: Env) -> dict[str, float]:
    if env.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t.tolist(), strict=True)}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def mv(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: mv(v) for k, v in x.items()}
        return x

    return {k: mv(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------- targets
def open_targets(cfg: Config, env: Env) -> tuple[Any, Any, dict[str, tuple[int, ...]]]:
    """Return (store reader or None, online adapter or None, teacher target shapes)."""
    teachers = cfg.teachers
    if not teachers:
        return None, None, {}
    if cfg.train.targets == "online":
        from olatrain.online import OnlineTargets  # the one lazy door to live teachers

        online = OnlineTargets(teachers, preset=cfg.train.teacher_preset, image_root=cfg.data.image_root,
                               device=env.device, sources=cfg.train.teacher_sources,
                               options=cfg.train.teacher_options)
        return None, online, online.shapes
    from olacache.store import StoreError, TargetReader

    if not cfg.data.store:
        raise SystemExit(
            "PT with cached targets needs data.store (build one with `olacache build`), "
            "or train.targets=online to run the teachers live"
        )
    try:
        reader = TargetReader(cfg.data.store, teachers)
    except StoreError as e:
        raise SystemExit(f"cannot use store {cfg.data.store}: {e}") from e
    return reader, None, dict(reader.shapes)


# ----------------------------------------------------------------------------------------------- one stage
def train_stage(cfg: Config, stage_dir: Path, *, init_from: Path | None, resume: bool,
                log: Callable[[str], None] = print, progress: bool = True) -> Path:
    from olatrain.data import ConversationDataset, DataError, build_dataloader, check_targets
    from olatrain.model import build_model
    from olatrain.presets import load_image_processor, load_tokenizer

    env = setup_env(cfg)
    seed_everything(cfg.train.seed)
    stage = cfg.train.stage
    stage_dir.mkdir(parents=True, exist_ok=True)

    # -- resume point (decided before anything expensive)
    start_step, resume_from = 0, None
    if resume:
        resume_from = ckpt.latest_checkpoint(stage_dir)
        if resume_from is not None:
            start_step = ckpt.load_state(resume_from)["step"]
    elif ckpt.latest_checkpoint(stage_dir) is not None:
        raise SystemExit(f"{stage_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another output_dir")

    # -- data and targets
    tokenizer = load_tokenizer(cfg)
    image_processor = load_image_processor(cfg)
    reader, online, shapes = open_targets(cfg, env)
    try:
        dataset = ConversationDataset(cfg, tokenizer, image_processor, reader, cfg.teachers)
        kept = check_targets(dataset, reader, cfg) if reader is not None else {}
    except DataError as e:  # a refusal before step 1, not a crash: the message says what to do
        raise SystemExit(f"[{stage}] {e}") from e
    if env.world > 1 and reader is not None:
        # every rank must shard the SAME sample list: rank 0's view of the store decides (a store still being
        # built could otherwise give ranks different skip lists and so overlapping/missing samples)
        box = [dataset.active_indices if env.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        dataset.set_active(box[0])
    if env.main and kept.get("skipped"):
        log(f"[{stage}] skipped {kept['skipped']} sample(s) whose targets are missing/failed in the store")
    loader = build_dataloader(dataset, cfg.train.batch_size, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                              rank=env.rank, world_size=env.world, num_workers=cfg.data.num_workers,
                              start_step=start_step * cfg.train.grad_accum, drop_last=True)

    # -- model (re-seeded: its random init must not depend on what was loaded before it, e.g. online teachers)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, shapes, device=env.device, tokenizer=tokenizer)
    if init_from is not None and resume_from is None:
        sd = ckpt.load_weights(init_from)
        model.load_trainable_state_dict(sd, strict=False)
        if env.main:
            log(f"[{stage}] initialised from {init_from}")
    model.set_stage(stage)
    if cfg.train.grad_checkpointing == "on" or (cfg.train.grad_checkpointing == "auto" and env.device.type == "cuda"):
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    # one group, as the reference (same lr for projector, predictors, tokens and temperatures in PT)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
                            weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(cfg.train.max_steps, cfg.train.warmup_ratio))
    # start the data stream (and its workers) BEFORE restoring the RNG: creating the iterator draws a worker
    # base seed from the global RNG, which would otherwise shift a resumed run's RNG stream by one draw
    it: Iterator[dict[str, Any]] = iter(loader)
    if resume_from is not None:
        model.load_trainable_state_dict(ckpt.load_weights(resume_from), strict=False)
        ckpt.load_training_state(resume_from, opt, sched)
        if env.main:
            log(f"[{stage}] resumed from {resume_from} at step {start_step}")
    ddp = model
    if env.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    metrics_f = None
    if env.main:
        (stage_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        # drop rows past the resume point (a fresh start keeps none) BEFORE opening for append: the truncation
        # replaces the file, and a handle opened earlier would keep writing into the replaced (unlinked) one
        _truncate_metrics(stage_dir / "metrics.jsonl", start_step)
        metrics_f = open(stage_dir / "metrics.jsonl", "a")
    n_trainable = sum(p.numel() for p in params)
    if env.main:
        log(f"[{stage}] {len(dataset)} samples, {n_trainable / 1e6:.2f}M trainable params, "
            f"{cfg.train.max_steps} steps x {cfg.train.batch_size}x{cfg.train.grad_accum}x{env.world}, "
            f"device {env.device}" + (f", targets {cfg.train.targets}" if cfg.teachers else ""))

    # -- the loop
    display = TrainDisplay(stage, cfg.train.max_steps, start_step, enabled=env.main and progress)
    stop_at = cfg.train.max_steps if cfg.train.stop_after is None else min(cfg.train.max_steps, start_step + cfg.train.stop_after)
    step = start_step
    saved_at = start_step if resume_from is not None else -1
    model.train()
    with display:
        while step < stop_at:
            t_step = time.perf_counter()
            t_data = t_teacher = 0.0
            sums: dict[str, float] = {}
            n_samples = 0
            for micro in range(cfg.train.grad_accum):
                t0 = time.perf_counter()
                batch = next(it)
                t_data += time.perf_counter() - t0
                if online is not None:  # live teachers: timed apart, so data_wait still means the loader
                    t0 = time.perf_counter()
                    batch["targets"], batch["target_mask"] = online(batch["image_paths"], batch["has_image"])
                    t_teacher += time.perf_counter() - t0
                batch = to_device(batch, env.device)
                n_samples += batch["input_ids"].shape[0]
                last = micro == cfg.train.grad_accum - 1
                sync = contextlib.nullcontext() if (last or env.world == 1) else ddp.no_sync()
                with sync, torch.autocast(env.device.type, dtype=env.amp_dtype or torch.float32,
                                          enabled=env.amp_dtype is not None):
                    out = ddp(batch)
                    loss = out["loss"] / cfg.train.grad_accum
                loss.backward()
                for k, v in out.items():
                    if k.startswith("loss"):
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.train.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t_step
            if step % cfg.train.log_every == 0 or step == stop_at:
                row = all_reduce_mean(sums, env)
                row.update(step=step, stage=stage, lr=sched.get_last_lr()[0],
                           grad_norm=float(grad_norm) if grad_norm is not None else None,
                           samples_per_s=n_samples * env.world / dt, step_time=dt, data_wait=t_data / dt)
                if online is not None:
                    row["teacher_time"] = t_teacher / dt
                if metrics_f is not None:
                    metrics_f.write(json.dumps(row) + "\n")
                    metrics_f.flush()
                display.update(step, row)
            if env.main and cfg.train.save_every > 0 and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                ckpt.save_periodic(stage_dir, weights=model.trainable_state_dict(), optimizer=opt, scheduler=sched,
                                   step=step, stage=stage, config=cfg.to_dict())
                saved_at = step
            if env.world > 1:
                torch.distributed.barrier()
    if metrics_f is not None:
        metrics_f.close()

    final = stage_dir / "final"
    if env.main:
        if step >= cfg.train.max_steps:
            ckpt.save_checkpoint(final, weights=model.trainable_state_dict(), optimizer=None, scheduler=None,
                                 step=step, stage=stage, config=cfg.to_dict())
            ckpt.mark_done(final)
            log(f"[{stage}] done: {final}")
        else:  # stopped early on purpose (train.stop_after): leave a resumable checkpoint
            if saved_at != step:  # (re-saving the step just saved would only replace it with an equal copy)
                ckpt.save_periodic(stage_dir, weights=model.trainable_state_dict(), optimizer=opt,
                                   scheduler=sched, step=step, stage=stage, config=cfg.to_dict())
            log(f"[{stage}] stopped at step {step}/{cfg.train.max_steps}; continue with --resume")
    if env.world > 1:
        torch.distributed.barrier()
    return final


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows after ``step`` (the resume point; 0 on a fresh start): they will be produced again."""
    if not path.is_file():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


class TrainDisplay:
    """Step, each loss term, samples/s, ETA: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool):
        import sys

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.stage = stage
        self.total = total
        self.progress = Progress(
            TextColumn(f"[bold]{stage}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not self.live,
        )
        self.task = self.progress.add_task(stage, total=total, completed=start, info="")

    def __enter__(self) -> TrainDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *a: Any) -> None:
        self.progress.__exit__(*a)

    def update(self, step: int, row: dict[str, Any]) -> None:
        terms = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in sorted(row.items())
                         if k.startswith("loss_") and k.count("_") == 1)
        info = f"loss={row.get('loss', float('nan')):.3f} {terms} {row['samples_per_s']:.1f} samp/s"
        if self.live:
            self.progress.update(self.task, completed=step, info=info)
        elif self.enabled:
            print(f"[{self.stage}] step {step}/{self.total} {info}", flush=True)


# ----------------------------------------------------------------------------------------------- whole run
def run(spec: RunSpec, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Run every stage in order; each initialises from the previous stage's final checkpoint."""
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    prev: Path | None = None
    final = out
    for name in spec.stages:
        cfg = spec.configs[name]
        stage_dir = out / name
        final = stage_dir / "final"
        if ckpt.is_done(final):
            if not resume:
                raise SystemExit(f"{stage_dir} is already complete: pass --resume to continue the run "
                                 "(finished stages are skipped), or choose another output_dir")
            log(f"[{name}] already complete, skipping")
            prev = final
            continue
        init = Path(cfg.train.init_from) if cfg.train.init_from else prev
        train_stage(cfg, stage_dir, init_from=init, resume=resume, log=log, progress=progress)
        if not ckpt.is_done(final):
            break  # stopped early (train.stop_after); --resume continues here
        prev = final
    return final
