"""`olatrain generate`: greedy decoding with a trained checkpoint, so a user can try what they trained.

The checkpoint's own config rebuilds the model (stage forced to inference: no predictors); its weights hold
the trained projector and task tokens (and the LLM after VPT/IFT). The prompt goes through the same chat
template and image preprocessing as training, with the image and the frozen task tokens in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from olacache.common.runtime import pick_device
from olatrain import checkpoint as ckpt
from olatrain.config import Config, ConfigError, config_from_dict


class GenerateError(RuntimeError):
    pass


def load_for_inference(directory: Path, device: str = "auto") -> tuple[torch.nn.Module, Any, Any, Config]:
    from olatrain.data.pixels import load_image_processor
    from olatrain.model import build_model
    from olatrain.presets import load_tokenizer

    directory = Path(directory)
    if not (directory / ckpt.STATE).is_file() or not (directory / ckpt.WEIGHTS).is_file():
        missing = ckpt.STATE if not (directory / ckpt.STATE).is_file() else ckpt.WEIGHTS
        hint = ""
        if (directory / "final" / ckpt.STATE).is_file():
            hint = f" (did you mean {directory / 'final'}?)"
        raise GenerateError(f"{directory} is not an olatrain checkpoint (no {missing}){hint}; "
                            "pass a stage's final/ directory, e.g. runs/tiny/ift/final")
    try:
        cfg = config_from_dict(ckpt.load_state(directory)["config"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:  # ValueError covers bad JSON too
        raise GenerateError(f"{directory}: unreadable checkpoint state/config: {e!r}") from e
    stage = cfg.train.stage
    cfg.train.stage = "ift"  # inference: no predictors, task tokens in place
    dev = pick_device(device)
    tok = load_tokenizer(cfg)
    proc = load_image_processor(cfg)
    model = build_model(cfg, {}, device=dev, tokenizer=tok)
    model.load_trainable_state_dict(ckpt.load_weights(directory, device=dev), strict=False)
    model.eval()
    cfg.train.stage = stage
    return model, tok, proc, cfg


@torch.no_grad()
def generate_ids(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Greedy decoding with image + task tokens in place. ``input_ids`` right-padded as in training (prompt
    ending with the assistant header). Returns (B, n_new) new token ids only (pad after EOS)."""
    dev = model.device
    input_ids = input_ids.to(dev)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pixel_values is not None:
        pixel_values = pixel_values.to(dev)
    asm = model.assemble(input_ids, attention_mask, pixel_values, has_image)
    emb, valid = asm.inputs_embeds, asm.layout.valid_len
    # HF generation of a batch needs LEFT padding: right-align every row
    _, seq, _ = emb.shape
    shift = (seq - valid)[:, None]
    src = (torch.arange(seq, device=dev)[None, :] - shift) % seq
    emb = emb.gather(1, src[..., None].expand_as(emb))
    att = (torch.arange(seq, device=dev)[None, :] >= shift).long()
    llm = model.llm
    gcfg = llm.generation_config
    if eos_token_id is None:
        eos_token_id = gcfg.eos_token_id if gcfg.eos_token_id is not None else llm.config.eos_token_id
    if pad_token_id is None:
        pad_token_id = gcfg.pad_token_id if gcfg.pad_token_id is not None else llm.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    generate_kwargs.setdefault("do_sample", False)
    return llm.generate(
        inputs_embeds=emb,
        attention_mask=att,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **generate_kwargs,
    )


def generate(directory: Path, prompt: str, *, image: Path | None = None, max_new_tokens: int = 32,
             device: str = "auto", note: Callable[[str], None] | None = None) -> str:
    """The decoded answer; ``note`` receives remarks about it (kept apart, so a caller can print the answer
    alone on stdout)."""
    from olacache.inputs.images import ImageError, load_rgb
    from olatrain.data.pixels import pad_to_square, processor_mean_color, run_processor
    from olatrain.data.templates import tokenize_conversation

    if image is not None and not Path(image).is_file():  # before the model loads
        raise GenerateError(f"--image {image}: no such file")
    model, tok, proc, cfg = load_for_inference(directory, device)
    tiny = [k for k in ("llm", "vision") if getattr(cfg.model, k) == "tiny"]
    if note is not None and tiny:
        note(f"this checkpoint's {' and '.join(tiny)} come from the tiny random-weight presets: "
             "expect noise, not answers (real checkpoints: model.llm / model.vision)")
    has_image = image is not None
    text = f"<image>\n{prompt}" if has_image else prompt
    ids, _ = tokenize_conversation([{"from": "human", "value": text}], tok, cfg.model.chat_template,
                                   has_image=has_image, add_generation_prompt=True)
    pixels = None
    if has_image:
        try:
            img = load_rgb(image)
        except ImageError as e:
            raise GenerateError(str(e)) from e
        if cfg.data.image_aspect == "pad":
            img = pad_to_square(img, processor_mean_color(proc))
        pixels = run_processor(proc, img)[None]
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = generate_ids(model, input_ids, pixels, max_new_tokens=max_new_tokens, has_image=torch.tensor([has_image]))
    return tok.decode(out[0], skip_special_tokens=True).strip()
