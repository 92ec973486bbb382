#!/usr/bin/env bash
# The chaos benchmark: 100,000 distinct deliveries (5% delivered twice) through ingest, two
# workers and PostgreSQL with all of Spaces' limits, while workers are killed and frozen, the
# broker restarts, the store is down for 30 s and the database for 10 s. Prints stored, lost,
# duplicated, dead-lettered, requests over a limit and the time to drain.
#
# Needs what the test suite needs (RabbitMQ, PostgreSQL, the S3 test server: `bash .ci/run`
# starts them); it restarts the local RabbitMQ. Release build; several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export FBSYNC_TEST_S3_ENDPOINT="${FBSYNC_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo test --release --test reliability chaos -- --ignored --nocapture --test-threads 1
