#!/usr/bin/env bash
# The worker-cost benchmark (tests/reliability/worker_cost.rs): the workers' CPU time per 1,000
# stored messages at 2,000 messages/s over 50 conversations, no store limits, on SQLite and on
# PostgreSQL, with one and with two workers.
#
# Needs what the test suite needs (RabbitMQ, PostgreSQL, the S3 test server: `bash .ci/run`
# starts them). Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
export FBSYNC_TEST_S3_ENDPOINT="${FBSYNC_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo test --release --test reliability worker_cost -- --ignored --nocapture --test-threads 1
