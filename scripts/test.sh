#!/usr/bin/env bash
# Installs everything the tests need into .venv (from scratch when absent) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m ruff check app tests benchmarks
.venv/bin/python -m pytest "$@"
