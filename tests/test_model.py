"""The MLLM on tiny presets: token layout, hooks, stages, gradients, losses, generation, checkpoints. CPU, offline.

The preset cache is the shared one set up by conftest.py (OLAKIT_CACHE; presets are deterministic)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from olatrain.config import Config
from olatrain.data import load_image_processor
from olatrain.generate import generate_ids
from olatrain.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OLAVLM, VisionEncoder, build_model
from olatrain.presets import (
    MARKER,
    TINY_LAYERS,
    load_tokenizer,
    resolve,
    scale_layers,
    tiny_llm_dir,
    tiny_tokenizer_dir,
    tiny_vision_dir,
)

# Spatial targets are 64 tokens here (real stores: 576 = 24x24) only to keep the CPU tests fast; the image
# block keeps the real CLIP geometry (576 patches).
SPATIAL = 64
SHAPES = {"depth": (SPATIAL, 16), "seg": (SPATIAL, 24), "gen": (1, 8)}
N_IMG = 576


def make_cfg(stage: str = "pt", task_tokens: dict[str, int] | None = None, **layers: list[int]) -> Config:
    cfg = Config()
    cfg.train.stage = stage
    cfg.model.layers = {**copy.deepcopy(TINY_LAYERS), **layers}
    cfg.model.task_tokens = dict(task_tokens or {"gen": 8, "depth": 8, "seg": 8})
    cfg.model.spatial_queries = SPATIAL
    return cfg


def make_model(stage: str = "pt", task_tokens: dict[str, int] | None = None, seed: int = 0, **kw) -> OLAVLM:
    torch.manual_seed(seed)
    return build_model(make_cfg(stage, task_tokens, **kw), SHAPES if stage == "pt" else None)


def make_batch(seed: int = 0) -> dict:
    """3 samples: image at position 3 (long text), image at position 1 (padded), text-only (padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (3, 9), generator=g)
    ids[:, 0] = 0  # BOS
    ids[0, 3] = IMAGE_TOKEN_INDEX
    ids[1, 1] = IMAGE_TOKEN_INDEX
    att = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 5 + [0] * 4])
    ids[att == 0] = 5  # pad id
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    labels[att == 0] = IGNORE_INDEX
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    has_image = torch.tensor([True, True, False])
    return {
        "input_ids": ids,
        "attention_mask": att,
        "labels": labels,
        "pixel_values": torch.randn(3, 3, 336, 336, generator=g) * has_image[:, None, None, None],
        "has_image": has_image,
        "targets": {t: torch.randn(3, *s, generator=g).half() for t, s in SHAPES.items()},
        "target_mask": {t: has_image.clone() for t in SHAPES},
    }


# ----------------------------------------------------------------------------------------------- presets


def test_presets_are_local_real_classes():
    for d in (tiny_tokenizer_dir(), tiny_vision_dir(), tiny_llm_dir()):
        assert json.loads((d / MARKER).read_text()) == {"preset": "tiny", "random_init": True}
    assert resolve("llm", "tiny") == str(tiny_llm_dir())
    assert resolve("llm", "meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_llm_dir()).model_type == "llama"
    vc = AutoConfig.from_pretrained(tiny_vision_dir())
    assert (vc.image_size, vc.patch_size) == (336, 14)

    tok = load_tokenizer(make_cfg())
    assert len(tok) == AutoConfig.from_pretrained(tiny_llm_dir()).vocab_size
    assert (
        tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>" and tok.pad_token == "<|pad|>"
    )
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    proc = load_image_processor(make_cfg())
    from PIL import Image

    px = proc(Image.new("RGB", (500, 400)), return_tensors="pt")["pixel_values"]
    assert tuple(px.shape) == (1, 3, 336, 336)


def test_scale_layers():
    assert scale_layers({"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}, 6) == {
        "depth": [2, 4],
        "seg": [2, 3],
        "gen": [2, 4],
    }
    assert scale_layers({"x": [1, 2, 32]}, 4) == {"x": [1, 4]}  # clamp to >= 1, dedupe


def test_layer_beyond_depth_is_an_error():
    with pytest.raises(ValueError, match="outside 1..6"):
        build_model(make_cfg(depth=[8, 20]), SHAPES)


# ----------------------------------------------------------------------------------------------- layout


def test_token_layout_positions_labels_and_embeddings():
    model = make_model(task_tokens={"gen": 2, "depth": 4, "seg": 0})  # seg: loss but no tokens
    assert model.token_order == ["gen", "depth"]
    b = make_batch()
    asm = model.assemble(b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"], b["labels"])
    lay = asm.layout
    k = N_IMG + 6
    assert lay.image_start.tolist() == [3, 1, 0]
    assert lay.image_end.tolist() == [3 + N_IMG, 1 + N_IMG, 0]
    assert [x.tolist() for x in lay.spans["gen"]] == [
        [3 + N_IMG, 1 + N_IMG, 0],
        [3 + N_IMG + 2, 1 + N_IMG + 2, 0],
    ]
    assert [x.tolist() for x in lay.spans["depth"]] == [
        [3 + N_IMG + 2, 1 + N_IMG + 2, 0],
        [3 + N_IMG + 6, 1 + N_IMG + 6, 0],
    ]
    s, e = lay.spans["seg"]
    assert (e - s).tolist() == [0, 0, 0]
    assert lay.text_start.tolist() == [3 + k, 1 + k, 0]
    assert lay.valid_len.tolist() == [9 - 1 + k, 6 - 1 + k, 5]
    assert asm.inputs_embeds.shape[1] == 9 - 1 + k
    assert lay.block_ok.tolist() == [True, True, False]
    assert asm.attention_mask.sum(1).tolist() == lay.valid_len.tolist()

    block = model.task_token_block()
    tt = model.task_tokens
    torch.testing.assert_close(block[:2], tt["gen"])
    torch.testing.assert_close(block[2:], tt["depth"].view(4, SPATIAL // 4, -1).mean(1))
    emb = model.llm.get_input_embeddings()
    for i, p in enumerate([3, 1]):
        n = int(b["attention_mask"][i].sum())
        e_i = asm.inputs_embeds[i]
        torch.testing.assert_close(e_i[:p], emb(b["input_ids"][i, :p]))
        torch.testing.assert_close(e_i[p : p + N_IMG], asm.image_features[i])
        torch.testing.assert_close(e_i[p + N_IMG : p + k], block)
        torch.testing.assert_close(e_i[p + k : p + k + n - p - 1], emb(b["input_ids"][i, p + 1 : n]))
        assert (asm.labels[i, p : p + k] == IGNORE_INDEX).all()
        assert torch.equal(asm.labels[i, :p], b["labels"][i, :p])
        assert torch.equal(asm.labels[i, p + k : p + k + n - p - 1], b["labels"][i, p + 1 : n])
        assert (asm.labels[i, lay.valid_len[i] :] == IGNORE_INDEX).all()
    # text-only: untouched, then padding
    torch.testing.assert_close(asm.inputs_embeds[2, :5], emb(b["input_ids"][2, :5]))
    assert (asm.inputs_embeds[2, 5:] == 0).all() and (asm.labels[2, 5:] == IGNORE_INDEX).all()


def test_layout_without_task_tokens_and_truncation():
    model = make_model(task_tokens={"gen": 0, "depth": 0, "seg": 0})
    assert model.token_order == [] and model.task_token_block().shape[0] == 0
    assert (
        "gen" not in model.task_tokens
    )  # no gen parameter; depth/seg params still exist as predictor queries
    b = make_batch()
    asm = model.assemble(b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"], b["labels"])
    assert torch.equal(asm.layout.text_start, asm.layout.image_end)
    # a forward still works (gen query falls back to the mean of the image-token states)
    out = model(b)
    assert torch.isfinite(out["loss"]) and out["loss_gen"] > 0

    model = make_model(task_tokens={"gen": 2, "depth": 4, "seg": 4})
    cut = (
        1 + N_IMG + 10 + 1
    )  # cuts sample 0 inside its task-token block (ends at 589); sample 1 keeps its (587)
    asm = model.assemble(
        b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"], b["labels"], max_length=cut
    )
    assert asm.inputs_embeds.shape[1] == cut
    assert asm.layout.valid_len.tolist() == [cut, cut, 5]
    assert asm.layout.block_ok.tolist() == [False, True, False]


def test_bad_image_token_counts_are_errors():
    model = make_model(stage="ift")
    b = make_batch()
    with pytest.raises(ValueError, match="exactly one"):
        model.assemble(
            b["input_ids"], b["attention_mask"], b["pixel_values"], torch.tensor([True, True, True])
        )
    att = b["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model.assemble(b["input_ids"], att, b["pixel_values"], b["has_image"])


def test_predictor_index_excludes_other_task_tokens_and_padding():
    model = make_model(task_tokens={"gen": 2, "depth": 4, "seg": 4})
    b = make_batch()
    asm = model.assemble(b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"], b["labels"])
    lay, seq = asm.layout, asm.inputs_embeds.shape[1]
    for t in ("gen", "depth", "seg"):
        pos, mask = model.predictor_index(lay, t, seq)
        for i in range(3):
            s, e = int(lay.spans[t][0][i]), int(lay.spans[t][1][i])
            expect = (
                list(range(int(lay.image_end[i])))
                + list(range(s, e))
                + list(range(int(lay.text_start[i]), int(lay.valid_len[i])))
            )
            assert pos[i][mask[i]].tolist() == expect
    # gen query = mean of the layer's states at the gen task-token positions; depth/seg = the raw parameter
    hs = torch.randn(3, seq, model.hidden_size)
    q = model._queries("gen", hs, lay)
    for i in range(2):
        s, e = int(lay.spans["gen"][0][i]), int(lay.spans["gen"][1][i])
        torch.testing.assert_close(q[i, 0], hs[i, s:e].mean(0))
    assert model._queries("depth", hs, lay) is model.task_tokens["depth"]


# ----------------------------------------------------------------------------------------------- hooks


def test_hooks_capture_exactly_hidden_states():
    model = make_model()
    b = make_batch()
    asm = model.assemble(b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"], b["labels"])
    layers = [1, 3, 5, model.n_layers]  # the last one is HF's post-final-norm hidden_states[n]
    with torch.no_grad():
        with model.capture_hidden_states(layers) as hs:
            model.llm.base_model(inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask)
        ref = model.llm.base_model(
            inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask, output_hidden_states=True
        ).hidden_states
    assert sorted(hs) == layers
    for layer in layers:
        assert torch.equal(hs[layer], ref[layer]), layer
    # ours are removed on exit (HF installs its own output-capturing hooks lazily and keeps them)
    count = lambda: sum(len(m._forward_hooks) for m in model.llm.modules())  # noqa: E731
    after = count()
    with model.capture_hidden_states(layers):
        assert count() == after + len(layers)
    assert count() == after


# ----------------------------------------------------------------------------------------------- stages


def test_stage_trainable_sets_and_checkpoint_content():
    model = make_model()
    tops = lambda names: {n.split(".")[0] for n in names}  # noqa: E731
    pt = model.trainable_parameters("pt")
    assert tops(pt) == {"projector", "predictors", "task_tokens", "logit_scales"}
    assert set(model.predictors["depth"]) == {"2", "5"} and set(model.logit_scales) == {"depth", "seg", "gen"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(pt)
    assert tops(model.trainable_parameters("ift")) == {"llm", "projector"}
    assert tops(model.trainable_parameters("vpt")) == {"llm", "projector"}
    assert not any(p.requires_grad for p in model.vision.parameters())

    sd_pt = model.trainable_state_dict()
    assert set(sd_pt) == set(pt)

    ift = make_model(stage="ift", seed=1)
    assert len(ift.predictors) == 0 and len(ift.logit_scales) == 0
    assert set(ift.task_tokens) == {"gen", "depth", "seg"}  # present, frozen
    assert not any(p.requires_grad for p in ift.task_tokens.values())
    assert {n for n, p in ift.named_parameters() if p.requires_grad} == set(ift.trainable_parameters())
    missing, unexpected = ift.load_trainable_state_dict(sd_pt, strict=False)
    assert any(k.startswith("predictors.") for k in unexpected)
    assert all(k.startswith("llm.") for k in missing)
    for t in ("gen", "depth", "seg"):
        assert torch.equal(ift.task_tokens[t], model.task_tokens[t])
    assert torch.equal(ift.projector[0].weight, model.projector[0].weight)
    sd_ift = ift.trainable_state_dict()
    assert tops(sd_ift) == {"llm", "projector", "task_tokens"}  # IFT checkpoints carry the frozen tokens
    with pytest.raises(KeyError):
        ift.load_trainable_state_dict(sd_pt, strict=True)
    ift2 = make_model(stage="ift", seed=2)
    ift2.load_trainable_state_dict(sd_ift, strict=True)
    assert torch.equal(ift2.task_tokens["seg"], ift.task_tokens["seg"])


def test_pt_backward_reaches_projector_tokens_predictors_not_llm():
    model = make_model()
    model.train()
    out = model(make_batch())
    out["loss"].backward()
    for prefix in ("projector", "task_tokens", "predictors", "logit_scales"):
        grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(prefix)}
        assert grads and all(g is not None for g in grads.values()), prefix
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0, prefix
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())


def test_embedding_losses_alone_train_projector_through_frozen_llm():
    model = make_model()
    out = model(make_batch())
    (out["loss"] - out["loss_ce"]).backward()  # loss_ce is detached: this is the embedding part only
    assert model.projector[2].weight.grad.abs().sum() > 0
    assert model.task_tokens["gen"].grad.abs().sum() > 0


def test_text_only_sample_contributes_no_embedding_loss():
    model = make_model()
    model.eval()
    b = make_batch()
    with torch.no_grad():
        ref = model(b)
        b2 = copy.deepcopy(b)
        for t in SHAPES:
            b2["targets"][t][2] = 1000.0  # text-only row
        again = model(b2)
        for t in SHAPES:
            assert again[f"loss_{t}"].item() == pytest.approx(ref[f"loss_{t}"].item(), rel=1e-6)
        b3 = copy.deepcopy(b)
        b3["target_mask"] = {t: torch.zeros(3, dtype=torch.bool) for t in SHAPES}
        none = model(b3)
    for t in SHAPES:
        assert none[f"loss_{t}"].item() == 0.0
    assert none["loss"].item() == pytest.approx(none["loss_ce"].item())


def test_ift_forward_is_ntp_only():
    model = make_model(stage="ift")
    out = model(make_batch())
    assert set(out) == {"loss", "loss_ce"}
    out["loss"].backward()
    assert model.llm.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in model.task_tokens.values())


def test_a_few_steps_reduce_embedding_losses():
    model = make_model()
    model.train()
    b = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    hist = []
    for _ in range(8):
        out = model(b)
        hist.append({t: out[f"loss_{t}"].item() for t in SHAPES})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for t in SHAPES:
        assert hist[-1][t] < hist[0][t], (t, hist[0][t], hist[-1][t])


def test_gradient_checkpointing_gives_the_same_gradients():
    b = make_batch()
    grads = []
    for ckpt in (False, True):
        model = make_model()
        model.train()
        if ckpt:
            model.enable_gradient_checkpointing()
        model(b)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_task_token_init_scales():
    model = make_model(task_tokens={"gen": 8, "depth": 8, "seg": 8})
    emb_std = model.llm.get_input_embeddings().weight.std().item()
    block = model.task_token_block()
    assert block[:8].std().item() == pytest.approx(emb_std, rel=0.2)  # gen
    assert block[8:].std().item() == pytest.approx(emb_std, rel=0.2)  # depth/seg group means
    cfg = make_cfg()
    cfg.model.task_token_init = "randn"
    ref = build_model(cfg, SHAPES)
    assert ref.task_tokens["depth"].std().item() == pytest.approx(1.0, rel=0.1)


# ----------------------------------------------------------------------------------------------- generation


def test_generate_returns_tokens_and_batching_is_consistent():
    model = make_model(stage="ift")
    model.eval()
    b = make_batch()
    out = generate_ids(model, b["input_ids"], b["pixel_values"], 4, attention_mask=b["attention_mask"])
    assert out.dtype == torch.long and out.shape == (3, 4)
    for i in range(3):
        n = int(b["attention_mask"][i].sum())
        single = generate_ids(model, b["input_ids"][i : i + 1, :n], b["pixel_values"][i : i + 1], 4)
        assert torch.equal(single[0], out[i]), i


def test_timm_vision_encoder_by_name():
    enc = VisionEncoder("timm:test_vit", -2)
    x = torch.randn(2, 3, enc.image_size, enc.image_size)
    feats = enc(x)
    assert feats.shape == (2, (enc.image_size // 16) ** 2, enc.out_dim)
    assert not any(p.requires_grad for p in enc.parameters())


def test_bf16_autocast_forward_backward():
    # the CUDA recipe runs under bf16 autocast; CPU autocast exercises the same dtype mixing
    model = make_model()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch())
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    assert model.task_tokens["depth"].grad.dtype == torch.float32
    assert model.task_tokens["depth"].grad.abs().sum() > 0


def test_text_only_batch_and_zero_contrastive_weight_touch_every_trainable_param():
    # DDP requires every trainable parameter to take part in each step
    cfg = make_cfg()
    cfg.loss.contrastive_weight = 0.0
    torch.manual_seed(0)
    model = build_model(cfg, SHAPES)
    b = make_batch()
    keep = torch.tensor([2])  # the text-only sample alone
    small = {k: v[keep] for k, v in b.items() if isinstance(v, torch.Tensor)}
    small["targets"] = {t: v[keep] for t, v in b["targets"].items()}
    small["target_mask"] = {t: v[keep] for t, v in b["target_mask"].items()}
    small["input_ids"], small["attention_mask"] = small["input_ids"][:, :5], small["attention_mask"][:, :5]
    small["labels"] = small["labels"][:, :5]
    out = model(small)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
