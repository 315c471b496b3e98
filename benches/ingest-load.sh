#!/usr/bin/env bash
# The ingest request-rate benchmark (docs/BENCHMARKS.md): `stockflow ingest serve` on the embedded
# log (fdatasync before every answer) in one process, `stockflow ingest load` in another.
#   benches/ingest-load.sh [SHARDS]      # default: 4 (the embedded default); 1 for the best latency
# Prints four lines: closed-loop single events, closed-loop NDJSON batches of 500, then the
# open-model latency at half of each target rate (10,000 req/s; 150,000 events/s).
set -euo pipefail
cd "$(dirname "$0")/.."
shards=${1:-4}
bin=./target/release/stockflow
[ -x "$bin" ] || cargo build --release
dir=$(mktemp -d)
port=${PORT:-8091}
STOCKFLOW_LOG=warn "$bin" --data-dir "$dir" --shards "$shards" ingest serve --listen "127.0.0.1:$port" &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/v1/events"
echo "shards=$shards"
"$bin" ingest load --url "$url" --seconds 10 --connections 128
"$bin" ingest load --url "$url" --seconds 10 --connections 8 --batch 500
"$bin" ingest load --url "$url" --seconds 10 --connections 128 --rate 10000
"$bin" ingest load --url "$url" --seconds 10 --connections 16 --batch 500 --rate 300
