#!/usr/bin/env bash
# Every benchmark in one command, printing one table: each figure beside the bound it is held
# to, measured in the same run on the same machine, and their ratio.
#
#   scripts/bench.sh                 # all scenarios (about 30 minutes after the build)
#   BENCH_SKIP="chaos backfill" scripts/bench.sh
#
# Scenarios:
#   ingest        open-throttle webhook deliveries into `fbsync ingest`, against the broker's own
#                 confirmed-publish rate (the load generator publishing straight to RabbitMQ),
#                 the CPU time (user + system) per message of ingest, the broker and the load
#                 generator, and (with valgrind) ingest's instructions per delivery
#                 (scripts/bench-ingest-instructions.sh)
#   e2e           `fbsync up` (SQLite, local store, which has no budgets), 100,000 open-throttle
#                 deliveries over 500 conversations from the first POST to the last message
#                 stored, against ingest alone (5 s, as above) in BENCH_E2E_ROUNDS alternated
#                 rounds (default 3), reported as medians
#   worker        the workers' CPU per 1,000 stored messages at 2,000 messages/s over 50
#                 conversations, SQLite and PostgreSQL, one and two workers
#                 (scripts/bench-worker-cost.sh)
#   flush         the worker's CPU for one flush into conversations of 1,000, 10,000 and 100,000
#                 events, appended and fully merged (scripts/bench-flush-cost.sh)
#   spaces        ingest and a worker through today's Spaces limits (300 writes/s, 500
#                 operations/s, no per-object window, counted by the tests' limits layer), 20,000
#                 messages over 1,000 conversations at 2,000/s: writes/s against the bucket's 300,
#                 the last message against max(sending, writes made / 300 per s)
#                 (scripts/bench-bucket.sh)
#   busy          one conversation, a message a second for a minute, at the defaults, behind
#                 today's Spaces limits and on the local store: visibility p99 against 2 s
#   slower        a bucket taking 40 writes/s while configured for 300: SlowDown answers after
#                 the first 10 s against the requests sent then (bound 5%)
#   capacity      twice the bucket's capacity (10 writes/s, 1,200 busy conversations): backlog
#                 and oldest staged age over time, visibility (scripts/bench-bucket.sh)
#   backfill      a Page of 10,000 conversations x 20 messages from the fake Graph API through
#                 Spaces' limits, against 10,000 writes at 150/s (scripts/bench-backfill.sh)
#   hostile       1,000 unsigned clients each uploading a body of the limit (1 MiB) but its last
#                 byte and stalling, beside 200 signed deliveries: ingest's peak RSS against
#                 300 MB, with the default byte budget and with only the in-flight count
#   chaos         100,000 deliveries under every fault (scripts/chaos.sh; restarts RabbitMQ)
#
# Needs what the tests need (RabbitMQ, PostgreSQL, the S3 test server): run `bash .ci/run` once,
# or start them as it does. Release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
export FBSYNC_TEST_S3_ENDPOINT="${FBSYNC_TEST_S3_ENDPOINT:-http://127.0.0.1:5055}"
skip=" ${BENCH_SKIP:-} "
target=${CARGO_TARGET_DIR:-target}/release
out=$(mktemp -d /tmp/fbsync-bench-all-XXXXXX)
trap 'rm -rf "$out"' EXIT

machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(rabbitmqctl version 2>/dev/null | sed 's/^/RabbitMQ /' || echo 'RabbitMQ')"
echo "machine: $machine"
cargo build --release --bin fbsync --example loadgen
rows=()
row() { rows+=("| $1 | $2 | $3 | $4 |"); }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# The number after "$2" on the line of $1 that starts with it.
field() { awk -v key="$2" 'index($0, key) == 1 { sub(key, ""); print $1; exit }' "$1"; }
# utime + stime of process $1 in clock ticks (fields 14 and 15 of /proc/PID/stat, counted after
# the command name, which may hold spaces).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# `fbsync ingest` on its own, for the ingest-alone rounds of the ingest and e2e scenarios.
ingest="" ingest_port="" ingest_run=""
start_ingest() {
  ingest_port=$((5600 + RANDOM % 100)) ingest_run=bench-ingest-$RANDOM
  FACEBOOK_APP_SECRET=bench FACEBOOK_VERIFY_TOKEN=v QUEUE_PREFIX=$ingest_run \
    INGEST_ADDR=127.0.0.1:$ingest_port INGEST_METRICS_ADDR=127.0.0.1:0 RUST_LOG=warn \
    "$target/fbsync" ingest &
  ingest=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ingest_port/readyz" >/dev/null && break; sleep 0.1; done
}
stop_ingest() {
  if [ -n "$ingest" ]; then
    kill "$ingest"; wait "$ingest" || true
    "$target/examples/loadgen" --delete-topology "$ingest_run" >/dev/null
    ingest=""
  fi
}
trap 'stop_ingest; rm -rf "$out"' EXIT
# One round of ingest alone: 5 s of open-throttle deliveries, 128 in flight; the load
# generator's report goes to $1.
ingest_round() {
  FACEBOOK_APP_SECRET=bench "$target/examples/loadgen" --url "http://127.0.0.1:$ingest_port/facebook/webhook" \
    --rate 0 --concurrency 128 --duration-secs 5 | tee "$1"
}

if [[ $skip != *" ingest "* ]]; then
  echo "== ingest"
  # Rounds of the broker's own rate and ingest's, alternated, 5 s each: each ratio compares
  # figures taken seconds apart, so a machine whose speed drifts (it is shared) moves both.
  # The figures reported are the medians of the rounds.
  rounds=${BENCH_INGEST_ROUNDS:-3}
  if ! (( rounds >= 1 )); then echo "BENCH_INGEST_ROUNDS must be at least 1" >&2; exit 2; fi
  start_ingest
  # The broker's CPU is read around each round too (its oldest Erlang VM process, when it runs
  # on this machine), and the load generator prints its own: the three share the machine's
  # cores, so what the generator and the broker spend per message bounds both rates. (The
  # broker's figure for its own rounds includes deleting the round's queue.)
  broker_pid=$(pgrep -o -f beam.smp || true)
  brokers=() ingests=() ratios=() ticks=0 accepted=0 published=0
  broker_ticks_raw=0 broker_ticks_ingest=0 loadgen_raw=() loadgen_ingest=()
  broker_cpu() { if [ -n "$broker_pid" ]; then cpu_ticks "$broker_pid"; else echo 0; fi; }
  for round in $(seq 1 "$rounds"); do
    b0=$(broker_cpu)
    "$target/examples/loadgen" --raw-publish --rate 0 --concurrency 128 --duration-secs 5 | tee "$out/raw.txt"
    b1=$(broker_cpu)
    cpu_before=$(cpu_ticks "$ingest")
    ingest_round "$out/ingest.txt"
    cpu_after=$(cpu_ticks "$ingest")
    b2=$(broker_cpu)
    ticks=$((ticks + cpu_after - cpu_before))
    broker_ticks_raw=$((broker_ticks_raw + b1 - b0))
    broker_ticks_ingest=$((broker_ticks_ingest + b2 - b1))
    accepted=$((accepted + $(field "$out/ingest.txt" "accepted ")))
    published=$((published + $(field "$out/raw.txt" "accepted ")))
    loadgen_raw+=("$(awk '/^cpu / { gsub(/\(/, "", $4); print $4 }' "$out/raw.txt")")
    loadgen_ingest+=("$(awk '/^cpu / { gsub(/\(/, "", $4); print $4 }' "$out/ingest.txt")")
    brokers+=("$(field "$out/raw.txt" "accepted/s")")
    ingests+=("$(field "$out/ingest.txt" "accepted/s")")
    ratios+=("$(ratio "${ingests[-1]}" "${brokers[-1]}")")
    echo "round $round: ingest ${ingests[-1]}/s, broker ${brokers[-1]}/s, ratio ${ratios[-1]}"
  done
  stop_ingest
  broker=$(median "${brokers[@]}")
  ingest_rate=$(median "${ingests[@]}")
  row "ingest: deliveries/s, open throttle, 128 in flight (median of $rounds alternated rounds)" "$ingest_rate" "$broker (broker's confirmed publishes/s)" "$(median "${ratios[@]}") (rounds: ${ratios[*]})"
  per_message() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v n="$2" \
    'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "-" }'; }
  row "ingest: CPU per delivery, µs (ingest process, user + system)" "$(per_message "$ticks" "$accepted")" "-" "-"
  if [ -n "$broker_pid" ]; then
    row "the broker's CPU per message, µs: published by ingest / by the load generator" \
      "$(per_message "$broker_ticks_ingest" "$accepted") / $(per_message "$broker_ticks_raw" "$published")" "-" "-"
  fi
  row "the load generator's CPU per message, µs (median): posting to ingest / publishing" \
    "$(median "${loadgen_ingest[@]}") / $(median "${loadgen_raw[@]}")" "-" "-"
  if command -v valgrind >/dev/null; then
    scripts/bench-ingest-instructions.sh | tee "$out/instructions.txt" || echo "the instruction count failed"
    row "ingest: instructions per delivery (callgrind; barely moved by the machine's load)" \
      "$(sed -n 's/^instructions per delivery *//p' "$out/instructions.txt")" "-" "-"
  fi
fi

if [[ $skip != *" e2e "* ]]; then
  echo "== e2e"
  # Rounds of ingest alone (as in the ingest scenario, 5 s) and of the whole pipeline (10 s),
  # alternated like ingest's and the broker's: each ratio compares figures taken seconds apart.
  rounds=${BENCH_E2E_ROUNDS:-3}
  if ! (( rounds >= 1 )); then echo "BENCH_E2E_ROUNDS must be at least 1" >&2; exit 2; fi
  stored_rates=() alone_rates=() e2e_ratios=()
  for round in $(seq 1 "$rounds"); do
    start_ingest
    ingest_round "$out/e2e-alone-$round.txt"
    stop_ingest
    alone_rates+=("$(field "$out/e2e-alone-$round.txt" "accepted/s")")
    scripts/bench-e2e.sh 0 120 500 0 "" 100000 | tee "$out/e2e-$round.txt"
    stored_rates+=("$(awk '/^stored/ { for (i = 1; i <= NF; i++) if ($i ~ /^\(/) { gsub(/[(\/s]/, "", $i); print $i; exit } }' "$out/e2e-$round.txt")")
    e2e_ratios+=("$(ratio "${stored_rates[-1]}" "${alone_rates[-1]}")")
    echo "round $round: stored ${stored_rates[-1]}/s end to end, ingest alone ${alone_rates[-1]}/s, ratio ${e2e_ratios[-1]}"
  done
  row "end to end: messages stored/s, 100,000 open-throttle deliveries over 500 conversations, local store (median of $rounds alternated rounds)" "$(median "${stored_rates[@]}")" "$(median "${alone_rates[@]}") (ingest alone, the same rounds)" "$(median "${e2e_ratios[@]}") (rounds: ${e2e_ratios[*]})"
  row "end to end: visibility p50 / p99, s (each round)" "$(for round in $(seq 1 "$rounds"); do grep -m1 '^visibility' "$out/e2e-$round.txt" | awk '{printf "%s / %s; ", $4, $8}'; done | sed 's/; $//')" "-" "-"
  row "end to end: worker peak RSS (each round)" "$(for round in $(seq 1 "$rounds"); do grep -m1 '^worker mem' "$out/e2e-$round.txt" | awk '{printf "%s %s; ", $4, $5}'; done | sed 's/; $//')" "-" "-"
fi

# Rows of a benchmark's "| label | figure | bound | ratio |" tables, each label prefixed.
table_rows() {
  awk -v prefix="$2" -F'|' 'NF == 6 && $2 !~ /^-/ && $3 !~ /figure/ && $2 !~ /^ *(database|events|s) *$/ {
    printf "| %s:%s|%s|%s|%s|\n", prefix, $2, $3, $4, $5 }' "$1"
}
# Whole tables a benchmark printed (its lines that start with "|"), kept for the end.
extra_tables=()
keep_tables() { extra_tables+=("" "$1:" "$(grep '^|' "$2")"); }

if [[ $skip != *" worker "* ]]; then
  echo "== worker"
  scripts/bench-worker-cost.sh | tee "$out/worker.txt"
  keep_tables "workers' CPU per 1,000 stored messages (2,000 messages/s, 50 conversations, no store limits)" "$out/worker.txt"
fi

if [[ $skip != *" flush "* ]]; then
  echo "== flush"
  scripts/bench-flush-cost.sh | tee "$out/flush.txt"
  big=$(awk -F'|' '$2 ~ /^ *100000 *$/ { print $5; exit }' "$out/flush.txt" | sed 's/.*median \([0-9.]*\)).*/\1/')
  full=$(awk -F'|' '$2 ~ /^ *100000 *$/ { gsub(/ /, "", $6); print $6; exit }' "$out/flush.txt")
  if [ -n "$big" ]; then
    row "flush: worker CPU for one new message appended to 100,000 events (21 MB), ms" "$big" "100 (the goal); $full (full merge, same run)" "$(ratio "$big" 100)"
  fi
  keep_tables "flush cost (worker CPU per flush, by conversation size)" "$out/flush.txt"
fi

if [[ $skip != *" spaces "* ]]; then
  echo "== spaces"
  scripts/bench-bucket.sh spaces_burst | tee "$out/spaces.txt"
  while IFS= read -r line; do rows+=("$line"); done < <(table_rows "$out/spaces.txt" "Spaces' limits burst")
  keep_tables "Spaces' limits burst" "$out/spaces.txt"
fi

if [[ $skip != *" busy "* ]]; then
  echo "== busy"
  scripts/bench-bucket.sh busy_conversation | tee "$out/busy.txt"
  while IFS= read -r line; do rows+=("$line"); done < <(table_rows "$out/busy.txt" "busy conversation")
fi

if [[ $skip != *" slower "* ]]; then
  echo "== slower"
  scripts/bench-bucket.sh slower_bucket | tee "$out/slower.txt"
  while IFS= read -r line; do rows+=("$line"); done < <(table_rows "$out/slower.txt" "a bucket slower than configured")
fi

if [[ $skip != *" capacity "* ]]; then
  echo "== capacity"
  scripts/bench-bucket.sh beyond_capacity | tee "$out/capacity.txt"
  while IFS= read -r line; do rows+=("$line"); done < <(table_rows "$out/capacity.txt" "beyond capacity")
  keep_tables "beyond capacity (10 writes/s, 1,200 busy conversations)" "$out/capacity.txt"
fi

if [[ $skip != *" backfill "* ]]; then
  echo "== backfill"
  scripts/bench-backfill.sh | tee "$out/backfill.txt"
  cell() { awk -F'|' -v key="$1" 'index($2, key) { gsub(/ /, "", $3); print $3; exit }' "$out/backfill.txt"; }
  row "backfill: seconds, 10,000 conversations x 20 messages" "$(cell 'everything stored')" "$(cell 'bound:') (10,000 writes at 150/s)" "$(cell 'time / bound')"
  row "backfill: messages stored/s" "$(cell 'messages stored per second')" "-" "-"
  row "backfill: Graph API calls; object writes per conversation" "$(cell 'Graph API calls'); $(cell 'object writes per conversation')" "-" "-"
  row "backfill: requests over a limit; worker peak RSS, MB" "$(cell 'requests over a limit'); $(cell 'worker peak RSS')" "0; 150" "-"
fi

if [[ $skip != *" hostile "* ]]; then
  echo "== hostile"
  cargo test --release --test api bench_slow_uploads_memory -- --ignored --nocapture | tee "$out/hostile.txt"
  while IFS= read -r line; do rows+=("$line"); done < <(table_rows "$out/hostile.txt" "hostile clients")
fi

if [[ $skip != *" chaos "* ]]; then
  echo "== chaos"
  scripts/chaos.sh | tee "$out/chaos.txt"
  cell() { awk -F'|' -v key="$1" 'index($2, key) { gsub(/ /, "", $3); print $3; exit }' "$out/chaos.txt"; }
  row "chaos: stored / lost / duplicated of 100,000" "$(cell 'stored'); $(cell 'lost'); $(cell 'duplicated')" "100000; 0; 0" "-"
  drain=$(cell 'drain after')
  row "chaos: requests over a limit" "$(cell 'requests over a limit')" "0" "-"
  row "chaos: drain after the last delivery, s" "$drain" "300 (one object's PUT window)" "$(ratio "$drain" 300)"
fi

echo
echo "machine: $machine"
echo "| scenario | figure | bound (same run) | ratio |"
echo "|---|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
for line in "${extra_tables[@]}"; do echo "$line"; done
