#!/usr/bin/env bash
# README command 2 (and what CI runs): set up the virtualenv, then the default test suite (integration
# tests on the real SmolLM2 included; the slow, exhaustive ones run with `-m slow`, see the README).
# Under CI (CI=true) the virtualenv is built afresh from the project's files on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
if [ "${CI:-}" = true ]; then export FRESH=1; fi
start=$(date +%s)
bash scripts/install.sh
echo "set-up: $(( $(date +%s) - start )) s"
exec "$VENV/bin/python" -m pytest -q "$@"
