"""Small file helpers both packages use: atomic (optionally durable) writes, and byte counts for people."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it survives a power cut (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], *, durable: bool = False) -> None:
    """``write(tmp)`` into a hidden sibling, then rename it over ``path``: a reader (or a resumed run) sees the
    old file or the new one, never half of one. ``durable`` also fsyncs the file and its directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    if durable:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, durable: bool = False) -> None:
    atomic_write(path, lambda p: p.write_text(text), durable=durable)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (binary multiples, as the store's sizes are reported)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def parse_size(text: str | float | int) -> int:
    """``"20GB"``, ``"512MiB"``, ``"1.5 TB"``, ``10**9`` -> bytes (decimal and binary suffixes)."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6,
             "K": 10**3, "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    num, mult = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 20GB, 512MiB, 1.5TB)") from None
    if value <= 0:
        raise ValueError(f"size must be > 0, got {text!r}")
    return int(value * mult)
