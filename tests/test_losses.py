"""Embedding losses against hand-computed values, masking semantics, and the cross-rank InfoNCE gather."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olatrain.losses import embedding_loss, info_nce, logit_scale, masked_smooth_l1
from olatrain.model.predictors import TaskTokenResampler

# ----------------------------------------------------------------------------------------------- logit scale


def test_logit_scale_exp_and_clamp():
    theta = torch.tensor(2.0, requires_grad=True)
    s = logit_scale(theta, 100.0)
    assert s.item() == pytest.approx(math.exp(2.0))
    s.backward()
    assert theta.grad.item() == pytest.approx(math.exp(2.0))  # d exp = exp

    theta = torch.tensor(5.0, requires_grad=True)  # exp(5) = 148 > 100
    s = logit_scale(theta, 100.0)
    assert s.item() == 100.0
    s.backward()
    assert theta.grad.item() == 0.0  # clamped: no gradient, as in the reference


# ----------------------------------------------------------------------------------------------- smooth-L1


def _sl1(x: float, beta: float) -> float:
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def test_smooth_l1_hand_values_and_beta():
    pred = torch.tensor([[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]])
    target = torch.zeros(3, 2)
    mask = torch.tensor([True, True, False])
    # beta 1: |0|->0, |2|->1.5, |1|->0.5, |-1|->0.5 ; mean over the 4 elements of the 2 valid samples
    assert masked_smooth_l1(pred, target, mask, beta=1.0).item() == pytest.approx((0 + 1.5 + 0.5 + 0.5) / 4)
    # beta 2: 0, 2-1=1, 0.5*1/2=0.25, 0.25
    assert masked_smooth_l1(pred, target, mask, beta=2.0).item() == pytest.approx((0 + 1 + 0.25 + 0.25) / 4)
    # general formula check with non-zero targets
    target2 = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    exp = (_sl1(-0.5, 0.7) + _sl1(2.0, 0.7) + _sl1(1.0, 0.7) + _sl1(-1.0, 0.7)) / 4
    assert masked_smooth_l1(pred, target2, mask, beta=0.7).item() == pytest.approx(exp)


def test_smooth_l1_masked_sample_is_excluded_from_denominator_and_nan_safe():
    pred = torch.tensor([[1.0, 1.0], [3.0, 3.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [float("nan"), float("inf")]])  # failed row: garbage
    loss = masked_smooth_l1(pred, target, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(0.5)  # not 0.25: the reference would divide by all 4 elements
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[1].abs().sum() == 0


def test_smooth_l1_no_valid_sample_is_zero_with_graph():
    pred = torch.randn(2, 3, requires_grad=True)
    loss = masked_smooth_l1(pred, torch.randn(2, 3), torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------- InfoNCE


def _norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _hand_nce(pred, target, mask, scale):
    p = [_norm(v) for v in pred]
    y = [_norm(v) for v in target]
    losses = []
    for i in range(len(p)):
        if not mask[i]:
            continue
        logits = [
            scale * sum(a * b for a, b in zip(p[i], y[j], strict=True)) for j in range(len(y)) if mask[j]
        ]
        own = scale * sum(a * b for a, b in zip(p[i], y[i], strict=True))
        lse = math.log(sum(math.exp(x) for x in logits))
        losses.append(lse - own)
    return sum(losses) / len(losses)


def test_info_nce_hand_values():
    pred = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    target = [[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]]
    s, r = 7.0, 1 / math.sqrt(2)
    # normalised: p = (1,0), (0,1), (r,r); y = (1,0), (r,r), (0,1)
    # dots p_i.y_j: row0 [1, r, 0], row1 [0, r, 1], row2 [r, 1, r]; the label of row i is column i
    e = math.exp
    ce0 = math.log(e(s) + e(s * r) + e(0)) - s
    ce1 = math.log(e(0) + e(s * r) + e(s)) - s * r
    ce2 = math.log(e(s * r) + e(s) + e(s * r)) - s * r
    got = info_nce(torch.tensor(pred), torch.tensor(target), torch.ones(3, dtype=torch.bool), s, gather=False)
    assert got.item() == pytest.approx((ce0 + ce1 + ce2) / 3, rel=1e-5)
    assert got.item() == pytest.approx(_hand_nce(pred, target, [1, 1, 1], s), rel=1e-5)
    # sample 2 invalid: its row is dropped AND its column leaves every softmax
    two = info_nce(torch.tensor(pred), torch.tensor(target), torch.tensor([1, 1, 0]).bool(), s, gather=False)
    ce0_two = math.log(e(s) + e(s * r)) - s
    ce1_two = math.log(e(0) + e(s * r)) - s * r
    assert two.item() == pytest.approx((ce0_two + ce1_two) / 2, rel=1e-5)
    # only sample 0 valid: only its own column remains -> CE = 0
    one = info_nce(torch.tensor(pred), torch.tensor(target), torch.tensor([1, 0, 0]).bool(), s, gather=False)
    assert one.item() == pytest.approx(0.0, abs=1e-6)


def test_info_nce_invalid_columns_excluded_and_no_valid_is_zero():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 5, requires_grad=True)
    target = torch.randn(3, 4, 5)
    mask = torch.tensor([True, False, True])
    got = info_nce(pred, target, mask, 10.0, gather=False)
    ref = info_nce(pred[[0, 2]], target[[0, 2]], torch.ones(2, dtype=torch.bool), 10.0, gather=False)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    # garbage in an invalid target never matters
    target_bad = target.clone()
    target_bad[1] = float("nan")
    assert info_nce(pred, target_bad, mask, 10.0, gather=False).item() == pytest.approx(got.item(), rel=1e-6)
    none = info_nce(pred, target, torch.zeros(3, dtype=torch.bool), 10.0, gather=False)
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_info_nce_scale_gradient_flows():
    theta = torch.tensor(2.0, requires_grad=True)
    pred, target = torch.randn(3, 8), torch.randn(3, 8)
    info_nce(pred, target, torch.ones(3, dtype=torch.bool), logit_scale(theta), gather=False).backward()
    assert theta.grad is not None and theta.grad.item() != 0.0


def test_embedding_loss_total():
    torch.manual_seed(1)
    pred, target = torch.randn(4, 6, 3), torch.randn(4, 6, 3).half()
    mask = torch.tensor([True, True, False, True])
    out = embedding_loss(pred, target, mask, 7.0, contrastive_weight=0.3, beta=1.0, gather=False)
    assert out.sl1.item() == pytest.approx(masked_smooth_l1(pred, target, mask).item())
    assert out.nce.item() == pytest.approx(info_nce(pred, target, mask, 7.0, gather=False).item())
    assert out.total.item() == pytest.approx(out.sl1.item() + 0.3 * out.nce.item())
    total, sl1, nce = embedding_loss(pred, target, mask, 7.0, 0.0, 1.0, False)
    assert nce.item() == 0.0 and total.item() == pytest.approx(sl1.item())


# ----------------------------------------------------------------------------------------------- 2-rank gather


def _make_data(sizes: list[int]):
    g = torch.Generator().manual_seed(123)
    preds = [torch.randn(n, 6, 4, generator=g) for n in sizes]
    targets = [torch.randn(n, 6, 4, generator=g) for n in sizes]
    masks = [torch.rand(n, generator=g) > 0.25 for n in sizes]
    masks[0][0] = True
    masks[1][-1] = False  # an invalid sample on rank 1
    return preds, targets, masks


def _worker(rank: int, world: int, init_file: str, out_dir: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        preds, targets, masks = _make_data(sizes)
        pred = preds[rank].clone().requires_grad_(True)
        target = targets[rank].clone().requires_grad_(True)  # exercises the differentiable all-gather
        loss = info_nce(pred, target, masks[rank], 5.0, gather=True)
        n_valid = int(masks[rank].sum())
        (loss * n_valid).backward()  # sum of per-sample CE over this rank
        torch.save(
            {"loss": loss.detach(), "pred_grad": pred.grad, "target_grad": target.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        # every rank finishes its collectives before teardown (gloo can abort on a peer that already left)
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 3], [3, 2]])
def test_info_nce_gathered_matches_single_process(tmp_path, sizes):
    mp.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), sizes), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    preds, targets, masks = _make_data(sizes)
    pred = torch.cat(preds).requires_grad_(True)
    target = torch.cat(targets).requires_grad_(True)
    mask = torch.cat(masks)
    # single process, whole global batch: per-sample CE over all valid targets
    total = info_nce(pred, target, mask, 5.0, gather=False) * int(mask.sum())
    total.backward()
    dist_total = sum(r["loss"] * int(m.sum()) for r, m in zip(res, masks, strict=True))
    assert dist_total.item() == pytest.approx(total.item(), rel=1e-5)
    offs = [0, sizes[0]]
    for r in range(2):
        sl = slice(offs[r], offs[r] + sizes[r])
        torch.testing.assert_close(res[r]["pred_grad"], pred.grad[sl], rtol=1e-5, atol=1e-6)
        # target gradients: summed over ranks by the all-gather's backward == single-process gradient
        torch.testing.assert_close(res[r]["target_grad"], target.grad[sl], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- predictor


def test_resampler_shapes():
    torch.manual_seed(0)
    spatial = TaskTokenResampler(16, 16, 24)  # depth-style: dim = H
    out = spatial(torch.randn(2, 30, 16), torch.randn(36, 16))
    assert out.shape == (2, 36, 24)
    glob = TaskTokenResampler(16, 8, 8)  # gen-style: dim = target, one pooled query per sample
    assert glob(torch.randn(2, 30, 16), torch.randn(2, 1, 16)).shape == (2, 1, 8)
    # no biases anywhere in attention / FF, as specified
    for name, _p in spatial.named_parameters():
        if name.startswith(("attn.to_", "ff.fc")):
            assert name.endswith("weight")


def test_resampler_padding_invariance():
    torch.manual_seed(0)
    m = TaskTokenResampler(16, 32, 12).eval()
    x = torch.randn(2, 10, 16)
    q = torch.randn(5, 16)
    ref = m(x, q, torch.ones(2, 10, dtype=torch.bool))
    garbage = torch.randn(2, 7, 16) * 100
    x_pad = torch.cat([x, garbage], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 7)], dim=1).bool()
    torch.testing.assert_close(m(x_pad, q, mask), ref, rtol=1e-5, atol=1e-5)
    # without the mask the garbage does change the output (the reference's behaviour)
    assert not torch.allclose(m(x_pad, q), ref, atol=1e-3)
    # interleaved padding is also ignored
    x_mix = torch.cat([garbage[:, :3], x[:, :4], garbage[:, 3:], x[:, 4:]], dim=1)
    m_mix = torch.cat(
        [torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, 4), torch.ones(2, 6)], dim=1
    ).bool()
    torch.testing.assert_close(m(x_mix, q, m_mix), ref, rtol=1e-5, atol=1e-5)
