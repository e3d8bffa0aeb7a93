"""Training data wait with the store on object storage, measured side by side in one run:

0. the latency proxy (bench/latency_proxy.py, the stand-in for netem; see bench/README.md): the round trip
   it adds to small S3 GETs and what it leaves of bulk GET throughput, both vs the same server direct;
1. the real trainer (``python -m olatrain run``, tiny presets, PT, 2 DataLoader workers) reading a store with
   real-size targets (depth (576, 1024), seg (576, 1536), gen (1, 1024) fp16: 2.95 MB per image) from
   (a) local disk, (b) S3 on loopback (SeaweedFS ``weed mini``), (c) the same S3 behind +RTT of latency;
   per case the mean ``data_wait`` (loader wait / step time, from metrics.jsonl) and samples/s, warm-up steps
   left out;
2. the same loader with the model's compute replaced by a fixed sleep (``--gpu-step-ms``, 250/150/100 ms):
   the trainer's own ``prepare_stage`` builds the DataLoader (same dataset, store reader, workers) and the loop
   sleeps where the GPU step would run. On this CPU-only box the real step takes seconds and hides any read;
   the sleep stands for a step that leaves the CPU free (a GPU step), where the reads show;
3. the second epoch of (2) with and without ``data.store_cache`` (when the code has that key).

Where the code has ``data.store_readahead``, every S3 case runs with ``data.store_readahead=0`` and with the
default; without it, the runs are what the code does (no read-ahead) and the table says so.

4. how many sequential round trips a TargetReader open and a batch fetch cost at +RTT (read-ahead 0).

    .venv/bin/python bench/bench_s3_train.py            # 22-26 min on the 2-vCPU dev VM at load 2-6
    .venv/bin/python bench/bench_s3_train.py --quick    # smoke test, 5 min: fewer images, steps, rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

TEACHERS = {"depth": ((576, 1024), "spatial"), "seg": ((576, 1536), "spatial"), "gen": ((1, 1024), "global")}


# ----------------------------------------------------------------------------------------------- data
def make_dataset(tmp: Path, n: int) -> tuple[Path, Path, list[str]]:
    """n image samples: the bundled sample's captioned photos copied under distinct names (so the store has n
    rows and random batches span many shards); -> (annotations, image root, store keys)."""
    samples = [s for s in json.loads((ROOT / "examples" / "sample.json").read_text()) if s.get("image")]
    root = tmp / "images"
    root.mkdir(parents=True, exist_ok=True)
    ann, keys = [], []
    for i in range(n):
        s = samples[i % len(samples)]
        src = ROOT / "examples" / "images" / s["image"]
        name = f"{i:05d}{src.suffix}"
        shutil.copyfile(src, root / name)
        ann.append({**s, "id": f"s{i:05d}", "image": name})
        keys.append(name)
    path = tmp / f"ann{n}.json"
    path.write_text(json.dumps(ann))
    return path, root, keys


def write_store(url: str, keys: list[str], shard: int, seed: int = 0) -> float:
    """A store with the real teachers' target sizes, random fp16 values, all rows OK; -> seconds writing."""
    from olacache.store import OK, EmbeddingStore

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with EmbeddingStore.create(url, keys, shard_size=shard) as s:
        for name, (shape, kind) in TEACHERS.items():
            s.add_teacher(name, shape, dtype="float16", kind=kind)
        for sh in range(s.n_shards):
            r = s.shard_rows(sh)
            for name, (shape, _) in TEACHERS.items():
                v = rng.standard_normal((len(r), *shape), dtype=np.float32).astype(np.float16)
                s.write_shard(name, sh, v, np.full(len(r), OK, np.uint8), [""] * len(r))
    return time.perf_counter() - t0


def config_file(tmp: Path) -> Path:
    """configs/tiny.yaml with its PT stage only."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["stages"] = {"pt": raw["stages"]["pt"]}
    raw.pop("output_dir", None)
    path = tmp / "tiny-pt.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def has_key(section: str, key: str) -> bool:
    """Does this code's config know ``section.key``? (read-ahead / cache keys land separately)"""
    import dataclasses

    from olatrain import config

    cls = {"data": config.DataConfig}[section]
    return key in {f.name for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------------------------- children
def _env(endpoint: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def run_trainer(cfg: Path, sets: list[str], out: Path, endpoint: str | None, warmup: int) -> dict[str, float]:
    """``python -m olatrain run`` in a subprocess; -> steady-state figures from its metrics.jsonl."""
    args = [sys.executable, "-m", "olatrain", "run", str(cfg)]
    for s in [*sets, f"output_dir={out}"]:
        args += ["--set", s]
    res = subprocess.run(args, env=_env(endpoint), cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"olatrain run failed ({res.returncode}): {res.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "pt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["step"] > warmup]
    t = sum(r["step_time"] for r in rows)
    return {"data_wait": sum(r["data_wait"] * r["step_time"] for r in rows) / t,
            "data_wait_max": max(r["data_wait"] for r in rows),
            "samples_per_s": sum(r["samples_per_s"] * r["step_time"] for r in rows) / t,
            "step_time": statistics.median(r["step_time"] for r in rows), "steps": len(rows)}


def run_loader(cfg: Path, sets: list[str], out: Path, endpoint: str | None, step_ms: float,
               steps: int) -> list[float]:
    """The trainer's DataLoader with a fixed sleep as the step, in a subprocess; -> wait seconds per step."""
    args = [sys.executable, __file__, "--child-loader", str(cfg), "--child-out", str(out),
            "--gpu-step-ms", str(step_ms), "--child-steps", str(steps)]
    for s in sets:
        args += ["--set", s]
    res = subprocess.run(args, env=_env(endpoint), cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"loader child failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["waits"]


def child_loader(cfg_path: str, sets: list[str], out: str, step_ms: float, steps: int) -> None:
    """Build the stage exactly as training does (olatrain.train.prepare_stage: dataset, store reader, loader
    and its workers, model), then take ``steps`` batches, sleeping ``step_ms`` where the step would run."""
    import torch

    from olatrain.config import load_run
    from olatrain.train import prepare_stage

    torch.set_num_threads(1)
    spec = load_run(cfg_path, [*sets, f"output_dir={out}"])
    st = prepare_stage(spec.configs["pt"], Path(out) / "pt", init_from=None, resume=False, log=lambda _: None)
    waits = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(st.batches)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_ms / 1000)
    print(json.dumps({"waits": waits}))


def run_fetch_probe(url: str, endpoint: str, n: int, batch: int, teachers: list[str] | None) -> dict[str, float]:
    """TargetReader open + direct fetches (read-ahead 0) of random batches, in a subprocess (its own s3fs
    instance: fsspec caches one per set of arguments, and the endpoint comes from the environment)."""
    args = [sys.executable, __file__, "--child-fetch", url, "--child-steps", str(n), "--batch", str(batch)]
    if teachers:
        args += ["--child-teachers", ",".join(teachers)]
    res = subprocess.run(args, env=_env(endpoint), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"fetch child failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_fetch(url: str, n: int, batch: int, teachers: str | None) -> None:
    from olacache.store import TargetReader

    t0 = time.perf_counter()
    r = TargetReader(url, teachers.split(",") if teachers else None, readahead=0)
    paths = r.image_paths
    r.fetch(paths[:batch])
    t_open = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ts = []
    for _ in range(n):
        pick = [paths[i] for i in rng.choice(len(paths), batch, replace=False)]
        t0 = time.perf_counter()
        r.fetch(pick)
        ts.append(time.perf_counter() - t0)
    ts = ts[n // 4:]  # every shard index read once by then, mostly
    print(json.dumps({"open_s": t_open, "fetch_ms": statistics.median(ts) * 1e3, "fetch_min_ms": min(ts) * 1e3}))


# ----------------------------------------------------------------------------------------------- proxy check
_KEEP: list[Any] = []  # s3fs instances live to the end (closing them from a finalizer warns about loops)


def check_proxy(direct: str, proxied: str, rtt_ms: float) -> dict[str, float]:
    """Direct vs through the proxy, interleaved: the median time of a 1 KB ranged GET (the store reader's
    request: one round trip), and the MB/s of a 64 MB ranged GET."""
    import s3fs
    from s3_server import BUCKET

    d, p = (s3fs.S3FileSystem(endpoint_url=e, skip_instance_cache=True) for e in (direct, proxied))
    _KEEP.extend([d, p])
    big = os.urandom(64 << 20)
    key = f"{BUCKET}/proxy-check/big"
    d.pipe(key, big)
    small: dict[str, list[float]] = {"direct": [], "proxy": []}
    bulk: dict[str, list[float]] = {"direct": [], "proxy": []}
    for f in (d, p):  # connections open, credentials resolved
        f.cat_file(key, start=0, end=1024)
    for _ in range(3):
        for name, f in (("direct", d), ("proxy", p)):
            for _ in range(10):
                t0 = time.perf_counter()
                f.cat_file(key, start=0, end=1024)
                small[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = f.cat_file(key, start=0, end=len(big))
            bulk[name].append(len(got) / 1e6 / (time.perf_counter() - t0))
            assert got == big
    return {"small_direct_ms": statistics.median(small["direct"]) * 1e3,
            "small_proxy_ms": statistics.median(small["proxy"]) * 1e3,
            "bulk_direct_MBps": statistics.median(bulk["direct"]),
            "bulk_proxy_MBps": statistics.median(bulk["proxy"]), "rtt_ms": rtt_ms}


# ----------------------------------------------------------------------------------------------- main
def _fmt_wait(x: float) -> str:
    return f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="trainer steps per case (warm-up included)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--gpu-step-ms", type=float, nargs="+", default=[250.0, 150.0, 100.0])
    ap.add_argument("--loader-steps", type=int, default=40)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache-images", type=int, default=0, help="images in the two-epoch cache runs (0: all)")
    ap.add_argument("--cache-step-ms", type=float, default=150.0, help="the sleep step of the cache runs")
    ap.add_argument("--skip", nargs="*", default=[], choices=["proxy", "fetch", "trainer", "loader", "cache"])
    ap.add_argument("--readahead", nargs="+", default=["0", "default"],
                    help="data.store_readahead values of the S3 cases (batches per worker, or 'default')")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=str, default=None, help="default: a temp dir, removed at the end")
    ap.add_argument("--child-loader", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-fetch", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-teachers", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_fetch:
        child_fetch(a.child_fetch, a.child_steps, a.batch, a.child_teachers)
        return
    if a.child_loader:
        child_loader(a.child_loader, a.set, a.child_out, a.gpu_step_ms[0], a.child_steps)
        return
    if a.quick:
        a.n_images, a.steps, a.warmup, a.loader_steps, a.repeats, a.gpu_step_ms = 96, 8, 3, 24, 1, [150.0]
    with contextlib.ExitStack() as stack:
        if a.workdir:
            tmp = Path(a.workdir)
            shutil.rmtree(tmp, ignore_errors=True)  # a fresh store and a fresh S3 server's data every run
            tmp.mkdir(parents=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bench(a, tmp)


def bench(a: argparse.Namespace, tmp: Path) -> None:
    from latency_proxy import delay_proxy_process
    from s3_server import BUCKET, seaweedfs

    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    readahead = has_key("data", "store_readahead")
    cache = has_key("data", "store_cache")
    print(f"code: data.store_readahead {'present' if readahead else 'absent'}, data.store_cache "
          f"{'present' if cache else 'absent'}")
    ann, root, keys = make_dataset(tmp, a.n_images)
    cfg = config_file(tmp)
    mb = sum(int(np.prod(s)) * 2 for s, _ in TEACHERS.values()) / 1e6
    base_sets = [f"data.annotations={ann}", f"data.image_root={root}", f"data.num_workers={a.workers}",
                 f"train.batch_size={a.batch}", "train.save_every=0", "train.log_every=1"]
    with seaweedfs(tmp) as aws:
        os.environ.update({k: v for k, v in aws.items() if k != "AWS_ENDPOINT_URL"})
        direct = aws["AWS_ENDPOINT_URL"]
        port = int(direct.rsplit(":", 1)[1])
        with delay_proxy_process("127.0.0.1", port, a.rtt_ms) as pport:
            proxied = f"http://127.0.0.1:{pport}"
            if "proxy" not in a.skip:
                c = check_proxy(direct, proxied, a.rtt_ms)
                print(f"\n## latency proxy, +{a.rtt_ms:.0f} ms RTT asked (ranged GETs through s3fs: median of "
                      "30 x 1 KB, of 3 x 64 MB)")
                print("| | direct | through the proxy | difference / ratio |\n|---|---:|---:|---:|")
                print(f"| 1 KB GET, ms | {c['small_direct_ms']:.1f} | {c['small_proxy_ms']:.1f} | "
                      f"+{c['small_proxy_ms'] - c['small_direct_ms']:.1f} ms |")
                print(f"| 64 MB GET, MB/s | {c['bulk_direct_MBps']:,.0f} | {c['bulk_proxy_MBps']:,.0f} | "
                      f"{c['bulk_proxy_MBps'] / c['bulk_direct_MBps']:.2f} |")
            local = str(tmp / "local.zarr")
            s3 = f"s3://{BUCKET}/train.zarr"
            os.environ["AWS_ENDPOINT_URL"] = direct
            w_local = write_store(local, keys, a.shard_size)
            w_s3 = write_store(s3, keys, a.shard_size)
            print(f"\nstore: {a.n_images} images x {mb:.2f} MB (depth (576,1024) + seg (576,1536) + gen (1,1024) "
                  f"fp16), shard {a.shard_size}; written in {w_local:.1f} s local, {w_s3:.1f} s to S3")
            if "fetch" not in a.skip:
                fetch_section(a, s3, direct, proxied)
            cases: list[tuple[str, str, str | None, list[str]]] = [("local disk", local, None, [])]
            for label, ep in (("S3 loopback", direct), (f"S3 +{a.rtt_ms:.0f} ms RTT", proxied)):
                if readahead:
                    for ra in a.readahead:
                        cases.append((f"{label}, read-ahead {ra}", s3, ep,
                                      [] if ra == "default" else [f"data.store_readahead={int(ra)}"]))
                else:
                    cases.append((f"{label} (code without read-ahead)", s3, ep, []))
            n_run = 0
            if "trainer" not in a.skip:
                got: dict[str, list[dict[str, float]]] = {c[0]: [] for c in cases}
                for rep in range(a.repeats):
                    for label, url, ep, extra in cases:
                        n_run += 1
                        sets = [*base_sets, f"data.store={url}", f"train.max_steps={a.steps}", *extra]
                        got[label].append(run_trainer(cfg, sets, tmp / f"run{n_run}", ep, a.warmup))
                        print(f"  trainer rep {rep} {label}: {got[label][-1]} (load {os.getloadavg()[0]:.1f})",
                              flush=True)
                print(f"\n## real trainer, tiny PT, batch {a.batch}, {a.workers} workers, steps {a.warmup + 1}-"
                      f"{a.steps} of each run ({a.repeats} interleaved runs per case; mean over runs)")
                print("| store | data_wait mean (max step) | samples/s | median step s |\n|---|---:|---:|---:|")
                for label, *_ in cases:
                    rs = got[label]
                    print(f"| {label} | {_fmt_wait(statistics.mean(r['data_wait'] for r in rs))} "
                          f"({_fmt_wait(max(r['data_wait_max'] for r in rs))}) | "
                          f"{statistics.mean(r['samples_per_s'] for r in rs):.2f} | "
                          f"{statistics.median(r['step_time'] for r in rs):.2f} |")
            if "loader" not in a.skip:
                for step_ms in a.gpu_step_ms:
                    loader_section(a, tmp, cfg, base_sets, cases, step_ms, n_run)
                    n_run += len(cases) * a.repeats
            if "cache" not in a.skip and cache:
                cache_epochs(a, tmp, cfg, base_sets, keys, s3, proxied, readahead)
            elif "cache" not in a.skip:
                print("\n(data.store_cache is not in this code: no cache runs)")
    print(f"\nload average at end {os.getloadavg()}")


def fetch_section(a: argparse.Namespace, s3: str, direct: str, proxied: str) -> None:
    """How many sequential round trips a TargetReader open and a batch fetch cost: direct vs +RTT."""
    print(f"\n## TargetReader on S3, read-ahead 0, batch {a.batch}: direct vs +{a.rtt_ms:.0f} ms RTT "
          "(open = construct + first fetch; fetch = median of the last 30 of 40 random batches)")
    print("| teachers | open s direct | open s +RTT | fetch ms direct | fetch ms +RTT | added / RTT |\n"
          "|---|---:|---:|---:|---:|---:|")
    for teachers in (None, ["depth"], ["gen"]):
        d = run_fetch_probe(s3, direct, 40, a.batch, teachers)
        p = run_fetch_probe(s3, proxied, 40, a.batch, teachers)
        print(f"| {','.join(teachers) if teachers else 'all 3'} | {d['open_s']:.2f} | {p['open_s']:.2f} | "
              f"{d['fetch_ms']:.0f} | {p['fetch_ms']:.0f} | {(p['fetch_ms'] - d['fetch_ms']) / a.rtt_ms:.1f} |",
              flush=True)


def loader_section(a: argparse.Namespace, tmp: Path, cfg: Path, base_sets: list[str],
                   cases: list[tuple[str, str, str | None, list[str]]], step_ms: float, n_run: int) -> None:
    """Every case through the trainer's DataLoader with a ``step_ms`` sleep as the step, interleaved."""
    lw: dict[str, list[float]] = {c[0]: [] for c in cases}
    skip_first = 4  # worker start-up and first reads (fork, index reads, connections)
    for rep in range(a.repeats):
        for label, url, ep, extra in cases:
            n_run += 1
            sets = [*base_sets, f"data.store={url}", "train.max_steps=100000", *extra]
            waits = run_loader(cfg, sets, tmp / f"loader{n_run}", ep, step_ms, a.loader_steps)[skip_first:]
            lw[label].append(sum(waits) / (sum(waits) + step_ms / 1000 * len(waits)))
            print(f"  loader {step_ms:.0f} ms rep {rep} {label}: wait fraction {lw[label][-1]:.3f} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\n## the trainer's DataLoader with a {step_ms:.0f} ms sleep as the step (batch {a.batch}, "
          f"{a.workers} workers, batches {skip_first + 1}-{a.loader_steps}; {a.repeats} interleaved runs)")
    print("| store | data wait fraction, per run | samples/s delivered (mean) |\n|---|---:|---:|")
    for label, *_ in cases:
        ws = lw[label]
        rate = a.batch / (step_ms / 1000 / (1 - statistics.mean(ws)))
        print(f"| {label} | {' / '.join(_fmt_wait(x) for x in ws)} | {rate:.1f} |")


def cache_epochs(a: argparse.Namespace, tmp: Path, cfg: Path, base_sets: list[str], keys: list[str], s3: str,
                 proxied: str, readahead: bool) -> None:
    """Two epochs over ``--cache-images`` images from S3 behind the proxy, with and without data.store_cache;
    the wait fraction of each epoch under the fixed-sleep step (``--cache-step-ms``)."""
    step_ms = a.cache_step_ms
    sub = json.loads(Path(base_sets[0].split("=", 1)[1]).read_text())[:a.cache_images or None]
    ann = tmp / f"ann-cache{len(sub)}.json"
    ann.write_text(json.dumps(sub))
    per_epoch = len(sub) // a.batch
    sets0 = [f"data.annotations={ann}", *base_sets[1:], f"data.store={s3}", "train.max_steps=100000"]
    variants = [("no cache", [])]
    variants.append(("data.store_cache", ["data.store_cache={dir}"]))
    ra = [["data.store_readahead=0"], []] if readahead else [[]]
    res: dict[str, list[tuple[float, float]]] = {}
    n = 0
    for rep in range(a.repeats):
        for ra_sets in ra:
            for vname, vsets in variants:
                n += 1
                label = f"{vname}" + (", read-ahead 0" if ra_sets else ", read-ahead default" if readahead else "")
                d = tmp / f"cache{n}"
                extra = [s.format(dir=d / "chunks") for s in vsets]
                waits = run_loader(cfg, [*sets0, *ra_sets, *extra], d / "run", proxied, step_ms, 2 * per_epoch)
                fr = []
                for e in range(2):
                    w = sum(waits[e * per_epoch + (2 if e == 0 else 0):(e + 1) * per_epoch])
                    k = per_epoch - (2 if e == 0 else 0)
                    fr.append(w / (w + k * step_ms / 1000))
                res.setdefault(label, []).append((fr[0], fr[1]))
                print(f"  cache rep {rep} {label}: epoch wait fractions {fr} (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    print(f"\n## two epochs of {len(sub)} images from S3 +{a.rtt_ms:.0f} ms RTT, {step_ms:.0f} ms sleep "
          f"as the step (epoch 1 without its first 2 batches)")
    print("| | epoch 1 data wait | epoch 2 data wait |\n|---|---:|---:|")
    for label, v in res.items():
        print(f"| {label} | {' / '.join(_fmt_wait(x[0]) for x in v)} | {' / '.join(_fmt_wait(x[1]) for x in v)} |")


if __name__ == "__main__":
    main()
