"""What a run checks about itself, so that bad data and bad steps never train silently.

- ``RunError``: a run that cannot start or must stop, with one line for the user (``NonFiniteSteps`` for
  ``train.max_bad_steps`` non-applied steps in a row);
- ``check_output_dir``: no run is written into a store, the image root or a filesystem root;
- ``skipped.jsonl`` (every record of an image replaced, a target row masked or a step not applied, with the
  step that met it), its truncation on resume and its counts; ``summary.json`` at the end of a stage;
- ``finite_step``/``bad_step``: the non-finite check of every step, and the stop after too many in a row.

The ``st`` arguments are ``olatrain.train.Stage`` objects (not imported: train imports this module).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from olacache.common.runtime import Runtime
from olatrain.config import Config
from olatrain.metrics import truncate_metrics

SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
MAX_SKIP_LOG_LINES = 10  # per stage; the rest are in skipped.jsonl


class RunError(SystemExit):
    """A run that cannot start or must stop, for a reason the user can act on; ``str(e)`` is one line.

    A SystemExit, so that without any handler the process prints the line (no traceback) and exits 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RunRefused(RunError):
    """A run refused before step 1 (its config, data, store, output_dir or checkpoints do not fit): the CLI
    exits 2 like every other refusal; a RunError raised once training runs exits 1."""

    refused = True


class NonFiniteSteps(RunError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradient norm (none was applied)."""


def check_output_dir(cfg: Config) -> None:
    """Refuse an output_dir that would write the run into a store, into the image root or at a filesystem
    root, before anything is written."""
    out = Path(cfg.output_dir).expanduser().resolve()
    if out == Path(out.anchor):
        raise RunRefused(f"output_dir={cfg.output_dir} is a filesystem root; choose a directory for the run, "
                       f"e.g. output_dir=runs/my-run")
    if out.exists() and not out.is_dir():
        raise RunRefused(f"output_dir={cfg.output_dir} exists and is not a directory; choose another output_dir")
    for p in (*reversed(out.parents), out):  # outermost first: name the store, not one of its groups
        if (p / "zarr.json").is_file() or (p / ".zgroup").is_file() or (p / ".zarray").is_file():
            raise RunRefused(f"output_dir={cfg.output_dir} is inside the embedding store {p}; a run must not write "
                           f"into a store: choose a directory outside it")
    for key, value in (("data.store", cfg.data.store), ("data.image_root", cfg.data.image_root)):
        if not value or "://" in str(value):
            continue
        root = Path(value).expanduser().resolve()
        if out == root or root in out.parents:
            raise RunRefused(f"output_dir={cfg.output_dir} is inside {key}={value}; choose a directory outside it")


def open_skip_log(stage_dir: Path, start_step: int, rt: Runtime) -> Path:
    """``skipped.jsonl`` without the records after the resume point (they will be made again); every rank
    appends its own records (one short line per write, O_APPEND), so no collective is needed per step."""
    path = stage_dir / SKIPPED
    if rt.main:
        truncate_metrics(path, start_step)
    rt.barrier()
    return path


def count_skipped(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                kind = json.loads(line).get("kind", "?")
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def record_skips(st: Any, step: int, records: list[dict[str, Any]]) -> None:
    stage = st.cfg.train.stage
    with open(st.skip_log, "a") as f:  # type: ignore[arg-type]
        for rec in records:
            f.write(json.dumps({"step": step, "rank": st.rt.rank, **rec}) + "\n")
    for rec in records:
        if st.skip_lines < MAX_SKIP_LOG_LINES:
            st.skip_lines += 1
            if rec["kind"] == "image":
                what = (f"image {rec['image']} of sample {rec['id']!r} cannot be used ({rec['reason']}); "
                        f"replaced by sample {rec.get('replaced_by')!r}")
            else:
                what = f"sample {rec['id']!r} ({rec['image']}): {rec['teacher']} target masked: {rec['reason']}"
            more = f" (further ones only in {st.skip_log})" if st.skip_lines == MAX_SKIP_LOG_LINES else ""
            st.log(f"[{stage}] step {step}: {what}{more}")


def finite_step(st: Any, sums: dict[str, float], grad_norm: torch.Tensor | None) -> bool:
    """Whether this step's update may be applied: every loss term and the gradient norm finite (on every
    rank: one tiny all-reduce under DDP, so all ranks skip together)."""
    if grad_norm is None:
        grads = [p.grad for p in st.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    ok = all(math.isfinite(v) for v in sums.values()) and bool(torch.isfinite(grad_norm).all())
    if st.rt.distributed:
        ok = st.rt.all_reduce_mean({"bad": 0.0 if ok else 1.0})["bad"] == 0.0
    return ok


def bad_step(st: Any, step: int, sums: dict[str, float], grad_norm: torch.Tensor | None, ids: list[str],
              bad_run: list[dict[str, Any]]) -> None:
    """Record a step that was not applied; raise NonFiniteSteps after train.max_bad_steps in a row."""
    tc, stage = st.cfg.train, st.cfg.train.stage
    all_ids = [i for part in st.rt.gather_objects(ids) for i in part]
    terms = {k: v for k, v in sums.items() if not math.isfinite(v)}
    gn = float(grad_norm) if grad_norm is not None else None
    rec = {"kind": "step", "step": step, "ids": all_ids, "nonfinite": sorted(terms), "grad_norm": gn,
           "reason": "non-finite loss or gradient norm: the update was not applied"}
    bad_run.append(rec)
    if st.rt.main:
        with open(st.skip_log, "a") as f:  # type: ignore[arg-type]
            f.write(json.dumps({**rec, "rank": 0}) + "\n")
        st.log(f"[{stage}] step {step}: non-finite {', '.join(sorted(terms)) or 'gradient norm'}; update not "
               f"applied ({len(bad_run)}/{tc.max_bad_steps} in a row); samples {_short(all_ids)}")
    if len(bad_run) >= tc.max_bad_steps:
        if st.online is not None:
            cause = "a learning rate too high for this model (train.lr)"
        elif st.cfg.teachers:
            cause = (f"corrupted targets in store {st.cfg.data.store} (check it with `olacache verify "
                     f"{st.cfg.data.store}`), or a learning rate too high (train.lr={tc.lr})")
        else:
            cause = f"a learning rate too high (train.lr={tc.lr}) or broken weights in train.init_from"
        first = bad_run[0]["step"]
        raise NonFiniteSteps(
            f"[{stage}] stopped: {len(bad_run)} steps in a row ({first}-{step}) had a non-finite loss or gradient "
            f"norm, none was applied (train.max_bad_steps={tc.max_bad_steps}); samples of step {step}: "
            f"{_short(all_ids)}; likely cause: {cause}. Details in {st.skip_log}"
        )


def _short(ids: list[str], n: int = 8) -> str:
    return ", ".join(repr(i) for i in ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def write_summary(st: Any, step: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``<stage>/summary.json``: what the stage trained on and what it left out or skipped; logged when any."""
    counts = count_skipped(st.skip_log) if st.skip_log is not None else {}
    excluded = dict(st.excluded or {})
    summary = {"stage": st.cfg.train.stage, "step": step, "samples": st.n_samples,
               "excluded_before_step_1": excluded, "images_replaced": counts.get("image", 0),
               "target_rows_masked": counts.get("target", 0), "steps_not_applied": counts.get("step", 0)}
    (st.dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    parts = [f"{n} sample(s) excluded before step 1 ({k.replace('_', ' ')})" for k, n in excluded.items() if n]
    parts += [f"{summary[k]} {what}" for k, what in (
        ("images_replaced", "image(s) replaced after failing to load"),
        ("target_rows_masked", "target row(s) masked for non-finite values"),
        ("steps_not_applied", "step(s) not applied (non-finite)")) if summary[k]]
    if parts:
        log(f"[{st.cfg.train.stage}] data: " + "; ".join(parts) + f" (see {st.dir / SKIPPED})")
    return summary
