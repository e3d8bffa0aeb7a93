"""Checkpoints of FSDP runs: sharded, written with torch.distributed.checkpoint (DCP), atomically.

Layout of ``checkpoints/step_N`` (a DCP directory plus two small files written by rank 0):

    .metadata, __R_0.distcp ...   the sharded model (the stage's checkpoint keys) and AdamW state, by FQN
    train_state.pt                scheduler state and rank 0's RNG state (what a resumed run restores)
    state.json                    step, stage, config, "format": "dcp" (same fields as olatrain.checkpoint)

Atomic: every rank writes into ``.step_N.tmp`` and only when all have finished does rank 0 add its files and
rename the directory into place, then move ``LATEST``; a kill at any point leaves the previous checkpoint whole
(a half-written ``.step_N.tmp`` is never considered and is removed by the next save). DCP stores each tensor's
global shape and its shards' offsets, so a checkpoint saved with N ranks loads with M (DCP reshards on load).

``final/`` is consolidated (the full tensors gathered to rank 0) and written by olatrain.checkpoint in the DDP
format (``model.safetensors``), so the next stage, ``olatrain generate`` and ``olatrain export`` read it the same
way whether a stage ran with DDP or FSDP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from olacache.common.files import fsync_dir
from olatrain import checkpoint as ckpt

TRAIN_STATE = "train_state.pt"
METADATA = ".metadata"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_state(model: Any, keys: set[str], *, full: bool = False, stage: str = "ift") -> dict[str, Any]:
    opts = StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=stage == "pt")
    sd = get_model_state_dict(model, options=opts)
    return {k: v for k, v in sd.items() if k in keys}


def save_sharded(directory: Path, *, model: Any, optimizer: Any, scheduler: Any, step: int, stage: str,
                 config: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Writes ``directory`` atomically (see the module docstring)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if _rank0():
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    _barrier()
    state = {"model": _model_state(model, set(model.checkpoint_keys()), stage=stage),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    if _rank0():
        torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": ckpt.rng_state()}, tmp / TRAIN_STATE)
        (tmp / ckpt.STATE).write_text(json.dumps({"step": step, "stage": stage, "config": config, "format": "dcp"},
                                                 indent=1, default=str))
        fsync_dir(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
        fsync_dir(directory.parent)
    _barrier()
    return directory


def save_periodic(stage_dir: Path, keep: int = 2, **kw: Any) -> Path:
    """checkpoints/step_N (sharded), then LATEST, then prune to the newest ``keep`` (rank 0 touches files)."""
    ckdir = Path(stage_dir) / "checkpoints"
    path = save_sharded(ckdir / f"step_{kw['step']:06d}", **kw)
    if _rank0():
        ckpt._atomic_write_text(ckdir / ckpt.LATEST, path.name)
        done = sorted(p for p in ckdir.glob("step_*") if p.is_dir())
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in [*ckdir.glob(".step_*.tmp"), *ckdir.glob(".step_*.old")]:  # leftovers of a killed save
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return path


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (METADATA, TRAIN_STATE, ckpt.STATE))


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """LATEST if it names a complete sharded checkpoint, else the newest complete ``step_*`` (a kill between the
    rename and the pointer update); ``.step_*.tmp`` directories are never candidates."""
    ckdir = Path(stage_dir) / "checkpoints"
    ptr = ckdir / ckpt.LATEST
    name = ptr.read_text().strip() if ptr.is_file() else ""
    if name and is_complete(ckdir / name):
        return ckdir / name
    done = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def load_sharded(directory: Path, *, model: Any, optimizer: Any, scheduler: Any) -> None:
    """Collective: restore model shards, AdamW state, scheduler and RNG (resharding to this run's world size)."""
    directory = Path(directory)
    stage = ckpt.load_state(directory)["stage"]
    state = {"model": _model_state(model, set(model.checkpoint_keys()), stage=stage),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    blob = ckpt.safe_torch_load(directory / TRAIN_STATE)  # weights_only=True, one-line refusal
    if scheduler is not None and blob.get("scheduler") is not None:
        scheduler.load_state_dict(blob["scheduler"])
    ckpt.set_rng_state(blob["rng"])


def consolidated_weights(model: Any, stage: str) -> dict[str, torch.Tensor]:
    """Collective: the stage's checkpoint tensors gathered whole on rank 0 (CPU); ``{}`` on other ranks."""
    from olatrain.parallel import restore_scalar_shapes

    sd = _model_state(model, set(model.checkpoint_keys()), full=True, stage=stage)
    return restore_scalar_shapes(model, {k: v.detach().contiguous() for k, v in sd.items()}) if _rank0() else {}
