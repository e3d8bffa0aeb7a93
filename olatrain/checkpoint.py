"""Checkpoints: trainable weights (safetensors) + optimizer, scheduler, RNG and data position.

Layout of a stage directory::

    <output_dir>/<stage>/
        config.json            the resolved Config of the stage
        metrics.jsonl          one JSON object per logged step
        checkpoints/step_000050/{model.safetensors, optimizer.pt, rng.pt, state.json, manifest.json}
        checkpoints/LATEST     name of the newest complete checkpoint
        final/                 the last checkpoint of the stage, plus DONE (the next stage starts from it)

Atomicity: a checkpoint is written into a temporary sibling directory and renamed into place, and LATEST
is replaced with os.replace only after that. A kill at any moment leaves the previous checkpoint (and
LATEST pointing to it) loadable; stray temporary directories are ignored and cleaned up next time.

Integrity: ``manifest.json`` (written last) holds the size and sha256 of every other file. ``verify`` checks it,
so a checkpoint damaged later (a truncated or zero-byte file, a garbage ``state.json``, a deleted RNG file,
flipped bytes in the tensors) is recognised and ``find_resumable`` falls back to the newest intact one.
Checkpoints written before manifests existed are accepted when their files are present and ``state.json``
parses. Hashing reads the files back once per save (page cache) and once per resume.

Safety: nothing is unpickled beyond tensors and plain containers: the weights are safetensors, and
``optimizer.pt``/``rng.pt`` hold only tensors, dicts, lists, tuples, numbers and strings (the numpy RNG state is
stored as a tensor) and are read with ``torch.load(weights_only=True)``; a file holding anything else is
refused with a ``CheckpointError`` and none of its code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from olacache.common.files import atomic_write_text, fsync_dir

WEIGHTS = "model.safetensors"
OPTIM = "optimizer.pt"
STATE = "state.json"
RNG = "rng.pt"
MANIFEST = "manifest.json"
LATEST = "LATEST"
DONE = "DONE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or holding more than tensors); one line."""


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain values (loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))  # (version, 625 ints, gauss_next)
    n = st["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # an older checkpoint (numpy's own tuple)
        np.random.set_state(n)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name not in (MANIFEST, DONE)}
    (directory / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    """Pointers and markers (LATEST, DONE): durable, since resume trusts them."""
    atomic_write_text(path, text, durable=True)


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
    # safetensors writes through a private temp file (mode 0600); give every file the mode open() gave
    # state.json, i.e. the user's umask, so checkpoints are as shareable as anything else the user writes
    mode = stat.S_IMODE((tmp / STATE).stat().st_mode)
    for f in tmp.iterdir():
        os.chmod(f, mode)
    _write_manifest(tmp)  # last: it covers every file above, as read back from disk
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
    fsync_dir(directory.parent)
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


def verify(directory: Path, *, training: bool = True) -> str | None:
    """None when the checkpoint at ``directory`` is intact, else why not (one line).

    With a manifest, every file it lists must be there with its size and sha256, and ``state.json`` must
    parse; ``training`` also requires the optimizer and RNG files (a resumable checkpoint; ``final/`` has no
    optimizer). Without one (written before manifests) the required files must exist and ``state.json`` parse."""
    d = Path(directory)
    if not d.is_dir():
        return "no such directory"
    need = [WEIGHTS, STATE] + ([OPTIM, RNG] if training else [])
    man = d / MANIFEST
    if man.is_file():
        try:
            files = json.loads(man.read_text())["files"]
            listed = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return f"{MANIFEST} is unreadable"
        for name in need:
            if name not in listed:
                return f"{name} is not in its {MANIFEST}"
        for name, (size, digest) in listed.items():
            f = d / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
            if _sha256(f) != digest:
                return f"{name} does not match its sha256 in {MANIFEST} (changed or corrupted on disk)"
    else:
        for name in need:
            if not (d / name).is_file():
                return f"{name} is missing"
    try:
        state = load_state(d)
        int(state["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        return str(e)
    return None


def find_resumable(stage_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a stage (LATEST's first, then ``step_*`` newest first), plus the
    damaged ones passed over on the way, each with the reason."""
    ckdir = Path(stage_dir) / "checkpoints"
    ptr = ckdir / LATEST
    try:
        name = ptr.read_text().strip() if ptr.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    order = sorted((p for p in ckdir.glob("step_*") if p.is_dir()), reverse=True)
    if name and (ckdir / name) in order:
        order.remove(ckdir / name)
        order.insert(0, ckdir / name)
    damaged: list[tuple[Path, str]] = []
    for p in order:
        why = verify(p)
        if why is None:
            return p, damaged
        damaged.append((p, why))
    return None, damaged


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    f = Path(directory) / WEIGHTS
    if not f.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {directory}: not an olatrain checkpoint")
    try:
        return load_file(str(f), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError on a truncated/garbled header
        raise CheckpointError(f"{f}: unreadable safetensors file ({_one_line(e)})") from None


def load_state(directory: Path) -> dict[str, Any]:
    f = Path(directory) / STATE
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({_one_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: not a checkpoint state (a JSON object was expected)")
    return state


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` of a checkpoint file that may hold tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines (it explains weights_only); one line is enough here
        first = _one_line(e).split(". ")[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain containers ({first}); "
            f"olatrain never writes such files, so it was damaged or planted"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)})") from None


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    blob = safe_torch_load(Path(directory) / OPTIM)
    rng = safe_torch_load(Path(directory) / RNG)
    try:
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{directory}: optimizer/RNG state does not fit this run ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def mark_done(directory: Path) -> None:
    _atomic_write_text(Path(directory) / DONE, "ok\n")


def is_done(directory: Path) -> bool:
    return (Path(directory) / DONE).is_file()
