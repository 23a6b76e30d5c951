#!/usr/bin/env bash
# Installs the service into .venv (from scratch when absent) and starts it on http://127.0.0.1:8000.
# On first start it builds the embedded "demo" product from the packaged demo images (a few seconds).
# Extra arguments go to `python -m app serve`, e.g. --host 0.0.0.0 --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m app serve "$@"
