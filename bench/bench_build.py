"""Build benchmarks, side by side in ONE process on the real code paths.

Teacher: the Depth-Anything-V2-Small architecture (``DepthAnythingForDepthEstimation``; DINOv2 ViT-S/14 backbone,
hidden 384, 12 layers, 6 heads, image_size 518, ``out_indices [3, 6, 9, 12]``; DPT neck 48/96/192/384,
reassemble 384, fusion 64, head 32 — the values of depth-anything/Depth-Anything-V2-Small-hf's config.json) at
random init (seed 0), saved with ``save_pretrained`` to a temp dir and loaded through the olacache depth teacher
(``source=<dir>``), i.e. exactly the ``from_pretrained`` path a real checkpoint takes. Target: (576, 384).

Images: ``--images`` JPEG copies (quality 90) of the photos in examples/images at varied, COCO-like sizes
(640x480, 480x640, 500x375, 375x500, 800x600, 1024x768, 427x640, 612x612), decoded with olacache's load_rgb.

  1. overhead: (a) ``olacache.build.build()`` wall time (teacher load + weight hash + store create + decode/
     preprocess in DataLoader workers + batched forward + background shard writer + channel stats) vs
     (b) the pure batched ``Teacher.forward`` over the same preprocessed tensors already in memory (same batch
     size, same device, same teacher class and weights). Ratio build/forward, for each ``--workers`` value.
  2. reference-style loop: for each image load_rgb -> teacher preprocessor (PIL resize in the loop) -> forward
     of a batch of 1, with the same teacher object, vs the batched build. Speed-up = loop / build.
  3. bytes/image per teacher, float16 vs int8, and the int8 cosine: the sample (examples/sample.json) built with
     the tiny teachers by the real CLI (``python -m olacache build``) in both dtypes, read back with
     ``python -m olacache info --json``; plus the real-size figures computed from the store layout.

Everything is warm: one untimed forward runs first so oneDNN/MKL start-up is not charged to whichever
measurement happens to come first. Measurements are interleaved per round (forward, build per workers value,
reference loop) and the forward is timed again after the last round; ratios use the median of each kind.

Machines shared with other jobs: pass --threads 1. With 2 OpenMP threads and a core taken by someone else, the
waiting thread spins, so wall time AND CPU-s swing (batch-1 forwards suffer most).

    python bench/bench_build.py                                 # 64 images, batch 16, workers 2 and 0; ~5 min
    python bench/bench_build.py --images 64 --repeats 2 --threads 1   # the README run (~9 min)
    python bench/bench_build.py --no-ref --no-sizes             # overhead only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olacache.build import BuildConfig, build  # noqa: E402
from olacache.inputs.images import load_rgb  # noqa: E402
from olacache.teachers import load_teacher  # noqa: E402
from olacache.teachers.base import write_preset_marker  # noqa: E402

EXAMPLES = ROOT / "examples"
# real photographs among the sample images (the odd ones - 1 px, 400x6 strip, 1-bit - are not useful copies)
PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg", "retina.jpg", "camera.png",
          "brick.png", "grass.png", "gravel.png", "cell.png", "clock.png"]
SIZES = [(640, 480), (480, 640), (500, 375), (375, 500), (800, 600), (1024, 768), (427, 640), (612, 612)]


# ----------------------------------------------------------------------------------------------- setup
def save_dav2_small(out: Path, seed: int = 0) -> Path:
    """Depth-Anything-V2-Small architecture at random init (values of the real HF config.json)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518, patch_size=14,
        layerscale_value=1.0, out_indices=[3, 6, 9, 12], apply_layernorm=True, reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=384, reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
        depth_estimation_type="relative",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
    model.save_pretrained(out)
    write_preset_marker(out, seed)  # identity says random_init, like the tiny presets
    return out


def make_images(out: Path, n: int) -> tuple[Path, list[str]]:
    """n JPEG copies of the sample photos at varied sizes + a LLaVA JSON naming them."""
    img_dir = out / "images"
    img_dir.mkdir(parents=True)
    rels, samples = [], []
    for i in range(n):
        src = load_rgb(EXAMPLES / "images" / PHOTOS[i % len(PHOTOS)])
        w, h = SIZES[i % len(SIZES)]
        rel = f"img_{i:04d}.jpg"
        src.resize((w, h)).save(img_dir / rel, quality=90)
        rels.append(rel)
        samples.append({"id": str(i), "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A photo."}]})
    ann = out / "ann.json"
    ann.write_text(json.dumps(samples))
    return ann, rels


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{dev}, Python {platform.python_version()}")


# ----------------------------------------------------------------------------------------------- timings
class Clock:
    """Wall seconds and CPU seconds (this process, all threads, + reaped children = DataLoader workers).

    CPU seconds are the contention-robust number on a shared box: time-slicing against other jobs inflates wall
    time but not (much) the CPU time a measurement itself consumes."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, _cpu() - self.c0


def _cpu() -> float:
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def time_forward(teacher, batches: list[torch.Tensor]) -> Clock:
    with Clock() as c:
        for x in batches:
            teacher.forward(x)
    return c


def time_build(ann: Path, image_root: Path, out: Path, source: Path, batch: int, workers: int, device: str) -> Clock:
    cfg = BuildConfig(annotations=str(ann), image_root=str(image_root), out=str(out), teachers=["depth"],
                      teacher_overrides={"depth": {"source": str(source)}}, batch_size=batch, workers=workers,
                      device=device, progress=False)
    with Clock() as c:
        summary = build(cfg, log=lambda _m: None)
    assert summary.images_computed == summary.n_images and summary.teachers[0].n_ok == summary.n_images, summary
    shutil.rmtree(out)
    return c


def time_reference_loop(teacher, image_root: Path, rels: list[str]) -> Clock:
    """The reference's way: inside the training forward, one image at a time, PIL resize in the loop."""
    pre = teacher.preprocessor()
    with Clock() as c:
        for rel in rels:
            teacher.forward(pre(load_rgb(image_root / rel))[None])
    return c


# ----------------------------------------------------------------------------------------------- sizes
def sizes(tmp: Path) -> list[str]:
    """Tiny-teacher sample stores in float16 and int8 via the real CLI, read back with `olacache info --json`."""
    info = {}
    for dtype in ("float16", "int8"):
        out = tmp / f"sample_{dtype}.zarr"
        cmd = [sys.executable, "-m", "olacache", "build", str(EXAMPLES / "sample.json"), str(EXAMPLES / "images"),
               "--out", str(out), "--dtype", dtype, "--workers", "0"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
        res = subprocess.run([sys.executable, "-m", "olacache", "info", "--json", str(out)], check=True, cwd=ROOT,
                             capture_output=True, text=True)
        info[dtype] = json.loads(res.stdout)
    n = info["float16"]["n_images"]
    lines = [f"Sample store ({n} images, tiny teachers, `olacache info --json`):", "",
             "| teacher | shape | fp16 B/img | int8 B/img | int8/fp16 | int8 cos mean | int8 cos min |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for t, a in info["float16"]["teachers"].items():
        b = info["int8"]["teachers"][t]
        lines.append(f"| {t} | {'x'.join(map(str, a['shape']))} | {a['bytes_per_image']:,.0f} | "
                     f"{b['bytes_per_image']:,.0f} | {b['bytes_per_image'] / a['bytes_per_image']:.3f} | "
                     f"{b['int8_cosine_mean']:.5f} | {b['int8_cosine_min']:.5f} |")
    lines += ["", "Real-size, from the store layout (target + int8 per-vector float32 scale + 1 B status; "
              "zarr metadata/shard index excluded):", "",
              "| teacher | shape | fp16 B/img | int8 B/img | int8/fp16 |", "|---|---|---:|---:|---:|"]
    tot16 = tot8 = 0
    for t, shape in (("depth", (576, 1024)), ("seg", (576, 1536)), ("gen", (1, 1024))):
        elems = shape[0] * shape[1]
        b16, b8 = 2 * elems + 1, elems + 4 * shape[0] + 1
        tot16, tot8 = tot16 + b16, tot8 + b8
        lines.append(f"| {t} | {shape[0]}x{shape[1]} | {b16:,} | {b8:,} | {b8 / b16:.3f} |")
    lines.append(f"| all three | | {tot16:,} | {tot8:,} | {tot8 / tot16:.3f} |")
    lines.append(f"\nLLaVA-558K: {558_128 * tot16 / 1e12:.2f} TB fp16, {558_128 * tot8 / 1e12:.2f} TB int8. Measured "
                 "real-size stores: `python bench/bench_store_read.py --only-sizes` (Store reads section).")
    return lines


def channel_stats_check(tmp: Path, n: int = 256, shape: tuple[int, int] = (576, 1536)) -> None:
    """`olacache.build.channel_stats` (run by build() at the end, per teacher, over <= 256 rows) on a real-size
    seg column: time and the rise of this process's peak RSS."""
    import numpy as np

    from olacache.stats import channel_stats
    from olacache.store import OK, EmbeddingStore

    with EmbeddingStore.create(tmp / "stats.zarr", [f"s/{i}.jpg" for i in range(n)], shard_size=n) as s:
        s.add_teacher("seg", shape)
        x = np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32)
        s.write_shard("seg", 0, x, np.full(n, OK, np.uint8), [""] * n)
        del x
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with Clock() as c:
            channel_stats(s, "seg")
        r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"channel_stats over {n} rows of {shape}: {c.wall:.2f}s wall, {c.cpu:.2f} CPU-s; peak RSS {r0:.0f} -> "
          f"{r1:.0f} MB")


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds (forward, builds, reference loop)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads of this process (0 = torch's default); with 1, CPU-s are free of "
                         "OpenMP spin-waiting when other jobs share the cores (DataLoader workers always use 1)")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference-style per-image loop")
    ap.add_argument("--no-sizes", action="store_true", help="skip the fp16/int8 bytes table")
    ap.add_argument("--tmp", default=None, help="work dir (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--channel-stats-check", action="store_true",
                    help="only time build()'s channel_stats on a real-size (256 x 576 x 1536) column")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_", dir=args.tmp))
    try:
        print(f"machine: {machine()}", flush=True)
        if args.channel_stats_check:
            channel_stats_check(tmp)
            return
        source = save_dav2_small(tmp / "dav2-small")
        ann, rels = make_images(tmp / "data", args.images)
        image_root = tmp / "data" / "images"

        t0 = time.perf_counter()
        teacher = load_teacher("depth", source=str(source), device=args.device)
        t_load = time.perf_counter() - t0
        n_params = sum(p.numel() for p in teacher.model.parameters())
        pre = teacher.preprocessor()
        t0 = time.perf_counter()
        pix = [pre(load_rgb(image_root / r)) for r in rels]
        t_pre = time.perf_counter() - t0
        batches = [torch.stack(pix[i : i + args.batch]) for i in range(0, len(pix), args.batch)]
        teacher.forward(batches[0][:2])  # untimed warm-up (oneDNN primitives, allocator)
        print(f"teacher {teacher!r}: {n_params / 1e6:.1f}M backbone params; load+hash {t_load:.2f}s; "
              f"serial decode+preprocess of {len(rels)} images {t_pre:.2f}s", flush=True)

        fwd: list[Clock] = []
        bld: dict[int, list[Clock]] = {w: [] for w in args.workers}
        ref: list[Clock] = []

        def show(what: str, c: Clock) -> None:
            print(f"{what}: {c.wall:.2f}s wall, {c.cpu:.2f} CPU-s", flush=True)

        for r in range(args.repeats):
            fwd.append(time_forward(teacher, batches))
            show(f"round {r}: pure forward", fwd[-1])
            for w in args.workers:
                bld[w].append(time_build(ann, image_root, tmp / f"store_w{w}.zarr", source, args.batch, w,
                                         args.device))
                show(f"round {r}: build workers={w}", bld[w][-1])
            if not args.no_ref:
                ref.append(time_reference_loop(teacher, image_root, rels))
                show(f"round {r}: reference per-image loop", ref[-1])
        fwd.append(time_forward(teacher, batches))
        show("final pure forward", fwd[-1])

        def med(cs: list[Clock], attr: str) -> float:
            return statistics.median(getattr(c, attr) for c in cs)

        fw, fc = med(fwd, "wall"), med(fwd, "cpu")
        n = len(rels)
        print(f"\n{n} images, batch {args.batch}, device {args.device}; forward timed {len(fwd)}x, the others "
              f"{args.repeats}x, interleaved; medians:\n")
        print("| measurement | wall s | img/s | wall / forward | CPU-s | CPU / forward |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| pure batched forward (tensors in memory) | {fw:.2f} | {n / fw:.2f} | 1.000 | {fc:.2f} | 1.000 |")
        rows = [(f"`build()` workers={w}", bld[w]) for w in args.workers]
        if ref:
            rows.append(("reference-style loop (load_rgb + PIL resize + forward, batch 1)", ref))
        for name, cs in rows:
            w_, c_ = med(cs, "wall"), med(cs, "cpu")
            print(f"| {name} | {w_:.2f} | {n / w_:.2f} | {w_ / fw:.3f} | {c_:.2f} | {c_ / fc:.3f} |")
        if ref:
            print()
            for w in args.workers:
                print(f"batched build (workers={w}) vs reference-style loop: {med(ref, 'wall') / med(bld[w], 'wall'):.2f}x "
                      f"wall, {med(ref, 'cpu') / med(bld[w], 'cpu'):.2f}x CPU")
        if args.repeats > 1:
            print()
            for w in args.workers:
                per = [(b.wall / ((fwd[i].wall + fwd[i + 1].wall) / 2), b.cpu / ((fwd[i].cpu + fwd[i + 1].cpu) / 2))
                       for i, b in enumerate(bld[w])]
                print(f"per-round build/forward, workers={w} (forward = mean of the two bracketing runs), wall/CPU: "
                      + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in per))
        if not args.no_sizes:
            print()
            print("\n".join(sizes(tmp)))
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
