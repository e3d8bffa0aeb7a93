"""Where the fast read paths' checksum time goes, measured piece by piece (best of --repeats timings each):

1. crc32c (google-crc32c, hardware CRC) throughput by buffer size;
2. the GIL: two threads checksumming with google-crc32c's Python function (which holds the GIL) vs the same
   library's C function called through ctypes (which releases it; an experiment, not used by olacache), against
   one thread doing the same work, and a numpy sum as the control (it releases the GIL, so its speed-up says
   whether the machine had a second core free);
3. HDF5's fletcher32 on one image: olacache's numpy version vs numcodecs' Cython Fletcher32, and h5py reading the
   image with and without the fletcher32 filter (no chunk cache);
4. alignment: preadv of images into a page-aligned batch from offsets 4 bytes apart modulo 4 KiB (format 2's
   crc after each chunk) vs page-aligned offsets (format 1), page cache warm.

    .venv/bin/python bench/bench_checksums.py            # ~30 s
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olacache.store import checksums  # noqa: E402
from olacache.store.pread import aligned_empty  # noqa: E402


def crc32c_through_ctypes() -> Callable[[np.ndarray], int] | None:
    """google-crc32c's C function (its library's public C API, shipped in the wheel) called through ctypes,
    which releases the GIL for the call; None if the library is not found or disagrees on test data."""
    import google_crc32c

    here = os.path.dirname(os.path.dirname(google_crc32c.__file__))
    found = sorted(glob.glob(os.path.join(here, "google_crc32c.libs", "libcrc32c*.so*")))
    if not found:
        return None
    fn = ctypes.CDLL(found[0]).crc32c_value
    fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_size_t]
    if fn(b"123456789", 9) != 0xE3069283:
        return None
    return lambda b: int(fn(b.ctypes.data, b.nbytes))


def best(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls (the least disturbed by other jobs)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs="+", default=[576, 1024], help="one fp16 image")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    img = int(np.prod(a.shape)) * 2
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs, image {tuple(a.shape)} fp16 = {img:,} B")

    print("\n## 1. crc32c (google-crc32c) throughput")
    print("| buffer | µs | GB/s |\n|---|---:|---:|")
    for n in (128 << 10, img, 16 << 20):
        x = checksums._readonly(rng.integers(0, 256, n, dtype=np.uint8))
        t = best(lambda x=x: checksums._crc32c_value(x), a.repeats)  # type: ignore[misc]
        print(f"| {n:,} B | {t * 1e6:,.1f} | {n / t / 1e9:.1f} |")

    print("\n## 2. two threads vs one, 2 x 200 checksums of 1 MiB (seconds)")
    bufs = [checksums._readonly(rng.integers(0, 256, 1 << 20, dtype=np.uint8)) for _ in range(2)]
    fns: dict[str, Callable[[np.ndarray], object]] = {"google-crc32c Python function": checksums._crc32c_value}
    nogil = crc32c_through_ctypes()
    if nogil is not None:
        fns["the same library's C function through ctypes"] = nogil
    # control: numpy releases the GIL in a reduction, so this row shows whether a second core was free at all
    fns["control: numpy sum of the same bytes"] = lambda b: np.add.reduce(b, dtype=np.uint64)
    print("| crc32c call | 1 thread | 2 threads | speed-up |\n|---|---:|---:|---:|")
    with ThreadPoolExecutor(2) as ex:
        for name, f in fns.items():
            def work(b: np.ndarray, f: Callable[[np.ndarray], object] = f) -> None:
                for _ in range(200):
                    f(b)

            one = best(lambda work=work: [work(b) for b in bufs], max(3, a.repeats // 4))
            two = best(lambda work=work: list(ex.map(work, bufs)), max(3, a.repeats // 4))
            print(f"| {name} | {one:.3f} | {two:.3f} | {one / two:.2f} |")

    print("\n## 3. fletcher32 of one image")
    x = rng.integers(0, 256, img, dtype=np.uint8)
    rows = [("olacache numpy (checksums.fletcher32)", best(lambda: checksums.fletcher32(x), a.repeats))]
    try:
        from numcodecs.fletcher32 import Fletcher32

        enc = Fletcher32().encode(x)
        rows.append(("numcodecs Fletcher32.decode (Cython)", best(lambda: Fletcher32().decode(enc), a.repeats)))
    except ImportError:  # pragma: no cover - numcodecs comes with zarr
        pass
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        v = rng.standard_normal((16, *a.shape)).astype(np.float16)
        with h5py.File(f"{tmp}/f.h5", "w") as f:
            f.create_dataset("sum", data=v, chunks=(1, *a.shape), fletcher32=True)
            f.create_dataset("plain", data=v, chunks=(1, *a.shape))
        with h5py.File(f"{tmp}/f.h5", "r", rdcc_nbytes=0) as f:
            out = np.empty((1, *a.shape), np.float16)
            for name in ("sum", "plain"):
                ds = f[name]
                t = best(lambda ds=ds: [ds.read_direct(out, np.s_[k : k + 1], np.s_[0:1]) for k in range(16)],
                         a.repeats) / 16
                rows.append((f"h5py reads one image, {'with' if name == 'sum' else 'without'} fletcher32", t))
    print("| what | µs |\n|---|---:|")
    for name, t in rows:
        print(f"| {name} | {t * 1e6:,.1f} |")

    print("\n## 4. preadv of 32 images into a page-aligned batch, page cache warm (µs per image)")
    with tempfile.TemporaryDirectory() as tmp:
        n = 64
        path = Path(tmp) / "blob"
        path.write_bytes(rng.integers(0, 256, n * (img + 4), dtype=np.uint8).tobytes())
        fd = os.open(path, os.O_RDONLY)
        os.pread(fd, n * (img + 4), 0)
        pick = rng.choice(n - 1, 32, replace=False)
        batch = aligned_empty((32, img), np.uint8)
        print("| file offsets | µs per image |\n|---|---:|")
        for label, stride in (("page-aligned (format 1 layout)", img), ("4 bytes apart mod 4 KiB (format 2)", img + 4)):
            t = best(lambda stride=stride: [os.preadv(fd, [memoryview(batch[k])], int(r) * stride)
                                            for k, r in enumerate(pick)], a.repeats)
            print(f"| {label} | {t / 32 * 1e6:,.1f} |")
        os.close(fd)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
