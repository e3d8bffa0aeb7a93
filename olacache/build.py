"""The build: run frozen teachers once, batched, over a dataset's unique images, into an embedding store.

Pipeline (one process per GPU under torchrun; one process on CPU):

    annotations -> unique normalised image paths (row order fixed, sorted)
    -> pending shards (a shard is complete iff its status chunk says so; complete shards are never redone)
    -> this rank's shards (shard i belongs to rank i % world: disjoint, no DistributedSampler padding)
    -> DataLoader workers decode + preprocess per teacher; batches never cross a shard boundary, so a
       resumed build feeds the teacher exactly the batches an uninterrupted one would (identical targets)
    -> batched teacher forward (inference_mode; bf16 autocast on CUDA)
    -> whole-shard buffers -> a background writer thread (I/O overlaps compute) -> store.write_shard,
       which writes data first and the status chunk last (the completion marker).

Bad images never abort the build: decode failures and per-image forward failures become FAILED rows with a
reason; text-only samples are skipped (they have no image).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from olacache import __version__
from olacache.annotations import load_annotations, unique_images
from olacache.images import ImageError, load_rgb
from olacache.store import FAILED, MISSING, OK, EmbeddingStore, StoreMismatch, image_set_fingerprint

ALL_TEACHERS = ("depth", "seg", "gen")


class BuildError(RuntimeError):
    """A build that cannot start (bad arguments, store mismatch); nothing has been written when raised."""


@dataclass
class BuildConfig:
    annotations: str
    image_root: str
    out: str
    teachers: list[str] = field(default_factory=lambda: list(ALL_TEACHERS))
    preset: str = "tiny"
    # per-teacher overrides: {"depth": {"source": "/ckpt/dav2-large", "options": {"bgr_quirk": true}}}
    teacher_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 16
    shard_size: int = 256
    dtype: str = "float16"
    format: str = "zarr"
    workers: int = 2
    overwrite_teacher: list[str] = field(default_factory=list)
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **cli: Any) -> BuildConfig:
        """YAML/JSON file values, then CLI values that were actually given (not None) on top."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise BuildError(f"{path}: expected a mapping of build options")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise BuildError(f"{path}: unknown build option(s) {sorted(unknown)}; valid: {sorted(known)}")
        data.update({k: v for k, v in cli.items() if v is not None})
        return cls(**data)


@dataclass
class TeacherSummary:
    name: str
    shape: tuple[int, ...]
    n_ok: int
    n_failed: int
    n_missing: int
    bytes_per_image: float
    int8_cosine_mean: float | None = None
    int8_cosine_min: float | None = None


@dataclass
class BuildSummary:
    store: str
    n_images: int
    n_samples: int
    skipped_text_only: int
    shards_total: int
    shards_computed: int
    shards_skipped_complete: int
    images_computed: int
    seconds: float
    images_per_s: float
    teachers: list[TeacherSummary]
    failures: list[tuple[str, str]]  # (image path, reason), union over teachers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_dist(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU (tests), nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- data
class ShardImages(torch.utils.data.Dataset):
    """Items are whole batches (lists of rows inside one shard): decode once, preprocess for every teacher
    that still needs that shard. Runs in DataLoader workers; holds only picklable preprocessors."""

    def __init__(self, image_root: Path, paths: Sequence[str], batches: list[tuple[int, list[int]]],
                 shard_teachers: dict[int, list[str]], preprocessors: dict[str, Callable]):
        self.root = image_root
        self.paths = paths
        self.batches = batches
        self.shard_teachers = shard_teachers
        self.pre = preprocessors

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, rows = self.batches[i]
        teachers = self.shard_teachers[shard]
        ok_rows: list[int] = []
        failed: dict[int, str] = {}
        pix: dict[str, list[torch.Tensor]] = {t: [] for t in teachers}
        for r in rows:
            try:
                img = load_rgb(self.root / self.paths[r])
                per = {t: self.pre[t](img) for t in teachers}
            except ImageError as e:
                failed[r] = e.reason
                continue
            except Exception as e:  # a preprocessor choking on a valid-but-odd image: record, don't abort
                failed[r] = f"preprocessing failed: {type(e).__name__}: {e}"
                continue
            ok_rows.append(r)
            for t in teachers:
                pix[t].append(per[t])
        return {
            "shard": shard,
            "rows": rows,
            "ok_rows": ok_rows,
            "failed": failed,
            "pixels": {t: torch.stack(v) if v else None for t, v in pix.items()},
        }


def _identity(x: Any) -> Any:
    return x


def plan_batches(shards: Sequence[int], shard_rows: Callable[[int], range], batch_size: int) -> list[tuple[int, list[int]]]:
    """Fixed batch composition: a shard's rows in order, cut every batch_size. Independent of which shards
    are pending, so a resumed build forwards exactly the batches of an uninterrupted one."""
    out = []
    for s in shards:
        rows = list(shard_rows(s))
        out += [(s, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return out


# ----------------------------------------------------------------------------------------------- writer
class ShardWriter:
    """Background thread that writes whole shards; the bounded queue applies back-pressure (at most
    `depth` finished shards wait in host memory). Errors surface in the main thread at the next put/close."""

    def __init__(self, store: EmbeddingStore, depth: int = 2, on_written: Callable[[int, str], None] | None = None):
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.on_written = on_written
        self.thread = threading.Thread(target=self._run, name="olacache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            shard, teacher, values, status, errors = item
            try:
                self.store.write_shard(teacher, shard, values, status, errors)
                if self.on_written:
                    self.on_written(shard, teacher)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, shard: int, teacher: str, values: np.ndarray, status: np.ndarray, errors: list[str]) -> None:
        self._check()
        self.q.put((shard, teacher, values, status, errors))

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing to the store failed: {self.error}") from self.error

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()


class ShardBuffer:
    """Accumulates one shard's targets for one teacher until every row has a result."""

    def __init__(self, rows: range, shape: tuple[int, ...]):
        self.start = rows.start
        self.n = len(rows)
        self.values = np.zeros((self.n, *shape), dtype=np.float32)
        self.status = np.full(self.n, MISSING, dtype=np.uint8)
        self.errors = [""] * self.n

    def put_ok(self, rows: Sequence[int], values: np.ndarray) -> None:
        idx = np.asarray(rows) - self.start
        self.values[idx] = values
        self.status[idx] = OK

    def put_failed(self, row: int, reason: str) -> None:
        self.status[row - self.start] = FAILED
        self.errors[row - self.start] = reason

    @property
    def done(self) -> bool:
        return bool((self.status != MISSING).all())


# ----------------------------------------------------------------------------------------------- store setup
def teacher_attrs(teacher: Any, *, preset: str, options: dict | None, image_root: str) -> dict[str, Any]:
    # preset/options/image_root are recorded (not compared) so `verify --recompute` can rebuild the teacher
    return {
        "teacher": teacher.name,
        "preset": preset,
        "options": options or {},
        "image_root": str(Path(image_root).resolve()),
        "identity": teacher.identity(),
        "spec": teacher.spec(),
        "builder_version": __version__,
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def describe_difference(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of differing keys between two (nested) attribute dicts."""
    out: list[str] = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k, "<absent>"), want.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_difference(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: store has {a!r}, this build has {b!r}")
    return out


COMPARED_KEYS = ("identity", "spec", "dtype", "target_shape")


def _comparable(attrs: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resume: weights (by content hash, not by path: a tiny preset regenerated under
    another cache dir is the same teacher), preprocessing/target spec, dtype and shape."""
    out = {k: attrs.get(k) for k in COMPARED_KEYS}
    ident = attrs.get("identity") or {}
    out["identity"] = {k: ident.get(k) for k in ("weights_sha256", "random_init")}
    if out["target_shape"] is not None:
        out["target_shape"] = list(out["target_shape"])
    return out


def check_image_set(store: EmbeddingStore, paths: list[str]) -> None:
    if store.fingerprint == image_set_fingerprint(paths):
        return
    have, want = set(store.image_paths), set(paths)
    added, removed = sorted(want - have), sorted(have - want)
    detail = []
    if added:
        detail.append(f"{len(added)} image(s) not in the store, e.g. {added[:3]}")
    if removed:
        detail.append(f"{len(removed)} store image(s) not in the annotations, e.g. {removed[:3]}")
    if not detail:
        detail.append("same images in a different order")
    raise StoreMismatch(
        f"store {store.url} was built for a different image set ({store.n_images} images; "
        f"annotations give {len(paths)}): {'; '.join(detail)}. Build a new store (--out elsewhere) "
        "for a different image set."
    )


def prepare_store(cfg: BuildConfig, paths: list[str], teachers: dict[str, Any], dist: Dist) -> EmbeddingStore:
    """Create or open the store and its teacher columns on rank 0, then open it on the other ranks.
    Every mismatch is raised before any teacher forward runs."""
    err: str | None = None
    if dist.main:
        try:
            if EmbeddingStore.exists(cfg.out):
                store = EmbeddingStore.open(cfg.out, mode="r+")
                check_image_set(store, paths)
                if store.shard_size != cfg.shard_size:
                    # the shard size is part of the layout; resuming keeps the store's own
                    cfg.shard_size = store.shard_size
            else:
                if "://" not in cfg.out:
                    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
                store = EmbeddingStore.create(cfg.out, paths, shard_size=cfg.shard_size, format=cfg.format,
                                              created_by=f"olacache {__version__}")
            for name, t in teachers.items():
                ov = cfg.teacher_overrides.get(name, {})
                new = _jsonable(teacher_attrs(t, preset=ov.get("preset", cfg.preset),
                                              options=ov.get("options"), image_root=cfg.image_root))
                want = {**new, "dtype": cfg.dtype, "target_shape": list(t.target_shape)}
                if name not in store.teachers:
                    store.add_teacher(name, tuple(t.target_shape), dtype=cfg.dtype, attrs=new)
                    continue
                have = store.teacher_attrs(name)
                diff = describe_difference(_comparable(have), _comparable(want))
                if not diff:
                    continue
                if name in cfg.overwrite_teacher:
                    store.add_teacher(name, tuple(t.target_shape), dtype=cfg.dtype, attrs=new, replace=True)
                else:
                    raise StoreMismatch(
                        f"store {cfg.out}: column {name!r} was built differently: " + "; ".join(diff)
                        + f". Use --overwrite-teacher {name} to replace that column on purpose, "
                        "or --out a new store."
                    )
            store.close()
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            if dist.world == 1:
                raise
    err = dist.broadcast_object(err)
    if err is not None:
        raise BuildError(err)
    return EmbeddingStore.open(cfg.out, mode="r+")


# ----------------------------------------------------------------------------------------------- build
def _forward_isolating_failures(teacher: Any, pixels: torch.Tensor, rows: list[int]) -> tuple[list[int], np.ndarray | None, dict[int, str]]:
    """Batched forward; if the batch raises, retry image by image so one bad input fails alone."""
    try:
        return rows, teacher.forward(pixels).numpy(), {}
    except Exception:
        ok, vals, failed = [], [], {}
        for i, r in enumerate(rows):
            try:
                vals.append(teacher.forward(pixels[i : i + 1]).numpy())
                ok.append(r)
            except Exception as e:
                failed[r] = f"teacher forward failed: {type(e).__name__}: {e}"
        return ok, (np.concatenate(vals) if vals else None), failed


def load_teachers(cfg: BuildConfig, device: torch.device) -> dict[str, Any]:
    # imported here so `olacache info` / the trainer's store reader never pull in teacher code
    from olacache.teachers import TEACHERS, load_teacher

    unknown = [t for t in cfg.teachers if t not in TEACHERS]
    if unknown:
        raise BuildError(f"unknown teacher(s) {unknown}; registered: {sorted(TEACHERS)}")
    out = {}
    for name in cfg.teachers:
        ov = cfg.teacher_overrides.get(name, {})
        out[name] = load_teacher(name, preset=ov.get("preset", cfg.preset), source=ov.get("source"),
                                 device=device, options=ov.get("options"))
    return out


def build(cfg: BuildConfig, *, progress: Callable[[int, int, int], None] | None = None,
          log: Callable[[str], None] = print) -> BuildSummary:
    """Run a (resumable, optionally distributed) build. `progress(done, total, ok)` is called per batch."""
    t0 = time.perf_counter()
    if cfg.dtype not in ("float16", "int8"):
        raise BuildError(f"--dtype must be float16 or int8, got {cfg.dtype!r}")
    if cfg.format not in ("zarr", "hdf5"):
        raise BuildError(f"--format must be zarr or hdf5, got {cfg.format!r}")
    for key in ("batch_size", "shard_size", "workers"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "workers" else 1):
            raise BuildError(f"{key} must be an integer >= {0 if key == 'workers' else 1}, got {v!r}")
    unknown_ow = set(cfg.overwrite_teacher) - set(cfg.teachers)
    if unknown_ow:
        raise BuildError(f"--overwrite-teacher {sorted(unknown_ow)} is not among --teachers {cfg.teachers}")
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise BuildError(f"image root {root} is not a directory")

    # 1. annotations -> unique images (fails fast, naming the entry, before any teacher is loaded)
    samples = load_annotations(cfg.annotations)
    paths = unique_images(samples)
    text_only = sum(1 for s in samples if not s.get("image"))
    if not paths:
        raise BuildError(f"{cfg.annotations}: no sample has an image; nothing to build")

    dist_device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_dist(dist_device)
    if cfg.format == "hdf5" and dist.world > 1:
        raise BuildError("HDF5 stores have a single writer; use --format zarr for torchrun builds")
    device = dist_device

    # 2. teachers, then the store (all mismatches are refused here, before any work)
    teachers = load_teachers(cfg, device)
    store = prepare_store(cfg, paths, teachers, dist)

    # 3. pending shards: any teacher whose status chunk for the shard is incomplete
    complete = {t: store.complete_shards(t) for t in teachers}
    pending_all = [s for s in range(store.n_shards) if not all(complete[t][s] for t in teachers)]
    shard_teachers = {s: [t for t in teachers if not complete[t][s]] for s in pending_all}
    mine = [s for s in pending_all if s % dist.world == dist.rank]
    batches = plan_batches(mine, store.shard_rows, cfg.batch_size)
    n_mine = sum(len(store.shard_rows(s)) for s in mine)
    if dist.main:
        log(f"{store.n_images} images in {store.n_shards} shards of {store.shard_size}; "
            f"{store.n_shards - len(pending_all)} complete, {len(pending_all)} to compute"
            + (f" over {dist.world} ranks" if dist.world > 1 else ""))

    ds = ShardImages(root, store.image_paths, batches, shard_teachers,
                     {t: teachers[t].preprocessor() for t in teachers})
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=cfg.workers,
        collate_fn=_identity, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
        # forked workers are safe here: they touch no store handle (the store is written by this process only)
        persistent_workers=False,
    )

    buffers: dict[tuple[int, str], ShardBuffer] = {}
    computed = 0
    int8_cos: dict[str, list[np.ndarray]] = {t: [] for t in teachers}
    writer = ShardWriter(store)
    try:
        done = 0
        for item in loader:
            shard = item["shard"]
            for t in shard_teachers[shard]:
                key = (shard, t)
                buf = buffers.get(key)
                if buf is None:
                    buf = buffers[key] = ShardBuffer(store.shard_rows(shard), tuple(teachers[t].target_shape))
                for r, reason in item["failed"].items():
                    buf.put_failed(r, reason)
                if item["ok_rows"]:
                    ok, vals, failed = _forward_isolating_failures(teachers[t], item["pixels"][t], item["ok_rows"])
                    if vals is not None:
                        buf.put_ok(ok, vals)
                        if cfg.dtype == "int8" and len(int8_cos[t]) < 64:
                            int8_cos[t].append(int8_cosines(vals))
                    for r, reason in failed.items():
                        buf.put_failed(r, reason)
                if buf.done:
                    writer.put(shard, t, buf.values, buf.status, buf.errors)
                    del buffers[key]
            computed += len(item["rows"])
            done += len(item["rows"])
            if progress:
                progress(done, n_mine, len(item["ok_rows"]))
    finally:
        writer.close()
    leftover = [k for k in buffers]
    if leftover:  # cannot happen unless the loader dropped batches; never mark such shards complete
        raise RuntimeError(f"internal error: incomplete shard buffers {leftover}")

    dist.barrier()
    # 4. summary + per-channel stats (rank 0; from the store itself, so resumed builds are covered too)
    computed_all = sum(dist.gather_objects(computed))
    cos_all = dist.gather_objects({t: np.concatenate(v).tolist() if v else [] for t, v in int8_cos.items()})
    seconds = time.perf_counter() - t0
    summary_box: BuildSummary | None = None
    if dist.main:
        for t in teachers:
            cs = [c for d in cos_all for c in d[t]]
            extra: dict[str, Any] = {}
            if cs:
                extra = {"int8_cosine_mean": float(np.mean(cs)), "int8_cosine_min": float(np.min(cs))}
            elif cfg.dtype == "int8":
                prev = store.teacher_attrs(t)
                extra = {k: prev[k] for k in ("int8_cosine_mean", "int8_cosine_min") if k in prev}
            extra.update(channel_stats(store, t))
            store.set_teacher_attrs(t, **extra)
        summary_box = summarize(store, cfg, samples, text_only, len(pending_all), computed_all, seconds)
    store.close()
    summary_box = dist.broadcast_object(summary_box)
    return summary_box


def int8_cosines(values: np.ndarray) -> np.ndarray:
    """Per-image cosine between float32 targets and their int8 round trip (the store's quantiser)."""
    from olacache.store import dequantize_int8, quantize_int8

    q, scale = quantize_int8(values)
    rec = dequantize_int8(q, scale).astype(np.float32)
    a = values.reshape(len(values), -1).astype(np.float64)
    b = rec.reshape(len(values), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)


def channel_stats(store: EmbeddingStore, teacher: str, max_rows: int = 256, seed: int = 0) -> dict[str, Any]:
    """Per-channel mean/std over up to `max_rows` random OK images (stored in the column attrs)."""
    ok = np.flatnonzero(store.status(teacher) == OK)
    if len(ok) == 0:
        return {}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ok, size=min(max_rows, len(ok)), replace=False))
    # accumulate in float64 over small row chunks: one float64 copy of 256 seg rows would be 1.8 GB
    c = store.target_shape(teacher)[-1]
    s1, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(rows), 16):
        x = store.read_rows(teacher, rows[i : i + 16]).reshape(-1, c)
        s1 += x.sum(0, dtype=np.float64)
        s2 += np.square(x, dtype=np.float64).sum(0)
        n += len(x)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), "stats_rows": int(len(rows))}


def summarize(store: EmbeddingStore, cfg: BuildConfig, samples: list[dict], text_only: int,
              shards_computed: int, computed: int, seconds: float) -> BuildSummary:
    tsum = []
    failures: dict[str, str] = {}
    for t in store.teachers:
        if t not in cfg.teachers:
            continue
        st = store.status(t)
        n_ok = int((st == OK).sum())
        a = store.teacher_attrs(t)
        tsum.append(TeacherSummary(
            name=t, shape=tuple(store.target_shape(t)), n_ok=n_ok, n_failed=int((st == FAILED).sum()),
            n_missing=int((st == MISSING).sum()), bytes_per_image=store.nbytes(t) / max(1, store.n_images),
            int8_cosine_mean=a.get("int8_cosine_mean"),
            int8_cosine_min=a.get("int8_cosine_min"),
        ))
        for p, reason in store.errors(t):
            failures.setdefault(p, reason)
    return BuildSummary(
        store=str(cfg.out), n_images=store.n_images, n_samples=len(samples), skipped_text_only=text_only,
        shards_total=store.n_shards, shards_computed=shards_computed,
        shards_skipped_complete=store.n_shards - shards_computed, images_computed=computed,
        seconds=seconds, images_per_s=computed / seconds if seconds > 0 else math.nan,
        teachers=tsum, failures=sorted(failures.items()),
    )
