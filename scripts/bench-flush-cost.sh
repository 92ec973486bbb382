#!/usr/bin/env bash
# The flush-cost benchmark: the worker's CPU time for one flush of a new message into a
# conversation that holds 1,000, 10,000 or 100,000 events (about 20 MB), when it is appended
# and when it takes the full merge, and the worker's peak RSS (tests/reliability/flush_cost.rs).
#
# Needs what the test suite needs (RabbitMQ, PostgreSQL, the S3 test server: `bash .ci/run`
# starts them). Release build. FBSYNC_BENCH_FLUSH_SIZES=1000,5000 changes the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export FBSYNC_TEST_S3_ENDPOINT="${FBSYNC_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo test --release --test reliability flush_cost -- --ignored --nocapture --test-threads 1
