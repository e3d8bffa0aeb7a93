"""What probing costs: a probe step (one no-grad forward of the frozen MLLM + every (teacher, layer) probe's
forward/backward/AdamW step) vs the number of probed layers, and vs a PT step on the SAME batch, in one process.

Model: configs/tiny.yaml's presets (CLIP 336/14 tower, 6-layer Llama, 24 task tokens) or, with --llm-hidden /
--llm-layers, a wider Llama saved like bench_train.py's. Targets: a store olacache builds from the bundled sample
with the tiny teachers (depth 576x32, seg 576x128, gen 1x32), or --store. One batch of --batch images is built once
through the real data pipeline (ConversationDataset + collate) and reused by every measurement, so the only
thing that differs is the step.

Measured per configuration (median of --repeats after --warmup):
  pt          the PT training step of olatrain (model forward with predictors on its layers, backward through the
              frozen LLM into projector/task tokens, AdamW) on this batch
  forward     the frozen forward alone (probe_source.frozen_hidden_states, hooks on every LLM layer)
  probe L=k   a probe step with the 3 teachers x k layers (3k probes): the frozen forward + probes + AdamW
  naive L=k   what one forward PER probe would cost: 3k frozen forwards + the same probes (the reference probes
              one teacher per run; a forward per probe is the upper bound this design avoids)

    python bench/bench_probe.py --threads 1
    python bench/bench_probe.py --threads 1 --llm-hidden 512 --llm-layers 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
EXAMPLES = ROOT / "examples"


def timed(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pt_step_time(cfg, specs, tok, batch, warmup: int, repeats: int) -> float:  # noqa: ANN001
    """Median seconds of olatrain's PT step (forward with predictors, backward, AdamW) on ``batch``."""
    import torch

    from olatrain.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg, specs, tokenizer=tok)
    model.set_stage("pt")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, warmup, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llm-hidden", type=int, default=None)
    ap.add_argument("--llm-layers", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from olacache.build import BuildConfig, build
    from olacache.store import TargetReader
    from olatrain.config import load_run
    from olatrain.data import ConversationDataset, collate, load_image_processor
    from olatrain.model import TargetSpec
    from olatrain.presets import load_tokenizer, tiny_tokenizer_dir
    from olatrain.probe import ProbeHead, probe_backward, probe_config
    from olatrain.probe_outputs import pair_key
    from olatrain.probe_source import Source, frozen_hidden_states, load_frozen_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_probe_"))
    store = args.store
    if store is None:
        cfg_b = BuildConfig(annotations=str(EXAMPLES / "sample.json"), image_root=str(EXAMPLES / "images"),
                            out=str(tmp / "store.zarr"), teachers=["depth", "seg", "gen"], batch_size=8, workers=0,
                            device="cpu", progress=False)
        build(cfg_b, log=lambda *a, **k: None)
        store = cfg_b.out
    sets = [f"data.store={store}", "data.num_workers=0", f"data.annotations={EXAMPLES / 'sample.json'}",
            f"data.image_root={EXAMPLES / 'images'}", f"output_dir={tmp / 'run'}"]
    if args.llm_hidden or args.llm_layers:
        from bench_train import save_llm

        from olatrain.presets import scale_layers

        n = args.llm_layers or 8
        llm = save_llm(tmp / "llm", tiny_tokenizer_dir(), args.llm_hidden or 512, n)
        layers = scale_layers({"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}, n)
        sets += [f"model.llm={llm}", f"model.tokenizer={tiny_tokenizer_dir()}",
                 f"model.layers={json.dumps(layers)}"]
    cfg = load_run(ROOT / "configs" / "tiny.yaml", sets).configs["pt"]
    reader = TargetReader(store, ["depth", "seg", "gen"])
    tok = load_tokenizer(cfg)
    ds = ConversationDataset(cfg, tok, load_image_processor(cfg), reader, reader.teachers)
    images = [i for i in range(len(ds)) if ds.image_key(i) is not None][: args.batch]
    batch = collate([ds[i] for i in images], ds.pad_id)
    specs = {t: TargetSpec(reader.shapes[t], reader.kinds[t]) for t in reader.teachers}

    # -- PT step on this batch
    res: dict[str, float] = {"pt": pt_step_time(cfg, specs, tok, batch, args.warmup, args.repeats)}

    # -- frozen model + probes
    model = load_frozen_model(Source(cfg, None, "baseline", "bench"), torch.device("cpu"), tok)
    n_layers = model.n_layers
    all_layers = list(range(1, n_layers + 1))
    res["forward"] = timed(lambda: frozen_hidden_states(model, batch, all_layers), args.warmup, args.repeats)
    pc = probe_config({})
    counts = sorted({1, 2, 3, n_layers // 2, n_layers} - {0})
    for k in counts:
        layers = all_layers[:k]
        pairs = [(t, la) for t in reader.teachers for la in layers]
        torch.manual_seed(0)
        heads = torch.nn.ModuleDict({pair_key(t, la): ProbeHead(model.hidden_size, *reader.shapes[t], pc)
                                     for t, la in pairs})
        popt = torch.optim.AdamW(heads.parameters(), lr=1e-3)

        def probe_step(n_forwards: int = 1, layers=layers, pairs=pairs, heads=heads, popt=popt) -> None:
            for _ in range(n_forwards):
                hs, valid, _ = frozen_hidden_states(model, batch, layers)
            probe_backward(heads, pairs, hs, valid, batch, pc, None)
            popt.step()
            popt.zero_grad(set_to_none=True)

        res[f"probe L={k}"] = timed(probe_step, args.warmup, args.repeats)
        res[f"naive L={k}"] = timed(lambda p=probe_step, n=len(pairs): p(n), 0, 1)  # one sample: it is slow

    print(f"model: LLM {n_layers} layers, hidden {model.hidden_size}; batch {args.batch}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'step':<14}{'seconds':>9}{'/ PT step':>11}{'probes':>8}{'s / probe':>11}")
    for name, sec in res.items():
        k = int(name.split("=")[1]) if "=" in name else 0
        per = f"{(sec - res['forward']) / (3 * k):.3f}" if name.startswith("probe") else ""
        print(f"{name:<14}{sec:>9.3f}{sec / res['pt']:>11.2f}{3 * k if k else '':>8}{per:>11}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_layers": n_layers, "hidden": model.hidden_size,
                                               "batch": args.batch, "seconds": res}, indent=1))


if __name__ == "__main__":
    main()
