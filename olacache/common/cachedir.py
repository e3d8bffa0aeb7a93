"""The one cache directory for generated presets, and the one way to publish into it.

Every tiny preset (teachers, tokenizer, vision encoder, LLM) is a directory built once and then only read.
``publish_once`` builds it in a private temporary sibling and publishes it with one ``os.replace``, so readers
never see a half-written directory; a complete directory always holds ``PRESET_MARKER``. Policy for what is
already there: a directory WITH the marker is used as is; one WITHOUT it (a crash mid-publish by an older
version, a copy interrupted by hand) is incomplete and replaced. Two processes racing build the same bytes
(fixed seeds): the loser's rename fails and it uses the winner's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRESET_MARKER = "olakit_preset.json"
"""Written last into every preset directory; its presence means the directory is complete."""

# Builders seed torch's *global* RNG (inside fork_rng); two threads building at once would interleave draws and
# publish non-deterministic weights. Re-entrant so a builder that itself needs another preset cannot deadlock.
_LOCK = threading.RLock()


def cache_root() -> Path:
    """``$OLAKIT_CACHE`` if set, else ``~/.cache/olakit``."""
    env = os.environ.get("OLAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "olakit"


def read_marker(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / PRESET_MARKER
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _user_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode the user's umask asks for: mkdtemp makes 0700
    and some writers (transformers' safetensors) 0600, but a cache may be shared by a team."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def publish_once(final: Path, build: Callable[[Path], None], *, marker: dict[str, Any] | None = None) -> Path:
    """Return ``final``, building it first with ``build(tmp_dir)`` if it is not complete.

    ``marker``: the marker's content, written after ``build`` returns; None means ``build`` writes the marker
    itself (teachers do, with their seed), and a build that does not is an error."""
    final = Path(final)
    if (final / PRESET_MARKER).is_file():
        return final
    with _LOCK:
        if (final / PRESET_MARKER).is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            if marker is not None:
                (tmp / PRESET_MARKER).write_text(json.dumps(marker) + "\n")
            elif not (tmp / PRESET_MARKER).is_file():
                raise RuntimeError(f"building {final.name} did not write {PRESET_MARKER}")
            _user_modes(tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / PRESET_MARKER).is_file():  # an incomplete directory is in the way: replace it
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return final
