#!/usr/bin/env bash
# Reconciliation at catalogue scale (docs/BENCHMARKS.md, "Reconciliation"): 1 M events over
# 100,000 SKUs through the embedded pipeline, then `stockflow reconcile` against a ledger report
# of every SKU in which 1 % are short and 1 % over (gzip, the real column names). Prints the wall
# time and peak RSS of three runs and the report sizes. Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
SF=${SF:-target/release/stockflow}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$SF" generate --out "$W/ev.ndjson" --events 1000000 --skus 100000 >/dev/null
"$SF" --data-dir "$W/d" replay --file "$W/ev.ndjson" >/dev/null
"$SF" --data-dir "$W/d" state dump > "$W/state.ndjson"
{
  printf 'Date\tFNSKU\tASIN\tMSKU\tTitle\tDisposition\tStarting Warehouse Balance\tIn Transit Between Warehouses\tReceipts\tCustomer Shipments\tCustomer Returns\tVendor Returns\tWarehouse Transfer In/Out\tFound\tLost\tDamaged\tDisposed\tOther Events\tEnding Warehouse Balance\tUnknown Events\tLocation\n'
  # Every 100th SKU has 7 more at Amazon, every 100th (offset 50) 7 fewer.
  awk -F'"' '{ sku=$4; match($0, /"on_hand":-?[0-9]+/); oh=substr($0, RSTART+10, RLENGTH-10)+0;
               n=NR; if (n%100==0) oh+=7; else if (n%100==50) oh-=7;
               printf "12/31/2099\tX%s\tB\t%s\tt\tSELLABLE\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t%d\t0\tUS\n", sku, sku, oh }' "$W/state.ndjson"
} | gzip > "$W/ledger.tsv.gz"
for i in 1 2 3; do
  /usr/bin/time -f "run $i: %e s wall, %M KB peak RSS" "$SF" --data-dir "$W/d" reconcile --ledger "$W/ledger.tsv.gz" >/dev/null || true
done
ls -l "$W/d/reconcile" | awk 'NR>1 {print $5, $9}'
"$SF" --data-dir "$W/d" reconcile --ledger "$W/ledger.tsv.gz" | head -1 || true
