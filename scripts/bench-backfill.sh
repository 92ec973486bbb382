#!/usr/bin/env bash
# The backfill benchmark: a Page with 10,000 conversations of 20 messages from the fake Graph
# API, read by one `fbsync poll --backfill` and stored through all of Spaces' limits by one
# worker on PostgreSQL. Prints messages stored per second, Graph calls, object writes per
# conversation and the time against the bound the bucket's write rate sets (10,000 writes at
# 150 writes/s), requests over a limit and the worker's peak RSS.
#
# Needs what the test suite needs (RabbitMQ, PostgreSQL, the S3 test server: `bash .ci/run`
# starts them). Release build. FBSYNC_BENCH_CONVERSATIONS=N changes the Page's size.
set -euo pipefail
cd "$(dirname "$0")/.."
export FBSYNC_TEST_S3_ENDPOINT="${FBSYNC_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo test --release --test reliability backfill -- --ignored --nocapture --test-threads 1
