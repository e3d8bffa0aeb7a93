"""``olatrain sweep SWEEP.yaml --out DIR``: a grid of ablations over one base config, all on the same store.

SWEEP.yaml::

    base: ../tiny.yaml            # a run config, relative to the sweep file
    stages: [pt]                  # optional: run only these stages of the base config
    set: {train.max_steps: 20}    # optional: overrides shared by every run (key: value as --set takes them)
    grid:                         # optional: key -> values; the cartesian product, in file order
      loss.contrastive_weight: [0.0, 0.3]
    runs:                         # optional: name -> overrides (with a grid: every named run at every grid point)
      all: {}
      no-depth: {loss.weights.depth: 0}
    probe: {steps: 50}            # optional: probe every finished run (olatrain probe settings)

Each run lives in ``DIR/<name>``, its name derived from its overrides (stable: same file -> same names). A run
whose last stage finished is never trained again; a killed run resumes from its checkpoint; a failed run is
recorded (``sweep_run.json`` + ``error.txt``) and the sweep goes on (a rerun retries it). ``--shard K/N``
takes runs K-1, K-1+N, ... so N array jobs cover the sweep with no coordinator. The summary (summary.csv,
summary.json, losses.png, probe.png) is rebuilt from what is on disk, so any shard's summary shows every run
finished so far.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olacache.common.configio import ConfigError, load_yaml_file
from olacache.common.files import atomic_write_text

STATUS_FILE = "sweep_run.json"
SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
SECTIONS = ("model", "data", "loss", "train")
MAX_NAME = 120


class SweepError(ValueError):
    """A bad sweep file or argument; the message names the key and the fix."""


@dataclass
class SweepRun:
    index: int
    name: str
    overrides: dict[str, Any]  # dotted key -> value, in application order (set, grid point, named run)

    def set_items(self) -> list[str]:
        """The overrides as ``--set key=value`` items (values as YAML flow, which JSON is)."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]


@dataclass
class Sweep:
    path: Path
    base: Path
    stages: list[str] | None
    runs: list[SweepRun]
    probe: dict[str, Any] | None
    shared: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- naming
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v) or "none"
    if isinstance(v, dict):
        return "_".join(f"{k}-{_fmt(x)}" for k, x in v.items()) or "none"
    if v is None:
        return "none"
    return str(v)


def _short_key(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[1:]) if len(parts) > 1 and parts[0] in SECTIONS else key


def point_name(point: dict[str, Any]) -> str:
    """A readable, stable directory name for a set of overrides: ``contrastive_weight=0.3,layers.depth=2-5``."""
    return ",".join(f"{_short_key(k)}={_fmt(v)}" for k, v in point.items())


def safe_name(name: str) -> str:
    """Only [A-Za-z0-9._=,+-]; long names are cut and get a hash of the full name (still stable)."""
    clean = SAFE.sub("_", name).strip("._") or "run"
    if len(clean) > MAX_NAME:
        clean = clean[: MAX_NAME - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return clean


# ----------------------------------------------------------------------------------------------- loading
def _mapping(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    v = raw.get(key) or {}
    if not isinstance(v, dict):
        raise SweepError(f"{path}: `{key}` must be a mapping (key: value), got {type(v).__name__}")
    for k in v:
        if not isinstance(k, str) or not k:
            raise SweepError(f"{path}: `{key}` has a non-string key {k!r}")
    return v


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    try:
        raw = load_yaml_file(path, "sweep")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    unknown = set(raw) - {"base", "stages", "set", "grid", "runs", "probe"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; valid: base, stages, set, grid, runs, probe")
    if not raw.get("base"):
        raise SweepError(f"{path}: `base:` (the run config, relative to the sweep file) is required")
    base = (path.parent / str(raw["base"])).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base config {base} not found (`base:` is relative to the sweep file)")
    stages = raw.get("stages")
    if stages is not None and (not isinstance(stages, list) or not all(isinstance(s, str) for s in stages)):
        raise SweepError(f"{path}: `stages:` must be a list of stage names, e.g. [pt]")
    shared = _mapping(raw, "set", path)
    grid = _mapping(raw, "grid", path)
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"{path}: grid.{k} must be a non-empty list of values")
    named = _mapping(raw, "runs", path)
    for n, ov in named.items():
        if not isinstance(ov, dict) and ov is not None:
            raise SweepError(f"{path}: runs.{n} must be a mapping of overrides ({{}} for the base as is)")
    probe = raw.get("probe")
    if probe is not None and not isinstance(probe, dict):
        raise SweepError(f"{path}: `probe:` must be a mapping of probe settings ({{}} for the defaults)")
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] or [{}]
    names = list(named) or [None]
    runs: list[SweepRun] = []
    seen: dict[str, str] = {}
    for run_name in names:
        for point in points:
            label = ",".join(x for x in (run_name, point_name(point)) if x) or "base"
            name = safe_name(label)
            if name in seen:
                raise SweepError(f"{path}: runs {seen[name]!r} and {label!r} get the same directory name {name!r}; "
                                 "rename one")
            seen[name] = label
            ov = {**shared, **point, **((named.get(run_name) or {}) if run_name else {})}
            runs.append(SweepRun(len(runs), name, ov))
    return Sweep(path, base, stages, runs, probe, shared)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise SweepError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. --shard 2/4")
    return int(m.group(1)), int(m.group(2))


def shard_runs(runs: list[SweepRun], k: int, n: int) -> list[SweepRun]:
    """Every n-th run starting at the k-th (1-indexed): shards 1..n partition the sweep."""
    return [r for r in runs if r.index % n == k - 1]


# ----------------------------------------------------------------------------------------------- status
def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(status, indent=1, default=str))


def run_is_finished(run_dir: Path, sweep: Sweep) -> bool:
    from olatrain import checkpoint as ckpt

    st = read_status(run_dir)
    last = st.get("last_stage")
    return st.get("status") == "done" and bool(last) and ckpt.is_done(run_dir / last / "final")


def probe_is_finished(run_dir: Path) -> bool:
    return (run_dir / "probe" / "probe.json").is_file() and read_status(run_dir).get("probe") == "done"


# ----------------------------------------------------------------------------------------------- running
def _config_for(sweep: Sweep, run_dir: Path) -> Path:
    """The base config, restricted to the sweep's stages (written into the run dir, so the run records it)."""
    if sweep.stages is None:
        return sweep.base
    import yaml

    raw = load_yaml_file(sweep.base)
    have = raw.get("stages") or {"pt": {}}
    missing = [s for s in sweep.stages if s not in have]
    if missing:
        raise SweepError(f"{sweep.path}: stages {missing} are not in {sweep.base} (it has {list(have)})")
    raw["stages"] = {s: have[s] for s in sweep.stages}
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def execute(sweep: Sweep, run: SweepRun, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or resume) one run, then probe it when the sweep asks; never raises for a failed run."""
    from olatrain import train
    from olatrain.config import load_run

    run_dir = out / run.name
    status = {"name": run.name, "index": run.index, "overrides": run.overrides, **read_status(run_dir)}
    rank0 = os.environ.get("RANK", "0") == "0"
    if not run_is_finished(run_dir, sweep):
        t0 = time.perf_counter()
        status.update(status="running", error=None, started=time.time())
        if rank0:
            _write_status(run_dir, status)
        try:
            spec = load_run(_config_for(sweep, run_dir), [*run.set_items(), f"output_dir={run_dir}"])
            final = train.run(spec, resume=True, log=lambda m: log(f"[{run.name}] {m}"), progress=False)
            from olatrain import checkpoint as ckpt

            ok = ckpt.is_done(final)
            status.update(status="done" if ok else "stopped", last_stage=spec.stages[-1],
                          wall_s=time.perf_counter() - t0)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed run is recorded; the others go on
            msg = str(e) or type(e).__name__
            status.update(status="failed", error=msg.splitlines()[0][:500],
                          wall_s=time.perf_counter() - t0)
            if rank0:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
            log(f"[{run.name}] FAILED: {status['error']}")
        if rank0:
            _write_status(run_dir, status)
    if sweep.probe is not None and status.get("status") == "done" and not probe_is_finished(run_dir):
        from olatrain.probe import probe_config, run_probe
        from olatrain.probe_source import ProbeError, resolve_source

        try:
            run_probe(resolve_source(run_dir), probe_config(sweep.probe), run_dir / "probe",
                      log=lambda m: log(f"[{run.name}] {m}"))
            status["probe"] = "done"
        except (ProbeError, Exception) as e:  # noqa: BLE001
            status.update(probe="failed", probe_error=str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
            log(f"[{run.name}] probe FAILED: {status['probe_error']}")
        if rank0:
            _write_status(run_dir, status)
    return status


def run_sweep(sweep: Sweep, out: Path, *, shard: tuple[int, int] = (1, 1),
              log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run this shard's runs (finished ones are skipped); -> {name: status} of the runs it ran. The summary
    of the whole sweep is ``olatrain.sweep_summary.write_summary``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = shard_runs(sweep.runs, *shard)
    todo = [r for r in mine if not run_is_finished(out / r.name, sweep)
            or (sweep.probe is not None and not probe_is_finished(out / r.name))]
    log(f"sweep {sweep.path.name}: {len(sweep.runs)} runs, shard {shard[0]}/{shard[1]} has {len(mine)}, "
        f"{len(mine) - len(todo)} already finished, {len(todo)} to run")
    statuses = {}
    for r in todo:
        log(f"[{r.name}] run {r.index + 1}/{len(sweep.runs)}: {' '.join(r.set_items()) or '(base config)'}")
        statuses[r.name] = execute(sweep, r, out, log)
    return statuses


def dry_run_lines(sweep: Sweep, out: Path, shard: tuple[int, int]) -> list[str]:
    mine = {r.index for r in shard_runs(sweep.runs, *shard)}
    shared = " ".join(f"{k}={json.dumps(v)}" for k, v in sweep.shared.items())
    lines = [f"{len(sweep.runs)} runs of {sweep.base.name}" + (f", every run with: {shared}" if shared else "")]
    for r in sweep.runs:
        st = read_status(Path(out) / r.name).get("status", "new")
        tag = "this shard" if r.index in mine else "other shard"
        own = [f"{k}={json.dumps(v)}" for k, v in r.overrides.items()
               if k not in sweep.shared or sweep.shared[k] != v]
        lines.append(f"{r.index + 1:3d}. {r.name}  [{st}, {tag}]  {' '.join(own) or '(base config)'}")
    return lines
