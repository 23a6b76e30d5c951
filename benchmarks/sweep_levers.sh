#!/usr/bin/env bash
# The accuracy-lever sweep of issue 8, one process per run (README "Accuracy levers").
#   bash benchmarks/sweep_levers.sh DATA CATEGORY [EXTRA...]
# EXTRA (e.g. --train-every 4 for magnetic_tile) is added to every run.
set -euo pipefail
data=$1; category=$2; shift 2
py=${PYTHON:-.venv/bin/python}
run() { name=$1; shift; PYTHONPATH=. nice "$py" benchmarks/sweep_levers.py --data "$data" --category "$category" --name "$name" "$@"; }
run base "$@"
run centre0.875 --centre-crop 0.875 "$@"
run flatten256 --aggregation flatten --stage-dim 256 "$@"
run centre_flatten256 --centre-crop 0.875 --aggregation flatten --stage-dim 256 "$@"
run flatten_full --aggregation flatten "$@"
run size320 --image-size 320 "$@"
run holdout_min5 --holdout-fraction 0 "$@"
