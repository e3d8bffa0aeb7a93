"""What ``olatrain probe`` writes (docs/method.md §9): probe.json (one entry per (teacher, layer), plus the model,
the split, the settings and the cost), probe.csv (the same rows), probe.png (cosine vs layer, one line per
teacher) and split.json (the image lists), each written atomically; probe.json last, so its presence means the
outputs are complete."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from olacache.common.files import atomic_write

if TYPE_CHECKING:
    from olatrain.probe import ProbeJob


def pair_key(t: str, layer: int) -> str:
    return f"{t}@{layer}"


def assemble_result(job: ProbeJob, scores: dict[str, dict[str, float]], losses: dict[str, list[float]],
                    timing: dict[str, float], wall: float) -> dict[str, Any]:
    pc = job.pc
    tail = max(1, pc.steps // 10)
    rows = list((job.previous or {}).get("results", []))
    for t, layer in job.pairs:
        k = pair_key(t, layer)
        rows.append({"teacher": t, "layer": layer, **scores[k], "n_train": len(job.train_keys),
                     "train_loss": float(np.mean(losses[k][-tail:])) if losses[k] else None,
                     "steps": pc.steps})
    rows.sort(key=lambda r: (r["teacher"], r["layer"]))
    split_hash = hashlib.sha256("\n".join(job.eval_keys).encode()).hexdigest()[:16]
    return {
        "results": rows,
        "model": {**job.src.describe(), "n_layers": job.model.n_layers, "hidden_size": job.model.hidden_size},
        "split": {"by": "image", "seed": pc.split_seed, "eval_fraction": pc.eval_fraction,
                  "n_train": len(job.train_keys), "n_eval": len(job.eval_keys), "eval_sha256": split_hash,
                  "file": "split.json"},
        "settings": dataclasses.asdict(pc),
        "fingerprint": job.fingerprint,
        "cost": {"wall_s": wall, "probes": len(job.pairs), "world": job.rt.world, **timing,
                 "teacher_forwards": 0},
    }


CSV_COLUMNS = ("teacher", "layer", "cos", "cos_std", "n_eval", "n_train", "train_loss", "steps")


def write_outputs(out: Path, result: dict[str, Any], job: ProbeJob | None = None) -> None:
    """probe.json, probe.csv, probe.png (+ split.json with the image lists), each written atomically."""
    import csv
    import io

    from olatrain.plots import probe_figure

    if job is not None:
        split = {"train": job.train_keys, "eval": job.eval_keys, **{k: v for k, v in result["split"].items()
                                                                     if k != "file"}}
        atomic_write(out / "split.json", lambda p: p.write_text(json.dumps(split, indent=1)))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(result["results"])
    atomic_write(out / "probe.csv", lambda p: p.write_text(buf.getvalue()))
    title = f"probe cosine vs layer: {result['model'].get('label', out.name)}"
    atomic_write(out / "probe.png", lambda p: probe_figure([(result["model"].get("label", out.name), result)],
                                                            p, title=title))
    # probe.json last: its presence means the outputs are complete
    atomic_write(out / "probe.json", lambda p: p.write_text(json.dumps(result, indent=1, default=str)))
