"""One rank/world/device helper for the build and the trainer (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


@dataclass
class Runtime:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of each value (float64 on the wire)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}


def init_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment, pick the device (``cuda:LOCAL_RANK`` under ``auto``) and, with more than
    one process, join the process group (NCCL on CUDA, gloo on CPU). Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return Runtime(0, 1, local, dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(torch.distributed.get_rank(), world, local, dev)


def shutdown() -> None:
    """Leave the process group, if this process joined one. Called when a command ends: a gloo group left to
    the interpreter's exit can abort a rank ("terminate called without an active exception", seen under load)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
