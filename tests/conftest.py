"""Shared test setup: tiny presets go to one cache dir (deterministic, so sharing is safe), offline."""

from __future__ import annotations

import os
from pathlib import Path

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
