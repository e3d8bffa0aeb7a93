"""The build: run frozen teachers once, batched, over a dataset's unique images, into an embedding store.

Pipeline (one process per GPU under torchrun; one process on CPU), numbered as in :func:`build`:

    1. annotations -> unique normalised image paths (row order fixed, sorted)
    2. teachers, then the store and its columns (every mismatch refused before any work)
    3. pending shards (a shard is complete iff its status chunk says so; complete shards are never redone)
       -> this rank's shards (shard i belongs to rank i % world: disjoint, no DistributedSampler padding)
    4. DataLoader workers decode + preprocess per teacher; batches never cross a shard boundary, so a
       resumed build feeds the teacher exactly the batches an uninterrupted one would (identical targets)
       -> batched teacher forward (inference_mode; bf16 autocast on CUDA)
       -> whole-shard buffers -> a background writer thread (I/O overlaps compute) -> store.write_shard,
       which writes data first and the status chunk last (the completion marker)
    5. summary + per-channel statistics (rank 0)

Bad images never abort the build: decode failures and per-image forward failures become FAILED rows with a
reason (naming the full path tried); text-only samples are skipped (they have no image). A wrong image root does
abort it, before anything is loaded or written (:func:`check_image_root`), so it cannot fill a store with
"missing file" rows. ``retry_failed`` recomputes the FAILED rows of complete shards (and only those), e.g. after
fixing files or the root. The moving parts live in ``shards.py``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olacache import __version__
from olacache.common.configio import ConfigError, build_dataclass, load_yaml_file
from olacache.common.runtime import Runtime, init_runtime
from olacache.inputs.annotations import load_annotations, unique_images
from olacache.inputs.images import missing_under_root
from olacache.shards import (
    ShardBuffer,
    ShardImages,
    ShardWriter,
    forward_isolating_failures,
    identity_collate,
    plan_batches,
    plan_work,
)
from olacache.stats import channel_stats
from olacache.store import FAILED, MISSING, OK, EmbeddingStore, StoreMismatch, int8_cosines

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
    # recompute the FAILED rows of complete shards (after fixing files or the image root); OK rows are kept
    retry_failed: bool = False
    # follow symlinks out of the image root (refused by default: outside targets become failed rows)
    allow_outside_root: bool = False
    # refuse to start when more than this fraction of a probe of the images is missing (a wrong image root)
    max_missing_fraction: float = 0.5
    # --extend: add the annotations' images that are not in the store yet (see extend_store below)
    extend: bool = False

    @classmethod
    def from_file(cls, path: str | Path, **cli: Any) -> BuildConfig:
        """YAML/JSON file values (read like every config: YAML-1.2 scalars, typed fields), then CLI values that
        were actually given (not None) on top. Relative paths IN THE FILE (annotations, image_root, out, and a
        teacher source that starts with ./ or ../ or names an existing directory there) are taken relative to
        the file's directory, so a config works from any working directory; CLI values stay relative to it."""
        try:
            data = resolve_config_paths(load_yaml_file(path, "build config"), Path(path).resolve().parent)
            data.update({k: v for k, v in cli.items() if v is not None})
            return build_dataclass(cls, data, str(path))
        except ConfigError as e:
            raise BuildError(str(e)) from None


def resolve_config_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative path values of a build config file made relative to ``base`` (the file's directory)."""
    out = dict(data)
    for key in ("annotations", "image_root", "out"):
        v = out.get(key)
        if isinstance(v, str) and v and "://" not in v and not Path(v).expanduser().is_absolute():
            out[key] = os.path.normpath(base / v)
    ovs = out.get("teacher_overrides")
    if isinstance(ovs, dict):
        out["teacher_overrides"] = {k: dict(v) if isinstance(v, dict) else v for k, v in ovs.items()}
        for ov in out["teacher_overrides"].values():
            src = ov.get("source") if isinstance(ov, dict) else None
            # a hub id ("org/name") looks like a relative path too: only explicit or existing local paths move
            if isinstance(src, str) and not Path(src).is_absolute() and (
                    src.startswith(("./", "../")) or (base / src).is_dir()):
                ov["source"] = os.path.normpath(base / src)
    return out


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
    images_reused: int = 0  # images already in the store (not computed by this run; --extend reports it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


# What must match for a resume: weights (by content hash, not by path: a tiny preset regenerated under another
# cache dir is the same teacher), preprocessing/target spec, dtype and shape.
COMPARED_KEYS = ("identity.weights_sha256", "identity.random_init", "spec", "dtype", "target_shape")


def prepare_store(cfg: BuildConfig, paths: list[str], teachers: dict[str, Any], rt: Runtime) -> EmbeddingStore:
    """Create or open the store and its teacher columns on rank 0, then open it on the other ranks.
    Every mismatch is raised before any teacher forward runs (the store's own compatibility checks)."""
    err: str | None = None
    if rt.main:
        try:
            if EmbeddingStore.exists(cfg.out):
                store = EmbeddingStore.open(cfg.out, mode="r+")
                if cfg.extend:
                    extend_existing(store, cfg, paths)
                else:
                    store.require_image_set(paths)
                if store.shard_size != cfg.shard_size:
                    # the shard size is part of the layout; resuming keeps the store's own
                    cfg.shard_size = store.shard_size
            else:
                if "://" not in cfg.out:
                    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
                store = EmbeddingStore.create(cfg.out, paths, shard_size=cfg.shard_size, format=cfg.format,
                                              created_by=f"olacache {__version__}")
            for name, t in teachers.items():
                _prepare_column(store, cfg, name, t)
            store.close()
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            if not rt.distributed:
                raise
    err = rt.broadcast_object(err)
    if err is not None:
        raise BuildError(err)
    return EmbeddingStore.open(cfg.out, mode="r+")


def _prepare_column(store: EmbeddingStore, cfg: BuildConfig, name: str, teacher: Any) -> None:
    ov = cfg.teacher_overrides.get(name, {})
    attrs = teacher_attrs(teacher, preset=ov.get("preset", cfg.preset), options=ov.get("options"),
                          image_root=cfg.image_root)
    shape = tuple(teacher.target_shape)
    if name not in store.teachers:
        store.add_teacher(name, shape, dtype=cfg.dtype, attrs=attrs, kind=teacher.target_kind)
        return
    want = {"identity.weights_sha256": attrs["identity"].get("weights_sha256"),
            "identity.random_init": attrs["identity"].get("random_init"),
            "spec": attrs["spec"], "dtype": cfg.dtype, "target_shape": list(shape)}
    assert tuple(want) == COMPARED_KEYS
    try:
        store.require_teacher_attrs(name, want)
    except StoreMismatch as e:
        if name not in cfg.overwrite_teacher:
            raise StoreMismatch(f"{e}. Use --overwrite-teacher {name} to replace that column on purpose, "
                                "or --out a new store.") from None
        store.add_teacher(name, shape, dtype=cfg.dtype, attrs=attrs, kind=teacher.target_kind, replace=True)


# ----------------------------------------------------------------------------------------------- writer lease
def take_writer_lease(cfg: BuildConfig, rt: Runtime, log: Callable[[str], None]) -> Any:
    """Rank 0 takes the store's writer lease (olacache.store.lease; the job's other ranks share it); another
    live writer is refused before anything is written. Released at the end of the build (or at exit)."""
    err: str | None = None
    lease = None
    if rt.main:
        from olacache.store.lease import acquire

        try:
            lease = acquire(cfg.out, hdf5=cfg.format == "hdf5", log=log)
        except Exception as e:
            err = str(e)
            if not rt.distributed:
                raise BuildError(err) from None
    err = rt.broadcast_object(err)
    if err is not None:
        raise BuildError(err)
    return lease


# ----------------------------------------------------------------------------------------------- --extend
def extend_existing(store: EmbeddingStore, cfg: BuildConfig, paths: list[str]) -> None:
    """--extend: every teacher of the store is computed for the new images (so every one must be requested);
    the images already there are neither recomputed nor rewritten (olacache.store.extend)."""
    from olacache.store.extend import extend_store

    missing = [t for t in store.teachers if t not in cfg.teachers]
    if missing:
        raise BuildError(f"--extend computes every teacher of the store for the new images; add {missing} to "
                         f"--teachers (the store has {store.teachers})")
    extend_store(store, paths)


def images_reused(store: EmbeddingStore, computed: int) -> int:
    """Images of the store (without padding rows) that this run did not compute."""
    return sum(1 for p in store.image_paths if p) - computed


# ----------------------------------------------------------------------------------------------- build
def load_teachers(cfg: BuildConfig, device: torch.device) -> dict[str, Any]:
    # imported here so `olacache info` / the trainer's store reader never pull in teacher code
    from olacache.teachers import TEACHERS, load_teacher

    unknown = [t for t in cfg.teachers if t not in TEACHERS]
    if unknown:
        raise BuildError(f"unknown teacher(s) {unknown}; registered: {sorted(TEACHERS)}")
    out = {}
    for name in cfg.teachers:
        ov = cfg.teacher_overrides.get(name, {})
        try:
            out[name] = load_teacher(name, preset=ov.get("preset", cfg.preset), source=ov.get("source"),
                                     device=device, options=ov.get("options"))
        except (ValueError, OSError) as e:  # bad option/preset, or a checkpoint that cannot be found/read
            msg = " ".join(str(e).split())
            raise BuildError(msg if msg.startswith("teacher") else f"teacher {name!r}: {msg}") from e
    return out


def check_config(cfg: BuildConfig) -> None:
    """Refuse bad options before anything is loaded or written."""
    if cfg.dtype not in ("float16", "int8"):
        raise BuildError(f"--dtype must be float16 or int8, got {cfg.dtype!r}")
    if cfg.format not in ("zarr", "hdf5"):
        raise BuildError(f"--format must be zarr or hdf5, got {cfg.format!r}")
    from olacache.teachers import PRESETS, TEACHERS

    unknown = [t for t in cfg.teachers if t not in TEACHERS]
    if unknown:
        raise BuildError(f"unknown teacher(s) {unknown}; registered: {sorted(TEACHERS)}")
    for where, preset in [("--preset", cfg.preset)] + [
            (f"teacher_overrides.{t}.preset", ov["preset"]) for t, ov in cfg.teacher_overrides.items()
            if isinstance(ov, dict) and "preset" in ov]:
        if preset not in PRESETS:
            raise BuildError(f"{where}: unknown preset {preset!r}; valid: {list(PRESETS)}")
    for key in ("batch_size", "shard_size", "workers"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "workers" else 1):
            raise BuildError(f"{key} must be an integer >= {0 if key == 'workers' else 1}, got {v!r}")
    unknown_ow = set(cfg.overwrite_teacher) - set(cfg.teachers)
    if unknown_ow:
        raise BuildError(f"--overwrite-teacher {sorted(unknown_ow)} is not among --teachers {cfg.teachers}")
    if not Path(cfg.image_root).is_dir():
        raise BuildError(f"image root {cfg.image_root} is not a directory; pass the directory the annotation "
                         "image paths are relative to")
    if "://" not in cfg.out:
        # the nearest existing ancestor of --out must be writable: found now, not after the teachers load
        parent = Path(cfg.out).expanduser().absolute()
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not os.access(parent if parent.is_dir() else parent.parent, os.W_OK):
            raise BuildError(f"--out {cfg.out}: {parent} is not writable; choose a store path you can write to")
    if not 0.0 <= cfg.max_missing_fraction <= 1.0:
        raise BuildError(f"max_missing_fraction must be within [0, 1], got {cfg.max_missing_fraction}")


PROBE_IMAGES = 1024
"""How many image paths :func:`check_image_root` stats (the first batch plus evenly spaced others)."""


def check_image_root(cfg: BuildConfig, paths: list[str]) -> None:
    """Refuse a build whose image root is evidently wrong, before any teacher loads or anything is written:
    every image of the first batch missing, or more than ``max_missing_fraction`` of a probe of up to
    PROBE_IMAGES images missing. Otherwise a wrong root would fill the store with "missing file" rows.
    ``max_missing_fraction`` 1 turns the check off (a build that is meant to record missing files)."""
    if cfg.max_missing_fraction >= 1.0:
        return
    step = max(1, -(-len(paths) // PROBE_IMAGES))  # ceil: the probe spans the whole list
    first = paths[: cfg.batch_size]
    probe = list(dict.fromkeys(first + paths[::step][:PROBE_IMAGES]))
    missing = {rel: tried for rel in probe if (tried := missing_under_root(cfg.image_root, rel)) is not None}
    if not missing:
        return
    if all(rel in missing for rel in first) or len(missing) > cfg.max_missing_fraction * len(probe):
        raise BuildError(
            f"{len(missing)} of {len(probe)} images checked are missing under the image root "
            f"{Path(cfg.image_root).resolve()} (first path tried: {next(iter(missing.values()))}); is the "
            "image root right? Nothing was written. Pass the directory the annotation paths are relative to "
            "(or pass --max-missing-fraction 1 to build anyway)"
        )


def build(cfg: BuildConfig, *, progress: Callable[[int, int, int], None] | None = None,
          log: Callable[[str], None] = print) -> BuildSummary:
    """Run a (resumable, optionally distributed) build. `progress(done, total, ok)` is called once with
    done=0 when computing starts (after the teachers load), then per batch."""
    t0 = time.perf_counter()
    check_config(cfg)

    # 1. annotations -> unique images (fails fast, naming the entry, before any teacher is loaded)
    samples = load_annotations(cfg.annotations)
    paths = unique_images(samples)
    text_only = sum(1 for s in samples if not s.get("image"))
    if not paths:
        raise BuildError(f"{cfg.annotations}: no sample has an image; nothing to build")
    check_image_root(cfg, paths)
    rt = init_runtime(cfg.device)
    if cfg.format == "hdf5" and rt.distributed:
        raise BuildError("HDF5 stores have a single writer; use --format zarr for torchrun builds")

    # 2. teachers, then the store (all mismatches are refused here, before any work)
    if rt.main:
        log(f"loading teachers: {', '.join(cfg.teachers)} ({cfg.preset}) ...")
    teachers = load_teachers(cfg, rt.device)
    lease = take_writer_lease(cfg, rt, log)
    try:
        store = prepare_store(cfg, paths, teachers, rt)
    except BaseException:
        if lease is not None:  # a refused build (mismatch) leaves no lease behind in a long-lived process
            lease.release()
        raise

    # 3. pending shards: any teacher whose status chunk for the shard is incomplete (all its rows), plus with
    # retry_failed the FAILED rows of complete shards; this rank's share
    work = plan_work(store, list(teachers), cfg.retry_failed)
    pending = sorted(work)
    shard_teachers = {s: list(work[s]) for s in pending}
    mine = [s for s in pending if s % rt.world == rt.rank]
    if rt.main:
        n_retry = sum(len(r) for w in work.values() for r in w.values() if r is not None)
        log(f"{store.n_images} images in {store.n_shards} shards of {store.shard_size}; "
            f"{store.n_shards - len(pending)} complete, {len(pending)} to compute"
            + (f" ({n_retry} failed row(s) to retry)" if cfg.retry_failed else "")
            + (f" over {rt.world} ranks" if rt.distributed else ""))
        if not cfg.retry_failed:
            n_failed = {t: int((store.status(t) == FAILED).sum()) for t in teachers}
            if any(n_failed.values()):
                log(f"failed rows recorded: {n_failed}; `--retry-failed` recomputes them")

    # 4. decode in workers, forward in batches, write whole shards in the background
    computed, int8_cos = compute_shards(cfg, store, teachers, mine, shard_teachers, rt.device, progress, work)

    # 5. summary + per-channel stats (rank 0; from the store itself, so resumed builds are covered too)
    rt.barrier()
    computed_all = sum(rt.gather_objects(computed))
    cos_all = rt.gather_objects({t: np.concatenate(v).tolist() if v else [] for t, v in int8_cos.items()})
    summary: BuildSummary | None = None
    if rt.main:
        record_column_stats(store, cfg, list(teachers), cos_all)
        summary = summarize(store, cfg, samples, text_only, len(pending), computed_all, time.perf_counter() - t0)
    store.close()
    if lease is not None:
        lease.release()
    return rt.broadcast_object(summary)


def compute_shards(cfg: BuildConfig, store: EmbeddingStore, teachers: dict[str, Any], mine: list[int],
                   shard_teachers: dict[int, list[str]], device: torch.device,
                   progress: Callable[[int, int, int], None] | None,
                   work: dict[int, dict[str, list[int] | None]] | None = None,
                   ) -> tuple[int, dict[str, list[np.ndarray]]]:
    """Step 4 for this rank's shards -> (images computed, int8 round-trip cosines per teacher)."""
    work = work if work is not None else {s: dict.fromkeys(shard_teachers[s]) for s in mine}

    def shard_rows(s: int) -> list[int]:
        """Every row of an incomplete shard (so batches equal an uninterrupted build's); else the retried rows."""
        sets = work[s].values()
        if any(r is None for r in sets):
            return list(store.shard_rows(s))
        return sorted({r for rows in sets for r in rows})

    batches = plan_batches(mine, shard_rows, cfg.batch_size)
    n_mine = sum(len(shard_rows(s)) for s in mine)
    ds = ShardImages(Path(cfg.image_root), store.image_paths, batches, shard_teachers,
                     {t: teachers[t].preprocessor() for t in teachers}, allow_outside=cfg.allow_outside_root)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=cfg.workers,
        collate_fn=identity_collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
        # forked workers are safe here: they touch no store handle (the store is written by this process only)
        persistent_workers=False,
    )
    buffers: dict[tuple[int, str], ShardBuffer] = {}
    computed = 0
    int8_cos: dict[str, list[np.ndarray]] = {t: [] for t in teachers}
    writer = ShardWriter(store)
    stored: dict[str, tuple[np.ndarray, dict[str, str]]] = {}  # per teacher, read once for retried shards
    if progress:
        progress(0, n_mine, 0)
    try:
        for item in loader:
            shard = item["shard"]
            for t in shard_teachers[shard]:
                key = (shard, t)
                todo = work[shard][t]
                buf = buffers.get(key)
                if buf is None:
                    buf = buffers[key] = ShardBuffer(store.shard_rows(shard), tuple(teachers[t].target_shape))
                    if todo is not None:  # retry: start from the stored shard, the retried rows to compute
                        if t not in stored:
                            stored[t] = (store.status(t), dict(store.errors(t)))
                        buf.load_existing(store, t, todo, *stored[t])
                wanted = None if todo is None else set(todo)
                for r, reason in item["failed"].items():
                    if wanted is None or r in wanted:
                        buf.put_failed(r, reason)
                for r in item.get("pad", []):
                    buf.put_pad(r)
                ok_rows = item["ok_rows"]
                pix = item["pixels"][t]
                if wanted is not None and ok_rows:
                    keep = [i for i, r in enumerate(ok_rows) if r in wanted]
                    ok_rows, pix = [ok_rows[i] for i in keep], (pix[keep] if keep else None)
                if ok_rows:
                    ok, vals, failed = forward_isolating_failures(teachers[t], pix, ok_rows)
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
            if progress:
                progress(computed, n_mine, len(item["ok_rows"]))
    finally:
        writer.close()
    if buffers:  # cannot happen unless the loader dropped batches; never mark such shards complete
        raise RuntimeError(f"internal error: incomplete shard buffers {list(buffers)}")
    return computed, int8_cos


def record_column_stats(store: EmbeddingStore, cfg: BuildConfig, teachers: list[str],
                        cos_all: list[dict[str, list[float]]]) -> None:
    """int8 round-trip cosines and per-channel mean/std into each built column's attrs (rank 0)."""
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
        images_reused=images_reused(store, computed),
    )
