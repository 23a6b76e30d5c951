#!/usr/bin/env bash
# Creates .venv when absent and installs the project into it (pass "dev" for the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  bash scripts/install_chromium.sh || true  # the console's browser tests skip (saying why) without it
else
  .venv/bin/python -m pip install --quiet -c constraints.txt -e .
fi
