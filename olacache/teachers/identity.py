"""Where a teacher's weights come from and what identifies them: sources, preset markers, weight hashes.

A store records a teacher's identity (source, sha256 of the weight files ``from_pretrained`` loads, and
``random_init`` for tiny presets) and refuses to mix targets of different weights in one column.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from olacache.common.cachedir import PRESET_MARKER, read_marker

__all__ = [
    "PRESET_FILE",
    "hub_revision",
    "is_local_source",
    "load_json_config",
    "read_preset_marker",
    "weights_sha256",
    "write_preset_marker",
]

PRESET_FILE = PRESET_MARKER
"""Marker written next to a tiny preset's weights; ``random_init`` in a teacher's identity comes from it."""


def is_local_source(source: str | os.PathLike) -> bool:
    """True if ``source`` names a local path (existing or not) rather than a Hub id like ``org/name``.

    A missing local directory must fail with a clear "no such directory" message instead of a confusing Hub
    lookup, so anything that looks like a path (absolute, ``./``, ``~``, several components, an existing path)
    counts as local.
    """
    s = os.fspath(source)
    if os.path.exists(s):
        return True
    if s.startswith((os.sep, ".", "~")) or "\\" in s or s.endswith("/"):
        return True
    return s.count("/") != 1


def write_preset_marker(out_dir: Path, seed: int) -> None:
    """Write ``olakit_preset.json`` (last, by convention: its presence means the preset is complete)."""
    (Path(out_dir) / PRESET_FILE).write_text(
        json.dumps({"preset": "tiny", "random_init": True, "seed": int(seed)}, indent=2) + "\n"
    )



def read_preset_marker(model_dir: Path) -> dict[str, Any] | None:
    return read_marker(model_dir)


# What from_pretrained would load, in its order of preference. Hashing only these (not every *.bin/*.pth in the
# directory) keeps the hash cheap and meaningful: a Hub snapshot of OneFormer also holds the original detectron2
# .pth, and an unCLIP snapshot holds a UNet, neither of which the teacher uses.
_WEIGHT_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_HASH_CACHE: dict[tuple[Any, ...], str] = {}
_HASH_LOCK = threading.Lock()


def _files_to_hash(model_dir: Path) -> list[Path]:
    for name in _WEIGHT_CANDIDATES:
        path = model_dir / name
        if not path.is_file():
            continue
        files = [path]
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            files += [model_dir / s for s in shards]
        break
    else:
        # Not an HF-transformers layout (e.g. timm's local-dir, or a single .pth): hash every weight file.
        files = sorted(
            p
            for p in model_dir.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pth", ".pt")
        )
    if not files:
        raise FileNotFoundError(f"no weight files found in {model_dir}")
    # The architecture config is part of what the weights mean (layer count, out_indices, ...): hash it too.
    if (model_dir / "config.json").is_file():
        files.append(model_dir / "config.json")
    return files


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over the weight files (and config.json) that ``from_pretrained`` loads from ``model_dir``.

    Each file contributes its relative name and size before its bytes, so renames/splits change the hash.
    Results are memoised per process on (path, size, mtime) so loading the same teacher twice hashes once.
    """
    model_dir = Path(model_dir)
    files = _files_to_hash(model_dir)
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(model_dir).as_posix()):
        rel = path.relative_to(model_dir).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                digest.update(chunk)
    result = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = result
    return result


def hub_revision(repo_id: str, subfolder: str | None = None) -> str:
    """The commit hash of the locally cached Hub snapshot ``repo_id`` was loaded from."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    resolved = cached_file(repo_id, "config.json", subfolder=subfolder or "")
    commit = extract_commit_hash(resolved, None)
    if not commit:
        raise RuntimeError(f"could not determine the Hub revision of {repo_id!r} (resolved {resolved})")
    return commit


def load_json_config(source: str, filename: str, subfolder: str | None = None) -> dict[str, Any] | None:
    """Read a JSON config file from a local dir or the Hub cache; None when the file does not exist."""
    if is_local_source(source):
        path = Path(source).expanduser() / (subfolder or "") / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from transformers.utils.hub import cached_file

    resolved = cached_file(
        source, filename, subfolder=subfolder or "", _raise_exceptions_for_missing_entries=False
    )
    return json.loads(Path(resolved).read_text()) if resolved else None
