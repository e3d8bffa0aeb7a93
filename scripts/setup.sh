#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned torch/torchvision pair and the project (editable, with dev extras).
# Idempotent: a second run only checks. Override the interpreter with PYTHON=python3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.olakit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first: this pair is what the project is tested with (a CUDA build that also runs on CPU);
  # the project's own ranges admit it, so the next line installs nothing torch-related.
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
