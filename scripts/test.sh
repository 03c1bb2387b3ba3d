#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test of every crate.
# This is the one test command; .ci/run calls it and the README shows it.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== schemathesis"
scripts/schemathesis.sh

echo "== tests"
# A throwaway PostgreSQL for the PostgreSQL store's tests (installed when missing),
# stopped and deleted when this script exits.
# shellcheck source=scripts/postgres.sh
source scripts/postgres.sh
trap postgres_stop EXIT
postgres_start
# Headless Chromium for the playground's browser tests (installed when missing).
# shellcheck source=scripts/chromium.sh
source scripts/chromium.sh
chromium_ensure
# nextest runs every test in its own process, which the integration tests rely on:
# they share one binary per crate, and the server's metrics recorder is process-wide.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --locked --no-fail-fast
