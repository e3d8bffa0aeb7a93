"""Chat templates: token layout, label masking, image placeholder, conversation shape errors."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from olatrain.data.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    TemplateError,
    end_token_id,
    tokenize_conversation,
)
from olatrain.presets import tiny_tokenizer_dir

LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
PHI3_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def tok():
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    # the preset is Llama-3 style; give it Phi-3's role/end tokens too so one tokenizer serves every template
    t.add_special_tokens({"additional_special_tokens": PHI3_SPECIALS})
    return t


def conv(*turns: str, first: str = "human") -> list[dict[str, str]]:
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)]


def runs(ids: list[int], labels: list[int], tok) -> list[str]:
    """Decoded text of each maximal run of supervised tokens."""
    out, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i  # a supervised label is the token itself (the model shifts)
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def text_of(ids: list[int], tok) -> str:
    """Decode with the image token shown as <IMG>."""
    parts, cur = [], []
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            parts += [tok.decode(cur), "<IMG>"]
            cur = []
        else:
            cur.append(i)
    parts.append(tok.decode(cur))
    return "".join(parts)


def test_llama3_layout_and_labels(tok):
    c = conv("Describe it.\n<image>", "A cat.", "What colour?", "Ginger.")
    ids, labels = tokenize_conversation(c, tok, "llama3", has_image=True, sample_id="s1")
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    sh, eh, eot = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    expect = (
        f"<|begin_of_text|>{sh}system{eh}\n\n{LLAVA_SYSTEM}{eot}"
        f"{sh}user{eh}\n\n<IMG>\nDescribe it.{eot}{sh}assistant{eh}\n\nA cat.{eot}"
        f"{sh}user{eh}\n\nWhat colour?{eot}{sh}assistant{eh}\n\nGinger.{eot}"
    )
    assert text_of(ids, tok) == expect  # <image> moved to the front of its message
    assert runs(ids, labels, tok) == ["A cat.<|eot_id|>", "Ginger.<|eot_id|>"]
    # the whole conversation is tokenised as one text (split only at the image), exactly as at inference
    before, after = expect.split("<IMG>")
    ref = tok(before, add_special_tokens=False)["input_ids"] + [IMAGE_TOKEN_INDEX]
    ref += tok(after, add_special_tokens=False)["input_ids"]
    assert ids == ref


def test_phi3_layout_and_labels(tok):
    c = conv("<image>\nWhat is it?", "A rocket.", "Weather?", "Sunny.")
    ids, labels = tokenize_conversation(c, tok, "phi3", has_image=True)
    txt = text_of(ids, tok)
    # this tokenizer adds BOS by default, and phi3 follows the tokenizer (reference behaviour)
    assert txt == (
        "<|begin_of_text|><|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<IMG>\nWhat is it?<|end|>"
        "\n<|assistant|>\nA rocket.<|end|>\n<|user|>\nWeather?<|end|>\n<|assistant|>\nSunny.<|end|>"
    )
    assert runs(ids, labels, tok) == ["A rocket.<|end|>", "Sunny.<|end|>"]
    assert end_token_id(tok, "phi3") == tok.convert_tokens_to_ids("<|end|>")


def test_phi3_needs_single_end_token():
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())  # no <|end|> token
    with pytest.raises(TemplateError, match="splits into"):
        tokenize_conversation(conv("hi", "yo"), plain, "phi3", has_image=False)


def test_vicuna_answer_space_is_supervised(tok):
    ids, labels = tokenize_conversation(conv("<image>\nWhat?", "A cat."), tok, "vicuna", has_image=True)
    assert text_of(ids, tok).endswith("USER: <IMG>\nWhat? ASSISTANT: A cat.<|eot_id|>")
    assert runs(ids, labels, tok) == [" A cat.<|eot_id|>"]


def test_auto_matches_llama3_with_same_system(tok):
    """The preset's Jinja template is Llama-3 style without a default system prompt: with the LLaVA system
    message given explicitly, 'auto' must produce the same ids and labels as the Python 'llama3'."""
    c = [{"from": "system", "value": LLAVA_SYSTEM}] + conv("Hi <image>", "Hello there.", "And?", "Rome.")
    a = tokenize_conversation(c, tok, "auto", has_image=True)
    b = tokenize_conversation(c, tok, "llama3", has_image=True)
    assert a == b
    assert runs(*a, tok) == ["Hello there.<|eot_id|>", "Rome.<|eot_id|>"]


def test_auto_without_system(tok):
    ids, labels = tokenize_conversation(conv("<image>\nQ?", "A."), tok, "auto", has_image=True)
    assert text_of(ids, tok) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<IMG>\nQ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>"
    )
    assert runs(ids, labels, tok) == ["A.<|eot_id|>"]


@pytest.mark.parametrize("name", ["llama3", "phi3", "vicuna", "auto"])
def test_text_only_and_multi_turn(tok, name):
    c = conv("What is the capital of France?", "Paris.", "And of Italy?", "Rome.", "Spain?", "Madrid.")
    ids, labels = tokenize_conversation(c, tok, name, has_image=False)
    assert IMAGE_TOKEN_INDEX not in ids
    got = runs(ids, labels, tok)
    assert [g.strip().split("<|")[0] for g in got] == ["Paris.", "Rome.", "Madrid."]
    # every run ends with the template's end-of-turn token
    eot = tok.convert_ids_to_tokens(end_token_id(tok, name) if name != "auto" else tok.eos_token_id)
    assert all(g.endswith(eot) for g in got)


def test_placeholder_rules(tok):
    # no placeholder on an image sample: one is put in front of the first question
    ids, _ = tokenize_conversation(conv("What?", "A."), tok, "llama3", has_image=True)
    assert "user<|end_header_id|>\n\n<IMG>\nWhat?" in text_of(ids, tok)
    # several in one message collapse to one in front (reference rule)
    ids, _ = tokenize_conversation(conv("<image> a <image> b", "A."), tok, "llama3", has_image=True)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and "<IMG>\na  b" in text_of(ids, tok)
    # image in a later question stays in that question, moved to its front
    ids, _ = tokenize_conversation(conv("Hi", "Hello.", "Look: <image>", "A cat."), tok, "llama3", has_image=True)
    assert "user<|end_header_id|>\n\n<IMG>\nLook:" in text_of(ids, tok)
    with pytest.raises(TemplateError, match="no 'image'"):
        tokenize_conversation(conv("<image>\nWhat?", "A."), tok, "llama3", has_image=False, sample_id="t1")
    with pytest.raises(TemplateError, match="2 messages"):
        tokenize_conversation(conv("<image>", "A.", "<image>", "B."), tok, "llama3", has_image=True)
    with pytest.raises(TemplateError, match="answer"):
        tokenize_conversation(conv("Q", "<image> A."), tok, "llama3", has_image=True)


def test_conversation_shape(tok):
    # a leading gpt turn is dropped
    c = conv("Stray answer.", "<image>\nQ?", "A.", first="gpt")
    ids, labels = tokenize_conversation(c, tok, "llama3", has_image=True)
    assert "Stray" not in text_of(ids, tok) and runs(ids, labels, tok) == ["A.<|eot_id|>"]
    # non-alternating: error naming the sample
    bad = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    with pytest.raises(TemplateError, match="'bad-7'.*alternate"):
        tokenize_conversation(bad, tok, "llama3", has_image=False, sample_id="bad-7")
    with pytest.raises(TemplateError, match="system"):
        tokenize_conversation(conv("a", "b") + [{"from": "system", "value": "s"}], tok, "llama3", has_image=False)
    with pytest.raises(TemplateError, match="unknown chat template"):
        tokenize_conversation(conv("a", "b"), tok, "chatml", has_image=False)
    # a custom system turn replaces the default system prompt
    c = [{"from": "system", "value": "Be brief."}] + conv("a", "b")
    assert "system<|end_header_id|>\n\nBe brief.<|eot_id|>" in text_of(
        tokenize_conversation(c, tok, "llama3", has_image=False)[0], tok
    )


def test_generation_prompt(tok):
    c = conv("<image>\nQ?", "A.", "More?")
    for name in ("llama3", "auto"):
        ids, labels = tokenize_conversation(c, tok, name, has_image=True, add_generation_prompt=True)
        assert text_of(ids, tok).endswith("More?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert runs(ids, labels, tok) == ["A.<|eot_id|>"]
        ids2, _ = tokenize_conversation(c, tok, name, has_image=True)  # trailing question left unanswered
        assert text_of(ids2, tok).endswith("More?<|eot_id|>")


def test_auto_rejects_prefix_unstable_template(tok):
    t = copy.deepcopy(tok)
    # renders the last message differently from the others: not prefix-stable
    t.chat_template = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize_conversation(conv("Q?", "A.", "Q2?", "B."), t, "auto", has_image=False)
    t.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        tokenize_conversation(conv("Q?", "A."), t, "auto", has_image=False)


def test_bpe_merge_across_boundary_goes_to_answer(tok):
    """A boundary inside what the tokenizer merges into one token: the merged token counts as the answer's."""
    from olatrain.data.templates import encode_segments

    text = "The answer is (A). The answer is (B)."
    full = tok(text, add_special_tokens=False)["input_ids"]
    cut = text.index("nswer")  # splits the word "answer" of the first sentence
    ids, labels = encode_segments(tok, [(text[:cut], False), (text[cut:], True)])
    assert ids == full  # tokenisation is never altered by the segmentation
    k = sum(1 for lab in labels if lab == IGNORE_INDEX)
    assert labels[:k] == [IGNORE_INDEX] * k and labels[k:] == full[k:]
    assert tok.decode(full[:k]) == text[: len(tok.decode(full[:k]))]  # a strict token prefix of the text


def test_image_token_index_agrees_with_model():
    model = pytest.importorskip("olatrain.model")
    assert model.IMAGE_TOKEN_INDEX == IMAGE_TOKEN_INDEX
    assert set(TEMPLATES) == {"llama3", "phi3", "vicuna"}
