"""The library read path of local zarr stores (compressed columns, and `verify`'s whole-shard reads): zarr-python's
own codec pipeline vs the zarrs codec pipeline (set through ``zarr.config`` while the store's arrays are opened).
Same store, same random batches, interleaved passes in one run; median of ``--repeats``. Also checks whether each
pipeline notices a flipped byte in a checksummed inner chunk (the reason zarrs is not used: bench/README.md).

    .venv/bin/python bench/bench_library_reads.py                 # ~1 min on the 2-vCPU dev VM
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from olacache.store import OK, EmbeddingStore  # noqa: E402

ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}


def _make(url: str, n: int, shape: tuple[int, ...], shard: int, compressor: str | None) -> None:
    rng = np.random.default_rng(0)
    paths = [f"img/{i:06d}.jpg" for i in range(n)]
    with EmbeddingStore.create(url, paths, shard_size=shard) as s:
        s.add_teacher("t", shape, compressor=compressor)
        for k in range(s.n_shards):
            r = s.shard_rows(k)
            v = rng.standard_normal((len(r), *shape), dtype=np.float32).astype(np.float16)
            s.write_shard("t", k, v, np.full(len(r), OK, np.uint8), [""] * len(r))


def _batches_rate(url: str, batches: list[np.ndarray], zarrs: bool) -> float:
    with zarr.config.set(ZARRS if zarrs else {}), EmbeddingStore.open(url) as s:
        s.read_rows("t", batches[0])  # open + first touch outside the timing
        t0 = time.perf_counter()
        for b in batches:
            s.read_rows("t", b)
        return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def _verify_rate(url: str, zarrs: bool) -> float:
    with zarr.config.set(ZARRS if zarrs else {}), EmbeddingStore.open(url) as s:
        t0 = time.perf_counter()
        for k in range(s.n_shards):
            assert not s.check_shard("t", k)
        return s.n_images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--shape", type=str, default="256,1024")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    try:
        import zarrs  # noqa: F401
    except ImportError:
        sys.exit("zarrs is not installed (it is a dev dependency)")
    shape = tuple(int(x) for x in a.shape.split(","))
    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(a.n_images, 32, replace=False)) for _ in range(a.batches)]
    with tempfile.TemporaryDirectory() as d:
        zstd, plain = f"{d}/zstd.zarr", f"{d}/plain.zarr"
        _make(zstd, a.n_images, shape, a.shard_size, "zstd")
        _make(plain, a.n_images, shape, a.shard_size, None)
        cases = {
            "zstd column, random batch-32 read_rows": lambda z: _batches_rate(zstd, batches, z),
            "verify (check_shard, whole shards), uncompressed": lambda z: _verify_rate(plain, z),
            "verify (check_shard, whole shards), zstd": lambda z: _verify_rate(zstd, z),
        }
        caught = {z: _flip_caught(plain, z) for z in (False, True)}
        res: dict[tuple[str, bool], list[float]] = {}
        for _ in range(a.repeats):
            for name, fn in cases.items():
                for z in (False, True):
                    res.setdefault((name, z), []).append(fn(z))
    print(f"{a.n_images} images x {shape} fp16, shard_size {a.shard_size}; images/s, median of {a.repeats}\n")
    print("| read | zarr-python pipeline | zarrs pipeline | zarrs / zarr-python |")
    print("|---|---:|---:|---:|")
    for name in cases:
        p, z = statistics.median(res[(name, False)]), statistics.median(res[(name, True)])
        print(f"| {name} | {p:,.0f} | {z:,.0f} | **{z / p:.2f}** |")
    print(f"| a flipped byte in one inner chunk of a shard: reported by check_shard's chunk checks | "
          f"{caught[False]} | {caught[True]} | |")


def _flip_caught(url: str, zarrs: bool) -> bool:
    """Copy the store, flip one byte inside shard 0's first inner chunk, and report whether reading that shard
    through the library path raises a checksum error (the shard digest is not consulted here)."""
    import shutil

    d = tempfile.mkdtemp()
    try:
        copy = Path(d) / "flip.zarr"
        shutil.copytree(url, copy)
        shard0 = next(p for p in (copy / "t" / "target" / "c").rglob("*") if p.is_file() and p.parts[-3] == "0")
        raw = bytearray(shard0.read_bytes())
        raw[100] ^= 0x01
        shard0.write_bytes(bytes(raw))
        with zarr.config.set(ZARRS if zarrs else {}), EmbeddingStore.open(copy, fast_reads=False) as s:
            out = np.empty((s.shard_size, *s.target_shape("t")), np.float16)
            bad = s._b._library_read_into("t/target", np.arange(s.shard_size), out, np.arange(s.shard_size))
            return len(bad) > 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
