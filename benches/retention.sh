#!/usr/bin/env bash
# Disk after a replay with everything delivered, default retention vs "0s", and restart time with
# 1 M and 10 M events of history. Figures go to docs/BENCHMARKS.md ("Retention and restarts").
#   benches/retention.sh [BIN] [WORKDIR]
set -euo pipefail
BIN=${1:-target/release/stockflow}
WORK=${2:-$(mktemp -d /tmp/stockflow-retention.XXXXXX)}
mkdir -p "$WORK"
export STOCKFLOW_LOG=warn
cat > "$WORK/zero.toml" <<'TOML'
[retention]
stream = "0s"
delivered = "0s"
TOML
: > "$WORK/default.toml"

size() { du -sb "$1" | cut -f1; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

# A restart: open the log and the store, restore every shard, find nothing new, stop.
restart_ms() {
  local cfg=$1 dir=$2 best=
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s%N)
    "$BIN" --config "$cfg" --data-dir "$dir" replay --file /dev/null >/dev/null 2>&1
    t1=$(date +%s%N)
    local ms=$(( (t1 - t0) / 1000000 ))
    if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
  done
  echo "$best"
}

for n in ${SIZES:-1000000 10000000}; do
  stream="$WORK/events-$n.ndjson"
  [ -f "$stream" ] || "$BIN" generate --events "$n" --skus 100000 --out "$stream" >/dev/null
  echo "== $n events ($(mb "$(size "$stream")") of NDJSON)"
  for mode in default zero; do
    dir="$WORK/data-$n-$mode"
    rm -rf "$dir"
    t0=$(date +%s%N)
    "$BIN" --config "$WORK/$mode.toml" --data-dir "$dir" replay --file "$stream" >/dev/null 2>&1
    t1=$(date +%s%N)
    echo "$mode retention: replay $(( (t1 - t0) / 1000000 )) ms; data dir $(mb "$(size "$dir")") (state.redb $(mb "$(size "$dir/state.redb")"), log $(mb "$(size "$dir/log")"), $(find "$dir/log" -name '*.seg' | wc -l) segments); restart $(restart_ms "$WORK/$mode.toml" "$dir") ms"
  done
done
