"""The pictures of the research loop: loss curves and probe curves (matplotlib, headless Agg backend).

Every figure has a title, axis labels and a legend, and is written as PNG to a path or file object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAIN_TERMS = ("loss", "loss_ce")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display, same output everywhere
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Any) -> None:
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    pyplot().close(fig)


def loss_terms(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The loss terms a metrics.jsonl logs: total, CE, then one per teacher (the weighted term; its sl1/nce parts
    are left out of the pictures to keep them readable)."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("loss") and k not in keys and (k in MAIN_TERMS or k.count("_") == 1):
                keys.append(k)
    return [k for k in MAIN_TERMS if k in keys] + sorted(k for k in keys if k not in MAIN_TERMS)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def loss_figure(curves: Sequence[tuple[str, Sequence[dict[str, Any]]]], out: Any, *, title: str) -> None:
    """One panel per loss term, one line per curve (label, metrics rows); x = step."""
    plt = pyplot()
    terms: list[str] = []
    for _, rows in curves:
        terms += [t for t in loss_terms(rows) if t not in terms]
    terms = terms or ["loss"]
    nr, nc = _grid(len(terms))
    fig, axes = plt.subplots(nr, nc, figsize=(4.6 * nc, 3.4 * nr), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for i, (label, rows) in enumerate(curves):  # colour by curve: the same run has one colour everywhere
            pts = [(r["step"], r[term]) for r in rows if r.get(term) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label, color=f"C{i % 10}")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, out)


def _probe_rows(result: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    by: dict[str, list[tuple[int, float]]] = {}
    for r in result.get("results", []):
        by.setdefault(r["teacher"], []).append((int(r["layer"]), float(r["cos"])))
    return {t: sorted(v) for t, v in sorted(by.items())}


def probe_figure(entries: Sequence[tuple[str, dict[str, Any]]], out: Any, *, title: str) -> None:
    """Probe cosine vs layer. One model: one axis, one line per teacher. Several: one panel per teacher (as in
    the paper's figure), one line per model."""
    plt = pyplot()
    if len(entries) == 1:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for t, pts in _probe_rows(entries[0][1]).items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=t)
        _probe_axes(ax, "held-out cosine (probe output vs target)")
        fig.suptitle(title)
        save_figure(fig, out)
        return
    teachers: list[str] = []
    for _, res in entries:
        teachers += [t for t in _probe_rows(res) if t not in teachers]
    teachers = teachers or ["-"]
    fig, axes = plt.subplots(1, len(teachers), figsize=(4.8 * len(teachers), 3.8), squeeze=False)
    for ax, t in zip(axes.flat, teachers, strict=True):
        for i, (label, res) in enumerate(entries):
            pts = _probe_rows(res).get(t)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=label, color=f"C{i % 10}")
        _probe_axes(ax, f"{t}: held-out cosine")
    fig.suptitle(title)
    save_figure(fig, out)


def _probe_axes(ax: Any, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("LLM layer (hidden_states index)")
    ax.set_ylabel("cosine similarity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def load_probe(path: Path) -> dict[str, Any]:
    """probe.json of a probe output directory (or the file itself)."""
    import json

    p = Path(path)
    p = p / "probe.json" if p.is_dir() else p
    return json.loads(p.read_text())
