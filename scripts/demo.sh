#!/usr/bin/env bash
# The main job on the bundled sample, offline, with tiny random-init models:
#   1. olacache build: run the three tiny teachers once into a Zarr store
#   2. olatrain run:   PT (embedding losses from the store) then IFT, configs/tiny.yaml
#   3. olatrain generate: greedy decoding with the trained model
# Safe to run again: each run writes a fresh directory runs/demo/<date-time>/ (printed at the start and the
# end). OUT=<dir> bash scripts/demo.sh continues (or re-checks) that directory instead: the build resumes and
# finished training stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OLAKIT_CACHE="${OLAKIT_CACHE:-$PWD/.cache/olakit}"
OUT=${OUT:-runs/demo/$(date +%Y%m%d-%H%M%S)}
echo "demo output: $OUT"
olacache build examples/sample.json examples/images --out "$OUT/store.zarr" --preset tiny
olacache info "$OUT/store.zarr"
olatrain run configs/tiny.yaml --set data.store="$OUT/store.zarr" --set output_dir="$OUT/train" --resume "$@"
olatrain generate --checkpoint "$OUT/train/ift/final" --image examples/images/chelsea.jpg \
  --prompt "What animal is this?"
echo "demo output: $OUT (run again for a fresh one, or OUT=$OUT bash scripts/demo.sh to continue this one)"
