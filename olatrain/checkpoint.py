"""Checkpoints: trainable weights (safetensors) + optimizer, scheduler, RNG and data position.

Layout of a stage directory::

    <output_dir>/<stage>/
        config.json            the resolved Config of the stage
        metrics.jsonl          one JSON object per logged step
        checkpoints/step_000050/{model.safetensors, optimizer.pt, state.json}
        checkpoints/LATEST     name of the newest complete checkpoint
        final/                 the last checkpoint of the stage, plus DONE (the next stage starts from it)

Atomicity: a checkpoint is written into a temporary sibling directory and renamed into place, and LATEST
is replaced with os.replace only after that. A kill at any moment leaves the previous checkpoint (and
LATEST pointing to it) loadable; stray temporary directories are ignored and cleaned up next time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
OPTIM = "optimizer.pt"
STATE = "state.json"
RNG = "rng.pt"
LATEST = "LATEST"
DONE = "DONE"


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    directory: Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    stage: str,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint at `directory` atomically (temp dir + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared/non-contiguous storage: save independent contiguous copies
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / OPTIM)
    torch.save(rng_state(), tmp / RNG)
    (tmp / STATE).write_text(json.dumps({"step": step, "stage": stage, "config": config, **(extra or {})},
                                        indent=1, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():  # re-saving the same step (e.g. final after the last periodic save)
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    return directory


def save_periodic(stage_dir: Path, keep: int = 2, **kw: Any) -> Path:
    """Save checkpoints/step_N, point LATEST at it, keep the newest `keep`."""
    ckdir = Path(stage_dir) / "checkpoints"
    path = save_checkpoint(ckdir / f"step_{kw['step']:06d}", **kw)
    _atomic_write_text(ckdir / LATEST, path.name)
    done = sorted(p for p in ckdir.glob("step_*") if p.is_dir())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for pattern in (".step_*.tmp-*", ".step_*.old-*", f".{LATEST}.tmp-*"):  # leftovers of a killed save
        for p in ckdir.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return path


def _complete(path: Path) -> bool:
    return (path / STATE).is_file() and (path / WEIGHTS).is_file() and (path / OPTIM).is_file()


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint LATEST names; if LATEST is absent or dangling (a kill between renaming a checkpoint into
    place and updating LATEST, or inside the swap of a re-saved step), the newest complete ``step_*``.
    Directories only appear under their final name once complete, so any ``step_*`` with its files is whole;
    temporary ``.step_*`` siblings are never considered."""
    ckdir = Path(stage_dir) / "checkpoints"
    ptr = ckdir / LATEST
    name = ptr.read_text().strip() if ptr.is_file() else ""
    if name and _complete(ckdir / name):
        return ckdir / name
    done = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    f = Path(directory) / WEIGHTS
    if not f.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {directory}: not an olatrain checkpoint")
    return load_file(str(f), device=str(device))


def load_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE).read_text())


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    blob = torch.load(Path(directory) / OPTIM, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob.get("scheduler") is not None:
        scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(torch.load(Path(directory) / RNG, weights_only=False))


def mark_done(directory: Path) -> None:
    _atomic_write_text(Path(directory) / DONE, "ok\n")


def is_done(directory: Path) -> bool:
    return (Path(directory) / DONE).is_file()
