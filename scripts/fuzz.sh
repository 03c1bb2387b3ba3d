#!/usr/bin/env bash
# Fuzzes remixd's input parsers with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      (default: all, 60 s per target)
#
# Targets (fuzz/fuzz_targets/): create_task, image, settings, upload. Not part of the
# test suite or CI: runs are random and long. What it needs:
# - cargo-fuzz, installed on first use into target/tools (`cargo install`, about 3 min);
# - a C++ compiler (libfuzzer-sys builds libFuzzer from source);
# - nightly compiler flags (-Zsanitizer, sanitizer coverage). On the stable toolchain
#   the script sets RUSTC_BOOTSTRAP=1, which unlocks them (stable ships the ASan
#   runtime); FUZZ_TOOLCHAIN=nightly uses a nightly toolchain instead.
# The first build compiles the dependency tree instrumented into target/fuzz (40 min on
# two busy cores for the three light targets; `settings` adds the binary crate, with
# candle); later builds are incremental.
#
# New inputs go to fuzz/corpus/TARGET (ignored by git), seeded from fuzz/seeds/TARGET
# (committed). A crash leaves its input in fuzz/artifacts/TARGET/; reproduce it with
#   scripts/fuzz.sh TARGET 0 fuzz/artifacts/TARGET/crash-…
# (a third argument runs just that input). The exit status is 1 when a target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(create_task image settings upload)
which="${1:-all}"
seconds="${2:-60}"
reproduce="${3:-}"

if [[ "$which" == all ]]; then
  targets=("${TARGETS[@]}")
elif [[ " ${TARGETS[*]} " == *" $which "* ]]; then
  targets=("$which")
else
  echo "unknown target $which (known: ${TARGETS[*]} or all)" >&2
  exit 2
fi
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number" >&2; exit 2; }

tools="$PWD/target/tools"
if [[ ! -x "$tools/bin/cargo-fuzz" ]]; then
  echo "== installing cargo-fuzz into $tools"
  cargo install --locked --root "$tools" cargo-fuzz
fi
cargo_fuzz=("$tools/bin/cargo-fuzz")
if [[ -n "${FUZZ_TOOLCHAIN:-}" ]]; then
  export RUSTUP_TOOLCHAIN="$FUZZ_TOOLCHAIN"
else
  export RUSTC_BOOTSTRAP=1
fi
common=(--fuzz-dir fuzz --target-dir target/fuzz --debug-assertions)

# Per-target libFuzzer options. `image` checks the decoder's memory bound: one
# allocation over 96 MiB is a crash (the decoder is allowed 16 bytes a pixel of its
# 65,536-pixel limit plus 64 MiB), and so is a process over 1 GiB (ASan included).
options() {
  case "$1" in
    image) echo "-rss_limit_mb=1024 -malloc_limit_mb=96 -max_len=16384" ;;
    create_task) echo "-rss_limit_mb=1024 -malloc_limit_mb=64 -max_len=8192 -dict=fuzz/dicts/create_task.dict" ;;
    settings) echo "-rss_limit_mb=1024 -malloc_limit_mb=64 -max_len=8192" ;;
    upload) echo "-rss_limit_mb=1024 -malloc_limit_mb=64 -max_len=8192" ;;
  esac
}

# Only `settings` needs the binary crate (candle and all): a feature of the fuzz crate.
features() {
  if [[ "$1" == settings ]]; then echo "--features settings"; fi
}

echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
  # shellcheck disable=SC2046
  "${cargo_fuzz[@]}" build "${common[@]}" $(features "$t") "$t"
done

if [[ -n "$reproduce" ]]; then
  t="${targets[0]}"
  # shellcheck disable=SC2046
  exec "${cargo_fuzz[@]}" run "${common[@]}" $(features "$t") "$t" "$reproduce" -- $(options "$t")
fi

failed=()
mkdir -p target/fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="target/fuzz/logs/$t.log"
  echo "== fuzzing $t for ${seconds}s (log: $log)"
  status=0
  # shellcheck disable=SC2046
  "${cargo_fuzz[@]}" run "${common[@]}" $(features "$t") "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 $(options "$t") \
    >"$log" 2>&1 || status=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
  rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
  cov=$(grep -oE '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 |
    sed -E 's/.*(cov: [0-9]+ ft: [0-9]+ corp: [^ ]+).*/\1/')
  echo "   executions: ${runs:-?} (${speed:-?}/s), ${cov:-no coverage line}, peak RSS ${rss:-?} MB"
  crashes=$(grep -oE '(Test unit|artifact) written to [^ ]+' "$log" | awk '{print $NF}' | sort -u || true)
  if [[ $status -ne 0 || -n "$crashes" ]]; then
    failed+=("$t")
    echo "   FAILED (exit $status); the report:"
    grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY|.*ERROR: libFuzzer)' "$log" | head -5 | sed 's/^/     /'
    for c in $crashes; do echo "   crash input: $c"; done
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "== crashed: ${failed[*]}"
  exit 1
fi
echo "== no crash in ${targets[*]}"
