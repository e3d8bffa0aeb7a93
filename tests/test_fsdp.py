"""train.parallel=fsdp (FSDP2 + DCP) on CPU with gloo, through the real entry points (torchrun, `olatrain run`):

- 2 ranks x batch 2 == 1 process x batch 4 (the same global batch), PT then IFT, losses and final weights;
- a sharded checkpoint saved by 2 ranks resumes in 1 process, and one saved by 1 process resumes on 2 ranks
  (N -> M, both ways), and the result equals the straight run;
- SIGKILL of both ranks inside a sharded save (shards and metadata written, not yet renamed into place) leaves
  the previous checkpoint as the one resumed, and the resumed run still equals the straight run;
- FSDP's final/ is the same consolidated safetensors format a DDP stage writes (IFT initialises from it; the
  equality of the IFT losses shows it loaded).

PT runs on a gen-only store (one cheap teacher); the reference is a plain single-process run (DDP path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT
from test_train import (
    GEN_ONLY,
    _assert_same_losses,
    _assert_same_weights,
    _build_store,
    _config,
    _env,
    _rows,
    _sets,
    _train,
)

from olatrain import checkpoint as ckpt
from olatrain import dcp

PT_STEPS, IFT_STEPS = 4, 2
COMMON = [*GEN_ONLY, f"stages.pt.train.max_steps={PT_STEPS}", f"stages.ift.train.max_steps={IFT_STEPS}",
          "train.grad_accum=1", "data.shuffle=true"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_no_leftover_group(one_torch_thread):
    yield
    if dist.is_initialized():  # the private one-rank group an in-process FSDP run creates
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url, summary = _build_store(tmp_path_factory.mktemp("store") / "store.zarr", ["gen"])
    assert not summary.failures
    return url


@pytest.fixture(scope="module")
def cfg2(tmp_path_factory) -> Path:
    return _config(tmp_path_factory.mktemp("cfg"), ("pt", "ift"))


@pytest.fixture(scope="module")
def single(store, cfg2, tmp_path_factory) -> Path:
    """The reference: one process, batch 4, PT then IFT, no checkpoints but final/."""
    out = tmp_path_factory.mktemp("single")
    _train(cfg2, _sets(store, out, *COMMON, "train.batch_size=4", "train.save_every=0"))
    return out


def _torchrun(config: Path, sets: list[str], nproc: int = 2, resume: bool = False) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "olatrain", "run", str(config), *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd + (["--resume"] if resume else []), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return res.stdout + res.stderr


@pytest.mark.slow
def test_fsdp_two_ranks_match_single_process_pt_and_ift(store, cfg2, single, tmp_path):
    out = tmp_path / "fsdp"
    # save_every=2: a sharded periodic checkpoint is written mid-stage too (and must not disturb the run)
    # gradient checkpointing on (the reference runs without): FSDP units and recomputation together
    log = _torchrun(cfg2, _sets(store, out, *COMMON, "train.batch_size=2", "train.parallel=fsdp",
                                "train.save_every=2", "train.grad_checkpointing=on"))
    assert "[pt] FSDP:" in log and "sharded over 2 rank(s)" in log  # really sharded, not a silent fallback
    for stage, n in (("pt", PT_STEPS), ("ift", IFT_STEPS)):
        a, b = _rows(single / stage), _rows(out / stage)
        assert len(b) == n
        _assert_same_losses(b, a, rtol=1e-4, atol=1e-6)
        _assert_same_weights(out / stage / "final", single / stage / "final", rtol=1e-3, atol=1e-5)
    # the periodic checkpoint is sharded (DCP), final/ is the consolidated safetensors every reader uses
    step2 = out / "pt" / "checkpoints" / "step_000002"
    assert dcp.is_complete(step2) and not (step2 / ckpt.WEIGHTS).exists()
    assert len(list(step2.glob("*.distcp"))) == 2  # one shard file per rank
    assert (out / "pt" / "final" / ckpt.WEIGHTS).is_file() and ckpt.is_done(out / "ift" / "final")


@pytest.mark.slow
def test_sharded_checkpoint_of_two_ranks_resumes_in_one_process(store, cfg2, single, tmp_path):
    out = tmp_path / "split"
    sets = _sets(store, out, *COMMON, "train.parallel=fsdp", "train.save_every=0")
    _torchrun(cfg2, [*sets, "train.batch_size=2", "stages.pt.train.stop_after=2"])
    assert dcp.latest_checkpoint(out / "pt") == out / "pt" / "checkpoints" / "step_000002"
    assert [r["step"] for r in _rows(out / "pt")] == [1, 2]
    # same global batch (1 x 4 instead of 2 x 2): DCP reshards the 2-rank shards onto one rank
    logs = _train(cfg2, [*sets, "train.batch_size=4"], resume=True)
    assert any("resumed from" in m and "at step 2" in m for m in logs), logs
    for stage in ("pt", "ift"):
        _assert_same_losses(_rows(out / stage), _rows(single / stage), rtol=1e-4, atol=1e-6)
        _assert_same_weights(out / stage / "final", single / stage / "final", rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_sharded_checkpoint_of_one_process_resumes_on_two_ranks(store, cfg2, single, tmp_path):
    out = tmp_path / "grow"
    sets = _sets(store, out, *COMMON, "train.parallel=fsdp", "train.save_every=0")
    _train(cfg2, [*sets, "train.batch_size=4", "stages.pt.train.stop_after=2"])
    assert dcp.latest_checkpoint(out / "pt") == out / "pt" / "checkpoints" / "step_000002"
    _torchrun(cfg2, [*sets, "train.batch_size=2"], resume=True)  # 1 -> 2 ranks, same global batch
    for stage in ("pt", "ift"):
        _assert_same_losses(_rows(out / stage), _rows(single / stage), rtol=1e-4, atol=1e-6)
        _assert_same_weights(out / stage / "final", single / stage / "final", rtol=1e-3, atol=1e-5)


def test_frozen_weights_are_stored_in_bf16_for_cuda_bf16_runs(cfg2):
    """train.precision bf16 on CUDA: frozen vision tower (every stage) and frozen LLM (PT) stored in bf16,
    trainable parameters fp32. cast_frozen only looks at the device TYPE, so this runs on CPU; a bf16-autocast
    step then trains the fp32 parameters through the bf16 frozen ones."""
    from olatrain.config import load_run
    from olatrain.data.templates import IMAGE_TOKEN_INDEX
    from olatrain.model import TargetSpec, build_model
    from olatrain.parallel import cast_frozen
    from olatrain.plan import plan_stage
    from olatrain.presets import load_tokenizer

    spec = load_run(cfg2, [*GEN_ONLY, "train.precision=bf16"])
    models = {}
    for stage in ("pt", "ift"):
        cfg = spec.configs[stage]
        targets = {"gen": TargetSpec((1, 24), "global")} if stage == "pt" else {}
        model = build_model(cfg, targets, tokenizer=load_tokenizer(cfg))
        model.set_stage(stage)
        cast_frozen(model, cfg, torch.device("cuda"))
        named = dict(model.named_parameters())
        assert all(p.dtype == torch.bfloat16 for n, p in named.items() if n.startswith("vision."))
        llm = {p.dtype for n, p in named.items() if n.startswith("llm.")}
        assert llm == ({torch.bfloat16} if stage == "pt" else {torch.float32})
        assert all(p.dtype == torch.float32 for p in named.values() if p.requires_grad)
        # the planner counts the same bytes for a CUDA bf16 run
        rows = plan_stage(cfg, 1, cuda=True, targets={"gen": (1, 24)} if stage == "pt" else None)
        assert rows[0].params == sum(p.numel() * p.element_size() for p in named.values())
        models[stage] = model
    model = models["pt"]  # bf16 frozen LLM and vision, fp32 projector: the gradient must reach the projector
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        asm = model.assemble(ids, torch.ones_like(ids), torch.zeros(1, 3, 336, 336), torch.tensor([True]))
        model.llm(inputs_embeds=asm.inputs_embeds).logits.float().sum().backward()
    assert model.projector[0].weight.grad is not None and model.projector[0].weight.grad.dtype == torch.float32


# loaded by every rank of the torchrun below (via PYTHONPATH): each rank SIGKILLs itself right after its 3rd
# sharded save returns, i.e. with all shards and DCP's metadata written but before rank 0 renames the directory
# into place or moves LATEST: the worst moment to die
DIE_AFTER_THIRD_SAVE = """
import os, signal
import torch.distributed.checkpoint as dcp
_real, _n = dcp.save, [0]
def _save(*a, **k):
    out = _real(*a, **k)
    _n[0] += 1
    if _n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
dcp.save = _save
"""


@pytest.mark.slow
def test_sigkill_during_sharded_save_on_two_ranks_keeps_previous(store, cfg2, single, tmp_path):
    out = tmp_path / "killed"
    sets = _sets(store, out, *COMMON, "train.parallel=fsdp", "train.save_every=1", "train.batch_size=2")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_AFTER_THIRD_SAVE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "olatrain", "run", str(cfg2), *[x for s in sets for x in ("--set", s)]]
    env = {**_env(), "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0  # killed
    ckdir = out / "pt" / "checkpoints"
    assert (ckdir / ".step_000003.tmp" / dcp.METADATA).is_file()  # the interrupted save's complete shards ...
    assert not (ckdir / "step_000003").exists()
    assert dcp.latest_checkpoint(out / "pt") == ckdir / "step_000002"  # ... are not a checkpoint
    _torchrun(cfg2, sets, resume=True)
    assert not (ckdir / ".step_000003.tmp").exists()  # the next save cleared the leftovers
    for stage in ("pt", "ift"):
        _assert_same_losses(_rows(out / stage), _rows(single / stage), rtol=1e-4, atol=1e-6)
        _assert_same_weights(out / stage / "final", single / stage / "final", rtol=1e-3, atol=1e-5)


def test_resume_across_formats_is_refused(store, cfg2, single, tmp_path):
    out = tmp_path / "mixed"
    sets = _sets(store, out, *COMMON, "train.batch_size=4", "train.save_every=0", "stages.pt.train.stop_after=1")
    _train(cfg2, sets)  # a DDP-format checkpoint at step 1
    with pytest.raises(SystemExit, match="train.parallel=ddp"):
        _train(cfg2, [*sets, "train.parallel=fsdp"], resume=True)


def test_parallel_setting_is_validated(cfg2):
    from olatrain.config import ConfigError, load_run

    assert load_run(cfg2, ["train.parallel=fsdp"]).configs["ift"].train.parallel == "fsdp"
    assert load_run(cfg2).configs["pt"].train.parallel == "ddp"  # the default keeps today's behaviour
    with pytest.raises(ConfigError, match="train.parallel must be 'ddp' or 'fsdp'"):
        load_run(cfg2, ["train.parallel=zero3"])
