#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the linters and the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OLAKIT_CACHE="${OLAKIT_CACHE:-$PWD/.cache/olakit}"
ruff check .
python -m pytest "$@"
