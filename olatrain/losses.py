"""Embedding-distillation losses (docs/method.md §6), as pure functions with hand-checkable semantics.

Per teacher t and layer l:  L_{t,l} = smooth_l1 + c * InfoNCE,  and  L_t = w_t * sum_l L_{t,l}.

Deviations from the reference, all intentional:
* masking is per sample and real: the reference zeroes its masks in place (every embedding loss is 0, docs/method.md §11);
* smooth-L1 averages over the elements of VALID samples only; the reference multiplies masked samples by 0 but
  keeps them in the denominator, so its loss scale shrinks with the fraction of text-only samples in a batch;
* InfoNCE averages CE over valid local samples and removes invalid targets from every softmax; the reference
  computes mean(CE) * mean(mask) (a broadcasting quirk) and keeps invalid targets as negatives;
* unequal per-rank batch sizes are supported (padded to the max before the all-gather, padding masked out).

All reductions run in fp32 with autocast disabled: the similarities of 589k-d unit vectors are sums of many tiny
products and the softmax over the global batch must not run in bf16.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


def global_denominators(
    labels: torch.Tensor, masks: dict[str, torch.Tensor], ignore_index: int = -100
) -> dict[str, torch.Tensor] | None:
    """Under DDP, the denominator of every loss mean: the GLOBAL count / world instead of the local count.

    DDP averages gradients over ranks; with local means, ranks holding fewer supervised tokens (or fewer
    image samples) would weigh more than in a single process on the same global batch. With
    sum_local / (count_global / world) the rank average is exactly sum_global / count_global.
    Keys: "ce" (supervised next-token targets of ``labels``) and one per mask. None in a single process
    (plain local means). A collective: every rank calls it once per forward."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    keys = ["ce", *masks]
    counts = torch.stack([(labels[:, 1:] != ignore_index).sum(), *[m.sum() for m in masks.values()]]).double()
    dist.all_reduce(counts)  # stacked from tensors on labels.device, so already there
    world = dist.get_world_size()
    return {k: (c.clamp(min=1) / world).float() for k, c in zip(keys, counts, strict=True)}


def logit_scale(theta: torch.Tensor, max: float = 100.0) -> torch.Tensor:
    """exp(theta) clamped at ``max`` (no gradient to theta once clamped, as in the reference)."""
    return theta.float().exp().clamp(max=max)


def _no_autocast(t: torch.Tensor):
    dev = t.device.type
    if dev in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return nullcontext()


def _valid(mask: torch.Tensor, n: int) -> torch.Tensor:
    mask = mask.reshape(-1).bool()
    if mask.numel() != n:
        raise ValueError(f"mask has {mask.numel()} entries for a batch of {n}")
    return mask


def _zero_invalid(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Failed/text-only rows may hold NaN or garbage; 0 * NaN would still poison the sum and the gradient.
    keep = mask.view(-1, *([1] * (target.dim() - 1)))
    return torch.where(keep, target, torch.zeros((), dtype=target.dtype, device=target.device))


def masked_smooth_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 1.0,
    *,
    denom: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean smooth-L1 over all elements of the valid samples (``mask`` (B,) bool); 0 when none is valid.

    ``denom`` replaces the local count of valid samples (the model passes global count / world under DDP, so
    the rank-averaged gradient equals one process's on the global batch). The zero keeps the graph (it is
    ``0 * sum``), so every rank of a DDP job runs the same backward."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    b = pred.shape[0]
    m = _valid(mask, b).to(pred.device)
    with _no_autocast(pred):
        p = pred.float()
        y = _zero_invalid(target.to(p.device).float(), m)
        per_elem = F.smooth_l1_loss(p, y, reduction="none", beta=beta)
        per_sample = per_elem.reshape(b, -1).mean(dim=1)
        per_sample = torch.where(m, per_sample, torch.zeros((), device=p.device))
        return per_sample.sum() / (m.sum().clamp(min=1) if denom is None else denom)


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Differentiable all-gather of (b_r, ...) rows with unequal b_r: pad to max, gather, concat (W*max, ...)."""
    from torch.distributed.nn.functional import all_gather

    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])], dim=0)
    with warnings.catch_warnings():
        # torch >= 2.x flags it as deprecated in favour of a private module; it is still the public,
        # differentiable all-gather (backward sums the gradients of every rank's copy)
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0)


def info_nce(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather: bool = True,
    denom: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """One-directional InfoNCE (pred -> target) over the global batch.

    p_i = normalize(flatten(pred_i)), y_j = normalize(flatten(target_j)) over all targets of all ranks (gathered
    with a differentiable all-gather when torch.distributed is initialised, world > 1 and ``gather``);
    logits_ij = scale * p_i . y_j; invalid target columns are removed from the softmax; label of local sample i
    = its own target's column. Returns the mean CE over valid local samples (0, graph intact, if none).

    Every rank must call this the same number of times in the same order (it is a collective)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    b = pred.shape[0]
    m = _valid(mask, b).to(pred.device)
    rank, world = _dist_world()
    with _no_autocast(pred):
        p = F.normalize(pred.reshape(b, -1).float(), dim=-1)
        # the raw target (fp16 in the store) is what crosses the wire: half the bytes of normalised fp32, and
        # every rank then normalises exactly as a single process would
        y_local = _zero_invalid(target.to(pred.device), m).reshape(b, -1)
        if gather and world > 1:
            sizes_t = torch.tensor([b], device=pred.device, dtype=torch.long)
            all_sizes = [torch.zeros_like(sizes_t) for _ in range(world)]
            dist.all_gather(all_sizes, sizes_t)
            sizes = [int(s.item()) for s in all_sizes]
            y_all = _gather_rows(y_local, sizes)
            m_all = _gather_rows(m.to(torch.uint8), sizes).bool()
            mx = max(sizes)
            row = torch.arange(mx, device=pred.device)
            real = torch.cat([row < s for s in sizes])  # padding rows are never targets
            m_all = m_all & real
            offset = rank * mx
        else:
            y_all, m_all, offset = y_local, m, 0
        y = F.normalize(y_all.float(), dim=-1)
        scale = logit_scale if isinstance(logit_scale, torch.Tensor) else torch.tensor(float(logit_scale))
        logits = scale.float().to(p.device) * (p @ y.t())  # (b, N_all)
        # exp(finfo.min - max) underflows to exactly 0, so this equals -inf masking without NaN when a whole row
        # is masked (no valid target anywhere); such rows are then dropped by the local mask below.
        logits = logits.masked_fill(~m_all[None, :], torch.finfo(logits.dtype).min)
        labels = torch.arange(b, device=p.device) + offset
        ce = F.cross_entropy(logits, labels, reduction="none")
        ce = torch.where(m, ce, torch.zeros((), device=p.device))
        return ce.sum() / (m.sum().clamp(min=1) if denom is None else denom)


class EmbeddingLoss(NamedTuple):
    total: torch.Tensor  # sl1 + contrastive_weight * nce
    sl1: torch.Tensor
    nce: torch.Tensor


def embedding_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
    contrastive_weight: float = 0.3,
    beta: float = 1.0,
    gather: bool = True,
    denom: torch.Tensor | float | None = None,
) -> EmbeddingLoss:
    """One (teacher, layer) term: ``total = smooth_l1 + contrastive_weight * InfoNCE`` (``logit_scale`` is the
    scale itself, e.g. ``logit_scale(theta, max)``). InfoNCE is skipped when its weight is 0 — identically on every
    rank, since the weight is config."""
    sl1 = masked_smooth_l1(pred, target, mask, beta=beta, denom=denom)
    if contrastive_weight:
        nce = info_nce(pred, target, mask, logit_scale, gather=gather, denom=denom)
    else:
        nce = torch.zeros((), device=sl1.device)
    return EmbeddingLoss(sl1 + contrastive_weight * nce, sl1, nce)
