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
the store (build teacher_overrides source) and the online run (train.teacher_sources).

Per configuration: median (and min) step_time over the steady-state steps (the first --warmup skipped),
main-process CPU seconds per step (process_time sampled by a thread each time the loop appends a metrics row),
mean data_wait (fraction of the step spent in next(it)) and, online, teacher_time (the live teachers' fraction),
peak RSS of the training process (ru_maxrss; DataLoader workers are separate processes and not included; on CUDA
torch.cuda.max_memory_allocated as well), and the trainable parameter bytes by module from the final checkpoint.
An accounting child (plain, tokens, cached) then runs the first batch through one forward + backward of the real
model for its FLOPs (torch FlopCounterMode) and the bytes autograd saves for backward, split into LLM / predictors
/ other. Last, the same FLOP count at the paper's scale (Llama-3-8B + CLIP ViT-L/14-336) on meta tensors.

Machines shared with other jobs: pass --threads 1 (OpenMP spin-waiting makes 2-thread timings swing 3x there).

    python bench/bench_train.py                         # plain, cached, online; ~5 min on 2 cores
    python bench/bench_train.py --configs plain tokens cached online --threads 1 --steps 4 --repeats 3
    python bench/bench_train.py --mid-depth --configs cached online --threads 1 --no-account
    python bench/bench_train.py --only-scale-flops      # seconds
    python bench/bench_train.py --attention-check --threads 1   # predictor attention: explicit vs now, seconds
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


def build_store(out: Path, workers: int, sources: dict[str, str]) -> dict[str, Any]:
    from olacache.build import BuildConfig, build

    cfg = BuildConfig(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"), out=str(out),
                      teachers=["depth", "seg", "gen"], workers=workers, progress=False,
                      teacher_overrides={t: {"source": src} for t, src in sources.items()})
    s = build(cfg, log=lambda _m: None)
    return {t.name: t.shape for t in s.teachers}


def overrides(kind: str, *, out: Path, llm: Path, vision: Path, tok: Path, store: Path, n_layers: int,
              steps: int, batch: int, workers: int, device: str, sources: dict[str, str]) -> list[str]:
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
        o += ["train.targets=online", "train.teacher_preset=tiny", f"train.teacher_sources={json.dumps(sources)}"]
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
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from olatrain.config import load_run
    from olatrain.data import ConversationDataset, build_dataloader, check_targets, load_image_processor
    from olatrain.model import build_model
    from olatrain.model.predictors import TaskTokenResampler
    from olatrain.presets import load_tokenizer
    from olatrain.train import open_targets, seed_everything, trainer_runtime

    cfg = load_run(None, spec["overrides"]).configs["pt"]
    rt, _ = trainer_runtime(cfg)
    seed_everything(cfg.train.seed)
    tok, proc = load_tokenizer(cfg), load_image_processor(cfg)
    reader, online, shapes = open_targets(cfg, rt.device)
    ds = ConversationDataset(cfg, tok, proc, reader, cfg.teachers)
    if reader is not None:
        check_targets(ds, reader, cfg)
    loader = build_dataloader(ds, cfg.train.batch_size, shuffle=cfg.data.shuffle, seed=cfg.train.seed, rank=0,
                              world_size=1, num_workers=0)
    batch = next(iter(loader))
    model = build_model(cfg, shapes, device=rt.device, tokenizer=tok)
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
    # matmul/conv/attention FLOPs of forward + backward. FlopCounterMode counts nothing for torch's fused CPU
    # attention kernel (_scaled_dot_product_flash_attention_for_cpu), so count with SDPA's math backend, whose
    # bmm's it does count (full L x L, the causal half is not skipped; the same convention as the meta count)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(batch)["loss"].backward()
    tb = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad}
    print(MARK + json.dumps({"saved": sizes, "seq": int(batch["input_ids"].shape[1]), "flops": fc.get_total_flops(),
                             "trainable": sum(tb.values())}), flush=True)


def flops_at_scale(text_tokens: int) -> dict[str, float]:
    """Per-sample FLOPs (forward + backward, PT: LLM/vision frozen) at the paper's scale, counted by torch's
    FlopCounterMode on META tensors (no memory, no compute) through the real classes: LlamaForCausalLM with the
    Llama-3-8B config, CLIPVisionModel ViT-L/14-336 (forward only), the 2-layer projector, and olatrain's
    TaskTokenResampler with the widths OLAVLM gives it (depth: LLM width -> 1024; seg: 1536 -> 1536;
    gen: 1024 -> 1024, one query), two layers per teacher. 576 image tokens + text_tokens (+ 24 task tokens)."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from olatrain.model.predictors import TaskTokenResampler

    def count(fn) -> float:  # noqa: ANN001
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    h, meta = 4096, torch.device("meta")
    with meta:
        llm = LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))
        vis = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, image_size=336, patch_size=14))
        proj = nn.Sequential(nn.Linear(1024, h), nn.GELU(), nn.Linear(h, h))
    llm.requires_grad_(False)
    vis.requires_grad_(False)

    def llm_fb(seq: int) -> float:
        def f() -> None:  # the decoder blocks directly: HF's mask helpers call .item(), which meta cannot do
            x = torch.empty(1, seq, h, device=meta, requires_grad=True)
            pos = torch.arange(seq, device=meta)[None]
            pe = llm.model.rotary_emb(x, pos)
            y = x
            for layer in llm.model.layers:
                y = layer(y, attention_mask=None, position_embeddings=pe, position_ids=pos)
                y = y[0] if isinstance(y, tuple) else y
            llm.model.norm(y).sum().backward()
        return count(f)

    def vis_f() -> None:
        with torch.no_grad():
            vis(pixel_values=torch.empty(1, 3, 336, 336, device=meta), output_hidden_states=True)

    out = {"vision": count(vis_f),
           "projector": count(lambda: proj(torch.empty(1, 576, 1024, device=meta)).sum().backward())}
    seq = 576 + text_tokens
    out["llm_plain"], out["llm_ola"] = llm_fb(seq), llm_fb(seq + 24)
    pred = 0.0
    for dim, c, q in ((h, 1024, 576), (1536, 1536, 576), (1024, 1024, 1)):
        with meta:
            p = TaskTokenResampler(h, dim, c)

        def f(p=p, q=q) -> None:  # noqa: ANN001
            x = torch.empty(1, seq + 24, h, device=meta, requires_grad=True)
            p(x, torch.empty(q, h, device=meta), torch.ones(1, seq + 24, dtype=torch.bool, device=meta)).sum().backward()
        pred += 2 * count(f)
    out["predictors"] = pred
    return out


def print_scale_flops(text_tokens: int) -> None:
    f = flops_at_scale(text_tokens)
    plain = f["vision"] + f["projector"] + f["llm_plain"]
    tokens = f["vision"] + f["projector"] + f["llm_ola"]
    ola = tokens + f["predictors"]
    print(f"\nat the paper's scale (Llama-3-8B + CLIP ViT-L/14-336, 576 image + {text_tokens} text "
          "tokens per sample; FlopCounterMode on meta tensors, real classes), TFLOP per sample fwd+bwd:")
    print("| vision (fwd) | projector | LLM plain | LLM + 24 task tokens | 6 predictors | plain | OLA | OLA / plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {f['vision'] / 1e12:.2f} | {f['projector'] / 1e12:.3f} | {f['llm_plain'] / 1e12:.2f} | "
          f"{f['llm_ola'] / 1e12:.2f} | {f['predictors'] / 1e12:.3f} | {plain / 1e12:.2f} | {ola / 1e12:.2f} | "
          f"{ola / plain:.3f} (tokens alone {tokens / plain:.3f}) |")


def predictor_attention_check(n_kv: int = 725, batch: int = 4, hidden: int = 512, reps: int = 4) -> None:
    """The predictors' attention: olatrain's TaskTokenResampler as it is now vs the same weights with the
    explicit attention it used before (q, k each scaled by d**-0.25, fp32 score tensor, masked_fill, softmax,
    attn @ v; reproduced below). Shapes of the bench's mid-size run: B=4, ~725 K/V positions, 576 queries."""
    import torch

    from olatrain.model.predictors import PerceiverAttention, TaskTokenResampler

    class ExplicitAttention(PerceiverAttention):
        def forward(self, x, latents, x_mask=None):  # noqa: ANN001, ANN202
            x, latents = self.norm_x(x), self.norm_latents(latents)
            b, q_len, _ = latents.shape
            q = self.to_q(latents)
            k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
            q, k, v = (t.view(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            scale = self.head_dim**-0.25
            sim = ((q * scale) @ (k * scale).transpose(-1, -2)).float()
            if x_mask is not None:
                keep = torch.cat([x_mask.bool(), x_mask.new_ones(b, q_len, dtype=torch.bool)], dim=1)
                sim = sim.masked_fill(~keep[:, None, None, :], torch.finfo(sim.dtype).min)
            out = (sim.softmax(dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, q_len, self.heads * self.head_dim)
            return self.to_out(out)

    def saved_bytes(fn) -> tuple[torch.Tensor, int]:  # noqa: ANN001
        seen: set[int] = set()
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total[0] += st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, total[0]

    print(f"\npredictor attention, explicit fp32 softmax vs the module as it is now (B={batch}, {n_kv} K/V + 576 "
          f"queries, LLM width {hidden}, {torch.get_num_threads()} thread(s), fwd+bwd CPU-s median of {reps}):")
    print("| predictor width (target C) | max abs diff | fwd+bwd CPU-s explicit | now | saved MB explicit | now |")
    print("|---|---:|---:|---:|---:|---:|")
    for dim, c in ((hidden, 32), (128, 128)):
        torch.manual_seed(0)
        now = TaskTokenResampler(hidden, dim, c)
        old = TaskTokenResampler(hidden, dim, c)
        old.load_state_dict(now.state_dict())
        attn = ExplicitAttention(dim)
        attn.load_state_dict(now.attn.state_dict())
        old.attn = attn
        x = torch.randn(batch, n_kv, hidden, requires_grad=True)
        queries = torch.randn(576, hidden)
        mask = torch.ones(batch, n_kv, dtype=torch.bool)
        mask[0, n_kv * 5 // 6 :] = False  # one padded row
        args = (x, queries, mask)
        ya, sa = saved_bytes(lambda m=old, a=args: m(*a))
        yb, sb = saved_bytes(lambda m=now, a=args: m(*a))
        cpu: dict[str, list[float]] = {"old": [], "now": []}
        for _ in range(reps + 1):  # interleaved; the first pass is a warm-up
            for key, m in (("old", old), ("now", now)):
                c0 = time.process_time()
                m(*args).sum().backward()
                cpu[key].append(time.process_time() - c0)
        med = {k: statistics.median(v[1:]) for k, v in cpu.items()}
        print(f"| {dim} ({c}) | {(ya - yb).abs().max().item():.1e} | {med['old']:.3f} | {med['now']:.3f} | "
              f"{sa / 2**20:.0f} | {sb / 2**20:.0f} |")


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
    teach: list[float] = []
    for r in results:
        cpu_at = {int(k): v for k, v in r["cpu_at"].items()}
        for row in r["rows"]:
            s = row["step"]
            if s <= warmup:
                continue
            steps.append(row["step_time"])
            waits.append(row["data_wait"])
            if "teacher_time" in row:
                teach.append(row["teacher_time"])
            if s in cpu_at and s - 1 in cpu_at:
                cpus.append(cpu_at[s] - cpu_at[s - 1])
    return {
        "step": statistics.median(steps), "step_min": min(steps),
        "cpu": statistics.median(cpus) if cpus else float("nan"), "cpu_min": min(cpus) if cpus else float("nan"),
        "wait": statistics.mean(waits), "wait_max": max(waits),
        "teacher": statistics.mean(teach) if teach else None,
        "rss": statistics.median(r["maxrss_mb"] for r in results),
        "cuda": results[0]["cuda_peak_mb"], "trainable": results[0]["trainable_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", default=["plain", "cached", "online"], choices=CONFIGS)
    ap.add_argument("--steps", type=int, default=4, help="measured (steady-state) steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="steps skipped before measuring")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.num_workers)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the configurations (interleaved)")
    ap.add_argument("--llm-hidden", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=384)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--mid-depth", action="store_true", help="depth teacher = DA-V2-Small architecture")
    ap.add_argument("--no-account", action="store_true", help="skip the saved-activation/FLOP accounting")
    ap.add_argument("--scale-text-tokens", type=int, default=64,
                    help="text tokens per sample for the Llama-3-8B-scale FLOP count (0 = skip it)")
    ap.add_argument("--only-scale-flops", action="store_true", help="print only the Llama-3-8B-scale FLOP table")
    ap.add_argument("--attention-check", action="store_true",
                    help="only compare the predictors' attention with the explicit fp32-softmax version it replaced")
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
    if args.only_scale_flops:
        print_scale_flops(args.scale_text_tokens or 64)
        return
    if args.attention_check:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        predictor_attention_check(hidden=args.llm_hidden)
        return

    import torch
    from bench_build import machine

    from olatrain.presets import tiny_tokenizer_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.tmp))
    env = dict(os.environ)
    try:
        print(f"machine: {machine()}", flush=True)
        sources: dict[str, str] = {}
        if args.mid_depth:
            from bench_build import save_dav2_small

            sources["depth"] = str(save_dav2_small(tmp / "dav2-small"))
        tok = tiny_tokenizer_dir()
        llm = save_llm(tmp / "llm", tok, args.llm_hidden, args.llm_layers)
        vision = save_vision(tmp / "vision", args.vision_hidden, args.vision_layers)
        store = tmp / "store.zarr"
        t0 = time.perf_counter()
        shapes = build_store(store, args.workers, sources)
        print(f"store {store}: {shapes} (olacache build, {time.perf_counter() - t0:.1f}s)", flush=True)

        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.configs}
        for r in range(args.repeats):
            for kind in args.configs:
                spec = {"kind": kind, "threads": args.threads, "overrides": overrides(
                    kind, out=tmp / f"run_{kind}_{r}", llm=llm, vision=vision, tok=tok, store=store,
                    n_layers=args.llm_layers, steps=args.warmup + args.steps, batch=args.batch,
                    workers=args.workers, device=args.device, sources=sources)}
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
                    n_layers=args.llm_layers, steps=1, batch=args.batch, workers=0, device=args.device,
                    sources=sources)}
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
                  f"{o['cpu'] / c['cpu']:.2f}x main CPU-s (min {o['cpu_min'] / c['cpu_min']:.2f}x)"
                  + (f"; online teacher_time {o['teacher']:.1%} of the step" if o["teacher"] is not None else ""))
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
            print("\nfirst batch, one forward + backward: FLOPs (torch FlopCounterMode: matmul/attention/conv; "
                  "attention via SDPA's math backend, full L x L) and activations saved for backward (MB, the "
                  "kernels the run uses), by where they are saved:")
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
        if args.scale_text_tokens:
            print_scale_flops(args.scale_text_tokens)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
