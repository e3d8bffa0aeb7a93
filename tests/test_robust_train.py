"""olatrain on dirty data and damaged files (issue 7, trainer side), through the real code paths:

- annotations with zero-byte, truncated, non-image, missing and decompression-bomb images plus text-only
  samples: PT excludes the images the store failed (counted), IFT (no store) replaces them while training
  (deterministically: resume after a kill and 2-rank DDP equal the straight / single runs), all counted in
  summary.json and listed in skipped.jsonl; data.bad_images=error refuses before step 1;
- a store with corrupted bytes in a shard: the rows read back non-finite are masked, never a NaN loss;
- a non-finite step is not applied; train.max_bad_steps of them in a row stop the run with one line;
- checkpoints verify themselves (truncated / zero-byte weights, garbage state.json, deleted RNG file, flipped
  bytes) and --resume falls back to the newest intact one; planted pickles are refused without running;
- output_dir inside a store, the image root or at / is refused; text is bounded before tokenisation;
- every refusal is one line (no traceback), and the CLI exits non-zero.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, ROOT
from safetensors.torch import load_file
from test_train import (
    GEN_ONLY,
    _assert_same_losses,
    _assert_same_weights,
    _build_store,
    _cli,
    _config,
    _env,
    _rows,
    _train,
)

from olatrain import checkpoint as ckpt
from olatrain import train
from olatrain.guards import SKIPPED, SUMMARY, NonFiniteSteps, RunError

BAD = {  # file -> the reason the decoder gives (a substring)
    "zero.jpg": "zero-byte",
    "trunc.jpg": "truncated",
    "notimg.png": "not an image",
    "missing.jpg": "missing file",
    "bomb.png": "decompression bomb",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _bomb_png(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> dict:
    """The bundled sample plus one sample per kind of bad image and two more text-only samples, interleaved
    (none in the last two positions, so an unshuffled batch-4 epoch meets every one), and a gen-only store
    built over them (the build records the bad images as failed)."""
    tmp = tmp_path_factory.mktemp("dirty")
    images = tmp / "images"
    shutil.copytree(EXAMPLES / "images", images)
    jpg = (EXAMPLES / "images" / "chelsea.jpg").read_bytes()
    (images / "zero.jpg").write_bytes(b"")
    (images / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (images / "notimg.png").write_text("this is not an image\n")
    (images / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    good = json.loads((EXAMPLES / "sample.json").read_text())
    conv = good[0]["conversations"]
    extra = [{"id": f"bad-{name}", "image": name, "conversations": conv} for name in BAD]
    extra += [{"id": f"text-{k}", "conversations": [{"from": "human", "value": f"Count to {k + 2}."},
                                                  {"from": "gpt", "value": " ".join(map(str, range(1, k + 3)))}]}
              for k in range(2)]
    samples = []
    for i, s in enumerate(good):
        samples.append(s)
        if i % 4 == 1 and extra:
            samples.append(extra.pop(0))
    assert not extra and all(not s["id"].startswith("bad-") for s in samples[-2:])
    ann = tmp / "dirty.json"
    ann.write_text(json.dumps(samples))
    store, summary = _build_store(tmp / "dirty.zarr", ["gen"], annotations=ann, image_root=images)
    assert sorted(p for p, _ in summary.failures) == sorted(BAD)
    return {"ann": ann, "images": images, "store": store, "n": len(samples)}


def _dsets(d: dict, out: Path, *extra: str, store: str | None = "auto") -> list[str]:
    return [
        f"data.annotations={d['ann']}", f"data.image_root={d['images']}",
        f"data.store={d['store'] if store == 'auto' else store}", f"output_dir={out}",
        "data.num_workers=0", "data.max_length=1024", "data.shuffle=false", "train.batch_size=4",
        "train.save_every=0", *GEN_ONLY, *extra,
    ]


PT_IFT = ["stages.pt.train.max_steps=3", "stages.ift.train.max_steps=8"]


def _skips(stage_dir: Path) -> list[dict]:
    path = stage_dir / SKIPPED
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _key(rec: dict) -> tuple:
    return rec["step"], rec["kind"], rec["id"], rec.get("replaced_by"), rec["reason"]


def _one_line(msg: str) -> None:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg


# ----------------------------------------------------------------------------------------------- dirty data


@pytest.fixture(scope="module")
def straight(dirty, tmp_path_factory) -> tuple[Path, list[str]]:
    """PT (store: bad images excluded) -> IFT (no store: bad images replaced), straight through."""
    out = tmp_path_factory.mktemp("straight")
    logs = _train(_config(out, ("pt", "ift")), _dsets(dirty, out, *PT_IFT, "stages.ift.data.store=null"))
    return out, logs


def test_pt_ift_on_dirty_data_finishes_and_counts_the_skipped(straight, dirty):
    out, logs = straight
    # PT: the store knows the five failed images; they are excluded before step 1 and counted
    assert any("[pt] skipped 5 sample(s)" in m for m in logs), logs
    pt = json.loads((out / "pt" / SUMMARY).read_text())
    assert pt["excluded_before_step_1"] == {"targets_missing_or_failed": 5} and pt["images_replaced"] == 0, pt
    assert ckpt.load_state(out / "pt" / "final")["data"] == pt
    # IFT has no store: each bad image is met once in the unshuffled epoch, replaced and listed with its reason
    ift = json.loads((out / "ift" / SUMMARY).read_text())
    assert ift["images_replaced"] == 5 and ift["steps_not_applied"] == 0, ift
    recs = _skips(out / "ift")
    assert sorted(r["image"] for r in recs) == sorted(BAD)
    for r in recs:
        assert r["kind"] == "image" and BAD[r["image"]] in r["reason"], r
        assert r["replaced_by"] and not r["replaced_by"].startswith("bad-"), r
    assert any("[ift] data: 5 image(s) replaced" in m for m in logs), logs
    assert any("bomb.png" in m and "replaced by sample" in m for m in logs), logs
    rows = _rows(out / "ift")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and "skipped_step" not in r for r in rows)


class _Killed(BaseException):
    """Stands in for SIGKILL (not an Exception: nothing may swallow it)."""


def test_resume_after_a_kill_equals_the_straight_run_on_dirty_data(straight, dirty, tmp_path, monkeypatch):
    ref, _ = straight
    out = tmp_path / "killed"
    cfg = _config(tmp_path, ("pt", "ift"))
    # the resumed IFT reads through a DataLoader worker (the straight run reads in-process): the skip records
    # travel back with the batches and the replacements are the same
    sets = _dsets(dirty, out, *PT_IFT, "stages.ift.data.store=null", "stages.ift.train.save_every=2",
                  "stages.ift.data.num_workers=1")
    real = train._next_batch

    def dying(st, step):
        if st.cfg.train.stage == "ift" and step == 7:
            raise _Killed
        return real(st, step)

    monkeypatch.setattr(train, "_next_batch", dying)
    with pytest.raises(_Killed):
        _train(cfg, sets)
    monkeypatch.undo()
    assert max(r["step"] for r in _skips(out / "ift")) > 4  # records past the last checkpoint (step 6)...
    logs = _train(cfg, sets, resume=True)
    assert any("[ift] resumed from" in m and "at step 6" in m for m in logs), logs
    # ... are made again exactly once: losses, weights and the skip list equal the straight run's
    _assert_same_losses(_rows(out / "ift"), _rows(ref / "ift"), rtol=1e-6, atol=1e-7)
    _assert_same_weights(out / "ift" / "final", ref / "ift" / "final", rtol=1e-6, atol=1e-7)
    assert sorted(map(_key, _skips(out / "ift"))) == sorted(map(_key, _skips(ref / "ift")))
    assert json.loads((out / "ift" / SUMMARY).read_text())["images_replaced"] == 5


@pytest.mark.slow
def test_ddp_on_dirty_data_matches_one_process(dirty, tmp_path):
    """torchrun 2 x batch 2 vs 1 x batch 4, IFT without a store: both ranks replace the same way."""
    cfg = _config(tmp_path, ("ift",))
    common = ["train.max_steps=4", "data.shuffle=true", "data.store=null"]
    single = tmp_path / "single"
    _train(cfg, _dsets(dirty, single, *common))
    ddp = tmp_path / "ddp"
    sets = _dsets(dirty, ddp, *common, "train.batch_size=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "olatrain", "run", str(cfg), *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    _assert_same_losses(_rows(ddp / "ift"), _rows(single / "ift"), rtol=1e-4, atol=1e-6)
    _assert_same_weights(ddp / "ift" / "final", single / "ift" / "final", rtol=1e-3, atol=1e-5)
    a = sorted((r["step"], r["id"], r["replaced_by"]) for r in _skips(single / "ift"))
    b = sorted((r["step"], r["id"], r["replaced_by"]) for r in _skips(ddp / "ift"))
    assert a == b and a, (a, b)


def test_bad_images_error_policy_refuses_before_step_1(dirty, tmp_path):
    out = tmp_path / "strict"
    cfg = _config(tmp_path, ("ift",))
    with pytest.raises(RunError) as e:
        _train(cfg, _dsets(dirty, out, "train.max_steps=1", "data.store=null", "data.bad_images=error"))
    msg = str(e.value)
    _one_line(msg)
    assert "5 image(s)" in msg and "data.bad_images=error" in msg and "bad-" in msg, msg
    assert not _rows(out / "ift")
    res, flat = _cli("run", cfg, *[x for s in _dsets(dirty, tmp_path / "cli", "train.max_steps=1",
                                                   "data.store=null", "data.bad_images=error")
                                   for x in ("--set", s)])
    assert res.exit_code != 0 and "data.bad_images=error" in flat and "Traceback" not in res.output, res.output


def test_wrong_image_root_is_refused_before_step_1(dirty, tmp_path):
    cfg = _config(tmp_path, ("ift",))
    (tmp_path / "empty").mkdir()
    sets = _dsets(dirty, tmp_path / "run", "train.max_steps=1", "data.store=null",
                  f"data.image_root={tmp_path / 'empty'}")
    with pytest.raises(RunError) as e:
        _train(cfg, sets)
    msg = str(e.value)
    _one_line(msg)
    assert "data.image_root" in msg and str(tmp_path / "empty" / "astronaut.jpg") in msg, msg


def test_data_errors_in_workers_are_one_line(dirty, tmp_path):
    """A sample the pipeline cannot make (its image placeholder beyond data.max_length) inside a DataLoader
    worker: the main process gets the dataset's message alone, and `olatrain run` one line."""
    from olatrain.config import load_run
    from olatrain.data import ConversationDataset, DataError, build_dataloader, load_image_processor
    from olatrain.presets import load_tokenizer

    samples = json.loads((EXAMPLES / "sample.json").read_text())[:4]
    samples[0]["conversations"] = [{"from": "human", "value": "word " * 3000}, {"from": "gpt", "value": "ok"},
                                   {"from": "human", "value": "<image>\nand this?"}, {"from": "gpt", "value": "ok"}]
    ann = tmp_path / "long.json"
    ann.write_text(json.dumps(samples))
    cfg = _config(tmp_path, ("ift",))
    sets = [f"data.annotations={ann}", f"data.image_root={EXAMPLES / 'images'}", "data.store=null",
            f"output_dir={tmp_path / 'run'}", "data.num_workers=1", "data.max_length=700", "data.shuffle=false",
            "train.batch_size=2", "train.max_steps=1"]
    c = load_run(cfg, sets).configs["ift"]
    ds = ConversationDataset(c, load_tokenizer(c), load_image_processor(c), None, [])
    loader = build_dataloader(ds, 2, shuffle=False, seed=0, rank=0, world_size=1, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    _one_line(str(e.value))
    assert "placeholder" in str(e.value) and "max_length" in str(e.value), str(e.value)
    with pytest.raises(RunError) as e:
        _train(cfg, sets)
    _one_line(str(e.value))
    assert str(e.value).startswith("[ift] step 1:") and "placeholder" in str(e.value)


# ----------------------------------------------------------------------------------------------- non-finite


def _corrupt_first_rows(store: str, teacher: str, rows: int) -> None:
    """Store NaN in the first rows of a column through zarr itself, so the chunk checksums (store format 2)
    stay valid: rows a checksum cannot catch (another tool or a buggy writer put them there; write_shard
    refuses non-finite rows). Those rows read back as NaN with status OK."""
    import zarr

    arr = zarr.open_array(str(Path(store) / teacher / "target"), mode="r+")
    arr[:rows] = np.full((rows, *arr.shape[1:]), np.nan, dtype=arr.dtype)


def test_corrupted_store_rows_are_masked_never_a_nan_step(dirty, tmp_path):
    """Corrupted rows are found in the batch fetch and trained as failed targets: every logged loss is
    finite and every step applied, and each masked row is listed."""
    from olacache.store import TargetReader

    store = tmp_path / "copy.zarr"
    shutil.copytree(dirty["store"], store)
    _corrupt_first_rows(str(store), "gen", 3)
    r = TargetReader(str(store), ["gen"])
    got, ok = r.fetch(r.image_paths)
    bad = [p for p, x, k in zip(r.image_paths, got["gen"], ok["gen"], strict=True) if k and not x.isfinite().all()]
    assert 1 <= len(bad) <= 3, bad
    out = tmp_path / "run"
    logs = _train(_config(tmp_path, ("pt",)), _dsets(dirty, out, "train.max_steps=4",
                                                      store=str(store)))
    rows = _rows(out / "pt")
    assert [x["step"] for x in rows] == list(range(1, 5))
    assert all(np.isfinite(x["loss"]) and np.isfinite(x["loss_gen"]) and "skipped_step" not in x for x in rows)
    recs = [x for x in _skips(out / "pt") if x["kind"] == "target"]
    assert recs and {x["image"] for x in recs} <= set(bad) and all(x["teacher"] == "gen" for x in recs), recs
    summary = json.loads((out / "pt" / SUMMARY).read_text())
    assert summary["target_rows_masked"] == len(recs) and summary["steps_not_applied"] == 0
    assert any("target row(s) masked" in m for m in logs), logs
    w = load_file(str(out / "pt" / "final" / ckpt.WEIGHTS))
    assert all(bool(v.isfinite().all()) for v in w.values())


def test_the_step_guard_catches_what_the_row_check_would_miss(dirty, tmp_path, monkeypatch):
    """Defence in depth: with the row check switched off, the NaN rows reach the loss, and the steps holding
    them are not applied (the weights stay finite) instead of training on NaN."""
    from olatrain.data import dataset as ds_mod

    store = tmp_path / "copy.zarr"
    shutil.copytree(dirty["store"], store)
    _corrupt_first_rows(str(store), "gen", 3)
    monkeypatch.setattr(ds_mod, "nonfinite_rows", lambda t: torch.zeros(t.shape[0], dtype=torch.bool))
    out = tmp_path / "run"
    _train(_config(tmp_path, ("pt",)), _dsets(dirty, out, "train.max_steps=4", store=str(store)))
    rows = _rows(out / "pt")
    skipped = [x["step"] for x in rows if x.get("skipped_step")]
    assert skipped and all(not np.isfinite(x["loss"]) for x in rows if x.get("skipped_step")), rows
    assert all(np.isfinite(x["loss"]) for x in rows if not x.get("skipped_step"))
    assert json.loads((out / "pt" / SUMMARY).read_text())["steps_not_applied"] == len(skipped)
    w = load_file(str(out / "pt" / "final" / ckpt.WEIGHTS))
    assert all(bool(v.isfinite().all()) for v in w.values())


def test_a_corrupted_shard_never_reaches_training_as_data(dirty, tmp_path, caplog):
    """A flipped byte in a shard file (here its crc-checked index) fails the store's checksums: the rows it
    holds are read as failed targets, named in a warning, and the run trains on without them; no step sees
    garbage and nothing non-finite is applied."""
    import logging

    store = tmp_path / "copy.zarr"
    shutil.copytree(dirty["store"], store)
    shard = next(p for p in (store / "gen" / "target" / "c").rglob("*") if p.is_file())
    _flip(shard, shard.stat().st_size - 6)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="olacache.store"):
        _train(_config(tmp_path, ("pt",)), _dsets(dirty, out, "train.max_steps=2", store=str(store)))
    assert any("treated as failed targets" in r.getMessage() for r in caplog.records), caplog.records
    rows = _rows(out / "pt")
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)
    w = load_file(str(out / "pt" / "final" / ckpt.WEIGHTS))
    assert all(bool(v.isfinite().all()) for v in w.values())


def _nan_on(steps: set[int], monkeypatch) -> None:
    """Make the model's loss NaN on the given (1-based) forward calls: a stand-in for any non-finite step."""
    from olatrain.model import OLAVLM

    real = OLAVLM.forward
    calls = {"n": 0}

    def forward(self, batch):
        out = real(self, batch)
        calls["n"] += 1
        if calls["n"] in steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(OLAVLM, "forward", forward)


def test_a_non_finite_step_is_not_applied(dirty, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_on({2}, monkeypatch)
    logs = _train(_config(tmp_path, ("pt",)), _dsets(dirty, out, "train.max_steps=3", "train.save_every=1"))
    rows = _rows(out / "pt")
    assert [x["step"] for x in rows] == [1, 2, 3] and rows[1].get("skipped_step") is True
    assert "skipped_step" not in rows[0] and "skipped_step" not in rows[2]
    steps = [x for x in _skips(out / "pt") if x["kind"] == "step"]
    assert [x["step"] for x in steps] == [2] and len(steps[0]["ids"]) == 4, steps
    assert any("step 2: non-finite" in m and "not applied" in m for m in logs), logs
    assert json.loads((out / "pt" / SUMMARY).read_text())["steps_not_applied"] == 1
    # the weights after step 2 are those after step 1: the NaN update never reached them
    _assert_same_weights(out / "pt" / "checkpoints" / "step_000002", out / "pt" / "checkpoints" / "step_000001")
    w = load_file(str(out / "pt" / "final" / ckpt.WEIGHTS))
    assert all(bool(v.isfinite().all()) for v in w.values())


def test_consecutive_non_finite_steps_stop_the_run(dirty, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_on(set(range(2, 100)), monkeypatch)
    sets = _dsets(dirty, out, "train.max_steps=10", "train.max_bad_steps=3")
    with pytest.raises(NonFiniteSteps) as e:
        _train(_config(tmp_path, ("pt",)), sets)
    msg = str(e.value)
    _one_line(msg)
    assert "3 steps in a row (2-4)" in msg and "likely cause" in msg and "olacache verify" in msg, msg
    assert "cap-" in msg  # names the samples of the last bad step
    assert isinstance(e.value, SystemExit) and e.value.code == msg  # exits 1 with the line when uncaught
    assert not (out / "pt" / "final").exists()
    assert [x["step"] for x in _skips(out / "pt") if x["kind"] == "step"] == [2, 3, 4]
    # through the command line: the line, no traceback, a failing exit status
    res, flat = _cli("run", _config(tmp_path, ("pt",)),
                     *[x for s in _dsets(dirty, tmp_path / "cli", "train.max_steps=10") for x in ("--set", s)])
    assert res.exit_code == 1 and "stepsinarow" in flat and "Traceback" not in res.output, res.output


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def clean(dirty, tmp_path_factory) -> dict:
    """A straight 4-step PT run and one stopped after 3 steps with a checkpoint at every step."""
    tmp = tmp_path_factory.mktemp("ck")
    cfg = _config(tmp, ("pt",))
    ref = tmp / "ref"
    _train(cfg, _dsets(dirty, ref, "train.max_steps=4"))
    stopped = tmp / "stopped"
    _train(cfg, _dsets(dirty, stopped, "train.max_steps=4", "train.save_every=1", "train.stop_after=3"))
    return {"cfg": cfg, "ref": ref, "stopped": stopped}


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": lambda d: (d / ckpt.WEIGHTS).write_bytes((d / ckpt.WEIGHTS).read_bytes()[:100]),
    "zero-byte weights": lambda d: (d / ckpt.WEIGHTS).write_bytes(b""),
    "garbage state": lambda d: (d / ckpt.STATE).write_text("{not json"),
    "deleted rng": lambda d: (d / ckpt.RNG).unlink(),
    "flipped tensor bytes": lambda d: _flip(d / ckpt.WEIGHTS, (d / ckpt.WEIGHTS).stat().st_size - 5),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(clean, dirty, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(clean["stopped"], run)
    latest = run / "pt" / "checkpoints" / "step_000003"
    assert ckpt.latest_checkpoint(run / "pt") == latest and ckpt.verify(latest) is None
    DAMAGE[damage](latest)
    assert ckpt.verify(latest) is not None
    logs = _train(clean["cfg"], _dsets(dirty, run, "train.max_steps=4", "train.save_every=1"), resume=True)
    assert any(f"checkpoint {latest} is damaged" in m for m in logs), logs
    assert any("resumed from" in m and "at step 2" in m for m in logs), logs
    _assert_same_losses(_rows(run / "pt"), _rows(clean["ref"] / "pt"), rtol=1e-6, atol=1e-7)
    _assert_same_weights(run / "pt" / "final", clean["ref"] / "pt" / "final", rtol=1e-6, atol=1e-7)


def test_resume_without_an_intact_checkpoint_is_one_line(clean, dirty, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clean["stopped"], run)
    for d in (run / "pt" / "checkpoints").glob("step_*"):
        (d / ckpt.WEIGHTS).write_bytes(b"")
    with pytest.raises(RunError) as e:
        _train(clean["cfg"], _dsets(dirty, run, "train.max_steps=4"), resume=True)
    _one_line(str(e.value))
    assert "no intact checkpoint" in str(e.value) and "model.safetensors" in str(e.value), str(e.value)


class _Payload:
    """Pickles to a call of os.system: what a planted checkpoint file would run under weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", [ckpt.OPTIM, ckpt.RNG])
def test_a_planted_pickle_is_refused_and_never_runs(clean, dirty, tmp_path, name):
    """Even with its manifest rewritten to match (checksums only catch accidents), the file is refused with one
    line by torch.load(weights_only=True), and its payload never runs."""
    run = tmp_path / "run"
    shutil.copytree(clean["stopped"], run)
    latest = run / "pt" / "checkpoints" / "step_000003"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, latest / name)
    ckpt._write_manifest(latest)
    assert ckpt.verify(latest) is None
    with pytest.raises(RunError) as e:
        _train(clean["cfg"], _dsets(dirty, run, "train.max_steps=4"), resume=True)
    msg = str(e.value)
    _one_line(msg)
    assert "refused to load" in msg and name in msg, msg
    assert not marker.exists()


def test_checkpoints_record_checksums_and_use_the_normal_file_mode(clean):
    d = clean["stopped"] / "pt" / "checkpoints" / "step_000003"
    files = json.loads((d / ckpt.MANIFEST).read_text())["files"]
    assert set(files) == {ckpt.WEIGHTS, ckpt.OPTIM, ckpt.RNG, ckpt.STATE}
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in files.values())
    umask = os.umask(0)
    os.umask(umask)
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
    # RNG and optimizer state load as plain tensors/containers
    rng = torch.load(d / ckpt.RNG, weights_only=True)
    assert isinstance(rng["numpy"]["keys"], torch.Tensor)
    ckpt.set_rng_state(rng)


def test_a_damaged_final_is_not_used_to_initialise_the_next_stage(straight, dirty, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight[0] / "pt", run / "pt")
    _flip(run / "pt" / "final" / ckpt.WEIGHTS, 200)
    with pytest.raises(RunError) as e:
        _train(_config(tmp_path, ("pt", "ift")), _dsets(dirty, run, *PT_IFT, "stages.ift.data.store=null"),
               resume=True)
    _one_line(str(e.value))
    assert "[ift] cannot initialise from" in str(e.value) and "sha256" in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------------- output_dir


def test_output_dir_inside_a_store_image_root_or_root_is_refused(dirty, tmp_path):
    cfg = _config(tmp_path, ("pt",))
    before = sorted(p.relative_to(dirty["store"]) for p in Path(dirty["store"]).rglob("*"))
    for out in (Path(dirty["store"]) / "gen" / "target", Path(dirty["store"]), dirty["images"] / "sub",
                Path("/")):
        with pytest.raises(RunError) as e:
            _train(cfg, _dsets(dirty, out, "train.max_steps=1"))
        _one_line(str(e.value))
        assert f"output_dir={out}" in str(e.value), str(e.value)
    assert sorted(p.relative_to(dirty["store"]) for p in Path(dirty["store"]).rglob("*")) == before
    assert not (dirty["images"] / "sub").exists()
    res, flat = _cli("run", cfg, *[x for s in _dsets(dirty, Path("/"), "train.max_steps=1") for x in ("--set", s)])
    # a refusal before step 1: exit 2 (a stop once training runs exits 1: test_consecutive_non_finite_steps_...)
    assert res.exit_code == 2 and "filesystemroot" in flat and "Traceback" not in res.output, res.output


# ----------------------------------------------------------------------------------------------- text


def test_text_is_bounded_before_tokenisation(dirty, tmp_path):
    """A 20 MB caption is cut to data.max_length * MAX_CHARS_PER_TOKEN characters before the tokenizer sees it,
    and the ids after truncation equal those of the uncut (moderately long) text."""
    from olatrain.config import load_run
    from olatrain.data import ConversationDataset, load_image_processor
    from olatrain.data.dataset import MAX_CHARS_PER_TOKEN
    from olatrain.data.templates import tokenize_conversation
    from olatrain.presets import load_tokenizer

    huge = "a cat sits on a mat. " * 1_000_000  # 21 MB
    samples = [{"id": "huge", "image": "chelsea.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": huge}]}]
    ann = tmp_path / "huge.json"
    ann.write_text(json.dumps(samples))
    cfg = load_run(_config(tmp_path, ("ift",)), [f"data.annotations={ann}", f"data.image_root={EXAMPLES / 'images'}",
                                                 "data.max_length=700"]).configs["ift"]
    tok = load_tokenizer(cfg)
    ds = ConversationDataset(cfg, tok, load_image_processor(cfg), None, [])
    assert ds.max_chars == 700 * MAX_CHARS_PER_TOKEN
    seen: list[int] = []
    real = tok.__call__

    class Spy:
        def __getattr__(self, k):
            return getattr(tok, k)

        def __call__(self, texts, **kw):
            seen.extend(len(t) for t in (texts if isinstance(texts, list) else [texts]))
            return real(texts, **kw)

    ds.tokenizer = Spy()
    item = ds[0]
    assert max(seen) <= ds.max_chars + 2000 and len(item["input_ids"]) <= 700, max(seen)
    # the cut changes nothing the token truncation keeps
    moderate = samples[0]["conversations"][:1] + [{"from": "gpt", "value": huge[: 3 * ds.max_chars]}]
    a, la = tokenize_conversation(moderate, tok, cfg.model.chat_template, has_image=True, max_chars=ds.max_chars)
    b, lb = tokenize_conversation(moderate, tok, cfg.model.chat_template, has_image=True)
    budget = 700 - ds.image_block + 1
    assert a[:budget] == b[:budget] and la[:budget] == lb[:budget]


def test_nonfinite_rows_reads_fp16_bits():
    from olatrain.data.skips import nonfinite_rows

    x = torch.zeros(6, 3, 4, dtype=torch.float16)
    x[1, 2, 3] = float("nan")
    x[2, 0, 0] = float("inf")
    x[3, 1, 1] = float("-inf")
    x[4] = 65504.0  # the largest finite fp16
    x[5] = -65504.0
    assert nonfinite_rows(x).tolist() == [False, True, True, True, False, False]
    assert nonfinite_rows(x.float()).tolist() == [False, True, True, True, False, False]
