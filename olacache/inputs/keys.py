"""The join key between a dataset and a store: an image's normalised relative path (docs/method.md §8).

Both sides must compute it identically: ``olacache build`` names store rows with it, and ``olatrain`` looks a
sample's targets up with it. It therefore lives below the store, beside the other input definitions.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence


def normalize_image_path(path: str) -> str:
    """Normalise a relative image path into the store's join key.

    NFC unicode (macOS file names come back NFD), ``\\`` -> ``/``, surrounding whitespace stripped, ``.``
    segments and repeated ``/`` dropped, ``..`` resolved; absolute paths, drive letters, empty paths, NUL and
    ``..`` escaping the root are rejected with ValueError naming the path.
    """
    if not isinstance(path, str):
        raise ValueError(f"image path must be a str, got {type(path).__name__}: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON can carry a lone surrogate ("\\ud800"); no file system can name it, and os.stat would raise
        raise ValueError(f"image path is not valid Unicode ({e.reason} at character {e.start}): {path!r}") from None
    p = unicodedata.normalize("NFC", path).strip().replace("\\", "/")
    if not p:
        raise ValueError(f"empty image path: {path!r}")
    if "\x00" in p:
        raise ValueError(f"image path contains NUL: {path!r}")
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p) or "://" in p:
        raise ValueError(f"image path must be relative to the image root, got absolute path/URL: {path!r}")
    parts: list[str] = []
    for seg in p.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                raise ValueError(f"image path escapes the image root with '..': {path!r}")
            parts.pop()
            continue
        parts.append(seg)
    if not parts:
        raise ValueError(f"image path names no file: {path!r}")
    return "/".join(parts)


def image_set_fingerprint(paths: Sequence[str]) -> str:
    """sha256 hex of the ordered, normalised paths (NUL-separated: NUL cannot occur in a path)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(normalize_image_path(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()
