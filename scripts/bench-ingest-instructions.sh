#!/usr/bin/env bash
# Instructions `fbsync ingest` executes per webhook delivery, counted by valgrind's callgrind:
# unlike CPU time, the count does not move with whatever else the (shared) machine is doing, so
# it shows a change to ingest's own work that time figures drown in noise.
#
#   scripts/bench-ingest-instructions.sh     # needs valgrind, RabbitMQ, release binaries
#
# Two runs, of 500 and 2,500 deliveries (200/s, 16 in flight); the difference divided by 2,000
# is the cost of a delivery, start-up and shutdown cancelling out (the second run is also 10 s
# longer, so 10 s of an idle ingest's timers and heartbeats count in too: a few hundred
# instructions a delivery, the same in every run). Valgrind's virtual CPU has no
# SHA extensions, so the signature's HMAC-SHA256 runs in software under it: that part is printed
# apart (natively the sha2 crate uses the CPU's SHA instructions, a fraction of the cost).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "error: valgrind is not installed" >&2; exit 1; }
target=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d /tmp/fbsync-bench-instructions-XXXXXX)
trap 'rm -rf "$dir"' EXIT

# Writes "<accepted> <instructions> <sha256 instructions>" of one run of $1 deliveries to $2.
count_run() {
  local port=$((5500 + RANDOM % 90)) run=bench-instructions-$RANDOM
  FACEBOOK_APP_SECRET=bench FACEBOOK_VERIFY_TOKEN=v QUEUE_PREFIX=$run INGEST_ADDR=127.0.0.1:$port \
    INGEST_METRICS_ADDR=127.0.0.1:0 RUST_LOG=warn \
    valgrind --tool=callgrind --callgrind-out-file="$dir/$run.out" "$target/fbsync" ingest \
    2>"$dir/$run.log" &
  local ingest=$!
  # Whatever happens to the load, ingest is stopped (callgrind writes its counts then).
  trap "kill -INT $ingest 2>/dev/null; wait $ingest 2>/dev/null; rm -rf '$dir'" EXIT
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  FACEBOOK_APP_SECRET=bench "$target/examples/loadgen" --url "http://127.0.0.1:$port/facebook/webhook" \
    --rate 200 --concurrency 16 --count "$1" >"$dir/$run.load"
  kill -INT "$ingest"; wait "$ingest" || true
  trap 'rm -rf "$dir"' EXIT
  "$target/examples/loadgen" --delete-topology "$run" >/dev/null
  local accepted total sha
  accepted=$(awk '/^accepted /{ print $2 }' "$dir/$run.load")
  total=$(awk '/^(summary|totals):/{ print $2; exit }' "$dir/$run.out")
  sha=$(callgrind_annotate "$dir/$run.out" | awk '/sha2::sha256::compress256/{ gsub(",", "", $1); s += $1 } END { print s + 0 }')
  echo "$accepted $total $sha" >"$2"
}

count_run 500 "$dir/small"
count_run 2500 "$dir/large"
read -r small_n small small_sha <"$dir/small"
read -r large_n large large_sha <"$dir/large"
if [ "$small_n" != 500 ] || [ "$large_n" != 2500 ]; then
  echo "error: not every delivery was accepted ($small_n of 500, $large_n of 2500)" >&2
  exit 1
fi
awk -v a="$small" -v b="$large" -v sa="$small_sha" -v sb="$large_sha" 'BEGIN {
  per = (b - a) / 2000; sha = (sb - sa) / 2000
  printf "instructions per delivery  %.0f (of which SHA-256 in software under valgrind: %.0f; the rest: %.0f)\n", per, sha, per - sha
}'
