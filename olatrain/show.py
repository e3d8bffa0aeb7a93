"""``olatrain show CHECKPOINT --image FILE --out OUT.png``: for one image, the image beside the cached teacher
target and the PT predictors' output per spatial teacher and predictor layer, as feature maps in one 3-component
PCA colour space fit on the target (so colours compare across maps), with the cosine of each map to the target.
Global teachers (one vector) get their cosines in the figure's caption.

``--decode`` also turns the target and each predicted depth map into a depth image through the depth teacher's
own DPT neck + head (the same feature fed to all four levels, as the reference's visualisation does). That loads
the teacher: this module is an inspection command, the one place besides ``olatrain/online.py`` allowed to import
``olacache.teachers`` (lazily, in :func:`decode_depth`), and nothing in training, probing or sweeping imports it.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olatrain.probe_source import ProbeError, find_checkpoint

PROMPT = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "An image."}]


@dataclass
class Shown:
    """What the figure shows: per teacher, the target and {layer: prediction}, each (tokens, C) float32."""

    image: Any
    targets: dict[str, np.ndarray]
    preds: dict[str, dict[int, np.ndarray]]
    kinds: dict[str, str]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / max(1e-12, np.linalg.norm(a) * np.linalg.norm(b)))


def pca_colours(target: np.ndarray, maps: list[np.ndarray]) -> list[np.ndarray]:
    """Project (tokens, C) maps onto the target's top-3 principal components; scale each component to [0, 1]
    with the target's 1st/99th percentiles (clipped) -> (side, side, 3) RGB images, target first."""
    mu = target.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(target - mu, full_matrices=False)
    comps = vt[:3].T  # (C, 3)
    t_proj = (target - mu) @ comps
    lo, hi = np.percentile(t_proj, 1, axis=0), np.percentile(t_proj, 99, axis=0)
    side = int(round(math.sqrt(target.shape[0])))
    out = []
    for m in [target, *maps]:
        p = ((m - mu) @ comps - lo) / np.maximum(hi - lo, 1e-8)
        rgb = np.clip(p, 0, 1)
        if rgb.shape[1] < 3:
            rgb = np.concatenate([rgb, np.zeros((rgb.shape[0], 3 - rgb.shape[1]))], axis=1)
        out.append(rgb.reshape(side, side, 3))
    return out


def collect(checkpoint: Path, image: Path, sets: list[str] | None = None, key: str | None = None) -> Shown:
    """Run the PT checkpoint's predictors on ``image`` and read its cached targets."""
    from olacache.inputs.images import load_rgb
    from olacache.store import StoreError, TargetReader
    from olatrain import checkpoint as ckpt
    from olatrain.data import ConversationDataset, DataError, collate, load_image_processor
    from olatrain.model import TargetSpec, build_model
    from olatrain.model.sequence import gather_positions, predictor_index
    from olatrain.presets import load_tokenizer
    from olatrain.probe_source import resolve_source

    ck = find_checkpoint(checkpoint)
    src = resolve_source(ck, sets=sets)
    cfg = src.cfg
    if cfg.train.stage != "pt" or not cfg.teachers:
        raise ProbeError(f"{ck} has no predictors (stage {cfg.train.stage}, embedding losses: {cfg.teachers or 'none'})"
                         "; show needs a PT checkpoint trained with embedding losses, e.g. <run>/pt/final")
    if not cfg.data.store:
        raise ProbeError("the checkpoint's config has no data.store; pass --set data.store=STORE")
    if key is None:
        try:
            key = Path(image).resolve().relative_to(Path(cfg.data.image_root).resolve()).as_posix()
        except ValueError:
            raise ProbeError(f"{image} is not under data.image_root={cfg.data.image_root}; pass --key (its path "
                             "as stored, relative to the image root the store was built from)") from None
    try:
        reader = TargetReader(cfg.data.store, cfg.teachers)
    except StoreError as e:
        raise ProbeError(f"cannot use store {cfg.data.store}: {e}") from None
    if reader.rows_for([key])[0] < 0:
        raise ProbeError(f"image {key!r} is not in store {cfg.data.store}")
    tok = load_tokenizer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "one.json"
        ann.write_text(json.dumps([{"id": "show", "image": key, "conversations": PROMPT}]))
        cfg.data.annotations = str(ann)
        try:
            ds = ConversationDataset(cfg, tok, load_image_processor(cfg), reader, cfg.teachers)
            batch = collate([ds[0]], ds.pad_id)
        except DataError as e:
            raise ProbeError(str(e)) from None
    specs = {t: TargetSpec(reader.shapes[t], reader.kinds[t]) for t in cfg.teachers}
    model = build_model(cfg, specs, tokenizer=tok)
    model.load_trainable_state_dict(ckpt.load_weights(ck), strict=False)
    model.eval()
    layers = sorted({la for t in cfg.teachers for la in cfg.model.layers[t]})
    with torch.no_grad():
        asm = model.assemble(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["has_image"])
        with model.capture_hidden_states(layers) as hs:
            model.llm.base_model(inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask, use_cache=False)
        seq = asm.inputs_embeds.shape[1]
        preds: dict[str, dict[int, np.ndarray]] = {}
        for t in cfg.teachers:
            pos, kv = predictor_index(asm.layout, t, seq)
            preds[t] = {}
            for la in cfg.model.layers[t]:
                h = hs[la]
                p = model.predictors[t][str(la)](gather_positions(h, pos), model._queries(t, h, asm.layout), kv)
                preds[t][la] = p[0].float().numpy()
    targets = {t: batch["targets"][t][0].float().numpy() for t in cfg.teachers}
    return Shown(load_rgb(Path(image)), targets, preds, dict(reader.kinds))


def decode_depth(maps: list[np.ndarray], store: str, source: str | None = None) -> list[np.ndarray]:
    """Depth images (H, W) from (576, C) depth-teacher features through the teacher's own DPT neck + head."""
    from transformers import DepthAnythingForDepthEstimation

    from olacache.store import EmbeddingStore
    from olacache.teachers import resolve_source  # inspection only: never imported by training/probing

    if source is None:
        st = EmbeddingStore.open(store, "r")
        attrs = st.teacher_attrs("depth")
        st.close()
        ident = attrs.get("identity", {}).get("source")
        source = ident if ident and Path(ident).is_dir() else resolve_source("depth", attrs.get("preset", "tiny"))
    full = DepthAnythingForDepthEstimation.from_pretrained(source, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for m in maps:
            side = int(round(math.sqrt(m.shape[0])))
            x = torch.from_numpy(m).float()[None]
            x = torch.cat([x.new_zeros(1, 1, x.shape[-1]), x], dim=1)  # a CLS slot: the neck drops it
            levels = full.neck([x] * 4, side, side)
            depth = full.head(levels, side, side)[0]
            d = depth.numpy()
            out.append((d - d.min()) / max(1e-8, float(d.max() - d.min())))
    return out


def draw(shown: Shown, out: Path, *, decoded: dict[str, list[np.ndarray]] | None = None, title: str = "") -> None:
    from olatrain.plots import pyplot, save_figure

    plt = pyplot()
    spatial = [t for t in shown.preds if shown.kinds.get(t) == "spatial"]
    rows = [(t, "features") for t in spatial] + [(t, "decoded") for t in (decoded or {})]
    ncols = 2 + max([len(shown.preds[t]) for t in spatial] or [0])
    fig, axes = plt.subplots(max(1, len(rows)), ncols, figsize=(2.6 * ncols, 2.8 * max(1, len(rows))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (t, what) in enumerate(rows):
        axes[r, 0].imshow(shown.image)
        axes[r, 0].set_title("image", fontsize=9)
        layers = list(shown.preds[t])
        preds = [shown.preds[t][la] for la in layers]
        if what == "features":
            pics = pca_colours(shown.targets[t], preds)
            names = [f"{t} target (PCA)"] + [f"{t} pred L{la}\ncos {_cos(p, shown.targets[t]):.3f}"
                                             for la, p in zip(layers, preds, strict=True)]
        else:
            pics = decoded[t]  # type: ignore[index]
            names = [f"{t} target, decoded"] + [f"{t} pred L{la}, decoded" for la in layers]
        for c, (pic, name) in enumerate(zip(pics, names, strict=True)):
            axes[r, c + 1].imshow(pic, interpolation="nearest", cmap=None if pic.ndim == 3 else "inferno")
            axes[r, c + 1].set_title(name, fontsize=9)
    glob = [f"{t} L{la} cos {_cos(p, shown.targets[t]):.3f}" for t in shown.preds if t not in spatial
            for la, p in shown.preds[t].items()]
    fig.suptitle(title + ("\n" + "; ".join(glob) if glob else ""), fontsize=10)
    save_figure(fig, out)


def show(checkpoint: Path, image: Path, out: Path, *, sets: list[str] | None = None, key: str | None = None,
         decode: bool = False, teacher_source: str | None = None) -> Path:
    shown = collect(checkpoint, image, sets, key)
    decoded = None
    if decode:
        if "depth" not in shown.preds:
            raise ProbeError("--decode needs a depth teacher in the checkpoint's PT stage")
        from olatrain.probe_source import resolve_source

        store = resolve_source(find_checkpoint(checkpoint), sets=sets).cfg.data.store
        decoded = {"depth": decode_depth([shown.targets["depth"], *shown.preds["depth"].values()], str(store),
                                         teacher_source)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(shown, out, decoded=decoded, title=f"{Path(image).name}: cached target vs predicted ({checkpoint})")
    return out
