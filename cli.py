"""Command lines: `olacache` (build/inspect teacher-embedding stores) and `olatrain` (train on them).

One Typer file for both console scripts. Heavy imports happen inside the commands so `--help` is instant
and `olatrain` never imports teacher code unless asked for online targets.

Errors (one place for both tools, :func:`_guarded` and :class:`_Group`): a user's mistake prints one line,
``error: ...``, naming the file, key or path and what to do, and exits with a documented code:
``2`` the command was refused (usage, config, input files, names, paths, permissions, a store that does not
match), ``1`` a run that started failed (disk full, the trainer stopping, an unexpected error), ``130``
interrupted (after saying what was kept and how to resume). ``OLAKIT_DEBUG=1`` or ``--debug`` re-raises, so
the traceback shows.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from olacache.common.files import human_bytes

try:  # typer >= 0.2x vendors click as typer._click; earlier versions use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

# our own rich progress replaces transformers' per-load "Loading weights" bars (set before it is imported)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# without a terminal (logs, CI) rich assumes 80 columns and squeezes the tables; logs can be wider
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out = Console(width=None if sys.stdout.isatty() else 120)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Group(TyperGroup):
    """Click usage errors (bad option value, missing argument) as one ``error:`` line, exit 2, like every
    other mistake; typer's default is a boxed panel."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rc = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except ClickException as e:
            if not standalone_mode:
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `olacache`: the help, as typer shows it
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            _error_line(f"{e.format_message()}{where}")
            sys.exit(EXIT_USAGE)
        if standalone_mode:
            sys.exit(rc if isinstance(rc, int) else 0)
        return rc


olacache_app = typer.Typer(
    name="olacache",
    help="Run frozen teachers once, batched, over a dataset and store their targets (Zarr v3 or HDF5).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
olatrain_app = typer.Typer(
    name="olatrain",
    help="Train an OLA-VLM-style MLLM on cached teacher targets (no teacher in memory).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)


def _fail(msg: str, code: int = 2) -> None:
    _error_line(msg)
    raise typer.Exit(code)


def _error_line(msg: str) -> None:
    """``error: msg`` on stderr as ONE line (soft_wrap: rich would otherwise wrap it at the console width)."""
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)


def _log(msg: str) -> None:
    """Library log lines are plain text: '[pt] ...' must not be read as rich markup."""
    if _is_rank0():
        console.print(msg, markup=False, highlight=False)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ============================================================================================ errors
# The project's error classes, by (module, name): matching on the MRO avoids importing torch-heavy modules
# just to name their exception types (`--help` and `olacache info` stay fast).
USER_ERRORS = {
    ("olacache.common.configio", "ConfigError"),
    ("olacache.build", "BuildError"),
    ("olacache.store.format", "StoreError"),
    ("olacache.inputs.annotations", "AnnotationError"),
    ("olacache.inputs.images", "ImageError"),
    ("olatrain.data.errors", "DataError"),
    ("olatrain.data.templates", "TemplateError"),
    ("olatrain.generate", "GenerateError"),
    ("olatrain.export", "ExportError"),
    ("olatrain.plan", "PlanError"),
    ("olatrain.checkpoint", "CheckpointError"),
}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# what a command wants said when Ctrl-C stops it (what was kept, how to resume); set by the command
_on_interrupt: list[Callable[[], str]] = []


def _debug() -> bool:
    return os.environ.get("OLAKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _is_user_error(e: BaseException) -> bool:
    return any((c.__module__, c.__name__) in USER_ERRORS for c in type(e).__mro__)


def _one_line(msg: str) -> str:
    """An exception message as one line. A DataLoader worker's re-raised error carries the worker's whole
    traceback ("Caught X in DataLoader worker process 0. Original Traceback ..."): keep its last line, the
    original message, without the "module.Class: " prefix."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        lines = [rest if sep and "." in head and " " not in head else last]
    return " ".join(lines)


def _worker_error_name(e: BaseException) -> str | None:
    """"X" of a DataLoader worker's "Caught X in DataLoader worker process N" (torch re-raises a
    RuntimeError when it cannot rebuild X from the message)."""
    first = str(e).split("\n", 1)[0]
    if first.startswith("Caught ") and " in DataLoader worker" in first:
        return first[len("Caught "):].split(" in DataLoader worker")[0]
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _classify(e: BaseException) -> tuple[int, str]:
    """-> (exit code, the one-line message) for an exception that escaped a command."""
    for c in _chain(e):
        if isinstance(c, OSError) and c.errno in _DISK_FULL:
            where = f" writing {c.filename}" if c.filename else ""
            return EXIT_FAILED, (f"disk full{where} ({os.strerror(c.errno)}): free space or write elsewhere, then "
                                 "run the same command again (what was complete is kept)")
    if isinstance(e, SystemExit):  # the trainer's refusals and stops: SystemExit("message")
        # olatrain.guards.RunRefused (before step 1) is a refusal; a stop once training runs is a failure
        return (EXIT_USAGE if getattr(e, "refused", False) else EXIT_FAILED), _one_line(str(e.code))
    if _is_user_error(e) or (_worker_error_name(e) or "").split(".")[-1] in {n for _, n in USER_ERRORS}:
        return EXIT_USAGE, _one_line(str(e))
    if isinstance(e, OSError):
        what = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory",
                errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory"}.get(e.errno or -1)
        if what is not None:
            path = e.filename if e.filename is not None else ""
            hint = "check the path and its permissions" if what != "read-only file system" else \
                "write somewhere else"
            return EXIT_USAGE, f"{what}: {path}: {hint}" if path else f"{what}: {_one_line(str(e))}; {hint}"
        return EXIT_FAILED, f"{_one_line(str(e))}"
    return EXIT_FAILED, (f"unexpected {type(e).__name__}: {_one_line(str(e))} (OLAKIT_DEBUG=1 shows the "
                         "traceback; please report it)")


def _leave_process_group() -> None:
    """A command that ran under torchrun leaves its process group before the interpreter exits (only when
    torch.distributed was imported at all: `--help` and `info` never import torch)."""
    if "torch.distributed" in sys.modules:
        from olacache.common.runtime import shutdown

        shutdown()


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; an escaping exception becomes one ``error:`` line and its exit code (see the module
    docstring), Ctrl-C says what was kept. With OLAKIT_DEBUG=1 exceptions propagate (traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _on_interrupt.clear()
        try:
            result = fn(*args, **kwargs)
            _leave_process_group()
            return result
        except (ClickException, typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if _debug():
                raise
            note = ""
            if _on_interrupt:
                try:
                    note = _on_interrupt[-1]()
                except Exception as e:  # noqa: BLE001 - the note is best effort; the exit code is what matters
                    note = f"(could not inspect what was kept: {type(e).__name__}: {e})"
            if _is_rank0():
                console.print(f"[bold yellow]interrupted[/]{': ' if note else ''}{escape(note)}", soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                raise
            if _debug():
                raise
            code, msg = _classify(e)
            _error_line(msg)
            raise typer.Exit(code) from None
        except Exception as e:
            if _debug():
                raise
            code, msg = _classify(e)
            _error_line(msg)
            raise typer.Exit(code) from None

    return wrapper


def _resume_command(tool: str, add: str | None = None) -> str:
    """The command line that was run (so the user can run it again), or a description when unknown."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == tool or (argv0 == "__main__.py" and os.path.basename(os.path.dirname(sys.argv[0])) == tool):
        args = sys.argv[1:]
        if add and add not in args:
            args = [*args, add]
        return shlex.join([tool, *args])
    return f"the same `{tool}` command" + (f" with {add}" if add else "")


def _print_version(value: bool) -> None:
    if value:
        from olacache import __version__

        tool = os.path.basename(sys.argv[0]) if sys.argv else ""
        tool = tool if tool in ("olacache", "olatrain") else "olakit"
        print(f"{tool} {__version__}")
        raise typer.Exit()


def _set_debug(value: bool) -> None:
    if value:
        os.environ["OLAKIT_DEBUG"] = "1"


@olacache_app.callback()
@olatrain_app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", callback=_set_debug, metavar="",
                                        help="Show tracebacks instead of one-line errors (or OLAKIT_DEBUG=1).")] = False,
) -> None:
    pass


# ============================================================================================ olacache
@olacache_app.command("build")
@_guarded
def build_cmd(
    annotations: Annotated[str, typer.Argument(help="LLaVA JSON/JSONL annotations, or a directory of images.", metavar="ANNOTATIONS", show_default=False)],
    image_root: Annotated[str, typer.Argument(help="Directory the annotation image paths are relative to.", metavar="IMAGE_ROOT", show_default=False)],
    out_: Annotated[str, typer.Option("--out", "-o", metavar="STORE", help="Store path (directory for zarr, file for hdf5) or fsspec URL.")],
    teachers: Annotated[str | None, typer.Option(metavar="NAMES", show_default="depth,seg,gen", help="Comma-separated teachers; built in: depth, seg, gen (plugins add more).")] = None,
    preset: Annotated[Literal["tiny", "ola"] | None, typer.Option(show_default="tiny", help="tiny (random-init, offline) or ola (the paper's checkpoints).")] = None,
    config: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="YAML with build options (per-teacher sources/options); flags override it. Relative paths in it are relative to the file.")] = None,
    batch_size: Annotated[int | None, typer.Option(metavar="N", show_default="16", help="Images per teacher forward.")] = None,
    shard_size: Annotated[int | None, typer.Option(metavar="N", show_default="256", help="Images per store shard (new stores only).")] = None,
    dtype: Annotated[Literal["float16", "int8"] | None, typer.Option(show_default="float16", help="float16 (range-checked) or int8 (per-row absmax).")] = None,
    format_: Annotated[Literal["zarr", "hdf5"] | None, typer.Option("--format", show_default="zarr", help="Store format.")] = None,
    workers: Annotated[int | None, typer.Option(metavar="N", show_default="2", help="DataLoader workers decoding/preprocessing images.")] = None,
    overwrite_teacher: Annotated[list[str] | None, typer.Option("--overwrite-teacher", metavar="NAME", help="Replace this teacher's column if its weights/preprocessing changed (repeatable).")] = None,
    device: Annotated[str | None, typer.Option(metavar="DEVICE", show_default="auto", help="auto, cpu, cuda, cuda:N.")] = None,
    bgr_quirk: Annotated[bool, typer.Option("--bgr-quirk", metavar="", help="Reproduce the reference's BGR-swapped depth input (checkpoint-faithful targets).")] = False,
    json_out: Annotated[bool, typer.Option("--json", metavar="", help="Print the summary as JSON on stdout.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", metavar="", help="Recompute the rows recorded as failed (after fixing the files or the image root); OK rows are kept.")] = False,
    allow_outside_root: Annotated[bool, typer.Option("--allow-outside-root", metavar="", help="Follow symlinks that lead out of IMAGE_ROOT (refused by default: such images become failed rows).")] = False,
    max_missing: Annotated[float | None, typer.Option("--max-missing-fraction", metavar="F", show_default="0.5", help="Refuse to start when more than this fraction of a probe of the images is missing (a wrong IMAGE_ROOT).")] = None,
    extend: Annotated[bool, typer.Option("--extend", metavar="", help="Add these annotations' new images to an existing store (images already there are neither recomputed nor rewritten).")] = False,
    storage_option: Annotated[list[str] | None, typer.Option("--storage-option", metavar="KEY=VALUE", show_default="the AWS_* variables", help="fsspec option for an object-storage --out (repeatable), e.g. endpoint_url=http://host:8333.")] = None,
) -> None:
    """Build (or resume) a teacher-embedding store. Safe to kill and re-run; under `torchrun` each rank
    builds disjoint shards."""
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from olacache.build import BuildConfig, build

    cli = dict(
        annotations=annotations, image_root=image_root, out=out_,
        teachers=[t.strip() for t in teachers.split(",") if t.strip()] if teachers else None,
        preset=preset, batch_size=batch_size, shard_size=shard_size, dtype=dtype, format=format_,
        workers=workers, overwrite_teacher=overwrite_teacher or None, device=device,
        retry_failed=retry_failed or None, allow_outside_root=allow_outside_root or None,
        max_missing_fraction=max_missing, extend=extend or None,
    )
    _storage_options(storage_option)
    if config is not None:
        cfg = BuildConfig.from_file(config, **cli)
    else:
        cfg = BuildConfig(**{k: v for k, v in cli.items() if v is not None})
    if bgr_quirk:
        cfg.teacher_overrides.setdefault("depth", {}).setdefault("options", {})["bgr_quirk"] = True
    _on_interrupt.append(lambda: _build_kept(cfg.out, cfg.teachers))

    live = _is_rank0() and (sys.stderr.isatty() or os.environ.get("OLAKIT_PROGRESS") == "1")
    prog = Progress(
        TextColumn("[bold]building[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not live,
    )
    state: dict[str, Any] = {"task": None, "t0": time.perf_counter(), "last_line": 0.0}

    def on_progress(done: int, total: int, _ok: int) -> None:
        if state["task"] is None:
            # computing starts now (teachers loaded, store ready): the bar, its clock and the rate start at 0
            state["t0"] = time.perf_counter()
            state["task"] = prog.add_task("build", total=total, rate="") if live else -1
        el = time.perf_counter() - state["t0"]
        rate = done / el if el > 0 else 0.0
        if live:
            prog.update(state["task"], completed=done, rate=f"{rate:.1f} img/s" if done else "")
        elif _is_rank0() and done and (el - state["last_line"] >= 30 or done == total):
            # logs of batch jobs (no terminal): a plain line every 30 s
            state["last_line"] = el
            eta = (total - done) / rate if rate > 0 else float("nan")
            console.print(f"built {done}/{total} images in {el:.0f}s, {rate:.1f} img/s, ETA {eta:.0f}s")

    with prog:
        summary = build(cfg, progress=on_progress, log=_log)
    if not _is_rank0():
        return
    if json_out:
        out.print_json(json.dumps(summary.to_dict(), default=str))
        return
    _print_summary(summary)


def _build_kept(url: str, teachers: list[str]) -> str:
    """What an interrupted build leaves: complete shards per teacher, and the command that resumes."""
    from olacache.store import EmbeddingStore

    again = _resume_command("olacache")
    if not EmbeddingStore.exists(url):
        return f"nothing was written to {url}; run {again} to start again"
    with EmbeddingStore.open(url, mode="r") as s:
        done = {t: int(s.complete_shards(t).sum()) for t in teachers if t in s.teachers}
        n = s.n_shards
    kept = ", ".join(f"{t} {k}/{n}" for t, k in done.items()) or "none"
    return f"complete shards kept in {url}: {kept}; resume with: {again}"


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
                    human_bytes(t.bytes_per_image), cos)
    console.print(tab)
    if s.failures:
        console.print(f"[yellow]{len(s.failures)} image(s) failed[/] (recorded in the store):")
        for p, reason in s.failures[:20]:
            console.print(f"  {p}: {reason}", markup=False)
        if len(s.failures) > 20:
            console.print(f"  ... and {len(s.failures) - 20} more (`olacache verify {s.store}` lists them all)")
        console.print("after fixing the files (or the image root), add --retry-failed to recompute just those",
                      markup=False)


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
@_guarded
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
              f"{human_bytes(info['bytes'])} on disk, fingerprint {info['fingerprint'][:16]}")
    tab = Table()
    for c in ("teacher", "shape", "dtype", "weights", "ok/failed/missing", "on disk", "per image", "int8 cos"):
        tab.add_column(c, no_wrap=True)
    for name, t in info["teachers"].items():
        w = "random_init" if t["random_init"] else str(t["weights"])
        cos = f"{t['int8_cosine_mean']:.4f}/{t['int8_cosine_min']:.4f}" if t.get("int8_cosine_mean") else "-"
        tab.add_row(name, "x".join(map(str, t["shape"])), str(t["dtype"]), w,
                    f"{t['n_ok']}/{t['n_failed']}/{t['n_missing']}", human_bytes(t["bytes"]),
                    human_bytes(t["bytes_per_image"]), cos)
    out.print(tab)


@olacache_app.command("verify")
@_guarded
def verify_cmd(
    store: Annotated[str, typer.Argument(help="Store path or URL.", metavar="STORE")],
    recompute: Annotated[int, typer.Option(metavar="K", help="Re-run the live teacher on K random images and compare (cosine).")] = 0,
    image_root: Annotated[str | None, typer.Option(metavar="DIR", show_default="the build's", help="Image root for --recompute.")] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="Device for --recompute.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object (ok, problems, warnings, parity, failed rows).")] = False,
    repair: Annotated[bool, typer.Option("--repair", metavar="", help="Mark shards with damaged chunks incomplete so the next `olacache build` recomputes exactly them.")] = False,
    storage_option: Annotated[list[str] | None, typer.Option("--storage-option", metavar="KEY=VALUE", help="fsspec option for an object-storage URL (repeatable).")] = None,
    quick: Annotated[bool, typer.Option("--quick", metavar="", help="Read no target bytes: every complete shard's file, size and index, plus all metadata (seconds to minutes where the full check takes hours). Use it after copying or syncing a store and before a run; run the full check after a crash, a disk or network error, or a reported checksum failure.")] = False,
    teacher: Annotated[list[str] | None, typer.Option("--teacher", metavar="NAME", help="Check only this teacher column (repeatable).")] = None,
) -> None:
    """Check structure, completeness and every complete shard's files and checksums (reads every target byte:
    hours for a 1.65 TB store); --quick checks the same files, sizes and shard indexes without reading target
    data; with --recompute K, parity against the live teachers."""
    from olacache.store import StoreError
    from olacache.verify import verify_store

    _storage_options(storage_option)
    try:
        rep = verify_store(store, recompute, image_root=image_root, device=device, repair=repair, quick=quick,
                           teachers=teacher)
    except StoreError as e:
        _fail(str(e))
    if json_out:
        out.print_json(json.dumps({"ok": rep.ok, "problems": rep.problems, "warnings": rep.warnings,
                                   "parity": rep.parity, "failed": rep.failed, "quick": quick,
                                   "notes": rep.notes}))
    else:
        for t, rows in rep.failed.items():
            out.print(f"[yellow]{t}: {len(rows)} failed image(s)[/]")
            for path, reason in rows[:20]:
                out.print(f"  {path}: {reason}", markup=False, highlight=False)
            if len(rows) > 20:
                out.print(f"  ... and {len(rows) - 20} more (--json lists them all)", markup=False)
        for t, p in rep.parity.items():
            if "error" in p:
                continue
            out.print(f"{t}: recomputed {p['n']} images, cosine mean {p['cosine_mean']:.6f} "
                      f"min {p['cosine_min']:.6f}, max |diff| {p['max_abs_diff']:.3g}")
        for w in rep.warnings:  # soft_wrap: one line per warning/problem, whatever the terminal's width
            out.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
        for pr in rep.problems:
            out.print(f"[red]problem:[/] {escape(pr)}", soft_wrap=True)
        for n in rep.notes:
            out.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)
        out.print("[bold green]OK[/]" if rep.ok else f"[bold red]{len(rep.problems)} problem(s)[/]")
    raise typer.Exit(0 if rep.ok else 1)


@olacache_app.command("upgrade")
@_guarded
def upgrade_cmd(store: Annotated[str, typer.Argument(metavar="STORE", show_default=False, help="Store path or URL (format 1).")]) -> None:
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
@_guarded
def run_cmd(
    config: Annotated[Path, typer.Argument(help="YAML run config (e.g. configs/tiny.yaml); relative paths in it are relative to the file.", metavar="CONFIG", show_default=False)],
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: --set train.max_steps=10 (repeatable; stages.pt.train.lr=1e-3 for one stage).")] = None,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="Continue the run in output_dir from its latest checkpoint (finished stages are skipped).")] = False,
) -> None:
    """Train: every stage of the config in order (e.g. PT then IFT), each from the previous stage's result."""
    from olatrain.config import load_run
    from olatrain.train import run

    spec = load_run(config, set_)
    _check_run_paths(spec)
    _on_interrupt.append(lambda: _run_kept(spec))
    final = run(spec, resume=resume, log=_log)
    if _is_rank0():
        console.print(f"[bold green]finished[/] {final}")


@olatrain_app.command("generate")
@_guarded
def generate_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", metavar="DIR", help="A stage's final/ (or any checkpoint) directory.")],
    prompt: Annotated[str, typer.Option("--prompt", metavar="TEXT", help="The user's question.")],
    image: Annotated[Path | None, typer.Option("--image", metavar="FILE", help="An image file (omit for a text-only prompt).")] = None,
    max_new_tokens: Annotated[int, typer.Option(metavar="N", help="Tokens to generate.")] = 32,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda.")] = "auto",
) -> None:
    """Greedy decoding with a trained model (image tokens and the frozen task tokens in place). The answer
    alone goes to stdout; notes go to stderr."""
    from olatrain.generate import generate

    text = generate(checkpoint, prompt, image=image, max_new_tokens=max_new_tokens, device=device,
                    note=lambda m: console.print(f"note: {m}", markup=False, highlight=False, soft_wrap=True))
    # plain print: the answer exactly as decoded (no rich markup or wrapping), alone on stdout
    print(text)


def _check_run_paths(spec: Any) -> None:  # noqa: ANN401 - RunSpec
    """The data paths of every stage, checked before any model loads (a typo otherwise surfaces minutes
    later, inside a DataLoader worker)."""
    from olatrain.config import ConfigError

    for name in spec.stages:
        d = spec.configs[name].data
        where = f"data.{{}} of stage {name!r}"
        if not Path(d.annotations).exists():
            raise ConfigError(f"{where.format('annotations')}: {d.annotations} does not exist; set it in the "
                              "config or with --set data.annotations=FILE")
        if not Path(d.image_root).is_dir():
            raise ConfigError(f"{where.format('image_root')}: {d.image_root} is not a directory; set it to the "
                              "directory the annotation image paths are relative to")
        cfg = spec.configs[name]
        if cfg.teachers and cfg.train.targets == "cached" and d.store and "://" not in d.store \
                and not Path(d.store).exists():
            raise ConfigError(f"{where.format('store')}: {d.store} does not exist; build it with "
                              "`olacache build` or set --set data.store=STORE")


def _run_kept(spec: Any) -> str:  # noqa: ANN401 - RunSpec
    """What an interrupted run leaves: each stage's finished final/ or its last checkpoint and step."""
    from olatrain import checkpoint as ckpt

    again = _resume_command("olatrain", "--resume")
    kept = []
    for name in spec.stages:
        stage_dir = spec.output_dir / name
        if ckpt.is_done(stage_dir / "final"):
            kept.append(f"{name} finished ({stage_dir / 'final'})")
            continue
        last = ckpt.latest_checkpoint(stage_dir) if stage_dir.is_dir() else None
        if last is not None:
            kept.append(f"{name} at step {ckpt.load_state(last)['step']} ({last})")
        break
    if not kept:
        return f"no checkpoint was written yet in {spec.output_dir}; run the same command to start again"
    return f"kept {', '.join(kept)}; resume with: {again}"


# ---------------------------------------------------------------------------- olatrain: scale and export (#9)
@olatrain_app.command("export")
@_guarded
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help="A stage's final/ directory (e.g. runs/tiny/ift/final).")],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Empty or new directory for the Hugging Face LLaVA model.")],
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="Weights dtype: bf16, fp16 or fp32.")] = "fp32",
) -> None:
    """Write a transformers LlavaForConditionalGeneration directory (model, processor, chat template)."""
    from olatrain.export import export

    s = export(checkpoint, out_dir, dtype=dtype)
    out.print(f"exported {checkpoint} -> {s.out} ({s.dtype}, vocab {s.vocab_size}, image token {s.image_token_id}, "
              f"{len(s.task_tokens)} task tokens, image_aspect {s.image_aspect})", markup=False, highlight=False)


@olatrain_app.command("plan")
@_guarded
def plan_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", show_default=False, help="YAML run config (e.g. configs/llama3-clip336.yaml).")],
    gpus: Annotated[int, typer.Option("--gpus", metavar="N", help="GPUs (ranks) the run will use.")] = 8,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", metavar="GB", help="Memory of one GPU in GB (GiB).")] = 80.0,
    seq_len: Annotated[int | None, typer.Option("--seq-len", metavar="N", show_default="data.max_length", help="Plan for this sequence length instead of data.max_length (the worst case).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a config key (as in `olatrain run`).")] = None,
) -> None:
    """GPU memory per rank for every stage under DDP and FSDP, from the model classes on the meta device."""
    from olatrain.config import ConfigError, load_run
    from olatrain.plan import format_table, plan_run

    if gpus < 1 or gpu_mem <= 0:
        raise ConfigError("--gpus must be >= 1 and --gpu-mem > 0")
    spec = load_run(config, set_)
    rows = plan_run(spec, gpus, cuda=True, seq=seq_len)
    out.print(format_table(rows, gpu_mem, gpus, seq_len), markup=False, highlight=False)


# ============================================================================================ olatrain: research loop
# probe / sweep / plot / show (issue 8). Each command imports its module lazily; none of them imports a teacher
# except `show --decode`, through olatrain/show.py (an inspection command, never part of training or probing).
def _split_sets(sets: list[str] | None) -> tuple[list[str], dict]:
    """--set items: `probe.<key>=value` are probe settings, the rest override the model's run config."""
    from olacache.common.configio import parse_overrides

    probe_items = [s for s in sets or [] if s.startswith("probe.")]
    rest = [s for s in sets or [] if not s.startswith("probe.")]
    return rest, parse_overrides(probe_items).get("probe", {})


@olatrain_app.command("probe")
@_guarded
def probe_cmd(
    source: Annotated[Path | None, typer.Argument(help="A run dir (its last stage), <run>/<stage>/final, or any checkpoint dir.")] = None,
    out_: Annotated[Path, typer.Option("--out", "-o", help="Output directory (probe.json, probe.csv, probe.png, split.json).")] = Path("probe"),
    baseline: Annotated[Path | None, typer.Option("--baseline", help="Probe the untrained model of this run config instead of a checkpoint.")] = None,
    teachers: Annotated[str | None, typer.Option(help="Comma-separated teachers [default: every teacher in the store].")] = None,
    layers: Annotated[str, typer.Option(help="all, or a list such as 2,5 or 1-4.")] = "all",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (data.store=..., train.device=...) or a probe setting (probe.steps=200, probe.batch_size=8, probe.eval_fraction=0.2, ...).")] = None,
) -> None:
    """Train one probe per (teacher, layer) on the FROZEN model's hidden states against the cached targets and
    score it by held-out cosine (docs/method.md §9). One LLM forward per batch feeds every probe."""
    from olatrain.probe import probe_config, run_probe
    from olatrain.probe_source import ProbeError, resolve_source

    cfg_sets, probe_values = _split_sets(set_)
    if teachers:
        probe_values["teachers"] = [t.strip() for t in teachers.split(",") if t.strip()]
    probe_values.setdefault("layers", layers)
    try:
        pc = probe_config(probe_values)
        src = resolve_source(source, baseline=baseline, sets=cfg_sets)
        run_probe(src, pc, out_, log=_log)
    except ProbeError as e:
        _fail(str(e))
    if _is_rank0():
        _print_probe_table(out_)


def _print_probe_table(directory: Path) -> None:
    from olatrain.plots import load_probe

    res = load_probe(directory)
    by: dict[str, dict[int, float]] = {}
    for r in res.get("results", []):
        by.setdefault(r["teacher"], {})[int(r["layer"])] = r["cos"]
    layers = sorted({la for v in by.values() for la in v})
    tab = Table(title=f"held-out probe cosine ({res['split']['n_eval']} eval images)")
    tab.add_column("teacher")
    for la in layers:
        tab.add_column(f"L{la}", justify="right")
    for t, v in sorted(by.items()):
        tab.add_row(t, *[f"{v[la]:.3f}" if la in v else "-" for la in layers])
    out.print(tab)


plot_app = typer.Typer(help="Draw loss curves of runs, or probe curves of probe outputs.", no_args_is_help=True,
                       add_completion=False, pretty_exceptions_enable=False)
olatrain_app.add_typer(plot_app, name="plot")


@plot_app.command("run")
@_guarded
def plot_run_cmd(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    out_: Annotated[Path | None, typer.Option("--out", "-o", help="Comparison PNG (several runs) [default: runs_compare.png].")] = None,
) -> None:
    """One run: redraw its per-stage loss PNGs and summary.json. Several: one figure comparing their curves."""
    from olatrain.report import ReportError, compare_runs, summarize_run

    try:
        if len(runs) == 1 and out_ is None:
            for line in summarize_run(runs[0]).lines():
                console.print(line, markup=False, highlight=False)
            return
        path = compare_runs(runs, out_ or Path("runs_compare.png"))
    except ReportError as e:
        _fail(str(e))
    console.print(f"wrote {path}", markup=False)


@plot_app.command("probe")
@_guarded
def plot_probe_cmd(
    dirs: Annotated[list[Path], typer.Argument(help="Probe output directories (or probe.json files).")],
    out_: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("probe_compare.png"),
    labels: Annotated[str | None, typer.Option(help="Comma-separated legend labels [default: directory names].")] = None,
    title: Annotated[str, typer.Option(help="Figure title.")] = "probe cosine vs layer",
) -> None:
    """Probe curves of several models in one figure: one panel per teacher, one line per model."""
    from olatrain.plots import load_probe, probe_figure

    names = [s.strip() for s in labels.split(",")] if labels else [d.name if d.is_dir() else d.parent.name for d in dirs]
    if len(names) != len(dirs):
        _fail(f"--labels has {len(names)} names for {len(dirs)} directories")
    entries = []
    for name, d in zip(names, dirs, strict=True):
        try:
            entries.append((name, load_probe(d)))
        except (OSError, ValueError) as e:
            _fail(f"{d}: not a probe output (no readable probe.json): {e}")
    out_.parent.mkdir(parents=True, exist_ok=True)
    probe_figure(entries, out_, title=title)
    console.print(f"wrote {out_}", markup=False)


@olatrain_app.command("sweep")
@_guarded
def sweep_cmd(
    sweep_file: Annotated[Path, typer.Argument(help="SWEEP.yaml: base, stages, set, grid, runs, probe.")],
    out_: Annotated[Path, typer.Option("--out", "-o", help="Sweep directory: one sub-directory per run, summary.csv/json, losses.png, probe.png.")],
    shard: Annotated[str | None, typer.Option(help="K/N: run every N-th run starting at the K-th (array jobs).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs (name, status, overrides) and exit.")] = False,
) -> None:
    """Train (and probe) every run of an ablation grid on the same store; finished runs are never re-run,
    failed ones are recorded and do not stop the others."""
    from olatrain.sweep import SweepError, dry_run_lines, load_sweep, parse_shard, run_sweep

    try:
        sweep = load_sweep(sweep_file)
        k_n = parse_shard(shard)
    except SweepError as e:
        _fail(str(e))
    if dry_run:
        for line in dry_run_lines(sweep, out_, k_n):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    try:
        run_sweep(sweep, out_, shard=k_n, log=_log)
    except SweepError as e:
        _fail(str(e))
    if not _is_rank0():
        return
    from olatrain.sweep_summary import write_summary

    _print_sweep_table(write_summary(sweep, out_), out_)


def _print_sweep_table(summary: dict, directory: Path) -> None:
    from olatrain.sweep_summary import fmt

    rows = summary["runs"]
    stages = [s for r in rows for s in r["stages"]]
    first = stages[0] if stages else None
    terms = sorted({k for r in rows for k in (r["stages"].get(first, {}).get("final", {}) if first else {})
                    if k in ("loss", "loss_ce") or k.count("_") == 1})
    teachers = sorted({t for r in rows for t in (r["probe"] or {})})
    tab = Table(title=f"sweep {Path(summary['sweep']).name}: {summary['totals']['done']}/{len(rows)} done")
    tab.caption = (f"final {first} loss terms" if first else "") + (", mean probe cosine over the probed layers"
                                                                     if teachers else "")
    for c in ("run", "status", "wall s", *[t.removeprefix("loss_") for t in terms], *[f"cos {t}" for t in teachers]):
        tab.add_column(c, no_wrap=True)
    for r in rows:
        final = r["stages"].get(first, {}).get("final", {}) if first else {}
        wall = f"{r['wall_s']:.1f}" if isinstance(r["wall_s"], (int, float)) else "-"
        tab.add_row(r["name"], r["status"] + (f": {r['error']}" if r["error"] else ""), wall,
                    *[fmt(final.get(t)) for t in terms],
                    *[fmt((r["probe"] or {}).get(t, {}).get("mean")) for t in teachers])
    out.print(tab)
    tot = summary["totals"]
    out.print(f"teachers built or run: 0; teacher forwards avoided (target rows read from the store): "
              f"{tot['teacher_forwards_avoided']:,}; store bytes read: {human_bytes(tot['store_bytes_read'])}",
              markup=False, highlight=False)
    out.print(f"wrote {directory / 'summary.csv'}, summary.json, losses.png"
              + (", probe.png" if teachers else ""), markup=False, highlight=False)


@olatrain_app.command("show")
@_guarded
def show_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A PT checkpoint (<run>/pt/final) or a run dir whose last stage is PT.")],
    image: Annotated[Path, typer.Option("--image", help="An image file under the run's data.image_root (in the store).")],
    out_: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("show.png"),
    key: Annotated[str | None, typer.Option(help="The image's path as stored, if the file is not under data.image_root.")] = None,
    decode: Annotated[bool, typer.Option("--decode", help="Also decode target and predicted depth features through the depth teacher's DPT head (loads the teacher).")] = False,
    teacher_source: Annotated[str | None, typer.Option(help="Depth teacher checkpoint for --decode [default: the store's record].")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. data.store=...")] = None,
) -> None:
    """Cached target vs predicted embedding per spatial teacher and predictor layer, as feature maps in a
    shared PCA colour space, with the cosine of each map."""
    from olatrain.probe_source import ProbeError
    from olatrain.show import show

    try:
        path = show(checkpoint, image, out_, sets=set_, key=key, decode=decode, teacher_source=teacher_source)
    except ProbeError as e:
        _fail(str(e))
    console.print(f"wrote {path}", markup=False)
