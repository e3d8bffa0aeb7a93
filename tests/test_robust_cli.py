"""Mistakes and hostile input get one line, never a traceback; a wrong image root never poisons a store.

Each user mistake is run through the real command (typer's CliRunner, in process) and must print ONE
`error: ...` line naming the file, key or path, exit with the documented code (2 refused, 1 failed run,
130 interrupted) and show no traceback. The build-side cases (wrong root, --retry-failed, symlinks out of the
root, NFD names, extreme strips) run real builds with the tiny gen teacher (a second or two each).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT
from PIL import Image
from typer.testing import CliRunner

import cli
from cli import olacache_app, olatrain_app
from olacache.build import BuildConfig, BuildError, build
from olacache.store import FAILED, OK, EmbeddingStore
from olacache.verify import verify_store

IMAGES = EXAMPLES / "images"
TINY = ROOT / "configs" / "tiny.yaml"


def _quiet(*a, **k):
    pass


def _invoke(app, *args: str, env: dict | None = None):
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return res, res.output


def _one_error_line(res, code: int) -> str:
    """The single `error:` line of a refused command (asserting the exit code and no traceback)."""
    out = res.output
    assert res.exit_code == code, (res.exit_code, out, res.exception)
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errs) == 1, out
    return errs[0]


def _images(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    srcs = sorted(IMAGES.glob("*.jpg"))
    for i, n in enumerate(names):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(srcs[i % len(srcs)], root / n)


def _ann(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps([{"id": str(i), "image": n} for i, n in enumerate(names)]))
    return path


def _cfg(tmp: Path, ann: Path, root: Path, **kw) -> BuildConfig:
    base = dict(annotations=str(ann), image_root=str(root), out=str(tmp / "s.zarr"), teachers=["gen"],
                batch_size=2, shard_size=4, workers=0, device="cpu", progress=False)
    base.update(kw)
    return BuildConfig(**base)


# ----------------------------------------------------------------------------------------------- one line each


def test_bad_yaml_is_one_line_for_both_tools(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n  max_steps: 3\n")
    line = _one_error_line(_invoke(olatrain_app, "run", bad)[0], 2)
    assert str(bad) in line and "line" in line and "invalid YAML" in line
    res, _ = _invoke(olacache_app, "build", EXAMPLES / "sample.json", IMAGES, "--out", tmp_path / "s", "--config", bad)
    assert str(bad) in _one_error_line(res, 2)
    assert not (tmp_path / "s").exists()


def test_missing_files_and_wrong_paths_in_training_are_refused_before_models_load(tmp_path):
    sets = ["--set", f"output_dir={tmp_path / 'out'}"]
    res, _ = _invoke(olatrain_app, "run", TINY, *sets, "--set", f"data.annotations={tmp_path / 'nope.json'}")
    line = _one_error_line(res, 2)
    assert "data.annotations" in line and "nope.json" in line
    res, _ = _invoke(olatrain_app, "run", TINY, *sets, "--set", f"data.image_root={tmp_path / 'imgs'}")
    line = _one_error_line(res, 2)
    assert "data.image_root" in line and str(tmp_path / "imgs") in line
    res, _ = _invoke(olatrain_app, "run", TINY, *sets, "--set", f"data.store={tmp_path / 'no.zarr'}")
    line = _one_error_line(res, 2)
    assert "data.store" in line and "olacache build" in line
    assert not (tmp_path / "out").exists()


def test_bad_set_unknown_names_and_missing_store_are_one_line(tmp_path):
    assert "key=value" in _one_error_line(_invoke(olatrain_app, "run", TINY, "--set", "train.lr")[0], 2)
    out = ["--out", tmp_path / "s.zarr"]
    line = _one_error_line(_invoke(olacache_app, "build", EXAMPLES / "sample.json", IMAGES, *out,
                                   "--preset", "huge")[0], 2)
    assert "--preset" in line and "tiny" in line and "ola" in line
    line = _one_error_line(_invoke(olacache_app, "build", EXAMPLES / "sample.json", IMAGES, *out,
                                   "--teachers", "gen,normals")[0], 2)
    assert "normals" in line and "depth" in line
    line = _one_error_line(_invoke(olacache_app, "build", tmp_path / "ann.json", IMAGES, *out)[0], 2)
    assert "ann.json" in line
    line = _one_error_line(_invoke(olacache_app, "info", tmp_path / "none.zarr")[0], 2)
    assert "none.zarr" in line
    line = _one_error_line(_invoke(olacache_app, "verify", tmp_path / "none.zarr")[0], 2)
    assert "none.zarr" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("case", ["deep", "bigint", "surrogate"])
def test_malformed_annotations_are_one_line_naming_the_entry(tmp_path, case):
    if case == "deep":
        text, where = '[\n{"id": "a", "image": "chelsea.jpg"},\n' + "[" * 200_000 + "]" * 200_000 + "\n]", "line 3"
    elif case == "bigint":
        text, where = '[\n{"id": ' + "7" * 5000 + ', "image": "chelsea.jpg"}\n]', "line 2"
    else:
        text, where = '[{"id": "a", "image": "chelsea.jpg"}, {"id": "b", "image": "x\\ud800.jpg"}]', "entry 1"
    ann = tmp_path / "ann.json"
    ann.write_text(text)
    res, _ = _invoke(olacache_app, "build", ann, IMAGES, "--out", tmp_path / "s.zarr", "--teachers", "gen")
    line = _one_error_line(res, 2)
    assert str(ann) in line and where in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_disk_full_and_permission_denied_are_one_line(tmp_path, monkeypatch):
    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    ann = _ann(tmp_path / "ann.json", ["a.jpg", "b.jpg"])
    args = ["build", ann, tmp_path / "imgs", "--teachers", "gen", "--workers", "0", "--device", "cpu"]

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s.zarr" / "gen" / "target"))

    monkeypatch.setattr(EmbeddingStore, "write_shard", full)
    line = _one_error_line(_invoke(olacache_app, *args, "--out", tmp_path / "s.zarr")[0], 1)
    assert "disk full" in line and "s.zarr" in line and "same command" in line

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / "s.zarr"))

    monkeypatch.setattr(EmbeddingStore, "create", denied)
    line = _one_error_line(_invoke(olacache_app, *args, "--out", tmp_path / "ro" / "s.zarr")[0], 2)
    assert "permission denied" in line and str(tmp_path / "ro" / "s.zarr") in line


def test_dataloader_worker_errors_become_their_original_line():
    from olatrain.data.errors import DataError

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "olatrain.data.errors.DataError: sample '3': cannot load image /r/a.jpg: missing file"
    )
    assert cli._classify(wrapped) == (2, "sample '3': cannot load image /r/a.jpg: missing file")
    # torch re-raises as RuntimeError when it cannot rebuild the type from the message
    as_rt = RuntimeError(str(wrapped).replace("Caught DataError", "Caught ImageError"))
    assert cli._classify(as_rt)[0] == 2


def test_debug_shows_the_traceback(tmp_path):
    from olacache.common.configio import ConfigError

    res = CliRunner().invoke(olatrain_app, ["run", str(TINY), "--set", "train.lr"], env={"OLAKIT_DEBUG": "1"})
    assert isinstance(res.exception, ConfigError)
    res = CliRunner().invoke(olatrain_app, ["--debug", "run", str(TINY), "--set", "train.lr"])
    assert isinstance(res.exception, ConfigError)
    os.environ.pop("OLAKIT_DEBUG", None)  # --debug sets it for the process


# ----------------------------------------------------------------------------------------------- help, output


def test_help_shows_defaults_choices_and_version():
    res, out = _invoke(olacache_app, "build", "--help", env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    flat = "".join(out.replace("│", " ").split())
    assert res.exit_code == 0
    for d in ("default:(depth,seg,gen)", "default:(tiny)", "default:(16)", "default:(256)", "default:(float16)",
              "default:(zarr)", "default:(2)", "default:(auto)"):
        assert d in flat, d
    assert "<tiny|ola>" in flat and "<float16|int8>" in flat and "<zarr|hdf5>" in flat
    assert "<bool>" not in flat.replace("--help<bool>", "") and "<list[str]>" not in flat
    for app, _name in ((olacache_app, "olacache"), (olatrain_app, "olatrain")):
        res, out = _invoke(app, "--version")
        assert res.exit_code == 0 and out.split()[-1].count(".") == 2


def test_generate_prints_the_answer_alone_on_stdout(monkeypatch, tmp_path):
    import olatrain.generate as gen

    def fake(directory, prompt, *, note=None, **kw):  # the real decode is covered in test_train
        note("tiny random-weight presets: expect noise")
        return "a cat"

    monkeypatch.setattr(gen, "generate", fake)
    res = CliRunner().invoke(olatrain_app, ["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"])
    assert res.exit_code == 0 and res.stdout == "a cat\n"
    assert "noise" in res.stderr


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch):
    import olacache.build as b

    names = [f"i{i}.jpg" for i in range(12)]
    _images(tmp_path / "imgs", names)
    ann = _ann(tmp_path / "ann.json", names)
    calls = {"n": 0}
    real = b.forward_isolating_failures

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # shards 0 and 1 (2 batches each) are done and queued for writing
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(b, "forward_isolating_failures", interrupted)
    out = tmp_path / "s.zarr"
    res, text = _invoke(olacache_app, "build", ann, tmp_path / "imgs", "--out", out, "--teachers", "gen",
                        "--batch-size", "2", "--shard-size", "4", "--workers", "0", "--device", "cpu")
    assert res.exit_code == 130, text
    flat = " ".join(text.split())
    assert "interrupted" in flat and "gen 2/3" in flat and "resume with" in flat, flat
    with EmbeddingStore.open(str(out)) as s:
        assert s.complete_shards("gen").tolist() == [True, True, False]

    # training: the last checkpoint and its step
    import olatrain.checkpoint as ckpt
    import olatrain.train as train

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", stop)
    monkeypatch.setattr(ckpt, "latest_checkpoint", lambda d: Path(d) / "checkpoints" / "step_000007")
    monkeypatch.setattr(ckpt, "load_state", lambda d: {"step": 7})
    (tmp_path / "run" / "pt").mkdir(parents=True)
    res, text = _invoke(olatrain_app, "run", TINY, "--set", f"output_dir={tmp_path / 'run'}")
    flat = " ".join(text.split())
    assert res.exit_code == 130 and "step 7" in flat and "--resume" in flat, flat


# ----------------------------------------------------------------------------------------------- wrong root


def test_wrong_image_root_stops_before_anything_is_written(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    _images(tmp_path / "imgs", names)
    ann = _ann(tmp_path / "ann.json", names)
    (tmp_path / "other").mkdir()
    cfg = _cfg(tmp_path, ann, tmp_path / "other")
    with pytest.raises(BuildError) as e:
        build(cfg, log=_quiet)
    msg = str(e.value)
    assert str((tmp_path / "other").resolve()) in msg and str(tmp_path / "other" / "a.jpg") in msg
    assert not Path(cfg.out).exists()
    res, _ = _invoke(olacache_app, "build", ann, tmp_path / "other", "--out", cfg.out, "--teachers", "gen")
    assert "first path tried" in _one_error_line(res, 2)
    assert not Path(cfg.out).exists()
    # on purpose (--max-missing-fraction 1): built, every row failed, and verify calls that a problem
    cfg.max_missing_fraction = 1.0
    s = build(cfg, log=_quiet)
    assert len(s.failures) == 3
    rep = verify_store(cfg.out)
    assert not rep.ok and any("every image failed" in p and "--retry-failed" in p for p in rep.problems)
    res, out = _invoke(olacache_app, "verify", cfg.out)
    assert res.exit_code == 1 and "a.jpg" in out and "missing file" in out


def test_retry_failed_recomputes_only_the_failed_rows(tmp_path):
    names = [f"i{i}.jpg" for i in range(8)]
    _images(tmp_path / "full", names)
    ann = _ann(tmp_path / "ann.json", names)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    for n in ("i3.jpg", "i6.jpg"):  # one row in each shard (shard_size 4); 2 of 8 missing: under the threshold
        (tmp_path / "part" / n).unlink()
    cfg = _cfg(tmp_path, ann, tmp_path / "part")
    first = build(cfg, log=_quiet)
    failed = dict(first.failures)
    assert set(failed) == {"i3.jpg", "i6.jpg"}
    assert failed["i3.jpg"] == f"missing file: {tmp_path / 'part' / 'i3.jpg'}"  # the full path tried
    with EmbeddingStore.open(cfg.out) as s:
        before = s.read_rows("gen", np.arange(8))
    rep = verify_store(cfg.out)
    assert rep.ok and set(p for p, _ in rep.failed["gen"]) == {"i3.jpg", "i6.jpg"}
    assert any("--retry-failed" in w for w in rep.warnings)

    for n in ("i3.jpg", "i6.jpg"):  # fix the files
        shutil.copy(tmp_path / "full" / n, tmp_path / "part" / n)
    logs: list[str] = []
    again = build(cfg, log=logs.append)  # a plain rerun keeps them failed and says how to retry
    assert again.images_computed == 0 and len(again.failures) == 2
    assert any("--retry-failed" in line for line in logs)
    assert logs[0].startswith("loading teachers")
    cfg.retry_failed = True
    calls: list[tuple[int, int]] = []
    retried = build(cfg, log=_quiet, progress=lambda done, total, ok: calls.append((done, total)))
    assert calls[0] == (0, 2) and calls[-1] == (2, 2)  # the bar starts at 0 when computing starts
    assert retried.images_computed == 2 and not retried.failures  # only the two failed rows ran
    (tmp_path / "ref").mkdir()
    ref = build(_cfg(tmp_path / "ref", ann, tmp_path / "full"), log=_quiet)
    with EmbeddingStore.open(cfg.out) as s, EmbeddingStore.open(ref.store) as r:
        assert (s.status("gen") == OK).all() and s.errors("gen") == []
        after = s.read_rows("gen", np.arange(8))
        ok_rows = [0, 1, 2, 4, 5, 7]
        np.testing.assert_array_equal(after[ok_rows], before[ok_rows])  # kept, bit for bit
        np.testing.assert_allclose(after[[3, 6]].astype(np.float32), r.read_rows("gen", [3, 6]).astype(np.float32),
                                   rtol=0, atol=2e-3)  # recomputed in a batch of its own


# ----------------------------------------------------------------------------------------------- hostile input


def test_symlink_out_of_the_root_is_a_failed_row_unless_allowed(tmp_path):
    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    _images(tmp_path / "outside", ["secret.jpg"])
    (tmp_path / "imgs" / "link.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    (tmp_path / "imgs" / "inner.jpg").symlink_to(tmp_path / "imgs" / "a.jpg")  # inside: fine
    ann = _ann(tmp_path / "ann.json", ["a.jpg", "b.jpg", "link.jpg", "inner.jpg"])
    s = build(_cfg(tmp_path, ann, tmp_path / "imgs"), log=_quiet)
    failed = dict(s.failures)
    assert set(failed) == {"link.jpg"}
    assert "outside the image root" in failed["link.jpg"] and str(tmp_path / "outside") in failed["link.jpg"]
    ok = build(_cfg(tmp_path, ann, tmp_path / "imgs", out=str(tmp_path / "allowed.zarr"),
                    allow_outside_root=True), log=_quiet)
    assert not ok.failures


def test_nfd_named_file_is_found_by_the_build(tmp_path):
    nfc = unicodedata.normalize("NFC", "café.jpg")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    _images(tmp_path / "imgs", [nfd, "b.jpg"])  # on disk: NFD (as macOS writes it)
    ann = _ann(tmp_path / "ann.json", [nfc, "b.jpg"])  # annotated: NFC
    s = build(_cfg(tmp_path, ann, tmp_path / "imgs"), log=_quiet)
    assert not s.failures and s.teachers[0].n_ok == 2


def test_extreme_strip_is_a_failed_row_not_an_allocation(tmp_path):
    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    Image.new("RGB", (1, 100_000), (255, 0, 0)).save(tmp_path / "imgs" / "strip.png")
    assert (tmp_path / "imgs" / "strip.png").stat().st_size < 5_000
    ann = _ann(tmp_path / "ann.json", ["a.jpg", "b.jpg", "strip.png"])
    s = build(_cfg(tmp_path, ann, tmp_path / "imgs"), log=_quiet)
    failed = dict(s.failures)
    assert set(failed) == {"strip.png"} and "aspect ratio" in failed["strip.png"]
    with EmbeddingStore.open(s.store) as st:
        assert dict(zip(st.image_paths, st.status("gen"), strict=True))["strip.png"] == FAILED


# ----------------------------------------------------------------------------------------------- config paths


def test_relative_paths_in_config_files_resolve_against_the_file(tmp_path, monkeypatch):
    from olatrain.config import load_run

    proj = tmp_path / "proj"
    (proj / "conf").mkdir(parents=True)
    _images(proj / "imgs", ["a.jpg", "b.jpg"])
    _ann(proj / "ann.json", ["a.jpg", "b.jpg"])
    (proj / "conf" / "run.yaml").write_text(
        "output_dir: ../runs/x\ndata: {annotations: ../ann.json, image_root: ../imgs, store: ../s.zarr}\n"
        "stages: {pt: {}, ift: {data: {image_root: ../imgs}}}\n")
    monkeypatch.chdir(tmp_path)  # anywhere but the config's directory
    spec = load_run(proj / "conf" / "run.yaml", ["data.store=rel/s.zarr"])
    for st in ("pt", "ift"):
        d = spec.configs[st].data
        assert Path(d.annotations) == (proj / "ann.json").resolve()
        assert Path(d.image_root) == (proj / "imgs").resolve()
        assert d.store == "rel/s.zarr"  # --set values stay relative to the working directory
        assert Path(spec.configs[st].output_dir) == (proj / "runs" / "x").resolve()
    assert spec.configs["pt"].model.llm == "tiny"  # names are not paths
    (proj / "conf" / "build.yaml").write_text("annotations: ../ann.json\nteachers: [gen]\nworkers: 0\n"
                                              "teacher_overrides: {gen: {source: org/name}}\n")
    cfg = BuildConfig.from_file(proj / "conf" / "build.yaml", image_root="imgs", out="s.zarr")
    assert Path(cfg.annotations) == (proj / "ann.json").resolve()
    assert cfg.image_root == "imgs" and cfg.teacher_overrides["gen"]["source"] == "org/name"


def test_bare_command_shows_help_and_unknown_command_is_one_line():
    res, out = _invoke(olacache_app)
    assert "Usage" in out and "Traceback" not in out and res.exception is None or isinstance(res.exception, SystemExit)
    line = _one_error_line(_invoke(olatrain_app, "trian")[0], 2)
    assert "trian" in line and "--help" in line


def test_depth_store_from_the_old_interpolation_is_refused_by_name(tmp_path, monkeypatch):
    """A depth column built before the reference interpolation (spec_version 1) is refused on resume, naming
    the difference and --overwrite-teacher depth; that flag then rebuilds just that column."""
    from olacache.store import StoreMismatch
    from olacache.teachers.depth import DepthTeacher

    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    ann = _ann(tmp_path / "ann.json", ["a.jpg", "b.jpg"])
    cfg = _cfg(tmp_path, ann, tmp_path / "imgs", teachers=["depth"])
    with monkeypatch.context() as m:
        m.setattr(DepthTeacher, "spec_version", 1)
        build(cfg, log=_quiet)
    with pytest.raises(StoreMismatch) as e:
        build(cfg, log=_quiet)
    assert "spec_version" in str(e.value) and "--overwrite-teacher depth" in str(e.value)
    res, _ = _invoke(olacache_app, "build", ann, tmp_path / "imgs", "--out", cfg.out, "--teachers", "depth",
                     "--workers", "0", "--device", "cpu")
    assert "--overwrite-teacher depth" in _one_error_line(res, 2)
    cfg.overwrite_teacher = ["depth"]
    s = build(cfg, log=_quiet)
    assert s.teachers[0].n_ok == 2
    with EmbeddingStore.open(cfg.out) as st:
        assert st.teacher_attrs("depth")["spec"]["spec_version"] == 2
