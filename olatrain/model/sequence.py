"""Sequence assembly and predictor indexing as pure tensor functions (docs/method.md §1, §5.2).

Per image sample the model sees ``[text before <image>][N_img image embeddings][task tokens][text after]``,
task tokens in the order gen, depth, seg (teachers with a count > 0). Every offset is RECORDED per sample from
the actual position of ``IMAGE_TOKEN_INDEX`` in the token ids: nothing here assumes a system-prompt length or
an image-token count (the reference hard-codes 38/13 and 576). Text-only samples get neither image embeddings
nor task tokens, and their spans are empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from olatrain.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class Layout:
    """Where things are in the assembled sequence, per sample (all (B,) long tensors unless noted).

    For text-only samples image_start = image_end = text_start = 0 and every span is (0, 0)."""

    image_start: torch.Tensor
    image_end: torch.Tensor
    spans: dict[str, tuple[torch.Tensor, torch.Tensor]]  # teacher -> (start, end) of its task tokens
    text_start: torch.Tensor
    valid_len: torch.Tensor  # real (non-pad) length after truncation
    block_ok: torch.Tensor  # (B,) bool: image sample whose image + task-token block survived truncation
    has_image: torch.Tensor  # (B,) bool
    n_image_tokens: int


@dataclass
class Assembled:
    inputs_embeds: torch.Tensor  # (B, L', H)
    attention_mask: torch.Tensor  # (B, L') long
    labels: torch.Tensor  # (B, L') long, IGNORE_INDEX at image/task/pad positions
    layout: Layout
    image_features: torch.Tensor  # (B, N_img, H) projector output (text-only rows too: they keep DDP simple)


def pool_task_tokens(
    params: Mapping[str, torch.Tensor], counts: Mapping[str, int], kinds: Mapping[str, str], order: Sequence[str]
) -> list[torch.Tensor]:
    """The tokens inserted after each image, per teacher in ``order`` (docs/method.md §4): a global teacher's
    (n, H) parameter as is; a spatial teacher's (rows, H) parameter as n group means of rows/n consecutive
    rows."""
    parts = []
    for t in order:
        p, n = params[t], counts[t]
        parts.append(p.view(n, p.shape[0] // n, p.shape[1]).mean(dim=1) if kinds[t] == "spatial" else p)
    return parts


def check_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
    """Validate the batch contract; -> (B,) real lengths. One IMAGE_TOKEN_INDEX per image sample, none in
    text-only ones; right padding."""
    n_img_tok = (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1)
    if bool((n_img_tok != has_image.long()).any()):
        raise ValueError(
            f"each image sample needs exactly one IMAGE_TOKEN_INDEX ({IMAGE_TOKEN_INDEX}) and text-only samples "
            f"none; got counts {n_img_tok.tolist()} for has_image {has_image.tolist()}"
        )
    lengths = attention_mask.long().sum(dim=1)
    ar = torch.arange(input_ids.shape[1], device=input_ids.device)
    if bool(((ar[None, :] < lengths[:, None]).long() != attention_mask.long()).any()):
        raise ValueError("attention_mask must be right-padded (ones then zeros)")
    return lengths


def assemble_sequences(
    input_ids: torch.Tensor,
    token_embeds: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    has_image: torch.Tensor,
    image_features: torch.Tensor,
    task_block: torch.Tensor,
    token_spans: Sequence[tuple[str, int]],
    all_teachers: Sequence[str],
    max_length: int | None,
) -> Assembled:
    """Replace each image sample's IMAGE_TOKEN_INDEX by [image features][task block], right-pad, truncate to
    ``max_length``, and record the layout.

    ``token_embeds`` (B, L, H) are the word embeddings of ``input_ids`` (the -200 slot is dropped);
    ``image_features`` (B, N_img, H); ``task_block`` (T, H); ``token_spans`` = [(teacher, count), ...] in
    insertion order (summing to T); teachers in ``all_teachers`` without tokens get an empty span right after
    the image."""
    b = input_ids.shape[0]
    dev = input_ids.device
    is_img = input_ids == IMAGE_TOKEN_INDEX
    n_img = image_features.shape[1]
    k = n_img + task_block.shape[0]
    dtype = token_embeds.dtype
    feats_c, block_c = image_features.to(dtype), task_block.to(dtype)

    img_pos = torch.where(has_image, is_img.long().argmax(dim=1), torch.zeros_like(lengths))
    rows_e, rows_l = [], []
    lens_host, pos_host, has_host = lengths.tolist(), img_pos.tolist(), has_image.tolist()
    for i in range(b):
        n, p = lens_host[i], pos_host[i]
        if has_host[i]:
            rows_e.append(torch.cat([token_embeds[i, :p], feats_c[i], block_c, token_embeds[i, p + 1 : n]], dim=0))
            rows_l.append(
                torch.cat([labels[i, :p], labels.new_full((k,), IGNORE_INDEX), labels[i, p + 1 : n]], dim=0)
            )
        else:
            rows_e.append(token_embeds[i, :n])
            rows_l.append(labels[i, :n])
    full_len = torch.tensor([r.shape[0] for r in rows_e], device=dev)
    out_len = int(full_len.max()) if b else 0
    if max_length is not None:
        out_len = min(out_len, max_length)
    emb = token_embeds.new_zeros(b, out_len, token_embeds.shape[-1])
    lab = labels.new_full((b, out_len), IGNORE_INDEX)
    for i in range(b):
        m = min(rows_e[i].shape[0], out_len)
        emb[i, :m] = rows_e[i][:m]
        lab[i, :m] = rows_l[i][:m]
    valid = full_len.clamp(max=out_len)
    att = (torch.arange(out_len, device=dev)[None, :] < valid[:, None]).long()

    zero = torch.zeros_like(img_pos)
    image_start = torch.where(has_image, img_pos, zero)
    image_end = torch.where(has_image, img_pos + n_img, zero)
    spans: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cursor = image_end
    for t, count in token_spans:
        end = torch.where(has_image, cursor + count, zero)
        spans[t] = (cursor, end)
        cursor = end
    for t in all_teachers:
        spans.setdefault(t, (image_end, image_end))  # 0-token teachers: an empty span right after the image
    text_start = torch.where(has_image, img_pos + k, zero)
    block_ok = has_image & (text_start <= valid)
    layout = Layout(image_start, image_end, spans, text_start, valid, block_ok, has_image, n_img)
    return Assembled(emb, att, lab, layout, image_features)


def predictor_index(layout: Layout, teacher: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, seq_len) gather positions and validity mask for ``teacher``'s predictor K/V (docs/method.md §5.2):
    [0, image_end) ++ own task-token span ++ [text_start, valid_len); padding positions point at 0."""
    valid = layout.valid_len
    img_end = layout.image_end.clamp(max=valid)
    s, e = layout.spans[teacher]
    s, e = s.clamp(max=valid), e.clamp(max=valid)
    span = e - s
    ts = layout.text_start.clamp(max=valid)
    n_text = valid - ts
    total = img_end + span + n_text
    j = torch.arange(seq_len, device=valid.device)[None, :]
    a, sp = img_end[:, None], span[:, None]
    pos = torch.where(j < a, j, torch.where(j < a + sp, s[:, None] + (j - a), ts[:, None] + (j - a - sp)))
    mask = j < total[:, None]
    return torch.where(mask, pos, torch.zeros_like(pos)), mask


def gather_positions(hs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """hs (B, L, H), pos (B, N) -> (B, N, H)."""
    return hs.gather(1, pos[..., None].expand(-1, -1, hs.shape[-1]))
