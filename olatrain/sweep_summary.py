"""The summary of a sweep, rebuilt from its run directories: summary.json / summary.csv (one row per run),
losses.png (every run's loss curves, one panel per term), probe.png (every run's probe curves), and the store's
side of the bill (target rows read = teacher forwards a live-teacher run would have done, bytes read).
"""

from __future__ import annotations

import csv
import io
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from olacache.common.files import atomic_write_text
from olatrain.report import read_metrics, stage_dirs
from olatrain.sweep import Sweep, read_status


@cache
def _image_share(annotations: str) -> float:
    """Share of the annotation file's samples that have an image (text-only samples read no target)."""
    from olacache.inputs.annotations import load_annotations

    try:
        samples = load_annotations(annotations)
    except Exception:  # noqa: BLE001 - only an estimate's input; 1.0 is the upper bound
        return 1.0
    return sum(1 for s in samples if s.get("image")) / max(1, len(samples))


@cache
def _row_bytes(store: str) -> dict[str, int]:
    """Bytes one image's target occupies per teacher (int8: values + per-row fp32 scales)."""
    import numpy as np

    from olacache.store import EmbeddingStore

    try:
        st = EmbeddingStore.open(store, "r")
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for t in st.teachers:
        shape = st.target_shape(t)
        item = np.dtype(st.target_dtype(t)).itemsize
        out[t] = int(np.prod(shape)) * item + (4 * int(np.prod(shape[:-1])) if item == 1 else 0)
    st.close()
    return out


def _stage_reads(stage_dir: Path) -> tuple[int, int]:
    """(target rows read, bytes read) by one training stage, from its config.json and metrics.jsonl."""
    from olatrain.config import config_from_dict

    try:
        cfg = config_from_dict(json.loads((stage_dir / "config.json").read_text()))
    except (OSError, ValueError):
        return 0, 0
    if not cfg.teachers or cfg.train.targets != "cached" or not cfg.data.store:
        return 0, 0
    rows = read_metrics(stage_dir)
    seen = [r["samples_per_s"] * r["step_time"] for r in rows if r.get("samples_per_s") and r.get("step_time")]
    steps = rows[-1]["step"] if rows else 0
    samples = sum(seen) * (steps / len(seen)) if seen else 0.0
    images = round(samples * _image_share(str(cfg.data.annotations)))
    sizes = _row_bytes(str(cfg.data.store))
    return images * len(cfg.teachers), images * sum(sizes.get(t, 0) for t in cfg.teachers)


def _probe_reads(probe: dict[str, Any]) -> tuple[int, int]:
    s, teachers = probe.get("settings", {}), sorted({r["teacher"] for r in probe.get("results", [])})
    images = s.get("steps", 0) * s.get("batch_size", 0) * probe.get("cost", {}).get("world", 1)
    images += probe.get("split", {}).get("n_eval", 0)
    sizes = _row_bytes(str(probe.get("model", {}).get("store")))
    return images * len(teachers), images * sum(sizes.get(t, 0) for t in teachers)


def run_row(sweep: Sweep, run_dir: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from olatrain.report import summarize_stage

    st = read_status(run_dir)
    row: dict[str, Any] = {"name": name, "status": st.get("status", "new"), "error": st.get("error"),
                           "wall_s": st.get("wall_s"), "overrides": overrides, "stages": {}, "probe": None}
    rows_read = bytes_read = 0
    for d in stage_dirs(run_dir):
        s = summarize_stage(d)
        row["stages"][d.name] = {"steps": s.steps, "samples_per_s": s.samples_per_s,
                                 "final": {k: b for k, (_, b) in s.losses.items()}}
        r, b = _stage_reads(d)
        rows_read, bytes_read = rows_read + r, bytes_read + b
    probe_json = run_dir / "probe" / "probe.json"
    if probe_json.is_file():
        probe = json.loads(probe_json.read_text())
        by: dict[str, dict[int, float]] = {}
        for r in probe.get("results", []):
            by.setdefault(r["teacher"], {})[int(r["layer"])] = r["cos"]
        row["probe"] = {t: {"mean": sum(v.values()) / len(v), "layers": v} for t, v in sorted(by.items())}
        r, b = _probe_reads(probe)
        rows_read, bytes_read = rows_read + r, bytes_read + b
    if st.get("probe") == "failed":
        row["probe_error"] = st.get("probe_error")
    row["target_rows_read"], row["store_bytes_read"] = rows_read, bytes_read
    return row


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat = {"name": row["name"], "status": row["status"], "wall_s": row["wall_s"],
            "overrides": " ".join(f"{k}={json.dumps(v)}" for k, v in row["overrides"].items()),
            "target_rows_read": row["target_rows_read"], "store_bytes_read": row["store_bytes_read"],
            "error": row["error"] or ""}
    for stage, s in row["stages"].items():
        flat[f"{stage}.steps"] = s["steps"]
        for k, v in sorted(s["final"].items()):
            flat[f"{stage}.{k}"] = v
    for t, p in (row["probe"] or {}).items():
        flat[f"probe.{t}.mean"] = p["mean"]
        for layer, v in sorted(p["layers"].items()):
            flat[f"probe.{t}.L{layer}"] = v
    return flat


def write_summary(sweep: Sweep, out: Path) -> dict[str, Any]:
    from olatrain.plots import probe_figure
    from olatrain.report import compare_runs

    rows = [run_row(sweep, out / r.name, r.name, r.overrides) for r in sweep.runs]
    totals = {"runs": len(rows), "done": sum(r["status"] == "done" for r in rows),
              "failed": sum(r["status"] == "failed" for r in rows),
              "teacher_forwards_run": 0,
              "teacher_forwards_avoided": sum(r["target_rows_read"] for r in rows),
              "store_bytes_read": sum(r["store_bytes_read"] for r in rows)}
    summary = {"sweep": str(sweep.path), "base": str(sweep.base), "runs": rows, "totals": totals,
               "note": "teacher_forwards_avoided = target rows read from the store (samples seen x the annotations' "
                       "image share x teachers; probes: probe images x teachers); no teacher was built or run"}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    flats = [_flat(r) for r in rows]
    cols: list[str] = []
    for f in flats:
        cols += [k for k in f if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(flats)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    trained = [out / r["name"] for r in rows if stage_dirs(out / r["name"])]
    if trained:
        compare_runs(trained, out / "losses.png")
    probed = [(r["name"], json.loads((out / r["name"] / "probe" / "probe.json").read_text())) for r in rows
              if r["probe"]]
    if probed:
        probe_figure(probed, out / "probe.png", title=f"{sweep.path.stem}: probe cosine vs layer")
    return summary




def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if math.isfinite(x) else "nan"
    return "-" if x is None else str(x)
