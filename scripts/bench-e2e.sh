#!/usr/bin/env bash
# End-to-end benchmark: `fbsync up` (release) on SQLite with a local or S3 store, loaded by the
# load generator, followed until every message is stored.
#
#   scripts/bench-e2e.sh RATE SECONDS CONVERSATIONS [PUTS_PER_5MIN] [S3_ENDPOINT] [COUNT]
#
# RATE deliveries/s (one message each, 0 = as fast as ingest takes them), SECONDS the longest
# the load lasts, COUNT the deliveries in all (the load ends at whichever comes first),
# PUTS_PER_5MIN the per-object budget for an S3 store (0 = none, the default, where the bucket
# rates are unlimited too; otherwise Spaces' default rates apply), S3_ENDPOINT an S3-compatible
# server (default: the local directory store, which has no budgets).
# Needs RabbitMQ on 127.0.0.1:5672. Build first:
#   cargo build --release --bin fbsync --example loadgen
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000} seconds=${2:-10} conversations=${3:-50} puts=${4:-0} s3=${5:-} count=${6:-}
target=${CARGO_TARGET_DIR:-target}/release
run=$(date +%s%N | tail -c 9)
dir=$(mktemp -d /tmp/fbsync-bench-XXXXXX)
port=$((5700 + RANDOM % 200)) metrics_port=$((6700 + RANDOM % 200))
export FACEBOOK_APP_SECRET=bench FACEBOOK_VERIFY_TOKEN=bench QUEUE_PREFIX=bench-e2e-$run \
  DATA_DIR=$dir DATABASE_URL=${BENCH_DATABASE_URL:-sqlite://$dir/fbsync.db} INGEST_ADDR=127.0.0.1:$port \
  INGEST_METRICS_ADDR=127.0.0.1:$metrics_port \
  TOKEN_ENCRYPTION_KEY=YmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtMzI= \
  SPACES_OBJECT_PUTS_PER_5MIN=$puts RUST_LOG=warn
if [ "$puts" = 0 ]; then export SPACES_WRITES_PER_SEC=0 SPACES_OPS_PER_SEC=0; fi
if [ -n "$s3" ]; then
  bucket=bench-$run
  python3 - "$s3" "$bucket" <<'PY'
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(f"{sys.argv[1]}/{sys.argv[2]}", method="PUT"))
PY
  export SPACES_ENDPOINT=$s3 SPACES_BUCKET=$bucket SPACES_REGION=us-east-1 SPACES_API_KEY=bench SPACES_API_SECRET=bench
fi
"$target/fbsync" pages add --page-id 100000000000001 --user-uuid 00000000-0000-4000-8000-000000000001 --token bench >/dev/null
"$target/fbsync" up 2>"$dir/up.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; "$target/examples/loadgen" --delete-topology bench-e2e-$run >/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
echo "fbsync up: per-object budget ${puts}/5min, store ${s3:-local directory}, $conversations conversations"
"$target/examples/loadgen" --url "http://127.0.0.1:$port/facebook/webhook" --rate "$rate" \
  --duration-secs "$seconds" ${count:+--count "$count"} --conversations "$conversations" --concurrency 64 \
  --follow-metrics "http://127.0.0.1:$metrics_port/metrics" --worker-pid $pid
