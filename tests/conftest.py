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
