"""Command lines: `olacache` (build/inspect teacher-embedding stores) and `olatrain` (train on them).

One Typer file for both console scripts. Heavy imports happen inside the commands so `--help` is instant
and `olatrain` never imports teacher code unless asked for online targets.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# our own rich progress replaces transformers' per-load "Loading weights" bars (set before it is imported)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# without a terminal (logs, CI) rich assumes 80 columns and squeezes the tables; logs can be wider
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out = Console(width=None if sys.stdout.isatty() else 120)

olacache_app = typer.Typer(
    name="olacache",
    help="Run frozen teachers once, batched, over a dataset and store their targets (Zarr v3 or HDF5).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
olatrain_app = typer.Typer(
    name="olatrain",
    help="Train an OLA-VLM-style MLLM on cached teacher targets (no teacher in memory).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(code)


def _log(msg: str) -> None:
    """Library log lines are plain text: '[pt] ...' must not be read as rich markup."""
    if _is_rank0():
        console.print(msg, markup=False, highlight=False)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ============================================================================================ olacache
@olacache_app.command("build")
def build_cmd(
    annotations: Annotated[str, typer.Argument(help="LLaVA JSON/JSONL annotations, or a directory of images.")],
    image_root: Annotated[str, typer.Argument(help="Directory the annotation image paths are relative to.")],
    out_: Annotated[str, typer.Option("--out", "-o", help="Store path (directory for zarr, file for hdf5) or fsspec URL.")],
    teachers: Annotated[str | None, typer.Option(help="Comma-separated teachers. [default: depth,seg,gen]")] = None,
    preset: Annotated[str | None, typer.Option(help="tiny (random-init, offline) or ola (the paper's checkpoints). [default: tiny]")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with build options (per-teacher sources/options); flags override it.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per teacher forward. [default: 16]")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Images per store shard (new stores only). [default: 256]")] = None,
    dtype: Annotated[str | None, typer.Option(help="float16 (range-checked) or int8 (per-row absmax). [default: float16]")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="zarr or hdf5. [default: zarr]")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers decoding/preprocessing images. [default: 2]")] = None,
    overwrite_teacher: Annotated[list[str] | None, typer.Option("--overwrite-teacher", help="Replace this teacher's column if its weights/preprocessing changed (repeatable).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N. [default: auto]")] = None,
    bgr_quirk: Annotated[bool, typer.Option("--bgr-quirk", help="Reproduce the reference's BGR-swapped depth input (checkpoint-faithful targets).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    extend: Annotated[bool, typer.Option("--extend", help="Add these annotations' new images to an existing store (images already there are neither recomputed nor rewritten).")] = False,
    storage_option: Annotated[list[str] | None, typer.Option("--storage-option", help="fsspec option for an object-storage --out, key=value (repeatable), e.g. endpoint_url=http://host:8333. [default: the AWS_* variables]")] = None,
) -> None:
    """Build (or resume) a teacher-embedding store. Safe to kill and re-run; under `torchrun` each rank
    builds disjoint shards."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from olacache.build import BuildConfig, BuildError, build
    from olacache.inputs.annotations import AnnotationError
    from olacache.store import StoreError

    cli = dict(
        annotations=annotations, image_root=image_root, out=out_,
        teachers=[t.strip() for t in teachers.split(",") if t.strip()] if teachers else None,
        preset=preset, batch_size=batch_size, shard_size=shard_size, dtype=dtype, format=format_,
        workers=workers, overwrite_teacher=overwrite_teacher or None, device=device,
        extend=extend or None,
    )
    _storage_options(storage_option)
    try:
        if config is not None:
            cfg = BuildConfig.from_file(config, **cli)
        else:
            cfg = BuildConfig(**{k: v for k, v in cli.items() if v is not None})
    except (BuildError, TypeError, OSError) as e:
        _fail(str(e))
    if bgr_quirk:
        cfg.teacher_overrides.setdefault("depth", {}).setdefault("options", {})["bgr_quirk"] = True

    live = _is_rank0() and (sys.stderr.isatty() or os.environ.get("OLAKIT_PROGRESS") == "1")
    prog = Progress(
        TextColumn("[bold]building[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not live,
    )
    import time

    state = {"task": None, "t0": time.perf_counter(), "last_line": 0.0}

    def on_progress(done: int, total: int, _ok: int) -> None:
        el = time.perf_counter() - state["t0"]
        rate = done / el if el > 0 else 0.0
        if live:
            if state["task"] is None:
                state["task"] = prog.add_task("build", total=total, rate="")
            prog.update(state["task"], completed=done, rate=f"{rate:.1f} img/s")
        elif _is_rank0() and (el - state["last_line"] >= 30 or done == total):
            # logs of batch jobs (no terminal): a plain line every 30 s
            state["last_line"] = el
            eta = (total - done) / rate if rate > 0 else float("nan")
            console.print(f"built {done}/{total} images, {rate:.1f} img/s, ETA {eta:.0f}s")

    try:
        with prog:
            summary = build(cfg, progress=on_progress, log=_log)
    except (BuildError, StoreError, AnnotationError) as e:
        _fail(str(e))
    if not _is_rank0():
        return
    if json_out:
        out.print_json(json.dumps(summary.to_dict(), default=str))
        return
    _print_summary(summary)


def _print_summary(s) -> None:  # noqa: ANN001 - BuildSummary
    console.print(
        f"[bold green]store[/] {s.store}: {s.n_images} images from {s.n_samples} samples "
        f"({s.skipped_text_only} text-only skipped); shards computed {s.shards_computed}, "
        f"already complete {s.shards_skipped_complete}; {s.images_computed} images in {s.seconds:.1f}s "
        f"({s.images_per_s:.1f} img/s)"
    )
    tab = Table(title="teachers")
    for c in ("teacher", "shape", "ok", "failed", "missing", "bytes/image", "int8 cos mean/min"):
        tab.add_column(c)
    for t in s.teachers:
        cos = f"{t.int8_cosine_mean:.4f}/{t.int8_cosine_min:.4f}" if t.int8_cosine_mean is not None else "-"
        tab.add_row(t.name, "x".join(map(str, t.shape)), str(t.n_ok), str(t.n_failed), str(t.n_missing),
                    _human(t.bytes_per_image), cos)
    console.print(tab)
    if s.failures:
        console.print(f"[yellow]{len(s.failures)} image(s) failed[/] (recorded in the store):")
        for p, reason in s.failures[:20]:
            console.print(f"  {p}: {reason}", markup=False)
        if len(s.failures) > 20:
            console.print(f"  ... and {len(s.failures) - 20} more (`olacache info --json`)")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def _storage_options(items: list[str] | None) -> None:
    """--storage-option key=value -> process-wide fsspec options (olacache.store.remote)."""
    if not items:
        return
    from olacache.store import StoreError
    from olacache.store.remote import parse_storage_options, set_default_storage_options

    try:
        set_default_storage_options(parse_storage_options(items))
    except StoreError as e:
        _fail(str(e))


@olacache_app.command("info")
def info_cmd(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object (per-teacher shape, dtype, n_ok, n_failed, n_missing, bytes).")] = False,
    storage_option: Annotated[list[str] | None, typer.Option("--storage-option", help="fsspec option key=value for an object-storage URL (repeatable).")] = None,
) -> None:
    """What a store holds: teachers, shapes, dtype/codec, weights identity, counts, bytes."""
    from olacache.store import StoreError
    from olacache.verify import store_info

    _storage_options(storage_option)
    try:
        info = store_info(store)
    except StoreError as e:
        _fail(str(e))
    if json_out:
        out.print_json(json.dumps(info, default=str))
        return
    out.print(f"[bold]{info['store']}[/] ({info['format']}, format v{info['format_version']}, {info['created_by']})")
    out.print(f"{info['n_images']} images, {info['n_shards']} shards of {info['shard_size']}, "
              f"{_human(info['bytes'])} on disk, fingerprint {info['fingerprint'][:16]}")
    tab = Table()
    for c in ("teacher", "shape", "dtype", "weights", "ok/failed/missing", "on disk", "per image", "int8 cos"):
        tab.add_column(c, no_wrap=True)
    for name, t in info["teachers"].items():
        w = "random_init" if t["random_init"] else str(t["weights"])
        cos = f"{t['int8_cosine_mean']:.4f}/{t['int8_cosine_min']:.4f}" if t.get("int8_cosine_mean") else "-"
        tab.add_row(name, "x".join(map(str, t["shape"])), str(t["dtype"]), w,
                    f"{t['n_ok']}/{t['n_failed']}/{t['n_missing']}", _human(t["bytes"]),
                    _human(t["bytes_per_image"]), cos)
    out.print(tab)


@olacache_app.command("verify")
def verify_cmd(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    recompute: Annotated[int, typer.Option(help="Re-run the live teacher on K random images and compare (cosine).")] = 0,
    image_root: Annotated[str | None, typer.Option(help="Image root for --recompute [default: the build's].")] = None,
    device: Annotated[str, typer.Option(help="Device for --recompute.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Mark shards with damaged chunks incomplete so the next `olacache build` recomputes exactly them.")] = False,
    storage_option: Annotated[list[str] | None, typer.Option("--storage-option", help="fsspec option key=value for an object-storage URL (repeatable).")] = None,
) -> None:
    """Check structure, completeness and every complete shard's files and checksums; with --recompute K,
    parity against the live teachers."""
    from olacache.store import StoreError
    from olacache.verify import verify_store

    _storage_options(storage_option)
    try:
        rep = verify_store(store, recompute, image_root=image_root, device=device, repair=repair)
    except StoreError as e:
        _fail(str(e))
    if json_out:
        out.print_json(json.dumps({"ok": rep.ok, "problems": rep.problems, "warnings": rep.warnings,
                                   "parity": rep.parity}))
    else:
        for t, p in rep.parity.items():
            if "error" in p:
                continue
            out.print(f"{t}: recomputed {p['n']} images, cosine mean {p['cosine_mean']:.6f} "
                      f"min {p['cosine_min']:.6f}, max |diff| {p['max_abs_diff']:.3g}")
        for w in rep.warnings:
            out.print(f"[yellow]warning:[/] {escape(w)}")
        for pr in rep.problems:
            out.print(f"[red]problem:[/] {escape(pr)}")
        out.print("[bold green]OK[/]" if rep.ok else f"[bold red]{len(rep.problems)} problem(s)[/]")
    raise typer.Exit(0 if rep.ok else 1)


@olacache_app.command("upgrade")
def upgrade_cmd(store: Annotated[str, typer.Argument(help="Store path or URL (format 1).")]) -> None:
    """Convert a format-1 store to the current format in place, without touching target data (atomic,
    resumable: rerun it after an interruption)."""
    from olacache.store import StoreError
    from olacache.store.upgrade import upgrade_store

    try:
        msg = upgrade_store(store, log=_log)
    except StoreError as e:
        _fail(str(e))
    out.print(msg, markup=False, highlight=False)


# ============================================================================================ olatrain
@olatrain_app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="YAML run config (e.g. configs/tiny.yaml).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.max_steps=10 (repeatable; stages.pt.train.lr=1e-3 for one stage).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its latest checkpoint (finished stages are skipped).")] = False,
) -> None:
    """Train: every stage of the config in order (e.g. PT then IFT), each from the previous stage's result."""
    from olatrain.config import ConfigError, load_run
    from olatrain.train import run

    try:
        spec = load_run(config, set_)
    except ConfigError as e:
        _fail(str(e))
    final = run(spec, resume=resume, log=_log)
    if _is_rank0():
        console.print(f"[bold green]finished[/] {final}")


@olatrain_app.command("generate")
def generate_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A stage's final/ (or any checkpoint) directory.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The user's question.")],
    image: Annotated[Path | None, typer.Option("--image", help="An image file (omit for a text-only prompt).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
) -> None:
    """Greedy decoding with a trained model (image tokens and the frozen task tokens in place)."""
    from olatrain.generate import GenerateError, generate

    try:
        text = generate(checkpoint, prompt, image=image, max_new_tokens=max_new_tokens, device=device)
    except GenerateError as e:
        _fail(str(e))
    out.print(text)
