#!/usr/bin/env bash
# README command 2 (and what CI runs): set up, then the whole test suite, integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest -q "$@"
