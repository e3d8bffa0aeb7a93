"""The training loop, top to bottom: one stage at a time, plain PyTorch, DDP under torchrun.

    for each stage (pt -> [vpt] -> ift):                                          (run)
        prepare: runtime, data + cached targets, model, optimizer, resume point   (prepare_stage)
        loop:    AdamW, cosine schedule with warmup, grad accumulation + clipping,
                 bf16 autocast on CUDA, metrics.jsonl, periodic atomic checkpoints (train_loop)
        finish:  final/ (the next stage initialises from it), or a resumable stop (finish_stage)

No teacher is imported here: targets come from the store (olacache.store.TargetReader). The only way to get
live teachers is `train.targets: online`, which goes through olatrain.online (one lazily imported adapter).

Bad data and bad steps never train silently:
- samples excluded before step 1 (failed in the store; a failed `data.bad_images=error` pre-scan stops instead),
  images replaced while training and store rows holding non-finite values are counted, logged and listed in
  `<stage>/skipped.jsonl`; `<stage>/summary.json` (and final/state.json) hold the counts;
- a step whose loss or gradient norm is not finite is not applied (the optimizer does not step; the schedule
  and the data position still advance, so resume stays exact); `train.max_bad_steps` of them in a row stop the
  run with `guards.NonFiniteSteps`;
- `--resume` verifies checkpoints (checksums) and falls back to the newest intact one.
User-facing failures are `RunError`s: a SystemExit carrying one line (exit status 1 when nothing catches it).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olacache.common.runtime import Runtime, init_runtime
from olatrain import checkpoint as ckpt
from olatrain import guards, parallel
from olatrain.config import Config, RunSpec, config_from_dict, store_read_options
from olatrain.guards import RunError, RunRefused
from olatrain.metrics import MetricsLog, TrainDisplay


# ----------------------------------------------------------------------------------------------- setup
def trainer_runtime(cfg: Config) -> tuple[Runtime, torch.dtype | None]:
    """The process's runtime (rank, world, device; joins the process group under torchrun) plus the trainer's
    device settings; -> (runtime, autocast dtype or None for fp32)."""
    rt = init_runtime(cfg.train.device)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if rt.device.type == "cpu" and cfg.train.cpu_threads is not None:
        torch.set_num_threads(cfg.train.cpu_threads)  # process-wide (DataLoader workers use 1 regardless)
    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if rt.device.type == "cuda" else "fp32"
    return rt, (torch.bfloat16 if prec == "bf16" else None)


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def mv(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: mv(v) for k, v in x.items()}
        return x

    return {k: mv(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------- targets
def open_targets(cfg: Config, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """-> (store reader or None, online adapter or None, {teacher: TargetSpec} of the teachers with a loss)."""
    from olatrain.model import TargetSpec

    teachers = cfg.teachers
    if not teachers:
        return None, None, {}
    if cfg.train.targets == "online":
        from olatrain.online import OnlineTargets  # the one lazy door to live teachers

        online = OnlineTargets(teachers, preset=cfg.train.teacher_preset, image_root=cfg.data.image_root,
                               device=device, sources=cfg.train.teacher_sources,
                               options=cfg.train.teacher_options)
        return None, online, {t: TargetSpec(online.shapes[t], online.kinds[t]) for t in teachers}
    from olacache.store import StoreError, TargetReader

    if not cfg.data.store:
        raise RunRefused(
            "PT with cached targets needs data.store (build one with `olacache build`), "
            "or train.targets=online to run the teachers live"
        )
    try:
        reader = TargetReader(cfg.data.store, teachers, **store_read_options(cfg))
    except StoreError as e:
        raise RunRefused(f"cannot use store {cfg.data.store}: {e}") from e
    return reader, None, {t: TargetSpec(reader.shapes[t], reader.kinds[t]) for t in teachers}


# ----------------------------------------------------------------------------------------------- one stage
@dataclass
class Stage:
    """Everything one stage's loop needs, made by :func:`prepare_stage`."""

    cfg: Config
    rt: Runtime
    amp: torch.dtype | None
    dir: Path
    model: Any  # OLAVLM
    ddp: Any  # the model, or its DistributedDataParallel wrapper
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    batches: Iterator[dict[str, Any]]
    online: Any
    start_step: int
    resumed: bool
    metrics: MetricsLog | None
    log: Callable[[str], None] = print
    skip_log: Path | None = None  # <stage>/skipped.jsonl (every rank appends its own records)
    excluded: dict[str, int] | None = None  # samples left out before step 1, by reason
    n_samples: int = 0
    skip_lines: int = 0  # skip records logged so far (the rest only go to skipped.jsonl)
    sharded: bool = False  # train.parallel=fsdp: collective, sharded checkpoints (olatrain.dcp)


def prepare_stage(cfg: Config, stage_dir: Path, *, init_from: Path | None, resume: bool,
                  log: Callable[[str], None]) -> Stage:
    from olatrain.data import (
        ConversationDataset,
        DataError,
        build_dataloader,
        check_targets,
        load_image_processor,
    )
    from olatrain.model import build_model
    from olatrain.presets import load_tokenizer

    rt, amp = trainer_runtime(cfg)
    seed_everything(cfg.train.seed)
    stage = cfg.train.stage
    stage_dir.mkdir(parents=True, exist_ok=True)

    # -- resume point (decided before anything expensive; rank 0 verifies, every rank takes its choice)
    sharded = parallel.is_sharded(cfg)
    if sharded:
        from olatrain import dcp
    start_step, resume_from = 0, None
    if resume:
        if sharded:
            resume_from = dcp.latest_checkpoint(stage_dir)
        else:
            verdict: tuple[str | None, str | None] = (None, None)  # (checkpoint to resume from, refusal)
            if rt.main:
                found, damaged = ckpt.find_resumable(stage_dir)
                for path, why in damaged:
                    log(f"[{stage}] checkpoint {path} is damaged or incomplete ({why}); "
                        + ("trying an older one" if path != damaged[-1][0] or found is not None else "none is left"))
                if found is not None:
                    verdict = (str(found), None)
                elif damaged:
                    verdict = (None, f"no intact checkpoint in {stage_dir / 'checkpoints'} (the newest: "
                                     f"{damaged[0][1]}); remove {stage_dir} to train the stage from its start")
            found_s, refusal = rt.broadcast_object(verdict)
            if refusal is not None:
                raise RunRefused(f"[{stage}] cannot resume: {refusal}")
            resume_from = Path(found_s) if found_s is not None else None
        other = ckpt.latest_checkpoint(stage_dir) if sharded else _latest_sharded(stage_dir)
        if resume_from is None and other is not None:
            raise RunRefused(f"{other} was saved with train.parallel={'ddp' if sharded else 'fsdp'}: resume the "
                             "stage with that setting (a finished stage's final/ works with either)")
        if resume_from is not None:
            start_step = int(ckpt.load_state(resume_from)["step"])
    elif ckpt.latest_checkpoint(stage_dir) is not None or _latest_sharded(stage_dir) is not None:
        raise RunRefused(f"{stage_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another output_dir")
    if init_from is not None and resume_from is None:
        why = ckpt.verify(init_from, training=False)
        if why is not None:
            raise RunRefused(f"[{stage}] cannot initialise from {init_from}: {why}; rerun the stage that wrote it "
                           f"(remove its directory) or set train.init_from to an intact checkpoint")

    # -- data and targets
    tokenizer = load_tokenizer(cfg)
    image_processor = load_image_processor(cfg)
    reader, online, specs = open_targets(cfg, rt.device)
    if reader is not None and cfg.data.store_cache and not reader.is_remote and rt.main:
        log(f"[{stage}] data.store_cache is not used: {cfg.data.store} is on local disk (the cache is for "
            "object storage)")
    for t, spec in specs.items():  # the store's kinds win, and the saved config carries them to later stages
        cfg.model.teacher_kinds[t] = spec.kind
    try:
        dataset = ConversationDataset(cfg, tokenizer, image_processor, reader, cfg.teachers)
        kept = check_targets(dataset, reader, cfg) if reader is not None else {}
        dataset.check_image_root()
    except DataError as e:  # a refusal before step 1, not a crash: the message says what to do
        raise RunRefused(f"[{stage}] {e}") from None
    if cfg.data.bad_images == "error":  # every rank decodes its share of the images; all stop on any failure
        problem = _prescan(dataset, cfg, rt)
        if problem:
            raise RunRefused(f"[{stage}] {problem}")
    if rt.distributed and reader is not None:
        # every rank must shard the SAME sample list: rank 0's view of the store decides (a store still being
        # built could otherwise give ranks different skip lists and so overlapping/missing samples)
        dataset.set_active(rt.broadcast_object(dataset.active_indices if rt.main else None))
    if rt.main and kept.get("skipped"):
        log(f"[{stage}] skipped {kept['skipped']} sample(s) whose targets are missing/failed in the store")
    excluded = {"targets_missing_or_failed": int(kept.get("skipped", 0))}
    loader = build_dataloader(dataset, cfg.train.batch_size, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                              rank=rt.rank, world_size=rt.world, num_workers=cfg.data.num_workers,
                              start_step=start_step * cfg.train.grad_accum, drop_last=True)

    # -- model (re-seeded: its random init must not depend on what was loaded before it, e.g. online teachers)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, specs, device=rt.device, tokenizer=tokenizer)
    if init_from is not None and resume_from is None:
        try:
            model.load_trainable_state_dict(ckpt.load_weights(init_from), strict=False)
        except ckpt.CheckpointError as e:
            raise RunRefused(f"[{stage}] {e}") from None
        if rt.main:
            log(f"[{stage}] initialised from {init_from}")
    model.set_stage(stage)
    gc_mode = cfg.train.grad_checkpointing
    if gc_mode == "on" or (gc_mode == "auto" and rt.device.type == "cuda"):
        model.enable_gradient_checkpointing()
    parallel.cast_frozen(model, cfg, rt.device)  # frozen weights in bf16 on CUDA (a no-op on CPU)
    if sharded:  # before the optimizer: FSDP turns the parameters into sharded DTensors
        parallel.shard(model, cfg, rt)
        if rt.main:
            log(f"[{stage}] FSDP: {parallel.describe(model)}")
    params = [p for p in model.parameters() if p.requires_grad]
    # one group, as the reference (same lr for projector, predictors, tokens and temperatures in PT)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
                            weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(cfg.train.max_steps, cfg.train.warmup_ratio))
    # start the data stream (and its workers) BEFORE restoring the RNG: creating the iterator draws a worker
    # base seed from the global RNG, which would otherwise shift a resumed run's RNG stream by one draw
    batches: Iterator[dict[str, Any]] = iter(loader)
    try:
        if resume_from is not None and sharded:
            dcp.load_sharded(resume_from, model=model, optimizer=opt, scheduler=sched)
        elif resume_from is not None:
            model.load_trainable_state_dict(ckpt.load_weights(resume_from), strict=False)
            ckpt.load_training_state(resume_from, opt, sched)
        if resume_from is not None and rt.main:
            log(f"[{stage}] resumed from {resume_from} at step {start_step}")
    except ckpt.CheckpointError as e:
        raise RunRefused(f"[{stage}] {e}") from None
    ddp = model if sharded else parallel.wrap_ddp(model, rt)

    metrics = None
    if rt.main:
        (stage_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        metrics = MetricsLog(stage_dir / "metrics.jsonl", start_step, report_to=cfg.train.report_to)
        n_trainable = sum(p.numel() for p in params)
        log(f"[{stage}] {len(dataset)} samples, {n_trainable / 1e6:.2f}M trainable params, "
            f"{cfg.train.max_steps} steps x {cfg.train.batch_size}x{cfg.train.grad_accum}x{rt.world}, "
            f"device {rt.device}" + (f", targets {cfg.train.targets}" if cfg.teachers else ""))
    skip_log = guards.open_skip_log(stage_dir, start_step, rt)
    return Stage(cfg, rt, amp, stage_dir, model, ddp, params, opt, sched, batches, online, start_step,
                 resume_from is not None, metrics, log=log, skip_log=skip_log, excluded=excluded,
                 n_samples=dataset.n_samples, sharded=sharded)


def _latest_sharded(stage_dir: Path) -> Path | None:
    from olatrain import dcp

    return dcp.latest_checkpoint(stage_dir)


def _prescan(dataset: Any, cfg: Config, rt: Runtime) -> str | None:
    """The ``data.bad_images=error`` pre-scan, split over the ranks (rank r decodes every world-th image, so
    the ranks finish together and none waits out a collective timeout); None when every image decodes, else the
    one-line refusal (the same on every rank)."""
    mine = dataset.scan_bad_images(max(1, cfg.data.num_workers), rank=rt.rank, world=rt.world)
    bad = [b for part in rt.gather_objects(mine) for b in part]
    if not bad:
        return None
    ex = "; ".join(f"{what}: {why}" for what, why in bad[:3])
    return (f"{len(bad)} image(s) of {cfg.data.annotations} cannot be used (data.bad_images=error), e.g. {ex}. "
            f"Fix or remove them, or set data.bad_images=skip to train without them")


def train_loop(st: Stage, *, progress: bool) -> tuple[int, int]:
    """Run steps until max_steps (or train.stop_after more); -> (last step, step of the last checkpoint)."""
    rt, tc = st.rt, st.cfg.train
    stage = tc.stage
    display = TrainDisplay(stage, tc.max_steps, st.start_step, enabled=rt.main and progress)
    stop_at = tc.max_steps if tc.stop_after is None else min(tc.max_steps, st.start_step + tc.stop_after)
    step = st.start_step
    saved_at = st.start_step if st.resumed else -1
    bad_run: list[dict[str, Any]] = []  # the current run of consecutive non-applied steps
    st.model.train()
    with display:
        while step < stop_at:
            t_step = time.perf_counter()
            t_data = t_teacher = 0.0
            sums: dict[str, float] = {}
            n_samples = 0
            ids: list[str] = []
            for micro in range(tc.grad_accum):
                t0 = time.perf_counter()
                batch = _next_batch(st, step + 1)
                ids += list(batch["ids"])
                t_data += time.perf_counter() - t0
                if st.online is not None:  # live teachers: timed apart, so data_wait still means the loader
                    t0 = time.perf_counter()
                    batch["targets"], batch["target_mask"] = st.online(batch["image_paths"], batch["has_image"])
                    t_teacher += time.perf_counter() - t0
                batch = to_device(batch, rt.device)
                n_samples += batch["input_ids"].shape[0]
                last = micro == tc.grad_accum - 1
                sync = contextlib.nullcontext() if (last or not rt.distributed) else st.ddp.no_sync()
                with sync, torch.autocast(rt.device.type, dtype=st.amp or torch.float32, enabled=st.amp is not None):
                    out = st.ddp(batch)
                    loss = out["loss"] / tc.grad_accum
                loss.backward()
                for k, v in out.items():
                    if k.startswith("loss"):
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / tc.grad_accum
            grad_norm = (torch.nn.utils.clip_grad_norm_(st.params, tc.max_grad_norm)
                         if tc.max_grad_norm > 0 else None)
            applied = guards.finite_step(st, sums, grad_norm)
            if applied:
                st.opt.step()
                st.sched.step()
                bad_run.clear()
            else:  # not applied, but the schedule and the data position advance: resume maps step -> batch
                with warnings.catch_warnings():  # torch warns when the very first step is skipped: intended
                    warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before",
                                            category=UserWarning)
                    st.sched.step()
            st.opt.zero_grad(set_to_none=True)
            step += 1
            if not applied:
                guards.bad_step(st, step, sums, grad_norm, ids, bad_run)
            dt = time.perf_counter() - t_step
            if step % tc.log_every == 0 or step == stop_at:
                row = rt.all_reduce_mean(sums)
                row.update(step=step, stage=stage, lr=st.sched.get_last_lr()[0],
                           grad_norm=float(grad_norm) if grad_norm is not None else None,
                           samples_per_s=n_samples * rt.world / dt, step_time=dt, data_wait=t_data / dt)
                if not applied:
                    row["skipped_step"] = True
                if st.online is not None:
                    row["teacher_time"] = t_teacher / dt
                if st.metrics is not None:
                    st.metrics.write(row)
                display.update(step, row)
            if (rt.main or st.sharded) and tc.save_every > 0 and step % tc.save_every == 0 and step < tc.max_steps:
                _save_periodic(st, step)
                saved_at = step
            rt.barrier()
    return step, saved_at


def _next_batch(st: Stage, step: int) -> dict[str, Any]:
    """The next micro-batch; its skip records go to skipped.jsonl (tagged with the step that consumes it)."""
    from olatrain.data import DataError

    try:
        batch = next(st.batches)
    except DataError as e:  # bad data the policy cannot skip (or a worker's error): one line, not a traceback
        raise RunError(f"[{st.cfg.train.stage}] step {step}: {e}") from None
    records = batch.pop("skipped", None)
    if records:
        guards.record_skips(st, step, records)
    return batch


def _save_periodic(st: Stage, step: int) -> None:
    if st.sharded:  # collective: every rank writes its shards
        from olatrain import dcp

        dcp.save_periodic(st.dir, model=st.model, optimizer=st.opt, scheduler=st.sched, step=step,
                          stage=st.cfg.train.stage, config=st.cfg.to_dict())
        return
    ckpt.save_periodic(st.dir, weights=st.model.trainable_state_dict(), optimizer=st.opt, scheduler=st.sched,
                       step=step, stage=st.cfg.train.stage, config=st.cfg.to_dict())


def finish_stage(st: Stage, step: int, saved_at: int, log: Callable[[str], None]) -> Path:
    """Write final/ (marked DONE) when the stage reached max_steps, else a resumable checkpoint."""
    stage = st.cfg.train.stage
    final = st.dir / "final"
    if st.metrics is not None:
        st.metrics.close()
    st.rt.barrier()  # every rank's skip records are written
    weights: dict[str, torch.Tensor] = {}
    if st.sharded:  # collective parts first: final/ gathers the full tensors; a stop saves shards
        from olatrain import dcp

        if step >= st.cfg.train.max_steps:
            weights = dcp.consolidated_weights(st.model, stage)
        elif saved_at != step:
            _save_periodic(st, step)
            saved_at = step
    if st.rt.main:
        summary = guards.write_summary(st, step, log)
        if step >= st.cfg.train.max_steps:
            if not st.sharded:
                weights = st.model.trainable_state_dict()
            ckpt.save_checkpoint(final, weights=weights, optimizer=None, scheduler=None,
                                 step=step, stage=stage, config=st.cfg.to_dict(), extra={"data": summary})
            ckpt.mark_done(final)
            log(f"[{stage}] done: {final}")
        else:  # stopped early on purpose (train.stop_after): leave a resumable checkpoint
            if saved_at != step:  # (re-saving the step just saved would only replace it with an equal copy)
                _save_periodic(st, step)
            log(f"[{stage}] stopped at step {step}/{st.cfg.train.max_steps}; continue with --resume")
    st.rt.barrier()
    return final


def train_stage(cfg: Config, stage_dir: Path, *, init_from: Path | None, resume: bool,
                log: Callable[[str], None] = print, progress: bool = True) -> Path:
    st = prepare_stage(cfg, stage_dir, init_from=init_from, resume=resume, log=log)
    step, saved_at = train_loop(st, progress=progress)
    return finish_stage(st, step, saved_at, log)


# ----------------------------------------------------------------------------------------------- whole run
def inherit_teacher_kinds(cfg: Config, init_from: Path) -> None:
    """Take the teacher kinds the previous stage trained with (its PT store's record) from its checkpoint,
    so the task-token parameters of every stage have the shapes PT gave them."""
    try:
        prev = config_from_dict(ckpt.load_state(init_from)["config"])
    except (OSError, KeyError, ValueError):
        return  # not an olatrain checkpoint with a config: the stage's own config decides
    cfg.model.teacher_kinds.update(prev.model.teacher_kinds)


def run(spec: RunSpec, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Run every stage in order; each initialises from the previous stage's final checkpoint."""
    out = spec.output_dir
    for name in spec.stages:
        guards.check_output_dir(spec.configs[name])
    out.mkdir(parents=True, exist_ok=True)
    prev: Path | None = None
    final = out
    for name in spec.stages:
        cfg = spec.configs[name]
        stage_dir = out / name
        final = stage_dir / "final"
        if ckpt.is_done(final):
            if not resume:
                raise RunRefused(f"{stage_dir} is already complete: pass --resume to continue the run "
                                 "(finished stages are skipped), or choose another output_dir")
            log(f"[{name}] already complete, skipping")
            prev = final
            continue
        init = Path(cfg.train.init_from) if cfg.train.init_from else prev
        if init is not None:
            inherit_teacher_kinds(cfg, init)
        train_stage(cfg, stage_dir, init_from=init, resume=resume, log=log, progress=progress)
        if not ckpt.is_done(final):
            break  # stopped early (train.stop_after); --resume continues here
        prev = final
    if spec.configs[spec.stages[0]].train.summary and _is_rank0():
        from olatrain.report import finish_run_report

        finish_run_report(out, log)  # <run>/summary.json + <run>/<stage>/losses.png
    return final


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
