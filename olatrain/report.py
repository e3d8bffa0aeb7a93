"""The summary every ``olatrain run`` ends with: per stage, steps, time, samples/s and the first -> last value
of each loss term, printed and written to ``<run>/summary.json``, plus a loss-curve PNG per stage
(``<run>/<stage>/losses.png``). Everything is read back from the stage directories (config.json,
metrics.jsonl), so ``olatrain plot run`` can redraw it for any run, finished or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olacache.common.files import atomic_write_text
from olatrain.config import STAGES


class ReportError(RuntimeError):
    """A directory that is not an olatrain run."""


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: the rows before it stand
    return rows


def stage_dirs(run_dir: Path) -> list[Path]:
    """The run's stage directories in stage order (those with a metrics.jsonl)."""
    run_dir = Path(run_dir)
    return [run_dir / s for s in STAGES if (run_dir / s / "metrics.jsonl").is_file()]


@dataclass
class StageSummary:
    stage: str
    steps: int
    max_steps: int | None
    train_s: float  # sum of the logged step times (scaled to all steps when only every k-th step is logged)
    wall_s: float | None  # config.json written -> last metrics row, for the latest invocation of the stage
    samples_per_s: float
    losses: dict[str, tuple[float, float]]  # term -> (first, last)
    finished: bool

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "steps": self.steps, "max_steps": self.max_steps, "train_s": self.train_s,
                "wall_s": self.wall_s, "samples_per_s": self.samples_per_s, "finished": self.finished,
                "losses": {k: {"first": a, "last": b} for k, (a, b) in self.losses.items()}}


@dataclass
class RunSummary:
    run_dir: Path
    stages: list[StageSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "stages": [s.to_dict() for s in self.stages]}

    def lines(self) -> list[str]:
        """One line per stage, then one per loss term: text stays on one line per value."""
        from olatrain.plots import loss_terms

        out = [f"summary of {self.run_dir}:"]
        for s in self.stages:
            state = "done" if s.finished else "unfinished"
            wall = f", wall {s.wall_s:.1f}s" if s.wall_s is not None else ""
            out.append(f"  [{s.stage}] {s.steps}/{s.max_steps} steps ({state}), train {s.train_s:.1f}s{wall}, "
                       f"{s.samples_per_s:.2f} samples/s")
            for k in loss_terms([{k: 0 for k in s.losses}]):
                a, b = s.losses[k]
                out.append(f"  [{s.stage}]   {k}: {a:.4f} -> {b:.4f}")
        return out


def summarize_stage(stage_dir: Path) -> StageSummary:
    rows = read_metrics(stage_dir)
    cfg_path = stage_dir / "config.json"
    max_steps = None
    if cfg_path.is_file():
        try:
            max_steps = json.loads(cfg_path.read_text())["train"]["max_steps"]
        except (ValueError, KeyError):
            pass
    steps = int(rows[-1]["step"]) if rows else 0
    times = [float(r["step_time"]) for r in rows if r.get("step_time") is not None]
    samples = [float(r["samples_per_s"]) * float(r["step_time"]) for r in rows
               if r.get("samples_per_s") is not None and r.get("step_time") is not None]
    scale = steps / len(times) if times else 1.0  # log_every > 1: the logged steps stand for the others
    wall = None
    metrics = stage_dir / "metrics.jsonl"
    if cfg_path.is_file() and metrics.is_file():
        wall = max(0.0, os.path.getmtime(metrics) - os.path.getmtime(cfg_path))
    losses: dict[str, tuple[float, float]] = {}
    for k in sorted({k for r in rows for k in r if k.startswith("loss")}):
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            losses[k] = (float(vals[0]), float(vals[-1]))
    return StageSummary(stage_dir.name, steps, max_steps, sum(times) * scale, wall,
                        sum(samples) / sum(times) if times and samples else 0.0, losses,
                        (stage_dir / "final" / "DONE").is_file())


def summarize_run(run_dir: Path, *, write: bool = True) -> RunSummary:
    """Summarise a run; with ``write``, also ``<run>/summary.json`` and ``<run>/<stage>/losses.png``."""
    from olatrain.plots import loss_figure

    run_dir = Path(run_dir)
    dirs = stage_dirs(run_dir)
    if not dirs:
        raise ReportError(f"{run_dir} holds no stage with a metrics.jsonl (not an olatrain run directory)")
    summary = RunSummary(run_dir, [summarize_stage(d) for d in dirs])
    if write:
        for d in dirs:
            loss_figure([(d.name, read_metrics(d))], d / "losses.png", title=f"{run_dir.name} / {d.name}: losses")
        atomic_write_text(run_dir / "summary.json", json.dumps(summary.to_dict(), indent=1))
    return summary


def finish_run_report(run_dir: Path, log: Any = print) -> None:
    """The end of ``olatrain run`` (rank 0): summary printed and written, loss PNGs drawn. A failure here never
    fails the run that just trained: it is reported as one line."""
    try:
        for line in summarize_run(run_dir).lines():
            log(line)
    except Exception as e:  # noqa: BLE001 - a picture must not turn a finished training run into an error
        log(f"(no run summary: {type(e).__name__}: {e})")


def compare_runs(runs: Sequence[Path], out: Path) -> Path:
    """Loss curves of several runs in one figure per stage: ``out`` (stages side by side as separate files
    ``<out stem>_<stage>.png`` when the runs have more than one stage)."""
    from olatrain.plots import loss_figure

    per_stage: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for r in runs:
        dirs = stage_dirs(Path(r))
        if not dirs:
            raise ReportError(f"{r} holds no stage with a metrics.jsonl (not an olatrain run directory)")
        for d in dirs:
            per_stage.setdefault(d.name, []).append((Path(r).name, read_metrics(d)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stages = [s for s in STAGES if s in per_stage]
    for s in stages:
        path = out if len(stages) == 1 else out.with_name(f"{out.stem}_{s}{out.suffix or '.png'}")
        loss_figure(per_stage[s], path, title=f"{s}: losses of {len(per_stage[s])} run(s)")
    return out if len(stages) == 1 else out.parent
