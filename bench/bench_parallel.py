"""DDP vs FSDP2 (train.parallel) on 2 CPU ranks (gloo): step time and memory per rank, side by side in one run.

Each configuration runs `olatrain run` under ``torchrun --nproc-per-node 2`` in its own processes (so peak RSS does
not mix), IFT stage only (the full LLM trains: the case FSDP is for), on the bundled sample. Configurations are
interleaved (ddp, fsdp, ddp, fsdp, ...) for --repeats rounds so a load change on a shared machine hits both.

Per configuration: median step_time over the steady-state steps (the first --warmup skipped), from
metrics.jsonl; per rank peak RSS (ru_maxrss) and the bytes of model state the rank holds after the last step
(parameters + AdamW moments; under FSDP its local shards), both recorded by the worker (this file, --worker).

Models: the tiny presets by default (hidden 64, 6 layers: every cost is overhead there), or --llm-hidden/--llm-layers
for a larger random-init Llama saved with save_pretrained into a temp dir.

    python bench/bench_parallel.py --threads 1            # tiny, ~2 min on 2 cores
    python bench/bench_parallel.py --llm-hidden 512 --llm-layers 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _local_bytes(t) -> int:
    t = getattr(t, "_local_tensor", t)  # an FSDP2 DTensor: this rank's shard
    return t.numel() * t.element_size()


def worker(argv: list[str]) -> None:
    """One rank: `olatrain run`'s code path, plus a record of this rank's peak RSS and model-state bytes (taken in
    finish_stage, after the last optimizer step: parameters + AdamW moments held by this rank)."""
    import resource

    from olatrain import train
    from olatrain.config import load_run

    out, config, sets = Path(argv[0]), argv[1], argv[2:]
    state: dict[str, float] = {}
    real_finish = train.finish_stage

    def finish(st, *a, **k):
        moments = sum(_local_bytes(v) for s in st.opt.state.values() for n, v in s.items() if n != "step")
        state["state_mb"] = (sum(_local_bytes(p) for p in st.model.parameters()) + moments) / 1e6
        return real_finish(st, *a, **k)

    train.finish_stage = finish
    train.run(load_run(config, sets), log=lambda *_: None, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    rec = {"rank": rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **state}
    (out / f"rank{rank}.json").write_text(json.dumps(rec))


def make_llm(out: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from olatrain.presets import tiny_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_one(mode: str, work: Path, args: argparse.Namespace, llm: str, tag: str) -> dict:
    out = work / f"{mode}-{tag}"
    rep = work / f"rep-{mode}-{tag}"
    rep.mkdir()
    sets = [f"data.annotations={ROOT / 'examples' / 'sample.json'}", f"data.image_root={ROOT / 'examples' / 'images'}",
            f"output_dir={out}", "data.num_workers=0", f"train.batch_size={args.batch}", "train.save_every=0",
            f"stages.ift.train.max_steps={args.steps}", f"train.parallel={mode}", f"model.llm={llm}",
            f"train.cpu_threads={args.threads}", "model.layers={}", "loss.weights.depth=0", "loss.weights.seg=0",
            "loss.weights.gen=0"]
    cfg = work / "ift.yaml"
    if not cfg.exists():
        import yaml

        raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        raw["stages"] = {"ift": raw["stages"]["ift"]}
        cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", str(rep), str(cfg), *sets]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "ift" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows[args.warmup:]]
    ranks = [json.loads(p.read_text()) for p in sorted(rep.glob("rank*.json"))]
    return {"mode": mode, "step_time": statistics.median(times), "losses": [r["loss"] for r in rows],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "state_mb": max(r.get("state_mb", float("nan")) for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llm-hidden", type=int, default=0, help="0 = the tiny preset LLM")
    ap.add_argument("--llm-layers", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("OLAKIT_CACHE", str(ROOT / ".cache" / "olakit"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        llm = str(make_llm(work / "llm", args.llm_hidden, args.llm_layers)) if args.llm_hidden else "tiny"
        results: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
        for i in range(args.repeats):
            for mode in ("ddp", "fsdp"):
                r = run_one(mode, work, args, llm, str(i))
                results[mode].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    d, f = results["ddp"], results["fsdp"]
    step = statistics.median(x["step_time"] for x in f) / statistics.median(x["step_time"] for x in d)
    rss = statistics.median(x["peak_rss_mb"] for x in f) / statistics.median(x["peak_rss_mb"] for x in d)
    state = statistics.median(x["state_mb"] for x in f) / statistics.median(x["state_mb"] for x in d)
    same = max(abs(a - b) / abs(b) for a, b in zip(f[0]["losses"], d[0]["losses"], strict=True))
    print(f"llm={'tiny' if not args.llm_hidden else f'hidden {args.llm_hidden} x {args.llm_layers} layers'}, "
          f"2 ranks x batch {args.batch}, {args.steps} steps, {args.repeats} rounds")
    print(f"fsdp/ddp: step time {step:.2f}x, peak RSS per rank {rss:.2f}x, model state per rank {state:.2f}x; "
          f"max relative loss difference {same:.1e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
