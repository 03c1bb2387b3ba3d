#!/usr/bin/env bash
# Scale-out figures on one machine, printed, never asserted:
#  - queue claims and creates per second: SQLite in one process, PostgreSQL in one
#    process and in two (`remixd bench queue`);
#  - end-to-end tasks per second with the preview engine at 512x512: SQLite in one
#    process, PostgreSQL with one worker process and with two (scripts/bench-scale.py);
#  - createTask and recordInfo throughput against GET /healthz of the same server, on
#    SQLite and on PostgreSQL (scripts/bench.sh, wrk).
# A throwaway PostgreSQL cluster is started as the test suite starts it (scripts/postgres.sh).
# Usage: scripts/bench-scale.sh [end-to-end tasks, default 300] [queue tasks, default 3000]
#                               [wrk seconds per endpoint, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS="${1:-300}"
CLAIM_TASKS="${2:-3000}"
SECONDS_PER="${3:-10}"

cargo build --release --locked -q -p remixd
# shellcheck source=scripts/postgres.sh
source scripts/postgres.sh
postgres_start
trap postgres_stop EXIT

python3 scripts/bench-scale.py target/release/remixd "$REMIXD_TEST_POSTGRES_URL" "$TASKS" "$CLAIM_TASKS"

echo
echo "== createTask and recordInfo against /healthz, SQLite"
BENCH_PREVIEW=0 scripts/bench.sh "$SECONDS_PER"
echo
echo "== the same on PostgreSQL (the rate limits are counted in the database)"
psql "$REMIXD_TEST_POSTGRES_URL" -qc 'DROP SCHEMA IF EXISTS scale_http CASCADE; CREATE SCHEMA scale_http'
BENCH_PREVIEW=0 BENCH_DATABASE_URL="$REMIXD_TEST_POSTGRES_URL?options=-csearch_path%3Dscale_http" \
  scripts/bench.sh "$SECONDS_PER"
