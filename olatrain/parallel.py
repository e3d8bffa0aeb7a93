"""Data parallelism for a stage: DDP (every rank holds the whole model) or FSDP2 (``fully_shard``: parameters,
gradients and AdamW states sharded across ranks), chosen by ``train.parallel``.

FSDP units (each all-gathered just before it computes and freed after): every LLM decoder block, the input
embedding, the LM head, the final norm, each PT predictor, and the root (projector, task tokens, logit scales,
and anything else of the LLM). The units are chosen so that every module olatrain calls directly outside the
LLM's forward (the embedding in ``assemble``, the LM head in ``_ce``) is a unit of its own, and so each unit holds one dtype
(frozen bf16 vs trainable fp32 never share a unit). The frozen vision tower is not sharded (``ignored_params``):
it has no gradients or optimizer state, and it is small next to the LLM.

On CUDA with bf16 precision, FSDP computes in bf16 and reduce-scatters gradients in bf16 (MixedPrecisionPolicy;
sharded fp32 masters stay fp32), and frozen weights (the vision tower; the LLM in PT) are STORED in bf16
(:func:`cast_frozen`), which halves their memory. CPU runs (the tests) stay fp32 throughout.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

PARALLEL = ("ddp", "fsdp")


def frozen_dtype(cfg: Any, device_type: str) -> torch.dtype:
    """Storage dtype of frozen weights: bf16 on CUDA when the run computes in bf16, else fp32."""
    if device_type == "cuda" and cfg.train.precision in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float32


def cast_frozen(model: nn.Module, cfg: Any, device: torch.device) -> None:
    """Store the frozen vision tower, and in PT the frozen LLM, in :func:`frozen_dtype`. Trainable parameters (and
    so the optimizer state) stay fp32. A no-op on CPU."""
    dt = frozen_dtype(cfg, device.type)
    if dt == torch.float32:
        return
    model.vision.to(dt)
    if cfg.train.stage == "pt" and not any(p.requires_grad for p in model.llm.parameters()):
        model.llm.to(dt)


def ensure_process_group(rt: Any) -> None:
    """FSDP needs a process group even for one process (a plain `olatrain run`): a private one-rank group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def shard(model: nn.Module, cfg: Any, rt: Any) -> nn.Module:
    """Apply FSDP2 in place (before the optimizer is built: parameters become sharded DTensors)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(rt)
    _scalars_to_1d(model)
    mp = MixedPrecisionPolicy()
    if rt.device.type == "cuda" and cfg.train.precision in ("auto", "bf16"):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    # the root receives the batch dict (pixels, fp32 targets): leave it as the loader made it
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)
    llm = model.llm
    for block in model.decoder_layers:
        fully_shard(block, mp_policy=mp)
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if head is not None and head.weight is emb.weight:  # tied: one unit, one copy
        fully_shard([emb, head], mp_policy=mp)
    else:
        fully_shard(emb, mp_policy=mp)
        if head is not None:
            fully_shard(head, mp_policy=mp)
    if model.final_norm is not None:
        # its own unit: OLAVLM also registers it (and the blocks) under its own names, and a module reachable
        # from the root that is not a unit would be claimed by the root a second time
        fully_shard(model.final_norm, mp_policy=mp)
    for per_layer in model.predictors.values():
        for pred in per_layer.values():
            fully_shard(pred, mp_policy=mp)
    fully_shard(model, mp_policy=root_mp, ignored_params=set(model.vision.parameters()))
    model.no_sync = lambda: _no_sync(model)  # the loop's gradient-accumulation context, DDP's name
    return model


def _scalars_to_1d(model: nn.Module) -> None:
    """FSDP2 cannot shard 0-d parameters (the per-teacher logit scales): make them 1-element vectors, same
    values, same math (they broadcast). Their names are kept so checkpoints get the 0-d shape back
    (:func:`restore_scalar_shapes`), keeping final/ identical in format to a DDP run's."""
    names = []
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.dim() == 0:
                setattr(mod, pname, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                names.append(f"{mod_name}.{pname}" if mod_name else pname)
    model._fsdp_scalars = set(names)


def restore_scalar_shapes(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = getattr(model, "_fsdp_scalars", set())
    return {k: (v.reshape(()) if k in names else v) for k, v in sd.items()}


@contextlib.contextmanager
def _no_sync(model: Any) -> Iterator[None]:
    """FSDP2's equivalent of DDP.no_sync: accumulate unsharded gradients locally, reduce on the last micro-step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def wrap_ddp(model: nn.Module, rt: Any) -> nn.Module:
    """The DDP wrapper of a multi-process run (the model itself for one process)."""
    if not rt.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def describe(model: nn.Module) -> str:
    """One line for the log: units and world size (e.g. "9 units sharded over 2 ranks")."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return f"{len(units)} units sharded over {world} rank(s), vision tower replicated"


def is_sharded(cfg: Any) -> bool:
    return getattr(cfg.train, "parallel", "ddp") == "fsdp"
