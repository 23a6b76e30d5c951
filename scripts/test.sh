#!/usr/bin/env bash
# Installs everything the tests need into .venv (from scratch when absent), lints, and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python -m ruff check app tests benchmarks scripts
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
