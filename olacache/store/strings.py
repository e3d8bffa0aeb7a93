"""Text in core Zarr v3 data types, so every Zarr client (tensorstore, zarrs, any language) can read it.

Zarr v3's core data types hold no variable-length strings (zarr-python's ``string`` is an extension other
clients refuse), so a format-2 store keeps its two kinds of text as plain integers:

- image paths (written once, at creation): ``index/path_utf8`` uint8 (total bytes,) = every path's UTF-8
  bytes back to back, and ``index/path_offsets`` int64 (N + 1,); path ``i`` is
  ``path_utf8[path_offsets[i] : path_offsets[i + 1]].decode("utf-8")``.
- error texts (written per shard, by whichever rank owns it): ``<teacher>/error_utf8`` uint8 (N, ERROR_BYTES),
  one row per image = the reason's UTF-8 bytes zero-padded to ERROR_BYTES (``b""`` = no error). Fixed width so
  a shard's rows are one chunk its writer owns; longer reasons are cut at a character boundary and end "...".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ERROR_BYTES = 256
_ELLIPSIS = b"..."


def encode_concat(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 bytes, int64 offsets of length len(texts) + 1)."""
    blobs = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    return data, offsets


def decode_concat(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    off = np.asarray(offsets, dtype=np.int64).tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:], strict=True)]


def _fit(text: str, width: int) -> bytes:
    b = text.encode("utf-8")
    if len(b) <= width:
        return b
    cut = b[: width - len(_ELLIPSIS)]
    # drop a partial multi-byte character at the cut (continuation bytes are 0b10xxxxxx)
    return cut.decode("utf-8", errors="ignore").encode("utf-8") + _ELLIPSIS


def encode_fixed(texts: Sequence[str], width: int = ERROR_BYTES) -> np.ndarray:
    """-> uint8 (len(texts), width), zero-padded UTF-8."""
    out = np.zeros((len(texts), width), dtype=np.uint8)
    for i, t in enumerate(texts):
        b = _fit(str(t), width)
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_fixed(rows: np.ndarray) -> np.ndarray:
    """uint8 (n, width) -> object array of str (trailing zero bytes stripped)."""
    rows = np.asarray(rows, dtype=np.uint8)
    return np.array([r.tobytes().rstrip(b"\0").decode("utf-8", errors="replace") for r in rows], dtype=object)
