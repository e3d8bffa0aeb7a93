"""Chat templates in Python: a LLaVA conversation -> (input_ids, labels) with only the answers supervised.

Templates
- ``llama3``  (the reference's ``llava_llama_3``), ``phi3`` (``llava_phi_3``) and ``vicuna`` (LLaVA-1.5's
  ``vicuna_v1``) are written out here, MPT separator style: ``system + sep + role + msg + sep + role + msg +
  sep ...``. ``llama3`` always starts with the tokenizer's BOS; ``phi3``/``vicuna`` start with BOS only when the
  tokenizer adds one by default (what the reference's ``tokenizer(prompt)`` call does).
- ``auto`` renders the tokenizer's own Jinja ``chat_template`` with ``apply_chat_template``.

Supervision: only assistant messages plus their end-of-turn token (the template's separator, or for ``auto``
whatever the template emits up to the next turn, trailing whitespace excluded) carry labels; system prompt,
user turns, role headers, BOS and the image token are ``IGNORE_INDEX``.

How spans become token labels: the conversation is rendered to one string made of segments
(supervised or not). Each run of text between image placeholders is tokenised whole, exactly as at inference,
and a segment boundary at character ``c`` is mapped to the token index where ``tokenize(text[:c])`` stops
agreeing with ``tokenize(text)``; a BPE merge across a boundary therefore goes to the later segment instead
of being split or double counted. This works for any tokenizer (fast or slow, byte-level or SentencePiece)
without trusting offset mappings. For ``auto``, the spans come from rendering the conversation prefix by
prefix; a template whose output for the first k messages is not a prefix of its output for k+1 messages
(e.g. one that rewrites earlier turns depending on what follows) is rejected with ``TemplateError``.

Image placeholder: ``<image>`` is moved to the front of its message as ``"<image>\\n" + rest`` (the
reference's rule) and becomes the single id ``IMAGE_TOKEN_INDEX`` (-200), which the model replaces by the
image tokens (+ task tokens). A sample with an image but no placeholder gets one at the front of its first
user message; a text-only sample containing ``<image>`` is an error (it would ask the model for an image
that is not there), as are placeholders in two messages or in an answer.

Conversation shape: an optional leading ``system`` turn replaces the template's default system message; a
leading ``gpt`` turn is dropped (reference); then turns must alternate human, gpt, human, ...; a trailing
human turn is kept unanswered (with ``add_generation_prompt=True`` it ends with the assistant header, for
generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# IMAGE_TOKEN_INDEX lives here (not in olatrain.model) so that the data pipeline never imports the model
# module; olatrain.model should import it from here.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

_LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(ValueError):
    """A conversation that cannot be rendered, or a template/tokenizer that cannot be used."""


@dataclass(frozen=True)
class NamedTemplate:
    """An MPT-separator-style template. ``None`` separators mean "the tokenizer's eos_token"."""

    name: str
    system_header: str  # prefix of the system message
    system: str  # default system message
    system_sep: str | None
    user: str  # user role header
    user_sep: str | None
    assistant: str  # assistant role header (not supervised)
    assistant_sep: str | None  # end of an answer (supervised); must be ONE token so generation can stop on it
    bos: str  # "always" | "tokenizer" (only if the tokenizer adds BOS by default)
    # text between the assistant header and the answer, supervised with it (vicuna's " " after "ASSISTANT:":
    # the generation prompt ends at the colon, so the model must produce the space, usually merged into the
    # answer's first token)
    answer_prefix: str = ""


TEMPLATES: dict[str, NamedTemplate] = {
    "llama3": NamedTemplate(
        name="llama3",
        system_header="<|start_header_id|>system<|end_header_id|>\n\n",
        system=_LLAVA_SYSTEM,
        system_sep="<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        user_sep="<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_sep="<|eot_id|>",
        bos="always",
    ),
    "phi3": NamedTemplate(
        name="phi3",
        system_header="<|system|>\n",
        system="You are a helpful AI assistant.",
        system_sep="<|end|>",
        user="\n<|user|>\n",
        user_sep="<|end|>",
        assistant="\n<|assistant|>\n",
        assistant_sep="<|end|>",
        bos="tokenizer",
    ),
    # LLaVA-1.5 vicuna_v1 ("TWO" style: " " after the system prompt and user turns, </s> after answers)
    "vicuna": NamedTemplate(
        name="vicuna",
        system_header="",
        system=_LLAVA_SYSTEM,
        system_sep=" ",
        user="USER: ",
        user_sep=" ",
        assistant="ASSISTANT:",
        assistant_sep=None,
        bos="tokenizer",
        answer_prefix=" ",
    ),
}
TEMPLATE_NAMES = (*TEMPLATES, "auto")


def tokenize_conversation(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: str = "auto",
    *,
    has_image: bool,
    sample_id: str = "?",
    add_generation_prompt: bool = False,
    max_chars: int | None = None,
) -> tuple[list[int], list[int]]:
    """Render and tokenise one LLaVA conversation.

    Returns ``(input_ids, labels)`` of equal length, plain int lists (the caller makes tensors and
    truncates). ``input_ids`` holds ``IMAGE_TOKEN_INDEX`` once when ``has_image``; ``labels`` is
    ``IGNORE_INDEX`` except on assistant tokens and their end-of-turn token.

    ``max_chars`` bounds the text BEFORE tokenisation (see ``cap_turns``): pass a bound beyond which the
    caller's token truncation would drop the text anyway.
    """
    system, turns = normalize_turns(conversations, has_image=has_image, sample_id=sample_id)
    if max_chars is not None:
        system, turns = cap_turns(system, turns, max_chars)
    if template == "auto":
        segments = _auto_segments(tokenizer, system, turns, add_generation_prompt, sample_id)
        bos_id = None  # the template writes its own BOS (if any) as text
    elif template in TEMPLATES:
        t = TEMPLATES[template]
        segments = _named_segments(t, tokenizer, system, turns, add_generation_prompt)
        bos_id = _bos_id(t, tokenizer)
    else:
        raise TemplateError(f"unknown chat template {template!r}; choose one of {list(TEMPLATE_NAMES)}")
    return encode_segments(tokenizer, segments, bos_id=bos_id, sample_id=sample_id)


def end_token_id(tokenizer: Any, template: str) -> int:
    """The id that ends an assistant turn (stop token for generation)."""
    if template in TEMPLATES:
        sep = TEMPLATES[template].assistant_sep or tokenizer.eos_token
        return _single_token_id(tokenizer, sep, template)
    if tokenizer.eos_token_id is None:
        raise TemplateError("tokenizer has no eos_token; cannot tell where an answer ends")
    return int(tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------------------------------
# conversation normalisation


def normalize_turns(
    conversations: Sequence[dict[str, Any]], *, has_image: bool, sample_id: str = "?"
) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate roles and place the image placeholder; returns (system message or None, [(role, text)])
    with roles "user"/"assistant" alternating from "user"."""
    turns = [(str(c["from"]), str(c["value"])) for c in conversations]
    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    if turns and turns[0][0] == "gpt":
        turns = turns[1:]  # the reference drops a leading answer (it has no question)
    if not turns:
        raise TemplateError(f"sample {sample_id!r}: conversation has no human turn")
    out: list[tuple[str, str]] = []
    for i, (who, text) in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if who != want:
            where = "a system turn is only allowed first" if who == "system" else f"expected {want!r}"
            raise TemplateError(
                f"sample {sample_id!r}: turns must alternate human/gpt; turn {i} (after dropping a leading "
                f"gpt/system turn) is {who!r}: {where}"
            )
        out.append(("user" if who == "human" else "assistant", text))

    with_ph = [i for i, (_, text) in enumerate(out) if IMAGE_PLACEHOLDER in text]
    if not has_image:
        if with_ph:
            raise TemplateError(
                f"sample {sample_id!r} has no 'image' but its text contains {IMAGE_PLACEHOLDER!r}; add the "
                f"image or remove the placeholder"
            )
        return system, out
    if len(with_ph) > 1:
        raise TemplateError(
            f"sample {sample_id!r}: {IMAGE_PLACEHOLDER!r} appears in {len(with_ph)} messages; one image per "
            f"sample is supported, so exactly one message may hold the placeholder"
        )
    k = with_ph[0] if with_ph else 0  # no placeholder: the image goes before the first question
    role, text = out[k]
    if role != "user":
        raise TemplateError(f"sample {sample_id!r}: {IMAGE_PLACEHOLDER!r} is in an answer (turn {k})")
    # reference rule: remove every occurrence in the message, strip, and put one in front
    out[k] = (role, IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip())
    return system, out


def cap_turns(
    system: str | None, turns: list[tuple[str, str]], max_chars: int
) -> tuple[str | None, list[tuple[str, str]]]:
    """Cut the messages at ``max_chars`` characters in total (each message, and the conversation: messages
    starting beyond the budget are dropped), so a huge caption costs bounded memory in the tokenizer. The
    image placeholder is at the front of its message by now (``normalize_turns``), so it is never cut."""
    if system is not None and len(system) > max_chars:
        system = system[:max_chars]
    out: list[tuple[str, str]] = []
    used = 0
    for role, text in turns:
        if used >= max_chars:
            break
        text = text[: max_chars - used] if len(text) > max_chars - used else text
        used += len(text)
        out.append((role, text))
    return system, out


# ---------------------------------------------------------------------------------------------------------
# rendering to (text, supervised) segments

Segment = tuple[str, bool]


def _named_segments(
    t: NamedTemplate, tokenizer: Any, system: str | None, turns: list[tuple[str, str]], add_gen: bool
) -> list[Segment]:
    eos = tokenizer.eos_token
    seps = {}
    for key in ("system_sep", "user_sep", "assistant_sep"):
        v = getattr(t, key)
        if v is None:
            if eos is None:
                raise TemplateError(f"template {t.name!r} ends turns with eos_token, but the tokenizer has none")
            v = eos
        seps[key] = v
    # the answer's end token is what generation stops on: it must be one id, not a string of pieces
    _single_token_id(tokenizer, seps["assistant_sep"], t.name)

    segs: list[Segment] = [(t.system_header + (t.system if system is None else system) + seps["system_sep"], False)]
    for i, (role, text) in enumerate(turns):
        if role == "user":
            head = t.user + text + seps["user_sep"]
            answered = i + 1 < len(turns)
            if answered or add_gen:
                head += t.assistant
            segs.append((head, False))
        else:
            segs.append((t.answer_prefix + text + seps["assistant_sep"], True))
    return segs


def _auto_segments(
    tokenizer: Any, system: str | None, turns: list[tuple[str, str]], add_gen: bool, sample_id: str
) -> list[Segment]:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "model.chat_template='auto' but the tokenizer has no chat_template; set model.chat_template to one "
            f"of {list(TEMPLATES)}"
        )
    msgs: list[dict[str, str]] = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": r, "content": c} for r, c in turns
    ]

    def render(m: list[dict[str, str]], gen: bool) -> str:
        try:
            out = tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises its own exception types (e.g. "roles must alternate")
            raise TemplateError(f"sample {sample_id!r}: the tokenizer's chat_template failed: {e}") from e
        if not isinstance(out, str):
            raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, not str")
        return out

    full = render(msgs, add_gen and msgs[-1]["role"] == "user")
    spans: list[tuple[int, int]] = []
    prev_end = 0
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render(msgs[:k], True)  # everything up to and including the assistant header
        upto = render(msgs[: k + 1], False)  # ... plus this answer and its end-of-turn text
        if not (upto.startswith(head) and full.startswith(upto) and len(head) >= prev_end):
            raise TemplateError(
                f"the tokenizer's chat_template is not prefix-stable (rendering the first {k + 1} messages is "
                f"not a prefix of rendering more of them; sample {sample_id!r}), so answer spans cannot be "
                f"located; set model.chat_template to one of {list(TEMPLATES)}"
            )
        answer = upto[len(head) :]
        if m["content"].strip() not in answer:
            raise TemplateError(
                f"sample {sample_id!r}: could not find assistant message {k} in the chat_template output after "
                f"the generation prompt; set model.chat_template to one of {list(TEMPLATES)}"
            )
        end = len(head) + len(answer.rstrip())  # the newline many templates put after the end token is not a target
        spans.append((len(head), end))
        prev_end = end
    segs: list[Segment] = []
    pos = 0
    for a, b in spans:
        segs += [(full[pos:a], False), (full[a:b], True)]
        pos = b
    segs.append((full[pos:], False))
    return segs


# ---------------------------------------------------------------------------------------------------------
# tokenisation


def encode_segments(
    tokenizer: Any, segments: Sequence[Segment], *, bos_id: int | None = None, sample_id: str = "?"
) -> tuple[list[int], list[int]]:
    """Tokenise segments into (input_ids, labels); see the module docstring for the boundary rule."""
    runs: list[list[Segment]] = [[]]  # text runs between image placeholders
    for text, sup in segments:
        pieces = text.split(IMAGE_PLACEHOLDER)
        if sup and len(pieces) > 1:
            raise TemplateError(f"sample {sample_id!r}: {IMAGE_PLACEHOLDER!r} inside a supervised span")
        for j, piece in enumerate(pieces):
            if j:
                runs.append([])
            if piece:
                if runs[-1] and runs[-1][-1][1] == sup:  # merge neighbours: fewer boundaries to tokenise
                    runs[-1][-1] = (runs[-1][-1][0] + piece, sup)
                else:
                    runs[-1].append((piece, sup))

    ids: list[int] = []
    labels: list[int] = []
    if bos_id is not None:
        ids.append(bos_id)
        labels.append(IGNORE_INDEX)
    for r, run in enumerate(runs):
        if r:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        if not run:
            continue
        text = "".join(s for s, _ in run)
        cuts: list[int] = []
        c = 0
        for s, _ in run[:-1]:
            c += len(s)
            cuts.append(c)
        enc = tokenizer([text] + [text[:c] for c in cuts], add_special_tokens=False)["input_ids"]
        full = list(enc[0])
        bounds = [0]
        for prefix in enc[1:]:
            n = _common_prefix_len(full, prefix)
            bounds.append(max(n, bounds[-1]))  # monotone even if a tokenizer did something odd
        bounds.append(len(full))
        for (_, sup), a, b in zip(run, bounds[:-1], bounds[1:], strict=True):
            ids.extend(full[a:b])
            labels.extend(full[a:b] if sup else [IGNORE_INDEX] * (b - a))
    return ids, labels


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _single_token_id(tokenizer: Any, token: str, template: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TemplateError(
            f"chat template {template!r} ends answers with {token!r}, which this tokenizer splits into "
            f"{len(ids)} tokens; add it as a special token or use model.chat_template=auto"
        )
    return int(ids[0])


def _bos_id(t: NamedTemplate, tokenizer: Any) -> int | None:
    bos = tokenizer.bos_token_id
    if t.bos == "always":
        if bos is None:
            raise TemplateError(f"chat template {t.name!r} starts with BOS, but the tokenizer has no bos_token")
        return int(bos)
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]  # does the tokenizer add BOS by default (as the reference relies on)?
    return int(bos) if probe and probe[0] == bos else None
