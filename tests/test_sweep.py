"""`olatrain sweep`: run naming (readable, stable, unique), sharding (shards partition the sweep), the skip of
finished runs, failures recorded without stopping the others, and the summary (csv/json/plots), on the bundled
sample with tiny presets (1-step runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT
from typer.testing import CliRunner

from olacache.build import BuildConfig, build
from olatrain.sweep import SweepError, load_sweep, parse_shard, point_name, run_sweep, safe_name, shard_runs
from olatrain.sweep_summary import write_summary

TINY = ROOT / "configs" / "tiny.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------- naming


def test_names_are_readable_stable_and_unique(tmp_path):
    sweep = _write(tmp_path / "s.yaml", {
        "base": str(TINY),
        "grid": {"loss.contrastive_weight": [0.0, 0.3], "model.layers.depth": [[2, 5], [3]]},
        "runs": {"all": {}, "no-depth": {"loss.weights.depth": 0}},
    })
    runs = load_sweep(sweep).runs
    names = [r.name for r in runs]
    assert len(runs) == 8 and len(set(names)) == 8
    assert names[0] == "all,contrastive_weight=0,layers.depth=2-5"  # 0.0 reads as 0
    assert names[-1] == "no-depth,contrastive_weight=0.3,layers.depth=3"
    assert runs[-1].overrides == {"loss.contrastive_weight": 0.3, "model.layers.depth": [3],
                                  "loss.weights.depth": 0}
    assert [r.name for r in load_sweep(sweep).runs] == names  # stable
    assert point_name({"loss.weights": {"depth": 0, "gen": 0.5}}) == "weights=depth-0_gen-0.5"
    long = safe_name("x" * 300)
    assert len(long) <= 120 and long == safe_name("x" * 300) and long != safe_name("x" * 301)
    assert safe_name("a b/c") == "a_b_c"


def test_bad_sweep_files_are_clear_errors(tmp_path):
    with pytest.raises(SweepError, match="base"):
        load_sweep(_write(tmp_path / "a.yaml", {"grid": {"train.lr": [1]}}))
    with pytest.raises(SweepError, match="grid.train.lr must be a non-empty list"):
        load_sweep(_write(tmp_path / "b.yaml", {"base": str(TINY), "grid": {"train.lr": 1}}))
    with pytest.raises(SweepError, match="unknown key"):
        load_sweep(_write(tmp_path / "c.yaml", {"base": str(TINY), "gird": {}}))
    with pytest.raises(SweepError, match="same directory name"):
        load_sweep(_write(tmp_path / "d.yaml", {"base": str(TINY), "runs": {"a b": {}, "a_b": {}}}))
    with pytest.raises(SweepError, match="K/N"):
        parse_shard("3/2")


@pytest.mark.parametrize("n_runs", [1, 5, 8])
def test_shards_partition_the_sweep(tmp_path, n_runs):
    sweep = load_sweep(_write(tmp_path / "s.yaml", {"base": str(TINY), "grid": {"train.seed": list(range(n_runs))}}))
    for n in (1, 2, 3):
        got = [r.index for k in range(1, n + 1) for r in shard_runs(sweep.runs, k, n)]
        assert sorted(got) == list(range(n_runs))  # every run exactly once
    assert [r.index for r in shard_runs(sweep.runs, *parse_shard("2/2"))] == list(range(1, n_runs, 2))


# ----------------------------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    cfg = BuildConfig(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"),
                      out=str(tmp_path_factory.mktemp("store") / "store.zarr"), teachers=["gen"], batch_size=8,
                      workers=0, device="cpu", progress=False)
    build(cfg, log=lambda *a, **k: None)
    return cfg.out


@pytest.fixture(scope="module")
def sweep_file(store, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sweep")
    return _write(d / "sweep.yaml", {
        "base": str(TINY),
        "stages": ["pt"],
        "set": {"data.annotations": str(EXAMPLES / "sample.json"), "data.image_root": str(EXAMPLES / "images"),
                "data.store": store, "data.num_workers": 0, "train.batch_size": 2, "train.max_steps": 1,
                "train.save_every": 0, "loss.weights": {"depth": 0, "seg": 0, "gen": 0.5},
                "model.layers": {"gen": [3]}},
        "runs": {"ola": {}, "baseline": {"loss.weights.gen": 0}, "broken": {"model.layers.gen": [99]}},
        "probe": {"teachers": ["gen"], "layers": [1, 3], "steps": 1, "batch_size": 2, "num_workers": 0,
                  "save_every": 0, "heads": 1},
    })


@pytest.fixture(scope="module")
def swept(sweep_file, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("out")
    logs: list[str] = []
    sweep = load_sweep(sweep_file)
    run_sweep(sweep, out, shard=(1, 2), log=logs.append)  # ola + broken
    run_sweep(sweep, out, shard=(2, 2), log=logs.append)  # baseline
    write_summary(sweep, out)
    return out, logs


def test_sweep_runs_records_failures_and_summarises(swept):
    out, logs = swept
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["runs"]}
    assert list(rows) == ["ola", "baseline", "broken"]
    assert rows["ola"]["status"] == rows["baseline"]["status"] == "done"
    assert rows["broken"]["status"] == "failed" and "layer" in rows["broken"]["error"]
    assert (out / "broken" / "error.txt").is_file()
    assert {int(k) for k in rows["ola"]["probe"]["gen"]["layers"]} == {1, 3}
    assert rows["ola"]["stages"]["pt"]["steps"] == 1 and "loss_gen" in rows["ola"]["stages"]["pt"]["final"]
    assert "loss_gen" not in rows["baseline"]["stages"]["pt"]["final"]
    # the store's bill: each 1-step run reads one batch (2 images) of 1 teacher; probes 1 x 2 + eval images
    assert rows["ola"]["target_rows_read"] > 2 and summary["totals"]["teacher_forwards_run"] == 0
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("name,status") and len(csv) == 4
    assert (out / "losses.png").read_bytes()[:8] == PNG and (out / "probe.png").read_bytes()[:8] == PNG


def test_rerun_reruns_nothing_finished(swept, sweep_file, monkeypatch):
    out, _ = swept
    calls: list[str] = []
    from olatrain import train

    monkeypatch.setattr(train, "run", lambda spec, **k: calls.append(str(spec.output_dir)) or 1 / 0)
    metrics = (out / "ola" / "pt" / "metrics.jsonl").stat().st_mtime_ns
    logs: list[str] = []
    run_sweep(load_sweep(sweep_file), out, log=logs.append)
    assert [Path(c).name for c in calls] == ["broken"]  # only the failed run is tried again
    assert (out / "ola" / "pt" / "metrics.jsonl").stat().st_mtime_ns == metrics
    assert any("2 already finished, 1 to run" in line for line in logs)


def test_cli_dry_run_lists_without_running(sweep_file, tmp_path):
    from cli import olatrain_app

    res = CliRunner().invoke(olatrain_app, ["sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--dry-run",
                                            "--shard", "2/2"])
    assert res.exit_code == 0, res.output
    assert "baseline  [new, this shard]" in res.output and "ola  [new, other shard]" in res.output
    assert not (tmp_path / "o" / "ola").exists()
    res = CliRunner().invoke(olatrain_app, ["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "error:" in res.output
