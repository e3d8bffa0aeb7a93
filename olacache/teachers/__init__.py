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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from olacache.common.cachedir import cache_root, publish_once

from .base import Teacher
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


def tiny_source(name: str) -> Path:
    """Directory of ``name``'s tiny preset, building it on first use (published atomically; see
    ``olacache.common.cachedir``)."""
    cls = _teacher_class(name)
    final = cache_root() / "tiny" / f"{name}-v{cls.tiny_version}"
    return publish_once(final, lambda tmp: cls.save_tiny(tmp, seed=0))


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
