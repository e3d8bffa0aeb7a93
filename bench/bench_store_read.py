"""Random-batch read throughput of the embedding store: zarr vs HDF5 vs a raw .npy memmap, side by side.

Writes ONE synthetic data set (random fp16, default 2048 x 576 x 1024 = 2.4 GB, shard_size 256) three times —
an olacache zarr store, an olacache HDF5 store and a plain .npy — then reads the SAME sequence of random batches
(32 rows, no repeats within a batch) from each:

  (a) direct calls in this process: EmbeddingStore.read_rows (local byte-range fast path), the same through the
      zarr / h5py APIs (fast_reads=False), TargetReader.fetch (what the trainer calls: path lookup + status mask),
      a naive zarr-python ``z[i]`` loop, and ``memmap[rows]``;
  (b) a torch DataLoader with --workers workers (fork; the parent has already read, so this also exercises the
      per-process lazy reopen); the batch sampler yields row lists and __getitem__ reads one whole batch.

``--without-checksums`` also writes the same data as a zarr store and an HDF5 store WITHOUT chunk checksums
(format 1's layout: no crc32c codec inside the sharding codec, no fletcher32 filter) and adds their read_rows
rows, so the checksums' read cost is a ratio measured in the same run.

Numbers are WARM page-cache numbers (everything was just written and then read once; dropping caches needs
root). ``--cold`` additionally evicts each method's files with posix_fadvise(DONTNEED) before a first pass;
on a VM the host may still cache, so treat those as indicative only.

``--sizes`` (default on) also prints bytes/image for float16 vs int8 at the three teacher shapes, measured on
real stores, and the int8 reconstruction cosine on realistic-ish features.

    python bench/bench_store_read.py                       # defaults, ~2-3 min on 2 cores
    python bench/bench_store_read.py --n-images 512 --batches 50 --no-dataloader   # quick
    python bench/bench_store_read.py --n-images 512 --batches 40 --no-dataloader --no-sizes --without-checksums
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olacache.store import OK, EmbeddingStore, TargetReader  # noqa: E402
from olacache.store.reader import _new_batch  # noqa: E402

# ----------------------------------------------------------------------------------------------- data


@contextlib.contextmanager
def without_checksums() -> Iterator[None]:
    """Columns added inside are written with format 1's layout: no crc32c codec in the zarr sharding codec, no
    fletcher32 filter on HDF5 datasets (everything else as format 2), for with/without comparisons."""
    import h5py

    import olacache.store.zarr_backend as zb

    real_comp, real_create = zb._compressors, h5py.Group.create_dataset

    def create(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        kw.pop("fletcher32", None)
        return real_create(self, *a, **kw)

    zb._compressors = lambda name, url, version=2: real_comp(name, url, 1)  # type: ignore[assignment]
    h5py.Group.create_dataset = create  # type: ignore[method-assign]
    try:
        yield
    finally:
        zb._compressors = real_comp  # type: ignore[assignment]
        h5py.Group.create_dataset = real_create  # type: ignore[method-assign]


def build(
    root: Path, n: int, shape: tuple[int, ...], shard_size: int, seed: int, plain: bool = False
) -> dict[str, Path]:
    paths = [f"bench/{i:07d}.jpg" for i in range(n)]
    out = {"zarr": root / "store.zarr", "hdf5": root / "store.h5", "npy": root / "targets.npy"}
    stores = {k: EmbeddingStore.create(out[k], paths, shard_size=shard_size, format=k) for k in ("zarr", "hdf5")}
    if plain:  # the same data without chunk checksums (--without-checksums)
        out |= {"zarr-plain": root / "plain.zarr", "hdf5-plain": root / "plain.h5"}
        stores |= {
            f"{k}-plain": EmbeddingStore.create(out[f"{k}-plain"], paths, shard_size=shard_size, format=k)
            for k in ("zarr", "hdf5")
        }
    for k, s in stores.items():
        with without_checksums() if k.endswith("-plain") else contextlib.nullcontext():
            s.add_teacher("t", shape)
    mm = np.lib.format.open_memmap(out["npy"], mode="w+", dtype=np.float16, shape=(n, *shape))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for shard in range(stores["zarr"].n_shards):
        rows = stores["zarr"].shard_rows(shard)
        x = rng.standard_normal((len(rows), *shape), dtype=np.float32)
        st = np.full(len(rows), OK, np.uint8)
        for s in stores.values():
            s.write_shard("t", shard, x, st, [""] * len(rows))
        mm[rows.start : rows.stop] = x
    mm.flush()
    del mm
    for s in stores.values():
        s.close()
    print(
        f"built {n} x {shape} fp16 in zarr/hdf5/npy under {root} in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    return out


def files_of(p: Path) -> list[Path]:
    return [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]


def warm(p: Path) -> None:
    for f in files_of(p):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def evict(p: Path) -> None:
    """Best-effort cold cache: fsync, then ask the kernel to drop the file's clean pages."""
    for f in files_of(p):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------- timing


def time_batches(fn: Callable[[np.ndarray], object], batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


class MemmapDataset:
    """Lazy per-process np.load(mmap_mode='r'); __getitem__ takes a whole batch of rows."""

    def __init__(self, path: Path) -> None:
        self.path, self._mm, self._pid = path, None, None

    def __getitem__(self, rows: list[int]):  # noqa: ANN204
        if self._pid != os.getpid():
            self._mm, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        # Same transport as TargetReader.fetch: gather straight into a shared-memory batch.
        tensor, out = _new_batch((len(rows), *self._mm.shape[1:]))
        np.take(self._mm, np.asarray(rows), axis=0, out=out)
        return tensor

    def __len__(self) -> int:
        return 0


class TransportOnlyDataset:
    """No read at all: allocate the shared-memory batch and touch every page. The ceiling any source can reach
    through the DataLoader on this machine (worker -> main process hand-off of a fresh batch)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __getitem__(self, rows: list[int]):  # noqa: ANN204
        tensor, out = _new_batch((len(rows), *self.shape))
        out.reshape(-1)[:: 4096 // out.itemsize] = 0
        return tensor

    def __len__(self) -> int:
        return 0


class ReaderDataset:
    """What the trainer does: rows -> image paths -> TargetReader.fetch (lazy per-process open inside)."""

    def __init__(self, reader: TargetReader, paths: list[str]) -> None:
        self.reader, self.paths = reader, paths

    def __getitem__(self, rows: list[int]):  # noqa: ANN204
        targets, _ok = self.reader.fetch([self.paths[r] for r in rows])
        return targets["t"]

    def __len__(self) -> int:
        return 0


def time_loader(ds: object, batches: list[np.ndarray], workers: int) -> float:
    from torch.utils.data import DataLoader

    lists = [b.tolist() for b in batches]
    ctx = {"multiprocessing_context": "fork"} if workers > 0 else {}
    dl = DataLoader(ds, batch_size=None, sampler=lists, num_workers=workers, **ctx)  # type: ignore[arg-type]
    it = iter(dl)
    skip = 2 * max(1, workers)  # worker start-up and their first open are not steady state
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for x in it:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- sizes / int8


def sizes_report(tmp: Path, n: int = 32, seed: int = 0) -> list[str]:
    """bytes/image fp16 vs int8 from real (zarr) stores, and int8 reconstruction cosine.

    Data: per-channel mean/scale variation (scale log-normal) with two outlier channels x30, like ViT features
    with massive activations — outliers are the hard case for per-vector absmax."""
    rng = np.random.default_rng(seed)
    lines = [
        "| target shape | fp16 B/img | int8 B/img (incl. scale) | int8/fp16 | cos/image mean (min) | cos/vector mean (min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape in [(576, 1024), (576, 1536), (1, 1024)]:
        c = shape[-1]
        mean = rng.normal(0, 0.5, c).astype(np.float32)
        std = rng.lognormal(0, 1, c).astype(np.float32)
        std[rng.choice(c, 2, replace=False)] *= 30
        x = (mean + std * rng.standard_normal((n, *shape), dtype=np.float32)).astype(np.float32)
        url = tmp / f"sizes_{'x'.join(map(str, shape))}.zarr"
        paths = [f"s/{i}.jpg" for i in range(n)]
        with EmbeddingStore.create(url, paths, shard_size=n) as s:
            s.add_teacher("f16", shape, dtype="float16")
            s.add_teacher("i8", shape, dtype="int8")
            st, errs = np.full(n, OK, np.uint8), [""] * n
            s.write_shard("f16", 0, x, st, errs)
            s.write_shard("i8", 0, x, st, errs)
            b16, b8 = s.nbytes("f16") / n, s.nbytes("i8") / n
            y = s.read_rows("i8", np.arange(n)).astype(np.float32)
        xf, yf = x.reshape(n, -1), y.reshape(n, -1)
        cos_img = (xf * yf).sum(1) / (np.linalg.norm(xf, axis=1) * np.linalg.norm(yf, axis=1))
        xv, yv = x.reshape(-1, c), y.reshape(-1, c)
        cos_vec = (xv * yv).sum(1) / (np.linalg.norm(xv, axis=1) * np.linalg.norm(yv, axis=1))
        lines.append(
            f"| {shape} | {b16:,.0f} | {b8:,.0f} | {b8 / b16:.3f} | {cos_img.mean():.5f} ({cos_img.min():.5f}) "
            f"| {cos_vec.mean():.5f} ({cos_vec.min():.5f}) |"
        )
    return lines


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=2048)
    ap.add_argument("--shape", type=int, nargs="+", default=[576, 1024])
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=150, help="batches per timed pass")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per method (median reported)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--read-threads", type=int, default=4, help="thread count for the read_threads rows")
    ap.add_argument("--no-dataloader", action="store_true")
    ap.add_argument("--without-checksums", action="store_true",
                    help="also read the same data stored without chunk checksums (format 1's layout)")
    ap.add_argument("--cold", action="store_true", help="also time a first pass after fadvise(DONTNEED)")
    ap.add_argument("--no-sizes", action="store_true", help="skip the fp16-vs-int8 size/cosine table")
    ap.add_argument("--only-sizes", action="store_true")
    ap.add_argument(
        "--dir", type=Path, default=None, help="work dir (default: a fresh temp dir, removed at exit)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="olacache-bench-", dir=args.dir))
    try:
        if not args.only_sizes:
            run_reads(args, tmp)
        if not args.no_sizes:
            print("\nbytes per image and int8 reconstruction (zarr stores, 32 images each):")
            print("\n".join(sizes_report(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_reads(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    torch.set_num_threads(1)
    shape = tuple(args.shape)
    n, bsz = args.n_images, args.batch
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the build", flush=True
    )
    files = build(tmp, n, shape, args.shard_size, args.seed, plain=args.without_checksums)
    img_mb = float(np.prod(shape)) * 2 / 1e6
    rng = np.random.default_rng(args.seed + 1)
    batches = [rng.choice(n, bsz, replace=False) for _ in range(args.batches)]
    paths = [f"bench/{i:07d}.jpg" for i in range(n)]
    T = args.read_threads

    # Each method is a factory -> (read one batch, close), so the cold pass can open it fresh after eviction
    # (a live memmap keeps its pages mapped, and fadvise cannot drop mapped pages).
    def memmap_m():  # noqa: ANN202
        mm = np.load(files["npy"], mmap_mode="r")
        return (lambda b: np.asarray(mm[b])), (lambda: None)

    def store_m(key: str, **kw: object):  # noqa: ANN202
        s = EmbeddingStore.open(files[key], **kw)  # type: ignore[arg-type]
        return (lambda b: s.read_rows("t", b)), s.close

    def reader_m(key: str):  # noqa: ANN202
        r = TargetReader(files[key], ["t"])
        return (lambda b: r.fetch([paths[i] for i in b])), r.close

    def naive_m():  # noqa: ANN202
        import zarr

        z = zarr.open_array(files["zarr"] / "t" / "target", mode="r")
        return (lambda b: np.stack([z[int(r)] for r in b])), (lambda: None)

    methods = {
        "memmap  mm[rows]": memmap_m,
        "zarr    EmbeddingStore.read_rows": lambda: store_m("zarr"),
        "hdf5    EmbeddingStore.read_rows": lambda: store_m("hdf5"),
        f"zarr    read_rows, read_threads={T}": lambda: store_m("zarr", read_threads=T),
        f"hdf5    read_rows, read_threads={T}": lambda: store_m("hdf5", read_threads=T),
        "zarr    TargetReader.fetch (paths)": lambda: reader_m("zarr"),
        "hdf5    TargetReader.fetch (paths)": lambda: reader_m("hdf5"),
        "zarr    read_rows via zarr async API": lambda: store_m("zarr", fast_reads=False),
        "hdf5    read_rows via h5py": lambda: store_m("hdf5", fast_reads=False),
        "zarr    naive z[i] loop (zarr-python)": naive_m,
    }
    if args.without_checksums:
        methods |= {
            "zarr    read_rows, no checksums (format-1 layout)": lambda: store_m("zarr-plain"),
            "hdf5    read_rows, no checksums (format-1 layout)": lambda: store_m("hdf5-plain"),
            "hdf5    read_rows via h5py, no checksums": lambda: store_m("hdf5-plain", fast_reads=False),
        }
    slow = {"zarr    naive z[i] loop (zarr-python)", "zarr    read_rows via zarr async API"}
    all_files = list(files.values())

    cold: dict[str, float] = {}
    if args.cold:
        k = min(len(batches), 30)
        for name, make in methods.items():
            if name in slow:
                continue
            for p in all_files:
                evict(p)
            fn, close = make()
            cold[name] = time_batches(fn, batches[:k])
            close()
    for p in all_files:
        warm(p)

    opened = {name: make() for name, make in methods.items()}
    # Every reader returns exactly the same bytes for the same batch.
    ref = opened["memmap  mm[rows]"][0](batches[0])
    for name, (fn, _) in opened.items():
        got = fn(batches[0])
        got = got[0]["t"].numpy() if isinstance(got, tuple) else got
        assert np.array_equal(got, ref), name

    res: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every method alike
        for name, (fn, _) in opened.items():
            bs = batches[: max(10, len(batches) // 6)] if name in slow else batches
            fn(bs[0])
            res[name].append(time_batches(fn, bs))
    med = {m: statistics.median(v) for m, v in res.items()}
    base = med["memmap  mm[rows]"]

    print(
        f"\n### Direct calls, warm page cache: {args.batches} random batches of {bsz} x {shape} fp16 "
        f"({img_mb:.2f} MB/img), median of {args.repeats} interleaved passes"
    )
    def pass_ratio(a: str, b: str) -> float:
        """Median over the interleaved passes of a's rate / b's rate in the same pass: what load drift between
        passes moves least."""
        return statistics.median(x / y for x, y in zip(res[a], res[b], strict=True))

    head = "| method | images/s | MB/s | vs memmap | vs memmap, per pass |"
    if cold:
        head += f" first pass after fadvise evict ({min(len(batches), 30)} batches), images/s |"
    print(head)
    print("|---|---:|---:|---:|---:|" + ("---:|" if cold else ""))
    for m, v in med.items():
        extra = (f" {cold[m]:,.0f} |" if m in cold else " - |") if cold else ""
        print(f"| {m} | {v:,.0f} | {v * img_mb:,.0f} | {v / base:.2f} | "
              f"{pass_ratio(m, 'memmap  mm[rows]'):.2f} |{extra}")
    if args.without_checksums:
        print("\n### Checksum read cost and fast path vs library, same run (median of per-pass ratios)")
        print("| ratio | value |\n|---|---:|")
        for label, a, b in (
            ("zarr fast path: crc32c / no checksums", "zarr    EmbeddingStore.read_rows",
             "zarr    read_rows, no checksums (format-1 layout)"),
            ("hdf5 fast path: fletcher32 / no checksums", "hdf5    EmbeddingStore.read_rows",
             "hdf5    read_rows, no checksums (format-1 layout)"),
            ("hdf5 h5py: fletcher32 / no checksums", "hdf5    read_rows via h5py",
             "hdf5    read_rows via h5py, no checksums"),
            ("hdf5 with fletcher32: fast path / h5py", "hdf5    EmbeddingStore.read_rows",
             "hdf5    read_rows via h5py"),
            ("zarr with crc32c: fast path / zarr-python", "zarr    EmbeddingStore.read_rows",
             "zarr    read_rows via zarr async API"),
        ):
            print(f"| {label} | {pass_ratio(a, b):.2f} |")

    if not args.no_dataloader:
        readers = {k: TargetReader(files[k], ["t"]) for k in ("zarr", "hdf5")}
        for r in readers.values():
            r.fetch(paths[:2])  # the parent has read before the workers fork
        dl = {
            "no read: shm batch hand-off only (ceiling)": lambda: time_loader(
                TransportOnlyDataset(shape), batches, args.workers
            ),
            "memmap": lambda: time_loader(MemmapDataset(files["npy"]), batches, args.workers),
            "zarr (TargetReader.fetch)": lambda: time_loader(
                ReaderDataset(readers["zarr"], paths), batches, args.workers
            ),
            "hdf5 (TargetReader.fetch)": lambda: time_loader(
                ReaderDataset(readers["hdf5"], paths), batches, args.workers
            ),
        }
        dres: dict[str, list[float]] = {m: [] for m in dl}
        for _ in range(args.repeats):
            for m, f in dl.items():
                dres[m].append(f())
        dmed = {m: statistics.median(v) for m, v in dres.items()}
        print(
            f"\n### torch DataLoader, {args.workers} workers (fork after the parent read), batch_size=None + a "
            "sampler of row lists, warm page cache; batches returned in shared memory"
        )
        print("| source | images/s | MB/s | vs memmap |")
        print("|---|---:|---:|---:|")
        for m, v in dmed.items():
            print(f"| {m} | {v:,.0f} | {v * img_mb:,.0f} | {v / dmed['memmap']:.2f} |")
        for r in readers.values():
            r.close()

    for _, close in opened.values():
        close()
    print(f"\nload average after the read benchmark: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
