"""Training step time and peak memory: plain LLaVA vs cached targets vs online teachers, on the real loop.

Models (random init, saved with ``save_pretrained`` into a temp dir and named by path in the run config, i.e. the
same ``from_pretrained`` path real checkpoints take):
  LLM     LlamaForCausalLM, hidden --llm-hidden (512), --llm-layers (8), 8 heads / 4 KV heads, MLP 3x hidden,
          vocab = the tiny preset tokenizer (model.tokenizer)
  vision  CLIPVisionModel 336 px / patch 14 (576 patches + CLS), hidden --vision-hidden (384), --vision-layers (6)
  layers  the paper's 32-layer choice scaled to the LLM depth (olatrain.presets.scale_layers): 8 layers ->
          depth [2, 5], seg [2, 4], gen [3, 5]
Data: examples/sample.json + examples/images (27 samples, 21 images, one text-only), batch --batch (4), same
seed -> the same batches in every configuration.

Configurations, each in its OWN subprocess (so peak RSS does not mix), driven through
``olatrain.config.load_run`` + ``olatrain.train.run`` (PT stage), timings read back from metrics.jsonl:
  plain   no auxiliary losses: task tokens 0, model.layers empty, loss weights 0 (plain LLaVA PT)
  tokens  task tokens 8/8/8 but no predictors/losses (decomposes plain -> cached; --configs to enable)
  cached  OLA PT with targets from a store that ``olacache.build`` wrote with the tiny teachers (TargetReader
          in the DataLoader workers)
  online  the same with ``train.targets=online``: the olacache teachers run live every step (olatrain.online)
``--mid-depth`` swaps the depth teacher for the Depth-Anything-V2-Small architecture (bench_build.py) in both
the store and the online run, by publishing it as the ``tiny`` depth preset of a private $OLAKIT_CACHE (the other
presets are symlinked); the online adapter has no per-teacher source override, see bench/README.md.

Per configuration: median step_time over the steady-state steps (the first --warmup steps skipped), main-process
CPU seconds per step (process_time sampled by a thread each time the loop appends a metrics row; robust to other
jobs time-slicing the box), mean data_wait (fraction of the step spent in next(it) [+ the online teachers]), peak
RSS of the training process (ru_maxrss; DataLoader workers are separate processes and not included; on CUDA
torch.cuda.max_memory_allocated as well), and the trainable parameter bytes by module from the final checkpoint.

    python bench/bench_train.py                         # plain, cached, online; ~3-5 min on 2 cores
    python bench/bench_train.py --configs plain tokens cached --repeats 2
    python bench/bench_train.py --mid-depth --configs cached online
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

EXAMPLES = ROOT / "examples"
MARK = "BENCH_TRAIN_RESULT "
CONFIGS = ("plain", "tokens", "cached", "online")


# ----------------------------------------------------------------------------------------------- setup
def save_llm(out: Path, tok_dir: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_vision(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from olatrain.presets import CLIP_MEAN, CLIP_STD

    cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), projection_dim=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_resize=True,
                       do_center_crop=True, do_normalize=True, do_convert_rgb=True, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(out)
    return out


def private_cache_with_mid_depth(tmp: Path) -> Path:
    """$OLAKIT_CACHE whose `tiny` depth preset is the DA-V2-Small architecture; other presets symlinked."""
    from bench_build import save_dav2_small

    from olacache.teachers import TEACHERS, cache_root, tiny_source
    from olatrain.presets import tiny_llm_dir, tiny_tokenizer_dir, tiny_vision_dir

    for name in TEACHERS:  # make sure the shared ones exist before linking them
        tiny_source(name)
    tiny_tokenizer_dir(), tiny_vision_dir(), tiny_llm_dir()
    src, dst = cache_root() / "tiny", tmp / "olakit" / "tiny"
    dst.mkdir(parents=True)
    depth = f"depth-v{TEACHERS['depth'].tiny_version}"
    for entry in src.iterdir():
        if entry.name != depth and not entry.name.startswith("."):
            (dst / entry.name).symlink_to(entry.resolve())
    save_dav2_small(dst / depth)
    return dst.parent


def build_store(out: Path, workers: int) -> dict[str, Any]:
    from olacache.build import BuildConfig, build

    cfg = BuildConfig(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"), out=str(out),
                      teachers=["depth", "seg", "gen"], workers=workers, progress=False)
    s = build(cfg, log=lambda _m: None)
    return {t.name: t.shape for t in s.teachers}


def overrides(kind: str, *, out: Path, llm: Path, vision: Path, tok: Path, store: Path, n_layers: int,
              steps: int, batch: int, workers: int, device: str) -> list[str]:
    from olatrain.presets import DEFAULT_LAYERS_32, scale_layers

    layers = scale_layers(DEFAULT_LAYERS_32, n_layers)
    ola = kind in ("cached", "online")
    o = [
        f"output_dir={out}", f"model.llm={llm}", f"model.vision={vision}", f"model.tokenizer={tok}",
        "model.chat_template=llama3",
        "model.task_tokens=" + ("{gen: 8, depth: 8, seg: 8}" if kind != "plain" else "{gen: 0, depth: 0, seg: 0}"),
        "model.layers=" + (json.dumps(layers) if ola else '{"depth": [], "seg": [], "gen": []}'),
        "loss.weights=" + ("{depth: 0.5, seg: 0.5, gen: 0.5}" if ola else "{depth: 0, seg: 0, gen: 0}"),
        f"data.annotations={EXAMPLES / 'sample.json'}", f"data.image_root={EXAMPLES / 'images'}",
        "data.max_length=1024", f"data.num_workers={workers}", "data.image_aspect=square",
        f"train.max_steps={steps}", f"train.batch_size={batch}", "train.log_every=1", "train.save_every=0",
        "train.seed=42", "train.lr=1.0e-3", f"train.device={device}",
    ]
    if kind == "cached":
        o += [f"data.store={store}", "train.targets=cached"]
    if kind == "online":
        o += ["train.targets=online", "train.teacher_preset=tiny"]
    return o


# ----------------------------------------------------------------------------------------------- child
def child(spec: dict[str, Any]) -> None:
    """One configuration in this (fresh) process: the real run loop, then peak RSS and the checkpoint sizes."""
    import torch

    from olatrain import checkpoint as ckpt
    from olatrain.config import load_run
    from olatrain.train import run

    run_spec = load_run(None, spec["overrides"])
    out = run_spec.output_dir
    metrics = out / "pt" / "metrics.jsonl"
    cpu_at: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:  # process CPU time (all threads) each time the loop appends a metrics row
        seen = 0
        while not stop.is_set():
            if metrics.is_file():
                rows = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
                if len(rows) > seen:
                    c = time.process_time()
                    for ln in rows[seen:]:
                        cpu_at[json.loads(ln)["step"]] = c
                    seen = len(rows)
            stop.wait(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run(run_spec, log=lambda _m: None, progress=False)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    by_prefix: dict[str, int] = {}
    for k, v in ckpt.load_weights(out / "pt" / "final").items():
        p = k.split(".", 1)[0]
        by_prefix[p] = by_prefix.get(p, 0) + v.numel() * v.element_size()
    res = {
        "kind": spec["kind"], "wall": wall, "rows": rows, "cpu_at": cpu_at,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "trainable_bytes": by_prefix, "threads": torch.get_num_threads(),
    }
    print(MARK + json.dumps(res), flush=True)


def account(spec: dict[str, Any]) -> None:
    """Bytes autograd saves for backward in ONE training forward of the real model on the first real batch,
    split by where they are saved: inside the LLM (+ vision/projector before it), inside the predictors
    (TaskTokenResampler modules), elsewhere (assembly, CE, embedding losses). Storages are counted once.
    Observation only (saved_tensors_hooks + module hooks); nothing is timed here."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from olatrain.config import load_run
    from olatrain.data import ConversationDataset, build_dataloader, check_targets
    from olatrain.model import build_model
    from olatrain.predictors import TaskTokenResampler
    from olatrain.presets import load_image_processor, load_tokenizer
    from olatrain.train import open_targets, seed_everything, setup_env

    cfg = load_run(None, spec["overrides"]).configs["pt"]
    env = setup_env(cfg)
    seed_everything(cfg.train.seed)
    tok, proc = load_tokenizer(cfg), load_image_processor(cfg)
    reader, online, shapes = open_targets(cfg, env)
    ds = ConversationDataset(cfg, tok, proc, reader, cfg.teachers)
    if reader is not None:
        check_targets(ds, reader, cfg)
    loader = build_dataloader(ds, cfg.train.batch_size, shuffle=cfg.data.shuffle, seed=cfg.train.seed, rank=0,
                              world_size=1, num_workers=0)
    batch = next(iter(loader))
    model = build_model(cfg, shapes, device=env.device, tokenizer=tok)
    model.set_stage("pt")
    model.train()
    where = ["other"]
    seen: set[int] = set()
    sizes: dict[str, int] = {"llm": 0, "predictors": 0, "other": 0}

    def enter(name: str):  # noqa: ANN202
        return lambda *_a: where.append(name)

    def leave(*_a: Any) -> None:
        where.pop()

    hooks = [model.llm.base_model.register_forward_pre_hook(enter("llm")),
             model.llm.base_model.register_forward_hook(leave)]
    for m in model.modules():
        if isinstance(m, TaskTokenResampler):
            hooks += [m.register_forward_pre_hook(enter("predictors")), m.register_forward_hook(leave)]

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            sizes[where[-1]] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    for h in hooks:
        h.remove()
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
    del out
    with FlopCounterMode(display=False) as fc:  # matmul/conv/attention FLOPs of forward + backward
        model(batch)["loss"].backward()
    tb = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad}
    print(MARK + json.dumps({"saved": sizes, "seq": int(batch["input_ids"].shape[1]), "flops": fc.get_total_flops(),
                             "trainable": sum(tb.values())}), flush=True)


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"child {spec['kind']} failed (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")


# ----------------------------------------------------------------------------------------------- main
def summarize(results: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    steps: list[float] = []
    cpus: list[float] = []
    waits: list[float] = []
    for r in results:
        cpu_at = {int(k): v for k, v in r["cpu_at"].items()}
        for row in r["rows"]:
            s = row["step"]
            if s <= warmup:
                continue
            steps.append(row["step_time"])
            waits.append(row["data_wait"])
            if s in cpu_at and s - 1 in cpu_at:
                cpus.append(cpu_at[s] - cpu_at[s - 1])
    return {
        "step": statistics.median(steps), "step_min": min(steps),
        "cpu": statistics.median(cpus) if cpus else float("nan"), "cpu_min": min(cpus) if cpus else float("nan"),
        "wait": statistics.mean(waits), "wait_max": max(waits),
        "rss": statistics.median(r["maxrss_mb"] for r in results),
        "cuda": results[0]["cuda_peak_mb"], "trainable": results[0]["trainable_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", default=["plain", "cached", "online"], choices=CONFIGS)
    ap.add_argument("--steps", type=int, default=6, help="measured (steady-state) steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="steps skipped before measuring")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.num_workers)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the configurations (interleaved)")
    ap.add_argument("--llm-hidden", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=384)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--mid-depth", action="store_true", help="depth teacher = DA-V2-Small architecture")
    ap.add_argument("--no-account", action="store_true", help="skip the saved-activation accounting")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads in the training processes (0 = torch's default); 1 keeps CPU-s "
                         "per step free of OpenMP spin-waiting when other jobs share the cores")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        account(spec) if spec.get("account") else child(spec)
        return

    import torch
    from bench_build import machine

    from olatrain.presets import tiny_tokenizer_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.tmp))
    env = dict(os.environ)
    try:
        print(f"machine: {machine()}", flush=True)
        if args.mid_depth:
            env["OLAKIT_CACHE"] = os.environ["OLAKIT_CACHE"] = str(private_cache_with_mid_depth(tmp))
        tok = tiny_tokenizer_dir()
        llm = save_llm(tmp / "llm", tok, args.llm_hidden, args.llm_layers)
        vision = save_vision(tmp / "vision", args.vision_hidden, args.vision_layers)
        store = tmp / "store.zarr"
        t0 = time.perf_counter()
        shapes = build_store(store, args.workers)
        print(f"store {store}: {shapes} (olacache build, {time.perf_counter() - t0:.1f}s)", flush=True)

        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.configs}
        for r in range(args.repeats):
            for kind in args.configs:
                spec = {"kind": kind, "threads": args.threads, "overrides": overrides(
                    kind, out=tmp / f"run_{kind}_{r}", llm=llm, vision=vision, tok=tok, store=store,
                    n_layers=args.llm_layers, steps=args.warmup + args.steps, batch=args.batch,
                    workers=args.workers, device=args.device)}
                res = run_child(spec, env)
                results[kind].append(res)
                st = [row["step_time"] for row in res["rows"]]
                print(f"round {r} {kind}: step times {', '.join(f'{x:.2f}' for x in st)} s; "
                      f"peak RSS {res['maxrss_mb']:.0f} MB", flush=True)
                shutil.rmtree(tmp / f"run_{kind}_{r}", ignore_errors=True)

        s = {k: summarize(v, args.warmup) for k, v in results.items()}
        acct: dict[str, dict[str, Any]] = {}
        if not args.no_account:
            for kind in [k for k in CONFIGS if k in args.configs or (k == "tokens" and "cached" in args.configs)]:
                if kind == "online":
                    continue  # same model and loss as cached; the teachers run under inference_mode
                spec = {"kind": kind, "account": True, "threads": args.threads, "overrides": overrides(
                    kind, out=tmp / f"acct_{kind}", llm=llm, vision=vision, tok=tok, store=store,
                    n_layers=args.llm_layers, steps=1, batch=args.batch, workers=0, device=args.device)}
                acct[kind] = run_child(spec, env)

        base = s.get("plain")
        print(f"\nLLM Llama hidden {args.llm_hidden} x {args.llm_layers} layers; CLIP-336/14 hidden "
              f"{args.vision_hidden} x {args.vision_layers}; batch {args.batch}; data.num_workers {args.workers}; "
              f"{args.steps} steady steps after {args.warmup} warm-up, x{args.repeats} rounds; torch threads "
              f"{results[args.configs[0]][0]['threads']}; targets {shapes}\n")
        print("| config | step s median (min) | vs plain | main CPU-s/step median (min) | vs plain "
              "| data_wait mean (max) | peak RSS MB | vs plain |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, v in s.items():
            rel = f"{v['step'] / base['step']:.3f} ({v['step_min'] / base['step_min']:.3f})" if base else "-"
            relc = f"{v['cpu'] / base['cpu']:.3f} ({v['cpu_min'] / base['cpu_min']:.3f})" if base else "-"
            drss = f"{v['rss'] - base['rss']:+.0f}" if base else "-"
            print(f"| {k} | {v['step']:.2f} ({v['step_min']:.2f}) | {rel} | {v['cpu']:.2f} ({v['cpu_min']:.2f}) | "
                  f"{relc} | {v['wait']:.1%} ({v['wait_max']:.1%}) | {v['rss']:.0f} | {drss} |")
        print("\n(ratios in parentheses: min / min)")
        if "cached" in s and "online" in s:
            c, o = s["cached"], s["online"]
            print(f"online / cached: {o['step'] / c['step']:.2f}x step time (min {o['step_min'] / c['step_min']:.2f}x), "
                  f"{o['cpu'] / c['cpu']:.2f}x main CPU-s (min {o['cpu_min'] / c['cpu_min']:.2f}x)")
        if s.get("cached", {}).get("cuda") is not None:
            print("CUDA max_memory_allocated MB: " + ", ".join(f"{k} {v['cuda']:.0f}" for k, v in s.items()))
        mb = 2**20
        print("\ntrainable parameter bytes (final checkpoint, fp32) by module:")
        for k, v in s.items():
            tb = v["trainable"]
            aux = sum(b for p, b in tb.items() if p != "projector")
            print(f"  {k}: " + ", ".join(f"{p} {b / mb:.2f} MB" for p, b in sorted(tb.items()))
                  + (f"; auxiliary (predictors + task tokens + logit scales) {aux / mb:.2f} MB, x4 with grad and "
                     f"Adam exp_avg/exp_avg_sq = {4 * aux / mb:.1f} MB" if aux else ""))
        if acct:
            print("\nfirst batch, one forward + backward: FLOPs (torch FlopCounterMode: matmul/attention/conv) and "
                  "activations saved for backward (MB), by where they are saved:")
            print("| config | text tokens | GFLOP fwd+bwd | vs plain | saved: LLM + vision/projector | predictors | "
                  "other (assembly, CE, emb. losses) | total |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            f0 = acct["plain"]["flops"] if "plain" in acct else None
            for k, a in acct.items():
                sv = a["saved"]
                rf = f"{a['flops'] / f0:.3f}" if f0 else "-"
                print(f"| {k} | {a['seq']} | {a['flops'] / 1e9:.1f} | {rf} | {sv['llm'] / mb:.0f} | "
                      f"{sv['predictors'] / mb:.0f} | {sv['other'] / mb:.0f} | {sum(sv.values()) / mb:.0f} |")
            if "plain" in acct and "cached" in acct and base and "cached" in s:
                d_act = sum(acct["cached"]["saved"].values()) - sum(acct["plain"]["saved"].values())
                d_state = 4 * (acct["cached"]["trainable"] - acct["plain"]["trainable"])
                print(f"\nexpected cached - plain = extra saved activations {d_act / mb:.0f} MB + 4 x extra trainable "
                      f"{d_state / mb:.0f} MB = {(d_act + d_state) / mb:.0f} MB; measured peak-RSS difference "
                      f"{s['cached']['rss'] - base['rss']:+.0f} MB")
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
