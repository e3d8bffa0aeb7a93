"""Experiment trackers for those who use them (``train.report_to: [tensorboard, wandb]``): every row written to
metrics.jsonl is also sent to each tracker listed. Each tracker's package is an optional extra and is imported
only when the config lists it; an absent package is one clear error before step 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class TrackerError(SystemExit):
    """A tracker was asked for but cannot be used (package missing)."""


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class Trackers:
    """The trackers of one stage; ``log(row)`` sends a metrics row to each, ``close()`` flushes them."""

    def __init__(self, names: list[str], stage_dir: Path) -> None:
        self._tb = None
        self._wandb = None
        stage_dir = Path(stage_dir)
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrackerError(f"error: train.report_to lists tensorboard but it cannot be imported ({e}); "
                                   "pip install 'olakit[tensorboard]' or remove it from train.report_to") from None
            self._tb = SummaryWriter(log_dir=str(stage_dir / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise TrackerError("error: train.report_to lists wandb but it is not installed; "
                                   "pip install 'olakit[wandb]' or remove it from train.report_to") from None
            name = f"{stage_dir.parent.name}/{stage_dir.name}"
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "olakit"), name=name,
                                     dir=str(stage_dir), resume="allow", reinit=True)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        values = _numeric(row)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def open_trackers(names: list[str] | None, stage_dir: Path) -> Trackers | None:
    return Trackers(list(names), stage_dir) if names else None
