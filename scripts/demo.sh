#!/usr/bin/env bash
# The main job on the bundled sample, offline, with tiny random-init models:
#   1. olacache build: run the three tiny teachers once into a Zarr store
#   2. olatrain run:   PT (embedding losses from the store) then IFT, configs/tiny.yaml
#   3. olatrain generate: greedy decoding with the trained model
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OLAKIT_CACHE="${OLAKIT_CACHE:-$PWD/.cache/olakit}"
OUT=${OUT:-runs/demo}
olacache build examples/sample.json examples/images --out "$OUT/store.zarr" --preset tiny
olacache info "$OUT/store.zarr"
olatrain run configs/tiny.yaml --set data.store="$OUT/store.zarr" --set output_dir="$OUT/train" "$@"
olatrain generate --checkpoint "$OUT/train/ift/final" --image examples/images/chelsea.jpg \
  --prompt "What animal is this?"
