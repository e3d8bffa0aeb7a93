"""`olatrain generate`: greedy decoding with a trained checkpoint, so a user can try what they trained.

The checkpoint's own config rebuilds the model (stage forced to inference: no predictors); its weights hold
the trained projector and task tokens (and the LLM after VPT/IFT). The prompt goes through the same chat
template and image preprocessing as training, with the image and the frozen task tokens in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from olatrain import checkpoint as ckpt
from olatrain.config import Config, ConfigError, config_from_dict


class GenerateError(RuntimeError):
    pass


def load_for_inference(directory: Path, device: str = "auto") -> tuple[torch.nn.Module, object, object, Config]:
    from olatrain.model import build_model
    from olatrain.presets import load_image_processor, load_tokenizer

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
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    tok = load_tokenizer(cfg)
    proc = load_image_processor(cfg)
    model = build_model(cfg, {}, device=dev, tokenizer=tok)
    model.load_trainable_state_dict(ckpt.load_weights(directory, device=dev), strict=False)
    model.eval()
    cfg.train.stage = stage
    return model, tok, proc, cfg


def generate(directory: Path, prompt: str, *, image: Path | None = None, max_new_tokens: int = 32,
             device: str = "auto") -> str:
    from olacache.images import ImageError, load_rgb
    from olatrain.data import pad_to_square, processor_mean_color, run_processor
    from olatrain.templates import tokenize_conversation

    model, tok, proc, cfg = load_for_inference(directory, device)
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
    out = model.generate(input_ids, pixels, max_new_tokens=max_new_tokens,
                         has_image=torch.tensor([has_image]))
    return tok.decode(out[0], skip_special_tokens=True).strip()
