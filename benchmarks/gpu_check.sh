#!/usr/bin/env bash
# GPU check for a maintainer with a CUDA host, from a fresh clone (< 8 minutes on one H200):
#   1. installs the project with its test tools into .venv (scripts/install.sh dev),
#   2. runs the CUDA tests (pytest -m cuda; they skip without a CUDA device),
#   3. profiles the engine's stages at batch 1, 16 and 64 (benchmarks/gpu_profile.py:
#      decode on the CPU and on the device, backbone, search, maps; OUT/profile.json),
#   4. runs benchmarks/bench_service.py on the device for each body format (PNG and JPEG,
#      quality 95): full bottle bank, concurrency 1, 16, 64 and 256, micro-batching
#      on (max batch 64) and off, 4 load-generating client processes, writing
#      OUT/service_{png,jpeg}.{json,md} (images/s, p50/p95/p99, time in the service,
#      mean batch, GPU memory, the engine's own rate at the same batch),
#   5. runs it again with JPEG bodies decoded on the CPU (PATCHCORE_DEVICE_DECODE=off; step 4's
#      JPEG run decodes them on the device, the default on CUDA), batching on, concurrency
#      16, 64 and 256: OUT/service_jpeg_cpu_decode.{json,md}, the same run's baseline,
#   6. runs it again with JPEG bodies and several service processes sharing the device
#      (--processes, default 4; batching on, concurrency 16, 64 and 256, twice as many
#      client processes): OUT/service_jpeg_processes.{json,md}. This tells whether one
#      process's event loop and decode pool, not the device, is the limit.
#
#   bash benchmarks/gpu_check.sh                       # the real check (needs CUDA)
#   bash benchmarks/gpu_check.sh --device cpu --tiny --no-install   # seconds: keeps the script honest (tests)
#
# Options: --device cuda|cpu (default cuda), --tiny (a 64 px model, 3 images, 2 levels),
# --no-install (use $PYTHON or .venv as it is), --out DIR (default benchmarks/results/gpu_check),
# --data DIR (MVTec-layout root; default $PATCHCORE_TEST_DATA or ../shared/data),
# --train-images N and --coreset-ratio R (default 209 and 0.1: the full bottle bank; a
# host without the whole training set gets a bank of the same size from 21 images at 1.0),
# --seconds S per load level (default 10), --formats "png jpeg" (body formats of step 4),
# --processes N (step 6; default 4, --tiny 2; 1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
INSTALL=1
OUT=benchmarks/results/gpu_check
DATA=${PATCHCORE_TEST_DATA:-../shared/data}
TRAIN=209
RATIO=0.1
SECONDS_PER_LEVEL=10
FORMATS="png jpeg"
PROCESSES=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --train-images) TRAIN=$2; shift 2 ;;
    --coreset-ratio) RATIO=$2; shift 2 ;;
    --seconds) SECONDS_PER_LEVEL=$2; shift 2 ;;
    --formats) FORMATS=$2; shift 2 ;;
    --processes) PROCESSES=$2; shift 2 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

if [ "$INSTALL" = 1 ]; then
  bash scripts/install.sh dev
fi
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
started=$(date +%s)

echo "== environment"
"$PY" - "$DEVICE" <<'EOF' | tee "$OUT/environment.txt"
import sys
import torch
import app  # noqa: F401 - sets the native-thread environment first
from app.core.knn import faiss_has_gpu, resolve_search
device = sys.argv[1]
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
print("faiss gpu", faiss_has_gpu(), "search on", device, "->", resolve_search(device))
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda but torch sees no CUDA device")
EOF

echo "== CUDA tests"
# Exit status 5 = no test collected; the CUDA tests skip themselves without a device.
# A failing test does not stop the benchmarks (a device session is short and costly):
# the script runs them all and exits with the tests' status at the end.
set +e
# Only the modules that hold CUDA tests: collecting the whole suite would import the
# stand's and the browser tests' tools, which a GPU host need not have.
mapfile -t CUDA_TESTS < <(grep -rl --include='test_*.py' 'mark.cuda' tests | sort)
"$PY" -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}"
tests_status=$?
set -e
if [ "$tests_status" = 5 ]; then tests_status=0; fi
if [ "$tests_status" != 0 ]; then
  echo "CUDA tests FAILED (status $tests_status); running the benchmarks anyway" >&2
fi
# Each benchmark step likewise: one that fails is reported and the next one still runs.
failed_steps=()
step() {
  local name=$1; shift
  "$@" || { echo "step FAILED: $name" >&2; failed_steps+=("$name"); }
}

if [ "$TINY" = 1 ]; then
  PROFILE=(--train-images 3 --batches 1 2 --rounds 1)
  BENCH=(--quick --image-size 64 --train-images 3 --requests 3 --concurrency 1 2
         --max-batch-size 4 --max-seconds-per-level 5 --clients 2 --client-start-delay 3)
  ONE_PROCESS=()
  ONE_PROCESS_THREADS=()
  LEVELS=(--concurrency 2)
  PROCESSES=${PROCESSES:-2}
  PROCESS_CLIENTS=2
else
  PROFILE=(--train-images "$TRAIN" --coreset-ratio "$RATIO" --batches 1 16 64 --rounds 5)
  # 16 decode threads: on a GPU host the decode on the CPU is the next wall. Four client
  # processes: one Python client caps near a thousand requests/s.
  BENCH=(--train-images "$TRAIN" --coreset-ratio "$RATIO" --requests 100000
         --max-batch-size 64 --max-seconds-per-level "$SECONDS_PER_LEVEL"
         --clients 4 --client-start-delay 6)
  ONE_PROCESS=(--concurrency 1 16 64 256)
  ONE_PROCESS_THREADS=(--decode-threads 16)
  LEVELS=(--concurrency 16 64 256)
  PROCESSES=${PROCESSES:-4}
  PROCESS_CLIENTS=8
fi

# Device decoding is "auto" (on for CUDA); a CPU check runs the same code with "always".
if [ "$DEVICE" = cpu ]; then DEVICE_DECODE=always; else DEVICE_DECODE=auto; fi

echo "== engine stages on $DEVICE"
step profile "$PY" benchmarks/gpu_profile.py --data "$DATA" --device "$DEVICE" "${PROFILE[@]}" \
  --json "$OUT/profile.json"

for format in $FORMATS; do
  echo "== service benchmark on $DEVICE, $format bodies, one process"
  step "service $format" "$PY" benchmarks/bench_service.py --data "$DATA" --device "$DEVICE" \
    "${BENCH[@]}" "${ONE_PROCESS[@]}" "${ONE_PROCESS_THREADS[@]}" --device-decode "$DEVICE_DECODE" \
    --image-format "$format" --json "$OUT/service_$format.json" --markdown "$OUT/service_$format.md"
done

for format in $FORMATS; do
  [ "$format" = jpeg ] || continue
  echo "== service benchmark on $DEVICE, jpeg bodies decoded on the CPU, one process"
  step "service jpeg cpu decode" "$PY" benchmarks/bench_service.py --data "$DATA" --device "$DEVICE" \
    "${BENCH[@]}" "${LEVELS[@]}" "${ONE_PROCESS_THREADS[@]}" --batching on --no-engine --device-decode off \
    --image-format jpeg --json "$OUT/service_jpeg_cpu_decode.json" --markdown "$OUT/service_jpeg_cpu_decode.md"
done

if [ "$PROCESSES" -gt 1 ]; then
  echo "== service benchmark on $DEVICE, jpeg bodies, $PROCESSES processes"
  # Decode threads split between the processes: the same CPU pool as the one-process run.
  step "service processes" "$PY" benchmarks/bench_service.py --data "$DATA" --device "$DEVICE" \
    "${BENCH[@]}" "${LEVELS[@]}" \
    --batching on --no-engine --server-processes "$PROCESSES" --clients "$PROCESS_CLIENTS" \
    --decode-threads $(( 16 / PROCESSES > 0 ? 16 / PROCESSES : 1 )) \
    --image-format jpeg --json "$OUT/service_jpeg_processes.json" --markdown "$OUT/service_jpeg_processes.md"
fi

echo "== done in $(( $(date +%s) - started )) s (after install); results in $OUT/"
if [ "$tests_status" != 0 ]; then
  echo "CUDA tests FAILED (status $tests_status): see above" >&2
  exit "$tests_status"
fi
if [ "${#failed_steps[@]}" != 0 ]; then
  echo "FAILED steps: ${failed_steps[*]}" >&2
  exit 1
fi
