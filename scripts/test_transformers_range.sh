#!/usr/bin/env bash
# The modeling tests on the lowest and the newest transformers that pyproject.toml allows, each in a
# fresh virtualenv (everything else at constraints.txt's versions). Usage:
#   bash scripts/test_transformers_range.sh [LOWEST [NEWEST]]      (default 5.15.0 and 5.24.0)
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS="tests/formats/test_modeling.py tests/formats/test_decoupled.py tests/formats/test_deepseek.py tests/pipeline/test_layerwise.py tests/pipeline/test_convert.py tests/evaluation/test_evaluation.py"
for version in "${1:-5.15.0}" "${2:-5.24.0}"; do
  venv=".venv-transformers-$version"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"
  # transformers and the packages whose range it sets itself (5.15 needs huggingface_hub<2, tokenizers 0.22)
  grep -v -i -E '^(transformers|huggingface[-_]hub|tokenizers|hf-xet)==' constraints.txt > "$venv/constraints.txt"
  "$venv/bin/pip" install -q -c "$venv/constraints.txt" -e ".[test]" "transformers==$version"
  echo "== transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS
done
