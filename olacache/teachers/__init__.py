"""Teacher registry: the one place teachers are named.

Adding a teacher = one small module defining a :class:`Teacher` subclass + one line in :data:`TEACHERS`
(or ``register_teacher`` from a plugin/test). The registry key is the store column name.

Presets:
    ``tiny`` — the real architecture with a small config and random weights, built once (seed 0) into
              ``$OLAKIT_CACHE/tiny/<name>-v<tiny_version>`` (default cache ``~/.cache/olakit``); no network.
    ``ola``  — the real checkpoint the OLA-VLM reference distils from (``Teacher.default_source``, a Hub id).
An explicit ``source`` (local directory or Hub id) always wins over the preset.

This package never imports diffusers (the unCLIP image encoder is loaded with transformers alone).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import PRESET_FILE, Teacher
from .depth import DepthTeacher
from .gen import GenTeacher
from .seg import SegTeacher

__all__ = [
    "PRESETS",
    "TEACHERS",
    "Teacher",
    "cache_root",
    "load_teacher",
    "register_teacher",
    "resolve_source",
    "tiny_source",
]

TEACHERS: dict[str, type[Teacher]] = {"depth": DepthTeacher, "seg": SegTeacher, "gen": GenTeacher}

PRESETS: tuple[str, ...] = ("tiny", "ola")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # usable as a Zarr/HDF5 column name and a CLI token

# save_tiny seeds torch's *global* RNG (inside fork_rng); two threads building at once would interleave draws and
# publish non-deterministic weights. Processes have their own RNG and are handled by the atomic rename.
# Re-entrant so a save_tiny that itself needs another preset cannot deadlock.
_TINY_LOCK = threading.RLock()


def register_teacher(cls: type[Teacher]) -> type[Teacher]:
    """Register ``cls`` under ``cls.name``; returns ``cls`` so it also works as a class decorator.

    Re-registering the same class is a no-op; claiming a name held by another class is an error (a silent
    replacement would change what an existing store column means).
    """
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise TypeError(f"register_teacher expects a Teacher subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{cls.__name__}.name must match {_NAME_RE.pattern}, got {name!r}")
    if not isinstance(getattr(cls, "default_source", None), str):
        raise ValueError(f"{cls.__name__}.default_source must be a str (the real checkpoint's Hub id)")
    existing = TEACHERS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"teacher name {name!r} is already registered by {existing.__module__}.{existing.__name__}"
        )
    TEACHERS[name] = cls
    return cls


def _teacher_class(name: str) -> type[Teacher]:
    try:
        return TEACHERS[name]
    except KeyError:
        raise ValueError(f"unknown teacher {name!r}; valid: {sorted(TEACHERS)}") from None


def cache_root() -> Path:
    """``$OLAKIT_CACHE`` if set, else ``~/.cache/olakit``."""
    env = os.environ.get("OLAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "olakit"


def tiny_source(name: str) -> Path:
    """Directory of ``name``'s tiny preset, building it on first use.

    The preset is written into a private temp dir next to the target and published with one ``os.replace``,
    so readers never see a half-written directory; if two processes race, the loser's rename fails (the target
    is non-empty), it discards its copy and uses the winner's (same seed -> same bytes).
    """
    cls = _teacher_class(name)
    final = cache_root() / "tiny" / f"{name}-v{cls.tiny_version}"
    if (final / PRESET_FILE).is_file():
        return final
    with _TINY_LOCK:
        return _build_tiny(cls, final)


def _build_tiny(cls: type[Teacher], final: Path) -> Path:
    if (final / PRESET_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        cls.save_tiny(tmp, seed=0)
        if not (tmp / PRESET_FILE).is_file():
            raise RuntimeError(f"{cls.__name__}.save_tiny did not write {PRESET_FILE}")
        # mkdtemp makes the dir 0700 and transformers 5 writes model.safetensors 0600; the cache may be shared.
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / PRESET_FILE).is_file():
                raise RuntimeError(
                    f"cannot publish tiny preset to {final}: it exists but is incomplete; delete it and retry"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return final


def resolve_source(name: str, preset: str = "tiny", source: str | None = None) -> str:
    """Where to load teacher ``name`` from: explicit ``source`` > preset (``tiny`` dir / ``ola`` Hub id)."""
    cls = _teacher_class(name)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {list(PRESETS)}")
    if source is not None:
        return os.fspath(source)
    if preset == "tiny":
        return str(tiny_source(name))
    return cls.default_source


def load_teacher(
    name: str,
    preset: str = "tiny",
    source: str | None = None,
    *,
    device: str | torch.device = "cpu",
    options: Mapping[str, Any] | None = None,
) -> Teacher:
    """Build teacher ``name`` (frozen, eval mode) on ``device`` from the resolved source."""
    cls = _teacher_class(name)
    return cls(resolve_source(name, preset, source), device=device, options=options)
