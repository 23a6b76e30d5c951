#!/usr/bin/env bash
# The accuracy-lever sweep of issue 8 as it was run, one process per run
# (results in benchmarks/results/levers/, table: benchmarks/levers_table.py).
#   PYTHON=.venv/bin/python bash benchmarks/sweep_levers.sh ../shared/data
# Each run is also one line of the README ("Accuracy levers"), with its command.
set -euo pipefail
data=${1:-../shared/data}
py=${PYTHON:-.venv/bin/python}
# Every run before stop 19 normalised pixels with the backbone's dataset statistics only (the
# default then); `run` keeps them so, and `run_now` takes today's defaults.
run_now() { category=$1; name=$2; shift 2
        PYTHONPATH=. nice "$py" benchmarks/sweep_levers.py --data "$data" --category "$category" --name "$name" "$@"; }
run() { run_now "$@" --normalisation dataset; }
mean=(--aggregation mean --stage-dim 0)
flat=(--aggregation flatten --stage-dim 256)
# transistor: 10% (the target) and 1% coreset for the cheaper screens
run transistor base "${mean[@]}"
run transistor flatten256 "${flat[@]}"
run transistor c1_base --coreset-ratio 0.01 "${mean[@]}"
run transistor c1_flatten256 --coreset-ratio 0.01 "${flat[@]}"
run transistor c1_flatten128 --coreset-ratio 0.01 --aggregation flatten --stage-dim 128
run transistor c1_centre0.875 --coreset-ratio 0.01 --centre-crop 0.875 "${mean[@]}"
run transistor c1_centre_flatten256 --coreset-ratio 0.01 --centre-crop 0.875 "${flat[@]}"
run transistor c1_flatten256_holdout_min5 --coreset-ratio 0.01 --holdout-fraction 0 "${flat[@]}"
# bottle at 10% (the mean row is benchmarks/results/bottle__default.json)
run bottle flatten256 "${flat[@]}"
# magnetic_tile: every 4th training image (190) at 10% to screen, then all 761
run magnetic_tile e4_base --train-every 4 "${mean[@]}"
run magnetic_tile e4_flatten256 --train-every 4 "${flat[@]}"
run magnetic_tile flatten256 "${flat[@]}"
# All three, full sets at 10%: the width of the flattened neighbourhood (64 values per stage is
# the default), Eq. 7, a larger input (at 128 values, the default then) and a 5x5 neighbourhood.
for category in transistor bottle magnetic_tile; do
  run "$category" flatten128 --aggregation flatten --stage-dim 128
  run "$category" flatten64 --aggregation flatten --stage-dim 64
  run "$category" flatten32 --aggregation flatten --stage-dim 32
  run "$category" flatten64_reweight3 --aggregation flatten --stage-dim 64 --reweight 3
  run "$category" size320 --aggregation flatten --stage-dim 128 --image-size 320
  run "$category" flatten64_patch5 --aggregation flatten --stage-dim 64 --patch-size 5
done
# magnetic_tile's pixel AUROC: the two per-product levers that lift it, together
run magnetic_tile flatten64_patch5_sigma12 --aggregation flatten --stage-dim 64 --patch-size 5 --map-sigma 12
# The sizes and widths left unmeasured before (stop 18): the objects on their full sets,
# magnetic_tile on every 4th training image beside the default on the same subset.
for category in transistor bottle; do
  run "$category" size256 --image-size 256
  run "$category" sd16 --stage-dim 16
done
run magnetic_tile e4_flatten64 --train-every 4
run magnetic_tile e4_size256 --train-every 4 --image-size 256
run magnetic_tile e4_sd16 --train-every 4 --stage-dim 16
# Is the bank's size magnetic_tile's limit? A quarter and all of the patches (stop 18).
run magnetic_tile e4_coreset0.25 --train-every 4 --coreset-ratio 0.25
run magnetic_tile e4_coreset1.0 --train-every 4 --coreset-ratio 1.0
# Stop 19. Stage balancing (each stage an equal measured share of the distance), with the
# dataset normalisation of the runs above:
for category in transistor bottle magnetic_tile; do
  run "$category" stage_balance --stage-balance
done
run magnetic_tile stage_balance_sigma12 --stage-balance --map-sigma 12
# Per-image exposure normalisation, the default since: all three full sets, then with stage
# balancing, and magnetic_tile's per-product setting with the wider map smoothing as well.
run_now magnetic_tile e4_image_norm --train-every 4
for category in transistor bottle magnetic_tile; do
  run_now "$category" image_norm
  run_now "$category" image_norm_sb --stage-balance
done
run_now magnetic_tile image_norm_sb_sigma12 --stage-balance --map-sigma 12
