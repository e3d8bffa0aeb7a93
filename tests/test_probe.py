"""`olatrain probe` (docs/method.md §9), the run summary and `olatrain show`, on the bundled sample with tiny
presets and a real store:

- the split is by image (no image in both sides), seeded, deterministic, and stable when images are added;
- a probe of a tiny PT run writes probe.json with an entry for EVERY (teacher, layer), probe.csv and a PNG;
- a rerun with the same arguments does nothing; a rerun asking for more layers trains only the new ones;
- a resumed probe (state saved mid-way) gives the same scores as a straight one;
- --baseline probes the untrained model of a config; a path that is no run is one `error:` line;
- `olatrain run` writes summary.json and per-stage loss PNGs; `olatrain show` writes a PNG;
- probing and sweeping, run as commands in a fresh process, import no teacher module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT
from typer.testing import CliRunner

from olacache.build import BuildConfig, build
from olatrain import train
from olatrain.config import load_run
from olatrain.probe import parse_layers, probe_config, run_probe, split_images
from olatrain.probe_source import ProbeError, resolve_source

TINY = ROOT / "configs" / "tiny.yaml"
TEACHERS = ["depth", "gen", "seg"]
N_LAYERS = 6  # the tiny LLM
PNG = b"\x89PNG\r\n\x1a\n"
TEACHER_MODULES = ("olacache.teachers", "diffusers", "transformers.models.depth_anything",
                   "transformers.models.dinov2", "transformers.models.oneformer", "transformers.models.swin")
# probe settings kept tiny: the test checks the protocol and the outputs, not probe quality
FAST = {"steps": 2, "batch_size": 2, "eval_fraction": 0.2, "save_every": 0, "num_workers": 0, "heads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _quiet(*_a, **_k) -> None:
    pass


def _sets(store: str, out: Path, *extra: str) -> list[str]:
    return [f"data.annotations={EXAMPLES / 'sample.json'}", f"data.image_root={EXAMPLES / 'images'}",
            f"data.store={store}", f"output_dir={out}", "data.num_workers=0", "train.batch_size=2",
            "train.save_every=0", *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    cfg = BuildConfig(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"),
                      out=str(tmp_path_factory.mktemp("store") / "store.zarr"), teachers=TEACHERS, batch_size=8,
                      workers=0, device="cpu", progress=False)
    build(cfg, log=_quiet)
    return cfg.out


@pytest.fixture(scope="module")
def pt_cfg(tmp_path_factory) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["stages"] = {"pt": raw["stages"]["pt"]}
    path = tmp_path_factory.mktemp("cfg") / "tiny-pt.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pt_run(store, pt_cfg, tmp_path_factory) -> Path:
    """A 2-step tiny PT run (gen loss only: cheap steps; the probe reads every teacher of the store)."""
    out = tmp_path_factory.mktemp("pt")
    logs: list[str] = []
    train.run(load_run(pt_cfg, _sets(store, out, "train.max_steps=2", "loss.weights.depth=0",
                                      "loss.weights.seg=0")), log=logs.append, progress=False)
    assert any("summary of" in line for line in logs)  # the run ends with its summary
    return out


@pytest.fixture(scope="module")
def probed(pt_run, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("probe")
    logs: list[str] = []
    run_probe(resolve_source(pt_run), probe_config(FAST), out, log=logs.append)
    return out, logs


# ----------------------------------------------------------------------------------------------- the split


def test_split_is_by_image_seeded_and_stable():
    keys = [f"img{i:03d}.jpg" for i in range(50)]
    train_a, eval_a = split_images(keys + keys[:10], 0.2, seed=0)  # repeated images count once
    assert set(train_a).isdisjoint(eval_a) and sorted(train_a + eval_a) == keys
    assert len(eval_a) == 10
    assert split_images(list(reversed(keys)), 0.2, seed=0) == (train_a, eval_a)  # order of the input is irrelevant
    assert split_images(keys, 0.2, seed=1)[1] != eval_a  # the seed matters
    assert split_images(keys[:1], 0.2, seed=0) == (keys[:1], [])  # one image: nothing to hold out


def test_parse_layers():
    assert parse_layers("all", 6) == [1, 2, 3, 4, 5, 6]
    assert parse_layers("2,5", 6) == [2, 5] and parse_layers("1-3,6", 6) == [1, 2, 3, 6]
    assert parse_layers([5, 2], 6) == [2, 5]
    with pytest.raises(ProbeError, match="outside 1..6"):
        parse_layers("0,7", 6)


# ----------------------------------------------------------------------------------------------- probing


def test_probe_writes_every_teacher_and_layer(probed, pt_run):
    out, logs = probed
    res = json.loads((out / "probe.json").read_text())
    pairs = sorted((r["teacher"], r["layer"]) for r in res["results"])
    assert pairs == [(t, la) for t in TEACHERS for la in range(1, N_LAYERS + 1)]
    split = json.loads((out / "split.json").read_text())
    assert set(split["train"]).isdisjoint(split["eval"])
    assert len(split["train"]) + len(split["eval"]) == 21  # every image of the sample, each once
    assert res["split"]["n_eval"] == len(split["eval"]) > 0 and res["split"]["n_train"] == len(split["train"])
    for r in res["results"]:
        assert -1.0 <= r["cos"] <= 1.0 and r["n_eval"] == len(split["eval"]) and r["train_loss"] > 0
    assert res["model"]["source"] == "checkpoint" and res["model"]["n_layers"] == N_LAYERS
    assert res["cost"]["teacher_forwards"] == 0
    csv_rows = (out / "probe.csv").read_text().splitlines()
    assert csv_rows[0].startswith("teacher,layer,cos") and len(csv_rows) == 1 + len(TEACHERS) * N_LAYERS
    assert (out / "probe.png").read_bytes()[:8] == PNG
    assert any("18 probes" in line for line in logs)  # all of them trained in the one pass


def test_probe_rerun_skips_finished_pairs(probed, pt_run):
    out, _ = probed
    before = (out / "probe.json").read_text()
    logs: list[str] = []
    run_probe(resolve_source(pt_run), probe_config(FAST), out, log=logs.append)
    assert any("nothing to do" in line for line in logs)
    assert (out / "probe.json").read_text() == before


def test_probe_adds_only_missing_layers_and_resume_matches(pt_run, tmp_path):
    one = {**FAST, "teachers": ["gen"], "steps": 4}
    run_probe(resolve_source(pt_run), probe_config({**one, "layers": [2]}), tmp_path / "a", log=_quiet)
    logs: list[str] = []
    run_probe(resolve_source(pt_run), probe_config({**one, "layers": [2, 3]}), tmp_path / "a", log=logs.append)
    assert any("1 probes" in line for line in logs)
    res = json.loads((tmp_path / "a" / "probe.json").read_text())
    assert [(r["teacher"], r["layer"]) for r in res["results"]] == [("gen", 2), ("gen", 3)]
    # a probe interrupted after its state was saved resumes to the same result as a straight one
    straight = json.loads((tmp_path / "a" / "probe.json").read_text())["results"][0]
    src = resolve_source(pt_run)
    job_dir = tmp_path / "b"
    import olatrain.probe as probe_mod

    real_eval = probe_mod.evaluate

    def die(*_a, **_k):
        raise KeyboardInterrupt

    probe_mod.evaluate = die
    try:
        with pytest.raises(KeyboardInterrupt):
            run_probe(src, probe_config({**one, "layers": [2], "save_every": 2}), job_dir, log=_quiet)
    finally:
        probe_mod.evaluate = real_eval
    assert (job_dir / "probe_state.pt").is_file() and not (job_dir / "probe.json").exists()
    logs = []
    run_probe(src, probe_config({**one, "layers": [2], "save_every": 2}), job_dir, log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs)
    resumed = json.loads((job_dir / "probe.json").read_text())["results"][0]
    assert resumed["cos"] == pytest.approx(straight["cos"], rel=1e-4, abs=1e-5)
    assert not (job_dir / "probe_state.pt").exists()


def test_probe_refuses_other_settings_in_the_same_dir(probed, pt_run):
    with pytest.raises(ProbeError, match="another model or other probe settings"):
        run_probe(resolve_source(pt_run), probe_config({**FAST, "lr": 0.5}), probed[0], log=_quiet)


def test_baseline_and_cli_errors(store, pt_cfg, tmp_path):
    from cli import olatrain_app

    out = tmp_path / "base"
    res = CliRunner().invoke(olatrain_app, [
        "probe", "--baseline", str(pt_cfg), "--out", str(out), "--teachers", "gen", "--layers", "1",
        *[x for s in _sets(store, tmp_path / "unused") for x in ("--set", s)],
        *[x for k, v in FAST.items() for x in ("--set", f"probe.{k}={v}")]])
    assert res.exit_code == 0, res.output
    probe = json.loads((out / "probe.json").read_text())
    assert probe["model"]["source"] == "baseline" and [r["layer"] for r in probe["results"]] == [1]
    res = CliRunner().invoke(olatrain_app, ["probe", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------- pictures


def test_run_summary_and_loss_pngs(pt_run):
    summary = json.loads((pt_run / "summary.json").read_text())
    (stage,) = summary["stages"]
    assert stage["stage"] == "pt" and stage["steps"] == 2 and stage["finished"]
    assert stage["samples_per_s"] > 0 and stage["train_s"] > 0
    assert {"loss", "loss_ce", "loss_gen"} <= set(stage["losses"])
    assert (pt_run / "pt" / "losses.png").read_bytes()[:8] == PNG


def test_show_writes_a_png(store, pt_cfg, tmp_path):
    """show needs a PT checkpoint with spatial predictors: a 1-step depth-only run."""
    run = tmp_path / "run"
    train.run(load_run(pt_cfg, _sets(store, run, "train.max_steps=1", "loss.weights.gen=0", "loss.weights.seg=0",
                                      "train.summary=false")), log=_quiet, progress=False)
    from olatrain.show import show

    out = show(run, EXAMPLES / "images" / "chelsea.jpg", tmp_path / "show.png")
    assert out.read_bytes()[:8] == PNG
    # --decode: through the depth teacher's own DPT head (the inspection command may load the teacher)
    out = show(run, EXAMPLES / "images" / "chelsea.jpg", tmp_path / "decoded.png", decode=True)
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ProbeError, match="not in store|not under"):
        show(run, ROOT / "README.md", tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------- boundary


def test_probe_and_sweep_commands_import_no_teacher(store, pt_run, tmp_path):
    """A fresh process runs `olatrain probe` and `olatrain sweep` (the Typer commands, in-process) and has
    imported no teacher module."""
    sweep = tmp_path / "s.yaml"
    cfg = yaml.safe_load(TINY.read_text())
    cfg["stages"] = {"pt": cfg["stages"]["pt"]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    sweep.write_text(yaml.safe_dump({
        "base": "base.yaml",
        "set": {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in _sets(
            store, tmp_path / "unused", "train.max_steps=1", "loss.weights.depth=0", "loss.weights.seg=0"))
            if k != "output_dir"},
        "runs": {"one": {}},
        "probe": {**FAST, "teachers": ["gen"], "layers": [1], "steps": 1}}))
    probe_args = ["probe", str(pt_run), "--out", str(tmp_path / "p"), "--teachers", "gen", "--layers", "1",
                  *[x for k, v in FAST.items() for x in ("--set", f"probe.{k}={v}")]]
    sweep_args = ["sweep", str(sweep), "--out", str(tmp_path / "sw")]
    code = (
        "import json, sys\n"
        "from cli import olatrain_app\n"
        f"olatrain_app({probe_args!r}, standalone_mode=False)\n"
        f"olatrain_app({sweep_args!r}, standalone_mode=False)\n"
        "print('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    modules = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("MODULES="))[8:])
    leaked = sorted(m for m in modules for bad in TEACHER_MODULES if m == bad or m.startswith(bad + "."))
    assert not leaked, f"probe/sweep imported teacher code: {leaked}"
    assert "olatrain.probe" in modules and "olatrain.sweep" in modules and "olacache.store" in modules
    assert (tmp_path / "p" / "probe.json").is_file()
    assert (tmp_path / "sw" / "one" / "probe" / "probe.json").is_file()


# ----------------------------------------------------------------------------------------------- trackers


def test_report_to_tensorboard_logs_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from olatrain.config import ConfigError
    from olatrain.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", 0, report_to=["tensorboard"])
    for step in (1, 2):
        log.write({"step": step, "stage": "pt", "loss": 3.0 / step, "loss_ce": 2.0, "grad_norm": None})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 1.5)]
    assert "grad_norm" not in acc.Tags()["scalars"]  # only numbers are sent
    with pytest.raises(ConfigError, match="report_to"):
        load_run(TINY, ["train.report_to=[mlflow]"])


# ----------------------------------------------------------------------------------------------- DDP


def test_probe_ddp_two_ranks_match_single_process(pt_run, tmp_path):
    """torchrun 2 x batch 1 (gloo) vs 1 process x batch 2: the same global batches, averaged gradients, InfoNCE
    over the gathered batch, eval sums all-reduced -> the same scores; rank 0 alone writes."""
    settings = {**FAST, "teachers": ["gen", "depth"], "layers": [2], "steps": 3}
    single = tmp_path / "single"
    run_probe(resolve_source(pt_run), probe_config({**settings, "batch_size": 2}), single, log=_quiet)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "olatrain",
           "probe", str(pt_run), "--out", str(tmp_path / "ddp"), "--teachers", "gen,depth", "--layers", "2",
           *[x for k, v in {**settings, "batch_size": 1}.items() if k not in ("teachers", "layers")
             for x in ("--set", f"probe.{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    a = json.loads((single / "probe.json").read_text())
    b = json.loads((tmp_path / "ddp" / "probe.json").read_text())
    assert b["cost"]["world"] == 2 and b["split"] == a["split"]
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert (ra["teacher"], ra["layer"], ra["n_eval"]) == (rb["teacher"], rb["layer"], rb["n_eval"])
        assert rb["cos"] == pytest.approx(ra["cos"], rel=1e-4, abs=1e-5)
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4, abs=1e-5)
