"""olatrain, end to end through the real code paths (tiny presets, a real store built with olacache):

- the teacher boundary (a fresh process trains a PT step and has imported no teacher code);
- PT -> IFT -> `olatrain generate`, with the PT loss curve checked against a stored reference;
- metrics.jsonl rows; resume == straight run (losses and weights); a kill inside a checkpoint save;
- DDP (torchrun, 2 CPU ranks, gloo) == one process on the same global batch;
- online teacher targets == cached targets (fp16 tolerance);
- the missing-targets policy (absent teacher, low coverage, skip/error on failed images);
- config overrides / refusals, and `olatrain generate` on something that is not a checkpoint.

Threads: this module pins torch to ONE intra-op thread (restored afterwards; configs/tiny.yaml's
train.cpu_threads=1 does the same inside runs) and gives its subprocesses OMP_NUM_THREADS=1. On a 2-core
machine, 2 torch threads plus any other busy process (a DataLoader worker, a second rank, a neighbour's job)
made a PT step ~8x slower (13 s instead of 1.6 s: OpenMP threads spin-wait); one thread is about as fast as
two on an idle machine, and a fixed thread count keeps the stored loss curve reproducible.

Stored loss curve (tests/data/tiny_pt_loss_curve.json): regenerate it, after a deliberate change of the
numerics (model, losses, init, tiny presets or teachers, configs/tiny.yaml), with

    OLAKIT_UPDATE_CURVES=1 python -m pytest tests/test_train.py -k loss_curve

Determinism, measured: same machine, torch build and thread count -> bitwise identical (also with a store
built separately); 2 threads instead of 1 (a different float32 reduction order, as another CPU's kernels
would give) -> max relative difference 2e-6 over the 24 steps. Hence rtol=CURVE_RTOL=1e-3: 500x the
reduction-order noise, while a change of the init, the losses or the batch order moves these losses by far more.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import EXAMPLES, ROOT
from safetensors.torch import load_file
from typer.testing import CliRunner

from olacache.build import BuildConfig, build
from olatrain import checkpoint as ckpt
from olatrain import train
from olatrain.config import ConfigError, config_from_dict, load_run

TINY = ROOT / "configs" / "tiny.yaml"
CURVE = Path(__file__).parent / "data" / "tiny_pt_loss_curve.json"
CURVE_RTOL = 1e-3
UPDATE_CURVES = os.environ.get("OLAKIT_UPDATE_CURVES") == "1"
TEACHERS = ["depth", "seg", "gen"]
# modules a cached-targets run must never import (teacher code and the teachers' model classes)
TEACHER_MODULES = (
    "olacache.teachers",
    "diffusers",
    "transformers.models.depth_anything",
    "transformers.models.dinov2",
    "transformers.models.oneformer",
    "transformers.models.swin",
)
GEN_ONLY = ["loss.weights.depth=0", "loss.weights.seg=0"]  # cfg.teachers == ["gen"]: 3x cheaper PT steps
LOSS_KEYS = ("loss", "loss_ce", "loss_depth", "loss_seg", "loss_gen")


# ----------------------------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _quiet(*_a, **_k) -> None:
    pass


def _build_store(out: Path, teachers: list[str], *, annotations: Path | None = None,
                 image_root: Path | None = None):
    cfg = BuildConfig(annotations=str(annotations or EXAMPLES / "sample.json"),
                      image_root=str(image_root or EXAMPLES / "images"), out=str(out), teachers=list(teachers),
                      batch_size=8, workers=0, device="cpu", progress=False)
    return cfg.out, build(cfg, log=_quiet)


def _config(tmp: Path, stages: tuple[str, ...] = ("pt",)) -> Path:
    """configs/tiny.yaml restricted to `stages` (a stage cannot be removed with --set)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["stages"] = {k: v for k, v in raw["stages"].items() if k in stages}
    path = tmp / f"tiny-{'-'.join(stages)}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sets(store: str | None, out: Path, *extra: str, image_root: Path | None = None) -> list[str]:
    """--set overrides every run here uses: absolute data paths, no workers, small batches."""
    return [
        f"data.annotations={EXAMPLES / 'sample.json'}",
        f"data.image_root={image_root or EXAMPLES / 'images'}",
        f"data.store={store}",
        f"output_dir={out}",
        "data.num_workers=0",
        "data.max_length=1024",
        "train.batch_size=2",
        *extra,
    ]


def _train(config: Path, sets: list[str], *, resume: bool = False) -> list[str]:
    """`olatrain run` minus the argument parsing (train.run is what the command calls); returns the log."""
    logs: list[str] = []
    train.run(load_run(config, sets), resume=resume, log=logs.append, progress=False)
    return logs


def _rows(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(rows: list[dict], keys=LOSS_KEYS) -> np.ndarray:
    return np.array([[r[k] for k in keys if k in rows[0]] for r in rows], dtype=np.float64)


def _assert_same_losses(a: list[dict], b: list[dict], rtol: float, atol: float = 0.0) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = sorted(k for k in a[0] if k.startswith("loss"))
    assert keys == sorted(k for k in b[0] if k.startswith("loss"))
    np.testing.assert_allclose(_losses(a, keys), _losses(b, keys), rtol=rtol, atol=atol)


def _assert_same_weights(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    wa, wb = load_file(str(a / ckpt.WEIGHTS)), load_file(str(b / ckpt.WEIGHTS))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


def _cli(*args: str):
    from cli import olatrain_app

    res = CliRunner().invoke(olatrain_app, [str(a) for a in args])
    flat = "".join(res.output.split())  # rich wraps long paths at the console width
    return res, flat


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The bundled sample with all three tiny teachers (one build for the whole module)."""
    url, summary = _build_store(tmp_path_factory.mktemp("store") / "store.zarr", TEACHERS)
    assert summary.n_images == 21 and not summary.failures
    return url


@pytest.fixture(scope="module")
def pt_cfg(tmp_path_factory) -> Path:
    return _config(tmp_path_factory.mktemp("cfg"), ("pt",))


@pytest.fixture(scope="module")
def pt4(store, pt_cfg, tmp_path_factory) -> Path:
    """4 straight PT steps, all three teachers, batch 2: the reference for metrics/resume/kill tests."""
    out = tmp_path_factory.mktemp("pt4")
    _train(pt_cfg, _sets(store, out, "train.max_steps=4", "train.save_every=0"))
    return out


# ----------------------------------------------------------------------------------------------- boundary


def test_cached_pt_step_imports_no_teacher_code(store, pt_cfg, tmp_path):
    """A fresh process runs `olatrain run` (the Typer command, in-process) for one PT step on cached targets."""
    out = tmp_path / "run"
    args = ["run", str(pt_cfg), *[x for s in _sets(store, out, "train.max_steps=1") for x in ("--set", s)]]
    code = (
        "import json, sys\n"
        "from cli import olatrain_app\n"
        f"olatrain_app({args!r}, standalone_mode=False)\n"
        "import torch\n"
        "print('THREADS=' + str(torch.get_num_threads()))\n"
        "print('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in _env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("MODULES="))
    modules = json.loads(line[len("MODULES="):])
    leaked = sorted(m for m in modules for bad in TEACHER_MODULES if m == bad or m.startswith(bad + "."))
    assert not leaked, f"a cached-targets PT step imported teacher code: {leaked}"
    # the check is meaningful: the step really ran, on the store, with the trainer's own model classes
    assert "olacache.store" in modules and "olatrain.model" in modules
    assert "transformers.models.llama.modeling_llama" in modules
    rows = _rows(out / "pt")
    assert [r["step"] for r in rows] == [1] and all(f"loss_{t}" in rows[0] for t in TEACHERS)
    assert ckpt.is_done(out / "pt" / "final")
    assert "THREADS=1" in res.stdout  # configs/tiny.yaml: train.cpu_threads=1 (see setup_env)


# ----------------------------------------------------------------------------------------------- metrics


def test_metrics_jsonl_one_row_per_step(pt4):
    rows = _rows(pt4 / "pt")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["stage"] == "pt"
        for k in ("loss", "loss_ce", *(f"loss_{t}" for t in TEACHERS)):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        # total = CE + the weighted teacher terms (each loss_<t> is already weighted)
        assert r["loss"] == pytest.approx(r["loss_ce"] + sum(r[f"loss_{t}"] for t in TEACHERS), rel=1e-5)
        for t in TEACHERS:  # per-teacher breakdown is logged too
            assert r[f"loss_{t}_sl1"] > 0 and r[f"loss_{t}_nce"] > 0
        assert r["grad_norm"] > 0 and r["samples_per_s"] > 0 and r["step_time"] > 0
    # lr is logged after the scheduler step: the cosine reaches 0 after the last step
    assert [r["lr"] > 0 for r in rows] == [True, True, True, False]
    state = ckpt.load_state(pt4 / "pt" / "final")
    assert state["step"] == 4 and state["stage"] == "pt"


# ----------------------------------------------------------------------------------------------- resume


def test_resume_equals_straight_run(store, pt_cfg, pt4, tmp_path):
    out = tmp_path / "split"
    sets = _sets(store, out, "train.max_steps=4", "train.save_every=0")
    logs = _train(pt_cfg, [*sets, "train.stop_after=2"])
    assert any("stopped at step 2/4" in m for m in logs), logs
    assert not ckpt.is_done(out / "pt" / "final")
    assert ckpt.latest_checkpoint(out / "pt") == out / "pt" / "checkpoints" / "step_000002"
    assert [r["step"] for r in _rows(out / "pt")] == [1, 2]

    logs = _train(pt_cfg, sets, resume=True)
    assert any("resumed from" in m and "at step 2" in m for m in logs), logs
    # metrics.jsonl holds every step once, the resumed ones included
    _assert_same_losses(_rows(out / "pt"), _rows(pt4 / "pt"), rtol=1e-6, atol=1e-7)
    _assert_same_weights(out / "pt" / "final", pt4 / "pt" / "final", rtol=1e-6, atol=1e-7)


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way up may swallow it."""


@pytest.mark.parametrize("where", ["weights", "pointer"])
def test_kill_during_checkpoint_save_keeps_previous(store, pt_cfg, pt4, tmp_path, monkeypatch, where):
    """Die inside the step-2 save (while writing the weights into the temp dir, or after the rename but before
    LATEST moves): step 1 stays the loadable latest checkpoint and --resume reproduces the straight run."""
    out = tmp_path / "kill"
    stage = out / "pt"
    sets = _sets(store, out, "train.max_steps=4", "train.save_every=1")
    calls = {"n": 0}
    if where == "weights":
        real = ckpt.save_file

        def dying_save_file(tensors, filename, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                Path(filename).write_bytes(b"half a safetensors file")
                raise _Killed
            return real(tensors, filename, *a, **k)

        monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    else:
        real_write = ckpt._atomic_write_text

        def dying_pointer(path, text):
            if path.name == ckpt.LATEST:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise _Killed
            return real_write(path, text)

        monkeypatch.setattr(ckpt, "_atomic_write_text", dying_pointer)
    with pytest.raises(_Killed):
        _train(pt_cfg, sets)
    monkeypatch.undo()

    ckdir = stage / "checkpoints"
    if where == "weights":
        assert list(ckdir.glob(".step_000002.tmp-*")), "the killed save should have left its temp dir"
        assert not (ckdir / "step_000002").exists()
    else:
        assert (ckdir / "step_000002").is_dir() and (ckdir / ckpt.LATEST).read_text().strip() == "step_000001"
    latest = ckpt.latest_checkpoint(stage)
    assert latest == ckdir / "step_000001"
    assert ckpt.load_state(latest)["step"] == 1 and ckpt.load_weights(latest)

    # a run without --resume refuses the directory; --resume continues from step 1
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        _train(pt_cfg, sets)
    logs = _train(pt_cfg, sets, resume=True)
    assert any("at step 1" in m for m in logs), logs
    assert not list(ckdir.glob(".step_*")), "leftovers of the killed save are cleaned up by the next save"
    _assert_same_losses(_rows(stage), _rows(pt4 / "pt"), rtol=1e-6, atol=1e-7)
    _assert_same_weights(stage / "final", pt4 / "pt" / "final", rtol=1e-6, atol=1e-7)


def test_latest_checkpoint_survives_a_dangling_pointer(pt4, tmp_path):
    """LATEST naming a checkpoint that is not (or no longer) there falls back to the newest complete one;
    temp dirs and incomplete dirs are never picked."""
    stage = tmp_path / "pt"
    ckdir = stage / "checkpoints"
    ckdir.mkdir(parents=True)
    src = pt4 / "pt" / "final"
    for step in (3, 5):
        d = ckdir / f"step_{step:06d}"
        shutil.copytree(src, d)
        (d / ckpt.OPTIM).write_bytes(b"x")
    (ckdir / ".step_000009.tmp-123").mkdir()  # a killed save
    (ckdir / "step_000007").mkdir()  # no files: never complete
    assert ckpt.latest_checkpoint(stage) == ckdir / "step_000005"  # no LATEST at all
    (ckdir / ckpt.LATEST).write_text("step_000003\n")
    assert ckpt.latest_checkpoint(stage) == ckdir / "step_000003"  # LATEST wins while it is valid
    (ckdir / ckpt.LATEST).write_text("step_000008\n")
    assert ckpt.latest_checkpoint(stage) == ckdir / "step_000005"
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


# ----------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(store, pt_cfg, tmp_path):
    """torchrun 2 x batch 2 (gloo) vs 1 x batch 4: the sampler gives rank r a slice of the same global batch,
    the model normalises means by global counts, InfoNCE gathers negatives: per-step losses must agree."""
    common = ["train.max_steps=3", "train.grad_accum=1", "train.save_every=0", "data.shuffle=true"]
    single = tmp_path / "single"
    _train(pt_cfg, _sets(store, single, *common, "train.batch_size=4"))

    ddp = tmp_path / "ddp"
    sets = _sets(store, ddp, *common, "train.batch_size=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "olatrain", "run", str(pt_cfg), *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    a, b = _rows(single / "pt"), _rows(ddp / "pt")
    assert len(b) == 3
    _assert_same_losses(b, a, rtol=1e-4, atol=1e-6)
    _assert_same_weights(ddp / "pt" / "final", single / "pt" / "final", rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------- online


def test_online_targets_match_cached(store, pt_cfg, tmp_path):
    """train.targets=online (live tiny teachers through olatrain.online) gives the cached run's first-step
    losses on the same batch with the same initial weights, within fp16 tolerance."""
    cached = tmp_path / "cached"
    _train(pt_cfg, _sets(store, cached, "train.max_steps=1"))
    online = tmp_path / "online"
    logs = _train(pt_cfg, _sets(None, online, "train.max_steps=1", "train.targets=online",
                                "train.teacher_preset=tiny"))
    assert any("targets online" in m for m in logs), logs
    a, b = _rows(cached / "pt")[0], _rows(online / "pt")[0]
    assert a["loss_ce"] == pytest.approx(b["loss_ce"], rel=1e-6)  # same init, same batch
    for t in TEACHERS:
        for k in (f"loss_{t}", f"loss_{t}_sl1", f"loss_{t}_nce"):
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-4), k

    # and the targets themselves: the adapter returns what the store holds (both float16)
    from olacache.store import TargetReader
    from olatrain.online import OnlineTargets

    paths = ["chelsea.jpg", "nested/deep/chelsea_rgba.png", "strip_400x6.jpg"]
    live, ok = OnlineTargets(TEACHERS, preset="tiny", image_root=EXAMPLES / "images")(
        paths, torch.ones(len(paths), dtype=torch.bool))
    got, got_ok = TargetReader(store, TEACHERS).fetch(paths)
    for t in TEACHERS:
        assert live[t].dtype == torch.float16 and bool(ok[t].all()) and bool(got_ok[t].all())
        torch.testing.assert_close(live[t].float(), got[t].float(), rtol=2e-3, atol=2e-3, msg=t)


def test_online_targets_find_nfd_file_names(tmp_path):
    """Batches carry NFC store keys; a file saved under its NFD name (macOS) still gets its online targets
    (the dataset finds it through the raw annotated path), and an unreadable one is masked, not an error."""
    import unicodedata

    from olatrain.online import OnlineTargets

    name = "café.jpg"
    shutil.copy(EXAMPLES / "images" / "chelsea.jpg", tmp_path / unicodedata.normalize("NFD", name))
    live, ok = OnlineTargets(["gen"], preset="tiny", image_root=tmp_path)(
        [unicodedata.normalize("NFC", name), "missing.jpg", None], torch.tensor([True, True, False]))
    assert ok["gen"].tolist() == [True, False, False]
    assert live["gen"].shape == (3, 1, live["gen"].shape[-1]) and bool(live["gen"][1:].eq(0).all())


# ----------------------------------------------------------------------------------------------- missing targets


@pytest.fixture(scope="module")
def partial_stores(tmp_path_factory) -> dict:
    """gen-only stores: one from a 3-sample subset of the annotations; one over a copy of the images where two
    files are corrupt (the build records them as failed)."""
    tmp = tmp_path_factory.mktemp("partial")
    samples = json.loads((EXAMPLES / "sample.json").read_text())
    subset = tmp / "subset.json"
    subset.write_text(json.dumps(samples[:3]))
    sub_url, _ = _build_store(tmp / "subset.zarr", ["gen"], annotations=subset)

    images = tmp / "images"
    shutil.copytree(EXAMPLES / "images", images)
    for name in ("grass.png", "cell.png"):  # each used by exactly one sample
        (images / name).write_bytes(b"this is not an image")
    bad_url, summary = _build_store(tmp / "failed.zarr", ["gen"], image_root=images)
    assert sorted(p for p, _ in summary.failures) == ["cell.png", "grass.png"]
    return {"subset": sub_url, "failed": bad_url, "images": images}


def test_store_without_a_requested_teacher_is_refused(partial_stores, pt_cfg, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _train(pt_cfg, _sets(partial_stores["failed"], out, "train.max_steps=1",
                             image_root=partial_stores["images"]))
    msg = str(e.value.code)
    assert "depth" in msg and "seg" in msg and partial_stores["failed"] in msg, msg
    assert not _rows(out / "pt"), "refused before step 1"


def test_low_coverage_store_is_refused(partial_stores, pt_cfg, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _train(pt_cfg, _sets(partial_stores["subset"], out, "train.max_steps=1", *GEN_ONLY))
    msg = str(e.value.code)
    assert "covers only" in msg and "min_store_coverage" in msg and "gen" in msg, msg
    assert not _rows(out / "pt")


def test_failed_images_are_skipped_and_counted(partial_stores, pt_cfg, tmp_path):
    out = tmp_path / "run"
    sets = _sets(partial_stores["failed"], out, "train.max_steps=1", *GEN_ONLY, image_root=partial_stores["images"])
    logs = _train(pt_cfg, [*sets, "data.missing_targets=skip"])
    assert any("skipped 2 sample(s)" in m for m in logs), logs
    assert any("25 samples" in m for m in logs), logs  # 27 - 2
    assert [r["step"] for r in _rows(out / "pt")] == [1]

    with pytest.raises(SystemExit) as e:
        _train(pt_cfg, [*sets, "data.missing_targets=error", f"output_dir={tmp_path / 'strict'}"])
    msg = str(e.value.code)
    assert "missing_targets=error" in msg and ("grass.png" in msg or "cell.png" in msg), msg


# ----------------------------------------------------------------------------------------------- config


def test_set_overrides_reach_every_stage(tmp_path):
    spec = load_run(TINY, [
        "data.annotations=/data/a.json", "data.image_root=/data/img", "data.store=/data/s.zarr",
        f"output_dir={tmp_path}", "train.max_steps=7", "stages.pt.train.lr=0.5", "model.layers.gen=[1, 2]",
    ])
    assert spec.stages == ["pt", "ift"] and spec.output_dir == tmp_path
    for name in spec.stages:
        cfg = spec.configs[name]
        assert cfg.train.stage == name
        assert (cfg.data.annotations, cfg.data.image_root, cfg.data.store) == ("/data/a.json", "/data/img", "/data/s.zarr")
        assert cfg.train.max_steps == 7 and cfg.model.layers["gen"] == [1, 2]
        assert cfg.model.layers["depth"] == [2, 5]  # a nested override keeps the sibling keys
    assert spec.configs["pt"].train.lr == 0.5 and spec.configs["ift"].train.lr == 2e-4
    assert spec.configs["pt"].data.image_aspect == "square" and spec.configs["ift"].data.image_aspect == "pad"
    # the most specific override wins, whatever the order on the command line
    spec = load_run(TINY, ["stages.pt.train.batch_size=4", "train.batch_size=2", "train.lr=0.1"])
    assert spec.configs["pt"].train.batch_size == 4 and spec.configs["ift"].train.batch_size == 2
    assert spec.configs["pt"].train.lr == spec.configs["ift"].train.lr == 0.1  # beats the YAML stage values


def test_config_values_are_typed(tmp_path):
    """YAML 1.1 pitfalls do not reach the run: 1e-3 is a float, `on` stays the string "on"; wrong types are
    ConfigErrors naming the key (not a TypeError inside AdamW)."""
    spec = load_run(TINY, ["stages.pt.train.lr=3e-3", "train.max_steps=1e2", "train.betas=[0.9, 0.95]"])
    pt = spec.configs["pt"].train
    assert pt.lr == 0.003 and isinstance(pt.lr, float) and pt.max_steps == 100 and pt.betas == (0.9, 0.95)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: 1e-4, grad_checkpointing: on}\nstages: {ift: {}}\n")
    ift = load_run(cfg).configs["ift"].train
    assert ift.lr == 1e-4 and ift.grad_checkpointing == "on"
    # configs saved in checkpoints before this fix hold the YAML 1.1 reading (True); they still load
    saved = load_run(TINY).configs["ift"].to_dict()
    saved["train"]["grad_checkpointing"] = True
    del saved["train"]["cpu_threads"]  # an older checkpoint predates the field
    old = config_from_dict(saved)
    assert old.train.grad_checkpointing == "on" and old.train.cpu_threads is None
    assert spec.configs["pt"].train.cpu_threads == 1  # configs/tiny.yaml
    for item, key in [("train.lr=fast", "train.lr"), ("train.max_steps=2.5", "train.max_steps"),
                      ("train.cpu_threads=0", "train.cpu_threads"),
                      ("data.shuffle=1", "data.shuffle"), ("train.grad_checkpointing=yes", "grad_checkpointing"),
                      ("train.precision=fp16", "train.precision")]:
        with pytest.raises(ConfigError, match=key):
            load_run(TINY, [item])


def test_overrides_are_what_the_run_used(pt4, store):
    saved = json.loads((pt4 / "pt" / "config.json").read_text())
    assert saved["output_dir"] == str(pt4) and saved["data"]["store"] == store
    assert saved["data"]["annotations"] == str(EXAMPLES / "sample.json")
    assert saved["train"]["max_steps"] == 4 and saved["train"]["batch_size"] == 2
    assert ckpt.load_state(pt4 / "pt" / "final")["config"] == saved


@pytest.mark.parametrize("item, words", [
    ("train.max_stepz=3", ["max_stepz", "config.train", "max_steps"]),
    ("trian.lr=1", ["trian", "valid"]),
    ("stages.pretrain.train.lr=1", ["pretrain", "unknown stage"]),
    ("train.max_steps", ["key=value"]),
])
def test_bad_overrides_are_clear_errors(item, words):
    with pytest.raises(ConfigError) as e:
        load_run(TINY, [item])
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    res, flat = _cli("run", TINY, "--set", item)
    assert res.exit_code == 2 and "error" in res.output, res.output
    assert words[0] in flat


def test_rerun_on_an_existing_output_dir_is_refused(pt4, pt_cfg, store, tmp_path):
    # a finished run, through the CLI
    args = [x for s in _sets(store, pt4, "train.max_steps=4") for x in ("--set", s)]
    res, flat = _cli("run", pt_cfg, *args)
    assert res.exit_code == 2 and "alreadycomplete" in flat and "--resume" in flat, res.output
    # an unfinished run (checkpoints, no final): refused without --resume, also after a config change
    out = tmp_path / "stopped"
    _train(pt_cfg, _sets(store, out, "train.max_steps=2", "train.stop_after=1", *GEN_ONLY))
    args = [x for s in _sets(store, out, "train.max_steps=2", *GEN_ONLY, "train.lr=0.1") for x in ("--set", s)]
    res, flat = _cli("run", pt_cfg, *args)
    assert res.exit_code == 2 and "alreadyholdscheckpoints" in flat and "--resume" in flat, res.output
    assert [r["step"] for r in _rows(out / "pt")] == [1]
    assert ckpt.latest_checkpoint(out / "pt") == out / "pt" / "checkpoints" / "step_000001"


# ----------------------------------------------------------------------------------------------- generate


def test_generate_on_a_non_checkpoint_dir_is_a_clear_error(pt4, tmp_path):
    for bad in (tmp_path / "does-not-exist", tmp_path, pt4 / "pt"):
        res, flat = _cli("generate", "--checkpoint", bad, "--prompt", "hi")
        assert res.exit_code == 2, res.output
        assert "notanolatraincheckpoint" in flat and "".join(str(bad).split()) in flat, res.output
    _, flat = _cli("generate", "--checkpoint", pt4 / "pt", "--prompt", "hi")
    assert "didyoumean" in flat and "".join(str(pt4 / "pt" / "final").split()) in flat
    # a directory with state.json but no weights
    broken = tmp_path / "broken"
    shutil.copytree(pt4 / "pt" / "final", broken)
    (broken / ckpt.WEIGHTS).unlink()
    res, flat = _cli("generate", "--checkpoint", broken, "--prompt", "hi")
    assert res.exit_code == 2 and ckpt.WEIGHTS in flat, res.output


# ----------------------------------------------------------------------------------------------- end to end

E2E_SETS = [
    "stages.pt.train.max_steps=24", "stages.pt.train.lr=3e-3", "stages.pt.train.batch_size=4",
    "stages.ift.train.max_steps=12", "stages.ift.train.lr=1e-3", "stages.ift.train.batch_size=4",
    "train.save_every=0",
]


@pytest.mark.slow
def test_end_to_end_pt_ift_generate_and_loss_curve(store, tmp_path):
    cfg = _config(tmp_path, ("pt", "ift"))
    out = tmp_path / "run"
    logs = _train(cfg, _sets(store, out, *E2E_SETS))
    assert any(f"[ift] initialised from {out / 'pt' / 'final'}" in m for m in logs), logs
    pt, ift = _rows(out / "pt"), _rows(out / "ift")
    assert [r["step"] for r in pt] == list(range(1, 25)) and [r["step"] for r in ift] == list(range(1, 13))

    def first_last(rows, k):
        return np.mean([r[k] for r in rows[:5]]), np.mean([r[k] for r in rows[-5:]])

    for t in TEACHERS:  # the embedding losses clearly fall
        a, b = first_last(pt, f"loss_{t}")
        assert b < 0.6 * a, (t, a, b)
    a, b = first_last(pt, "loss_ce")  # CE too, though only the projector and task tokens move in PT
    assert b < a - 0.02, (a, b)
    assert all(set(r) >= {"loss", "loss_ce"} and not any(f"loss_{t}" in r for t in TEACHERS) for r in ift)
    a, b = first_last(ift, "loss_ce")
    assert b < a - 0.1, (a, b)

    # the PT loss curve against the stored reference
    curve = {str(r["step"]): {k: r[k] for k in LOSS_KEYS} for r in pt}
    if UPDATE_CURVES:
        CURVE.parent.mkdir(exist_ok=True)
        CURVE.write_text(json.dumps({
            "about": "tests/test_train.py::test_end_to_end_pt_ift_generate_and_loss_curve; regenerate with "
                     "OLAKIT_UPDATE_CURVES=1 (see the module docstring)",
            "config": "configs/tiny.yaml", "overrides": E2E_SETS, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "steps": curve,
        }, indent=1) + "\n")
    ref = json.loads(CURVE.read_text())
    assert ref["overrides"] == E2E_SETS, "the stored curve was made with other settings: regenerate it"
    assert ref["steps"].keys() == curve.keys()
    for step, terms in ref["steps"].items():
        for k, v in terms.items():
            assert curve[step][k] == pytest.approx(v, rel=CURVE_RTOL), (step, k, curve[step][k], v)

    # `olatrain generate` through the console entry point
    res = subprocess.run(
        [sys.executable, "-m", "olatrain", "generate", "--checkpoint", str(out / "ift" / "final"),
         "--image", str(EXAMPLES / "images" / "chelsea.jpg"), "--prompt", "What animal is this?",
         "--max-new-tokens", "12", "--device", "cpu"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), (res.stdout, res.stderr[-2000:])


# ----------------------------------------------------------------------------------------------- a fourth teacher


def test_fourth_teacher_trains_pt_then_ift(tmp_path):
    """The extension point end to end: a timm ViT teacher registered with one line is built into a store, whose
    column records its kind ("spatial", from the teacher), and PT trains on it with no trainer change; IFT then
    gets the same task-token shapes from the PT checkpoint (the kind travels with it)."""
    import importlib.util

    from olacache.store import EmbeddingStore
    from olacache.teachers import TEACHERS, register_teacher

    spec = importlib.util.spec_from_file_location("fourth_teacher_example", ROOT / "tests" / "fourth_teacher_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before = dict(TEACHERS)
    try:
        register_teacher(example.VitTinyTeacher)
        store, summary = _build_store(tmp_path / "vit.zarr", ["vit_tiny"])
    finally:
        TEACHERS.clear()
        TEACHERS.update(before)
    with EmbeddingStore.open(store) as s:
        assert s.teacher_kind("vit_tiny") == "spatial" and s.target_shape("vit_tiny") == (196, 192)
    # only the fourth teacher has an embedding loss; its 196-token grid is the spatial query count
    sets = _sets(store, tmp_path / "run", "model.layers.depth=[]", "model.layers.seg=[]", "model.layers.gen=[]",
                 "model.layers.vit_tiny=[2, 5]", "loss.weights.vit_tiny=0.5", "model.spatial_queries=196",
                 "model.task_tokens={gen: 8, depth: 0, seg: 0, vit_tiny: 4}",
                 "stages.pt.train.max_steps=3", "stages.ift.train.max_steps=2", "train.save_every=0")
    _train(_config(tmp_path, ("pt", "ift")), sets)
    rows = _rows(tmp_path / "run" / "pt")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss_vit_tiny"]) and r["loss_vit_tiny"] > 0 for r in rows)
    pt_w = load_file(str(tmp_path / "run" / "pt" / "final" / ckpt.WEIGHTS))
    assert pt_w["task_tokens.vit_tiny"].shape[0] == 196 and "predictors.vit_tiny.2.proj_in.weight" in pt_w
    saved = json.loads((tmp_path / "run" / "pt" / "config.json").read_text())
    assert saved["model"]["teacher_kinds"]["vit_tiny"] == "spatial"
    ift_w = load_file(str(tmp_path / "run" / "ift" / "final" / ckpt.WEIGHTS))
    torch.testing.assert_close(ift_w["task_tokens.vit_tiny"], pt_w["task_tokens.vit_tiny"])  # frozen in IFT
