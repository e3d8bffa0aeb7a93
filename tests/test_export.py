"""`olatrain export` with the real client: transformers' LlavaForConditionalGeneration + AutoProcessor, no olakit
code on the loading side, must give the same logits and greedy tokens as olatrain's model (docs/export.md).

The model is the tiny PT -> IFT run on the bundled sample (PT on a gen-only store: one cheap teacher; the depth
and seg task tokens still exist, as spatial group means, with their PT-time kinds from the config).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, ROOT
from safetensors.torch import load_file
from typer.testing import CliRunner

from olacache.build import BuildConfig, build
from olacache.inputs.images import load_rgb
from olatrain import checkpoint as ckpt
from olatrain import train
from olatrain.config import load_run
from olatrain.data.pixels import pad_to_square, processor_mean_color, run_processor
from olatrain.data.templates import IMAGE_TOKEN_INDEX, tokenize_conversation
from olatrain.export import ExportError, export
from olatrain.generate import generate, generate_ids, load_for_inference

NON_SQUARE = EXAMPLES / "images" / "chelsea.jpg"  # 192 x 128
PROMPT = "What is in the picture?"
LOGITS_ATOL = 1e-5  # fp32; measured 0.0 (same kernels, same order)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _cli(*args: str):
    from cli import olatrain_app

    res = CliRunner().invoke(olatrain_app, [str(a) for a in args])
    return res, "".join(res.output.split())


@pytest.fixture(scope="module")
def ift_final(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export_run")
    build(BuildConfig(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"),
                      out=str(tmp / "store.zarr"), teachers=["gen"], batch_size=8, workers=0, device="cpu",
                      progress=False), log=lambda *a, **k: None)
    sets = [f"data.annotations={EXAMPLES / 'sample.json'}", f"data.image_root={EXAMPLES / 'images'}",
            f"data.store={tmp / 'store.zarr'}", f"output_dir={tmp / 'run'}", "data.num_workers=0",
            "train.batch_size=2", "loss.weights.depth=0", "loss.weights.seg=0", "train.save_every=0",
            "stages.pt.train.max_steps=2", "stages.ift.train.max_steps=2"]
    train.run(load_run(ROOT / "configs" / "tiny.yaml", sets), resume=False, log=lambda *_: None, progress=False)
    final = tmp / "run" / "ift" / "final"
    assert ckpt.is_done(final)
    return final


@pytest.fixture(scope="module")
def exported(ift_final, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "llava"
    res, flat = _cli("export", ift_final, "--out", out)
    assert res.exit_code == 0, res.output
    assert "24tasktokens" in flat and "image_aspectpad" in flat
    return out


@pytest.fixture(scope="module")
def both(ift_final, exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    hf = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    proc = AutoProcessor.from_pretrained(exported, backend="pil")  # LLaVA-1.5 pixels: see docs/export.md
    assert isinstance(proc, LlavaProcessor)
    model, tok, oproc, cfg = load_for_inference(ift_final, "cpu")
    return hf, proc, model, tok, oproc, cfg


def _olatrain_inputs(model, tok, oproc, cfg, has_image: bool):
    text = f"<image>\n{PROMPT}" if has_image else PROMPT
    ids, _ = tokenize_conversation([{"from": "human", "value": text}], tok, cfg.model.chat_template,
                                   has_image=has_image, add_generation_prompt=True)
    px = None
    if has_image:
        assert cfg.data.image_aspect == "pad"
        px = run_processor(oproc, pad_to_square(load_rgb(NON_SQUARE), processor_mean_color(oproc)))[None]
    return torch.tensor([ids]), px


def _hf_inputs(proc, has_image: bool):
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}] if has_image else PROMPT
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    # the chat template writes BOS itself (as olatrain's template does): tokenize without adding another
    return proc(images=load_rgb(NON_SQUARE) if has_image else None, text=prompt, add_special_tokens=False,
                return_tensors="pt")


@pytest.mark.parametrize("has_image", [True, False], ids=["non_square_image", "text_only"])
def test_transformers_alone_gives_olatrains_logits_and_tokens(both, ift_final, has_image):
    hf, proc, model, tok, oproc, cfg = both
    ids, px = _olatrain_inputs(model, tok, oproc, cfg, has_image)
    inp = _hf_inputs(proc, has_image)
    hid = inp["input_ids"][0]
    n_old = model.llm.get_input_embeddings().weight.shape[0]
    # same text tokens; image -> 576 image tokens, then the 24 task tokens in insertion order
    assert [i for i in hid.tolist() if i < n_old] == [i for i in ids[0].tolist() if i != IMAGE_TOKEN_INDEX]
    if has_image:
        pos = ids[0].tolist().index(IMAGE_TOKEN_INDEX)
        img_id = hf.config.image_token_id
        assert hid[pos:pos + 576].eq(img_id).all() and int(hid.eq(img_id).sum()) == 576
        names = [f"<ola_{t}_{i}>" for t in ("gen", "depth", "seg") for i in range(8)]
        assert hid[pos + 576:pos + 600].tolist() == proc.tokenizer.convert_tokens_to_ids(names)
        assert torch.equal(inp["pixel_values"], px)  # pad-to-square with the mean colour: the same pixels
    with torch.no_grad():
        asm = model.assemble(ids, torch.ones_like(ids), px, torch.tensor([has_image]))
        ours = model.llm(inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask).logits
        theirs = hf(**inp).logits
    assert theirs.shape[:2] == ours.shape[:2]
    diff = (theirs[..., :n_old] - ours).abs().max().item()
    assert diff <= LOGITS_ATOL, diff

    n = 12
    want = generate_ids(model, ids, px, max_new_tokens=n, has_image=torch.tensor([has_image]))
    got = hf.generate(**inp, max_new_tokens=n)[:, hid.shape[0]:]
    assert got.tolist() == want.tolist()
    text = generate(ift_final, PROMPT, image=NON_SQUARE if has_image else None, max_new_tokens=n, device="cpu")
    assert proc.tokenizer.decode(got[0], skip_special_tokens=True).strip() == text


def test_task_tokens_are_the_inserted_vectors_and_never_generated(both, exported):
    hf, proc, model, *_ = both
    names = [f"<ola_{t}_{i}>" for t in ("gen", "depth", "seg") for i in range(8)]
    ids = proc.tokenizer.convert_tokens_to_ids(names)
    emb = hf.get_input_embeddings().weight.detach()
    with torch.no_grad():
        block = model.task_token_block()  # spatial teachers: the group means olatrain inserts
    assert torch.equal(emb[ids], block)
    assert torch.equal(hf.get_output_embeddings().weight[ids], torch.zeros_like(block))
    gen = json.loads((exported / "generation_config.json").read_text())
    assert set(ids) | {hf.config.image_token_id} <= set(gen["suppress_tokens"])
    # make a task token's output row win the next step outright: generation must still never produce it
    inp = proc(text="hello", return_tensors="pt")
    head = hf.get_output_embeddings().weight
    with torch.no_grad():
        h = hf(**inp, output_hidden_states=True).hidden_states[-1][0, -1]
        head[ids[0]] = h / h.pow(2).sum() * 1e4  # logit 1e4 for that token
    try:
        unsuppressed = hf.generate(**inp, max_new_tokens=1, suppress_tokens=[])[0, -1].item()
        assert unsuppressed == ids[0]  # the check below is meaningful: this row would win
        out = hf.generate(**inp, max_new_tokens=4)[0, inp["input_ids"].shape[1]:]
        assert not set(out.tolist()) & set(ids)
    finally:
        with torch.no_grad():
            head[ids[0]] = 0


def test_square_aspect_is_the_processors_own_resize(ift_final, tmp_path):
    from transformers import AutoProcessor

    ck = tmp_path / "ck"
    shutil.copytree(ift_final, ck)
    state = json.loads((ck / ckpt.STATE).read_text())
    state["config"]["data"]["image_aspect"] = "square"
    (ck / ckpt.STATE).write_text(json.dumps(state))
    export(ck, tmp_path / "sq")
    proc = AutoProcessor.from_pretrained(tmp_path / "sq", backend="pil")
    assert proc.image_processor.do_pad is False
    _, _, oproc, _ = load_for_inference(ck, "cpu")
    img = load_rgb(NON_SQUARE)
    assert torch.equal(proc.image_processor(img, return_tensors="pt")["pixel_values"][0], run_processor(oproc, img))


def test_bf16_export(ift_final, tmp_path):
    s = export(ift_final, tmp_path / "bf", dtype="bf16")
    w = load_file(str(s.out / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {torch.bfloat16}


def test_refusals_are_one_clear_line(ift_final, exported, tmp_path):
    res, flat = _cli("export", ift_final, "--out", exported)  # not empty
    assert res.exit_code != 0 and "error:" in res.output and "notempty" in flat
    ck = tmp_path / "ck"
    shutil.copytree(ift_final, ck)
    state = json.loads((ck / ckpt.STATE).read_text())
    state["config"]["model"]["vision"] = "timm:vit_tiny_patch16_224"
    (ck / ckpt.STATE).write_text(json.dumps(state))
    res, flat = _cli("export", ck, "--out", tmp_path / "x")
    assert res.exit_code != 0 and "timmencoder" in flat and "Traceback" not in res.output
    res, flat = _cli("export", ck.parent, "--out", tmp_path / "y")
    assert res.exit_code != 0 and "notanolatraincheckpoint" in flat
    with pytest.raises(ExportError, match="--dtype"):
        export(ift_final, tmp_path / "z", dtype="int4")


@pytest.mark.parametrize("template", ["llama3", "vicuna", "auto"])
def test_exported_chat_template_reproduces_olatrains_tokens(template):
    """System turn, image placeholder not at the front, an answer, a follow-up, generation prompt: the exported
    Jinja gives olatrain's ids (check_template runs inside every export too)."""
    from transformers import AddedToken

    from olatrain.config import load_run
    from olatrain.export import IMAGE_TOKEN, check_template, export_chat_template
    from olatrain.presets import load_tokenizer

    cfg = load_run(ROOT / "configs" / "tiny.yaml", [f"model.chat_template={template}"]).configs["ift"]
    tok = load_tokenizer(cfg)
    names = [f"<ola_x_{i}>" for i in range(3)]
    tok.add_tokens([AddedToken(n, special=True, normalized=False) for n in [IMAGE_TOKEN, *names]],
                   special_tokens=True)
    check_template(tok, template, export_chat_template(cfg, tok, names), names)
