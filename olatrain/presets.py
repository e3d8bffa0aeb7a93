"""Tiny presets: the real architecture classes with small configs and random weights.

No machine here can download weights, so every component the trainer loads (tokenizer, vision encoder, LLM) has a
"tiny" preset. Each preset is built once, deterministically, saved with ``save_pretrained`` into a local directory
and then loaded back through exactly the same ``from_pretrained`` path a real hub checkpoint would take.

Cache layout: ``$OLAKIT_CACHE`` (default ``~/.cache/olakit``) / ``tiny`` / ``olatrain-<name>-v1``, published the
one way every preset is (``olacache.common.cachedir.publish_once``: private temporary sibling, one ``os.replace``,
``olakit_preset.json`` written last; an incomplete directory is replaced).

Bump ``_VERSION`` whenever the content of a preset changes, so stale caches are never mixed with new code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from olacache.common.cachedir import PRESET_MARKER, cache_root, publish_once

_VERSION = "v1"
MARKER = PRESET_MARKER
SEED = 1234

# Llama-3-style special tokens. Instruct-style: generation ends at <|eot_id|>, so it is the EOS token.
BOS = "<|begin_of_text|>"
EOT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_ID = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOT, START_HEADER, END_HEADER, EOT_ID, PAD]
TOKENIZER_VOCAB_SIZE = 1536

# A Llama-3-style template written for this project: header per message, <|eot_id|> after each, BOS first.
# Content may be a plain string or a list of {"type": "text"|"image"} parts (an image part renders as "<image>").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Tiny vision encoder: real CLIP geometry (336 px, patch 14 -> 24x24 = 576 patches + CLS), tiny width/depth.
VISION_CONFIG = dict(
    image_size=336,
    patch_size=14,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=48,
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Tiny LLM: Llama architecture, 6 decoder layers.
LLM_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)

# Layers the predictors read for a 32-layer LLM (the released OLA-VLM checkpoints), and what we recommend for the
# 6-layer tiny LLM (stated explicitly in configs/tiny.yaml; nothing is rescaled silently).
DEFAULT_LAYERS_32 = {"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}
TINY_LAYERS = {"depth": [2, 5], "seg": [3, 4], "gen": [3, 5]}


def _preset_dir(name: str) -> Path:
    return cache_root() / "tiny" / f"olatrain-{name}-{_VERSION}"


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Return the published preset dir, building it first if needed (``olacache.common.cachedir``)."""
    return publish_once(_preset_dir(name), build, marker={"preset": "tiny", "random_init": True})


# ----------------------------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """A small, fixed English corpus: chat scaffolding, LLaVA-style prompts, and image captions."""
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    )
    prompts = [
        "What is in this picture?",
        "Describe the image briefly.",
        "Describe the image in two lines.",
        "What animal is this?",
        "What colour is its fur?",
        "Is it looking at the camera?",
        "What is on the saucer?",
        "Is the cup full?",
        "What is the person wearing?",
        "What is behind them?",
        "How many rockets are there?",
        "What is the weather like?",
        "What is the capital of France?",
        "And of Italy?",
        "Is this a dog?",
        "Answer the question using a single word or phrase.",
        "Only answer the option as the output.",
        "Answer with the option's letter from the given choices directly.",
        "Which object is closer to the camera?",
        "How far is the table from the window?",
        "Count the number of people in the image.",
        "Where is the ball relative to the chair?",
        "Give a short caption for this photo.",
        "Provide a detailed description of the scene.",
    ]
    captions = [
        "An astronaut in a white suit poses in front of an American flag.",
        "A ginger cat with green eyes looks to the side.",
        "A cup of coffee on a saucer with a spoon, seen from above.",
        "A rocket stands on the launch pad against a blue sky.",
        "A field of distant galaxies scattered across dark space.",
        "A photograph of a human retina with branching blood vessels.",
        "A close-up texture of green grass blades.",
        "A close-up texture of grey gravel stones.",
        "A black and white photo of a man with a camera on a tripod.",
        "A grey brick wall with regular mortar lines.",
        "A microscope image of a single cell.",
        "A wall clock photographed at an angle.",
        "A black silhouette of a horse on a white background.",
        "A cat whose picture fades to transparent on the left.",
        "A coffee cup drawn with a small colour palette.",
        "An astronaut portrait stored in CMYK colours.",
        "A high bit-depth grayscale photo of a cameraman.",
        "A rocket on its pad, stored sideways with a rotation tag.",
        "A single orange pixel.",
        "A very thin horizontal strip of a star field.",
        "A cup of coffee on a saucer in a cafe.",
        "It is a cat. Its fur is ginger with darker stripes. No, it is looking to the side.",
        "A spoon rests on the saucer next to the cup. Yes, it is filled with coffee.",
        "A white space suit with patches. A flag and a model of a spacecraft.",
        "There is one rocket. Clear and sunny. The capital of France is Paris. Rome.",
        "No, it is a cat.",
    ]
    subjects = [
        "the dog",
        "a small child",
        "the old man",
        "two women",
        "a red car",
        "the yellow bus",
        "a brown horse",
        "the black cat",
        "a group of students",
        "the tall building",
        "a wooden boat",
        "the green tree",
        "a plate of food",
        "the bicycle",
        "an airplane",
        "the kitchen table",
        "a laptop computer",
        "the river",
    ]
    verbs = [
        "is standing near",
        "is sitting on",
        "is parked next to",
        "is moving towards",
        "is placed behind",
        "is lying under",
        "is floating above",
        "is leaning against",
        "is reflected in",
        "is far from",
    ]
    objects = [
        "the window",
        "a park bench",
        "the street",
        "a sandy beach",
        "the mountains",
        "a snowy field",
        "the door",
        "a wooden fence",
        "the stairs",
        "a busy market",
        "the lake",
        "a stone bridge",
    ]
    details = [
        "on a sunny afternoon.",
        "in the evening light.",
        "during heavy rain.",
        "with many people around.",
        "in the middle of the city.",
        "at night under street lamps.",
        "with clouds in the sky.",
    ]
    lines = [system, *prompts, *captions]
    # deterministic combinatorial sentences: enough text for ~1.5k BPE merges
    k = 0
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            o = objects[(i + 3 * j) % len(objects)]
            d = details[(i * 5 + j) % len(details)]
            lines.append(f"{s[0].upper()}{s[1:]} {v} {o} {d}")
            k += 1
    numbers = " ".join(str(n) for n in range(0, 200))
    lines.append(numbers)
    lines.append("The answer is (A). The answer is (B). The answer is (C). The answer is (D).")
    lines.append("Depth, segmentation, and generation: left, right, top, bottom, near, far, above, below.")
    return lines


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Llama-3: BOS prepended by the post-processor when add_special_tokens=True (the chat template writes
    # bos_token itself and is tokenised without special tokens, so it is never doubled).
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT_ID,
        pad_token=PAD,
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def tiny_tokenizer_dir() -> Path:
    """Byte-level BPE (~1.5k tokens) with Llama-3-style special tokens and chat template."""
    return _build_once("tokenizer", _build_tokenizer)


# ----------------------------------------------------------------------------------------------- vision


def _seeded(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        import torch

        # fork_rng: building a preset must not perturb (or depend on) the caller's global RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            fn(out)

    return run


def _build_vision(out: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**VISION_CONFIG))
    model.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": VISION_CONFIG["image_size"]},
        crop_size={"height": VISION_CONFIG["image_size"], "width": VISION_CONFIG["image_size"]},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(out)


def tiny_vision_dir() -> Path:
    """CLIPVisionModel at 336 px / patch 14 (576 patches + CLS), random weights, with its CLIPImageProcessor."""
    return _build_once("vision", _seeded(_build_vision))


# ----------------------------------------------------------------------------------------------- LLM


def _build_llm(out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **LLM_CONFIG,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    # the tokenizer travels with the LLM, as it does in hub checkpoints (model.tokenizer defaults to the llm)
    tok.save_pretrained(out)


def tiny_llm_dir() -> Path:
    """LlamaForCausalLM (hidden 64, 6 layers, 4 heads), vocab = the tiny tokenizer, tokenizer saved alongside."""
    return _build_once("llm", _seeded(_build_llm))


# ----------------------------------------------------------------------------------------------- helpers

_RESOLVERS: dict[str, Callable[[], Path]] = {
    "tokenizer": tiny_tokenizer_dir,
    "vision": tiny_vision_dir,
    "llm": tiny_llm_dir,
}


def resolve(kind: str, name: str) -> str:
    """``"tiny"`` -> the local preset directory for ``kind`` (tokenizer|vision|llm); anything else unchanged.

    A ``timm:`` vision name is returned unchanged too (timm builds by name)."""
    if name != "tiny":
        return name
    if kind not in _RESOLVERS:
        raise ValueError(f"no tiny preset for kind {kind!r}; valid: {sorted(_RESOLVERS)}")
    return str(_RESOLVERS[kind]())


def scale_layers(layers: dict[str, list[int]], n_layers: int, ref_layers: int = 32) -> dict[str, list[int]]:
    """Map 1-indexed layer lists proportionally from a ``ref_layers``-deep LLM to an ``n_layers``-deep one.

    Round to nearest, clamp to 1..n_layers, de-duplicate (order kept). A helper for writing configs and error
    messages only: the model never rescales configured layers on its own."""
    out: dict[str, list[int]] = {}
    for name, ls in layers.items():
        seen: list[int] = []
        for layer in ls:
            m = min(max(int(round(layer * n_layers / ref_layers)), 1), n_layers)
            if m not in seen:
                seen.append(m)
        out[name] = seen
    return out


# ----------------------------------------------------------------------------------------------- loaders


def load_tokenizer(cfg: Any) -> Any:
    """The run's tokenizer: ``model.tokenizer`` or else the LLM's (``"tiny"`` -> the preset), right padding.

    A tokenizer without a pad token (Llama-3) gets ``<pad>`` added, as in the reference; build_model(tokenizer=)
    then grows the LLM's embeddings to ``len(tokenizer)``."""
    from transformers import AutoTokenizer

    mc = cfg.model
    path = resolve("tokenizer", mc.tokenizer) if mc.tokenizer else resolve("llm", mc.llm)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "right"
    return tok
