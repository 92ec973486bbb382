#!/usr/bin/env bash
# The bucket benchmarks (tests/reliability/bucket_limits.rs), through the tests' Spaces-limits
# layer in front of the S3 test server, ingest and one worker on SQLite:
#   spaces_burst     20,000 messages over 1,000 conversations at 2,000/s, Spaces' limits
#   beyond_capacity  1,200 busy conversations against 10 writes/s (twice what it can write)
# Each prints a table: writes/s and operations/s against the limits, the last message's time
# against writes made / 150 per s, visibility, backlog and oldest staged age over time.
#
#   scripts/bench-bucket.sh                   # both
#   scripts/bench-bucket.sh spaces_burst      # one
#
# Needs what the test suite needs (RabbitMQ, PostgreSQL, the S3 test server: `bash .ci/run`
# starts them). Release build. FBSYNC_BENCH_CAPACITY_SECS=N changes the beyond-capacity load's
# length (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
export FBSYNC_TEST_S3_ENDPOINT="${FBSYNC_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo test --release --test reliability "bucket_limits::${1:-}" -- --ignored --nocapture --test-threads 1
