"""What a run reports while it trains: ``metrics.jsonl`` (one JSON object per logged step) and the live display."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from olacache.common.files import atomic_write_text


class MetricsLog:
    """Append-only ``metrics.jsonl`` of a stage. Opening it drops the rows after ``start_step`` (a resumed run
    will produce them again; a fresh start keeps none)."""

    def __init__(self, path: Path, start_step: int, report_to: list[str] | None = None) -> None:
        self.path = Path(path)
        # truncate BEFORE opening for append: the truncation replaces the file, and a handle opened earlier
        # would keep writing into the replaced (unlinked) one
        truncate_metrics(self.path, start_step)
        self._trackers = None
        if report_to:  # train.report_to: the same rows go to tensorboard / wandb (optional extras)
            from olatrain.tracking import open_trackers

            self._trackers = open_trackers(report_to, self.path.parent)
        self._f = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._trackers is not None:
            self._trackers.log(row)

    def close(self) -> None:
        self._f.close()
        if self._trackers is not None:
            self._trackers.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows after ``step`` (the resume point; 0 on a fresh start): they will be produced again."""
    if not path.is_file():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(k + "\n" for k in keep))


class TrainDisplay:
    """Step, each loss term, samples/s, ETA: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.stage = stage
        self.total = total
        self.progress = Progress(
            TextColumn(f"[bold]{stage}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not self.live,
        )
        self.task = self.progress.add_task(stage, total=total, completed=start, info="")

    def __enter__(self) -> TrainDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *a: Any) -> None:
        self.progress.__exit__(*a)

    def update(self, step: int, row: dict[str, Any]) -> None:
        terms = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in sorted(row.items())
                         if k.startswith("loss_") and k.count("_") == 1)
        info = f"loss={row.get('loss', float('nan')):.3f} {terms} {row['samples_per_s']:.1f} samp/s"
        if self.live:
            self.progress.update(self.task, completed=step, info=info)
        elif self.enabled:
            print(f"[{self.stage}] step {step}/{self.total} {info}", flush=True)
