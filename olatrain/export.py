"""`olatrain export`: a trained checkpoint -> a Hugging Face LLaVA directory (docs/export.md).

The result loads with ``transformers.LlavaForConditionalGeneration.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)`` and no olakit code, so lmms-eval (``--model llava_hf``), vLLM and the Hub
can use what olatrain trained. What maps to what:

* vision tower, projector (``multi_modal_projector.linear_1/2``) and LLM: the same tensors, renamed by matching
  the state dict of a ``LlavaForConditionalGeneration`` built on the meta device from the exported config (so
  the names are whatever the installed transformers expects, and a missing/extra name is an error, not a guess);
* feature layer and CLS: ``vision_feature_layer = model.vision_layer``; CLIP drops CLS
  (``vision_feature_select_strategy="default"``), SigLIP has none (``"full"``);
* the task tokens (docs/method.md §4): one new vocabulary entry per inserted token (``<ola_gen_0>`` ...), in
  insertion order, whose input embedding is exactly the vector olatrain inserts (a spatial teacher's group mean);
  the chat template writes them right after ``<image>``; their output rows are zero and generation suppresses
  them (``generation_config.suppress_tokens``), so they are never generated;
* image aspect: ``pad`` -> ``LlavaImageProcessor(do_pad=True)`` (pad to square with the mean colour, LLaVA-1.5),
  ``square`` -> the encoder processor's own resize (+ centre crop), as olatrain trained.

Anything HF LLaVA cannot express (a timm encoder, a non-CLIP/SigLIP tower) is refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMAGE_TOKEN = "<image>"


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported (the message says why and what to do)."""


@dataclass
class ExportSummary:
    out: Path
    vocab_size: int
    image_token_id: int
    task_token_ids: list[int]
    task_tokens: list[str]
    image_aspect: str
    dtype: str


def task_token_names(order: list[str], counts: dict[str, int]) -> list[str]:
    """The vocabulary entries of the inserted task tokens, in insertion order (``<ola_gen_0>``, ...)."""
    return [f"<ola_{t}_{i}>" for t in order for i in range(counts[t])]


# ----------------------------------------------------------------------------------------------- chat template
def _lit(s: str) -> str:
    """A Jinja string literal (JSON escaping is a subset Jinja reads)."""
    return json.dumps(s)


def normalizing_prefix(task_tokens: list[str]) -> str:
    """Jinja that rewrites ``messages`` the way olatrain's data pipeline does before its template runs: string
    or ``[{type: image|text}]`` content -> one string; a user message with an image becomes
    ``"<image>" + task tokens + "\\n" + text`` (every ``<image>`` removed from the text, stripped; the reference's
    rule, olatrain.data.templates.normalize_turns)."""
    block = _lit(IMAGE_TOKEN + "".join(task_tokens) + "\n")
    return (
        "{%- set ola = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- set st = namespace(text='', img=false) -%}"
        "{%- if m['content'] is string -%}{%- set st.text = m['content'] -%}"
        "{%- else -%}{%- for part in m['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set st.img = true -%}"
        "{%- elif part['type'] == 'text' -%}{%- set st.text = st.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        f"{{%- if {_lit(IMAGE_TOKEN)} in st.text -%}}{{%- set st.img = true -%}}{{%- endif -%}}"
        "{%- if st.img and m['role'] == 'user' -%}"
        f"{{%- set st.text = {block} + (st.text | replace({_lit(IMAGE_TOKEN)}, '') | trim) -%}}"
        "{%- endif -%}"
        "{%- set ola.msgs = ola.msgs + [{'role': m['role'], 'content': st.text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = ola.msgs -%}"
    )


def named_template_jinja(t: Any, tokenizer: Any, with_bos: bool) -> str:
    """olatrain's MPT-separator template ``t`` (olatrain.data.templates.NamedTemplate) as Jinja."""
    eos = tokenizer.eos_token or ""
    sep = {k: getattr(t, k) if getattr(t, k) is not None else eos for k in ("system_sep", "user_sep", "assistant_sep")}
    return (
        ("{{- bos_token -}}" if with_bos else "")
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sys = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set sys = {_lit(t.system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        f"{{{{- {_lit(t.system_header)} + sys + {_lit(sep['system_sep'])} -}}}}"
        "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}"
        f"{{{{- {_lit(t.user)} + m['content'] + {_lit(sep['user_sep'])} -}}}}"
        f"{{%- if not loop.last or add_generation_prompt -%}}{{{{- {_lit(t.assistant)} -}}}}{{%- endif -%}}"
        "{%- elif m['role'] == 'assistant' -%}"
        f"{{{{- {_lit(t.answer_prefix)} + m['content'] + {_lit(sep['assistant_sep'])} -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def export_chat_template(cfg: Any, tokenizer: Any, task_tokens: list[str]) -> str:
    from olatrain.data.templates import TEMPLATES, _bos_id

    name = cfg.model.chat_template
    if name == "auto":
        base = getattr(tokenizer, "chat_template", None)
        if not isinstance(base, str) or not base:
            raise ExportError("model.chat_template is 'auto' but the tokenizer has no (single) chat_template")
        return normalizing_prefix(task_tokens) + base
    t = TEMPLATES[name]
    return normalizing_prefix(task_tokens) + named_template_jinja(t, tokenizer, _bos_id(t, tokenizer) is not None)


PROBE = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is this?  <image>"},
         {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "And the colour?"}]


def check_template(tokenizer: Any, template: str, chat_template: str, task_tokens: list[str]) -> None:
    """The exported Jinja must give olatrain's token ids (with ``<image>`` + task tokens where olatrain has its
    single IMAGE_TOKEN_INDEX) for a probe conversation: system turn, image in the first question (not at its
    front), an answer, a follow-up, generation prompt; and the same without the image."""
    from olatrain.data.templates import IMAGE_TOKEN_INDEX, tokenize_conversation

    block = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, *task_tokens])
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    for has_image in (True, False):
        conv = [dict(c) for c in PROBE]
        if not has_image:
            conv[1]["value"] = conv[1]["value"].replace(IMAGE_TOKEN, "")
        want, _ = tokenize_conversation(conv, tokenizer, template, has_image=has_image, add_generation_prompt=True)
        msgs = [{"role": role[c["from"]], "content": c["value"]} for c in conv]
        text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if has_image and IMAGE_TOKEN_INDEX in want:
            i = want.index(IMAGE_TOKEN_INDEX)
            want = want[:i] + block + want[i + 1:]
        if got != want:
            raise ExportError(f"the exported chat template does not reproduce olatrain's {template!r} tokens "
                              f"(image={has_image}); please report this with the template name")


# ----------------------------------------------------------------------------------------------- checks
def check_exportable(model: Any, cfg: Any) -> tuple[str, int]:
    """-> (vision_feature_select_strategy, num_additional_image_tokens), or ExportError with the reason."""
    v = model.vision
    if v.kind != "hf":
        raise ExportError(
            f"model.vision={cfg.model.vision!r} is a timm encoder: HF LLaVA's vision tower is a transformers model "
            "(CLIP/SigLIP vision), so this checkpoint cannot be expressed as LlavaForConditionalGeneration"
        )
    mtype = v.model.config.model_type
    if mtype.startswith("clip"):
        return "default", 1  # CLS first, dropped (LLaVA-1.5), exactly as olatrain's n_prefix = 1
    if mtype.startswith("siglip"):
        return "full", 0
    raise ExportError(f"vision model type {mtype!r} has no HF LLaVA feature-selection equivalent")


# ----------------------------------------------------------------------------------------------- weights
def llava_state_dict(model: Any, image_row: torch.Tensor | None, task_block: torch.Tensor, vocab: int,
                     task_ids: list[int], image_id: int) -> dict[str, torch.Tensor]:
    """olatrain names -> LLaVA names (transformers 5 layout: model.vision_tower / model.multi_modal_projector /
    model.language_model / lm_head), with the embedding grown to ``vocab`` rows and the task-token rows set."""
    llm = model.llm
    prefix = llm.base_model_prefix + "."
    emb_name = next(n for n, p in llm.named_parameters() if p is llm.get_input_embeddings().weight)
    out: dict[str, torch.Tensor] = {}
    for k, t in model.vision.model.state_dict().items():
        out["model.vision_tower." + k] = t
    out["model.multi_modal_projector.linear_1.weight"] = model.projector[0].weight
    out["model.multi_modal_projector.linear_1.bias"] = model.projector[0].bias
    out["model.multi_modal_projector.linear_2.weight"] = model.projector[2].weight
    out["model.multi_modal_projector.linear_2.bias"] = model.projector[2].bias
    lm_head = llm.get_output_embeddings().weight
    for k, t in llm.state_dict().items():
        if k.startswith(prefix):
            out["model.language_model." + k[len(prefix):]] = t
        else:
            out[k] = t
    emb = llm.get_input_embeddings().weight.detach()
    new_emb = emb.new_zeros(vocab, emb.shape[1])
    new_emb[: emb.shape[0]] = emb
    new_emb[image_id] = emb.mean(0) if image_row is None else image_row  # replaced by image features anyway
    new_emb[torch.tensor(task_ids, dtype=torch.long)] = task_block.detach().to(emb.dtype)
    out["model.language_model." + emb_name[len(prefix):]] = new_emb
    head = lm_head.detach().new_zeros(vocab, lm_head.shape[1])  # new rows zero: they add no score to any text
    head[: lm_head.shape[0]] = lm_head.detach()
    out["lm_head.weight"] = head
    return {k: v.detach().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- export
def export(checkpoint: Path, out: Path, dtype: str = "fp32") -> ExportSummary:
    from transformers import (
        AddedToken,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    from olatrain import checkpoint as ckpt
    from olatrain.config import config_from_dict
    from olatrain.data.templates import end_token_id
    from olatrain.generate import GenerateError, load_for_inference

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another --out or remove it")
    try:
        vision = config_from_dict(ckpt.load_state(Path(checkpoint))["config"]).model.vision
    except (OSError, ValueError, KeyError, TypeError):
        vision = ""  # not a checkpoint: load_for_inference below says so, with a hint
    if vision.startswith("timm:"):  # refused before building anything
        raise ExportError(
            f"model.vision={vision!r} is a timm encoder: HF LLaVA's vision tower is a transformers model "
            "(CLIP/SigLIP vision), so this checkpoint cannot be expressed as LlavaForConditionalGeneration"
        )
    try:
        model, tok, proc, cfg = load_for_inference(Path(checkpoint), device="cpu")
    except GenerateError as e:
        raise ExportError(str(e)) from e
    strategy, n_extra = check_exportable(model, cfg)
    if not hasattr(proc, "crop_size") and not hasattr(proc, "size"):
        raise ExportError(f"image processor {type(proc).__name__} has no HF resize/crop settings to carry over")

    # -- tokenizer: <image> + one entry per inserted task token (special: skipped when decoding)
    names = task_token_names(model.token_order, model.token_counts)
    new = [n for n in [IMAGE_TOKEN, *names] if n not in tok.get_vocab()]
    if len(new) != 1 + len(names):
        clash = [n for n in [IMAGE_TOKEN, *names] if n not in new]
        raise ExportError(f"the tokenizer already holds {clash}; cannot add the image/task tokens as new entries")
    tok.add_tokens([AddedToken(n, special=True, normalized=False, lstrip=False, rstrip=False) for n in new],
                   special_tokens=True)
    image_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    task_ids = [int(i) for i in tok.convert_tokens_to_ids(names)]
    old_rows = int(model.llm.get_input_embeddings().weight.shape[0])
    vocab = max(old_rows, len(tok))  # ids below old_rows land on unused padding rows of a padded vocabulary

    # -- config: the LLM's own config with the grown vocabulary, untied (new output rows must stay zero)
    text_cfg = model.llm.config.__class__.from_dict(model.llm.config.to_dict())
    text_cfg.vocab_size = vocab
    text_cfg.tie_word_embeddings = False
    vision_cfg = model.vision.model.config
    cfg_hf = LlavaConfig(
        vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(), image_token_index=image_id,
        image_seq_length=int(cfg.model.image_tokens), projector_hidden_act=cfg.model.projector_hidden_act,
        vision_feature_select_strategy=strategy, vision_feature_layer=int(cfg.model.vision_layer),
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    with torch.no_grad():
        block = model.task_token_block().detach()
    sd = llava_state_dict(model, None, block, vocab, task_ids, image_id)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(cfg_hf)
    want = set(hf.state_dict())
    if want != set(sd):
        raise ExportError(
            f"weight names do not match this transformers' LLaVA layout: missing {sorted(want - set(sd))[:8]}, "
            f"unexpected {sorted(set(sd) - want)[:8]}"
        )
    target = DTYPES[dtype]
    sd = {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.config.dtype = target
    hf.config.text_config.dtype = target
    hf.config.vision_config.dtype = target

    # -- generation config: the LLM's, greedy by default, task/image tokens suppressed
    g = model.llm.generation_config.to_dict()
    eos = g.get("eos_token_id", model.llm.config.eos_token_id)
    eos_list = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                       end_token_id(tok, cfg.model.chat_template)})
    gen = GenerationConfig(bos_token_id=g.get("bos_token_id"), pad_token_id=g.get("pad_token_id", tok.pad_token_id),
                           eos_token_id=eos_list if len(eos_list) > 1 else eos_list[0],
                           suppress_tokens=[image_id, *task_ids], do_sample=False)
    hf.generation_config = gen

    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, state_dict=sd)

    # -- processor: the encoder's resize/crop/normalise, plus pad-to-square for image_aspect=pad
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    kw = {k: getattr(proc, k) for k in keys if getattr(proc, k, None) is not None}
    kw = {k: (dict(v) if hasattr(v, "items") else v) for k, v in kw.items()}
    kw = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v) for k, v in kw.items()}
    improc = LlavaImageProcessor(**kw, do_pad=cfg.data.image_aspect == "pad")
    processor = LlavaProcessor(
        image_processor=improc, tokenizer=tok, patch_size=int(vision_cfg.patch_size),
        vision_feature_select_strategy=strategy, num_additional_image_tokens=n_extra,
        chat_template=export_chat_template(cfg, tok, names), image_token=IMAGE_TOKEN,
    )
    # against the tokenizer's OWN template for `auto` (checked before the export's replaces it)
    check_template(tok, cfg.model.chat_template, processor.chat_template, names)
    tok.chat_template = processor.chat_template
    processor.save_pretrained(out)
    (out / "olakit_export.json").write_text(json.dumps({
        "source": str(Path(checkpoint).resolve()), "task_tokens": dict(zip(names, task_ids, strict=True)),
        "image_token_id": image_id, "image_aspect": cfg.data.image_aspect, "dtype": dtype,
    }, indent=1))
    return ExportSummary(out, vocab, image_id, task_ids, names, cfg.data.image_aspect, dtype)
