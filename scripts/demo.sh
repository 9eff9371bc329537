#!/usr/bin/env bash
# README command 1: set up, prepare the embedded model and text, convert SmolLM2-135M at half the
# KV cache with CARE (the default conversion) and with the weight-SVD baseline, print one table.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
bash scripts/install.sh
exec "$VENV/bin/care-mla" demo --out "${1:-runs/demo}" --overwrite
