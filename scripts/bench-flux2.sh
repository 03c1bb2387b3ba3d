#!/usr/bin/env bash
# FLUX.2 [klein] 4B on this machine's CPU: remixd against diffusers (PyTorch), part by part, same
# inputs and thread count. Prints figures and asserts nothing.
#
# The model is FLUX.2 [klein] 4B's architecture (Flux2Transformer2DModel, 3.9 B parameters; a
# Qwen3-4B text encoder, 4.0 B; AutoencoderKLFlux2, 84 M) with fixed-seed random weights (full
# size: the cost is the real model's), made once under target/flux2-klein-4b-random (about 16 GB,
# bf16 safetensors) by scripts/sd-oracle/bench_flux2.py; making it takes a few minutes and about
# 9 GB of memory (one component at a time, in bf16). Parts, each timed as the median of the
# repeats after one warm-up (diffusers counts FLOPs on it):
#  - text:       encode_prompt of one prompt (chat template, padded to 512 tokens; Qwen3 hidden
#                states 9, 18, 27 -> [1, 512, 7680]);                                 ~4.3 TFLOP
#  - tr512:      one transformer forward for a 512x512 output with one 512x512 reference:
#                3 x 1024 image tokens + 512 text tokens, timestep 0.5;                 ~26 TFLOP
#  - tr1024:     the same for 1024x1024: 3 x 4096 image tokens + 512 text tokens;      ~129 TFLOP
#  - vae_encode: a 512x512 image to packed, normalised latents [1, 128, 32, 32];        ~1.1 TFLOP
#  - vae_decode: latents [1, 32, 64, 64] to a 512x512 image;                            ~2.5 TFLOP
#  - image:      a whole 4-step 512x512 remix (base image, one reference, all-white mask,
#                strength 1, guidance 1): text encode + pipeline call;                  ~113 TFLOP
# and each side's f32 matmul peak. Precisions: diffusers loads every component in f32 and computes
# in f32 (the bf16 weights widened on load); remixd says in its figures what it computes in and
# holds its weights in (compute_dtype, weights_dtype); the table shows both.
# Memory plan: every part runs in its own process, first diffusers' then remixd's, so the two
# never hold memory at the same time and each process's peak RSS is that part's alone. diffusers
# in f32 holds 16 GB for the transformer or for the text encoder, never both: its image part runs
# the text encoder first, frees it, then runs the pipeline without one (prompt_embeds=). The
# largest, tr1024 on diffusers, needs about 20 GB (its weights plus a few GB of activations):
# run this on a machine with 24 GB or more and little else running. The peak RSS counts the
# touched pages of memory-mapped weight files too (up to 8 GB more while loading; the kernel can
# drop them); diffusers also reports the peak of the anonymous part (peak_anon_mb).
# The table gives seconds, the ratio diffusers/remixd (> 1: remixd is faster), GFLOP (counted on
# diffusers) and GFLOP/s, each side's peak RSS and precisions. Figures land in
# target/bench-flux2/{diffusers,remixd}.json (one object per part under "parts"), each part-run's
# own output and log under target/bench-flux2/t<threads>-r<repeats>/.
#
# Usage: scripts/bench-flux2.sh [threads, default 2] [repeats, default 1] [parts, default all]
#   parts: all, or a comma-separated list of text, tr512, tr1024, vae_encode, vae_decode, image
#   (run cheapest first whatever the order given).
# Needs python3 and, the first time, the Python package registry (scripts/sd-oracle/venv.sh
# makes the virtualenv, about 5 GB), and about 17 GB of disk for the model. REMIXD_BIN=path uses
# that remixd binary instead of building one; BENCH_FLUX2_KEEP=1 keeps the part-runs an earlier,
# interrupted run with the same threads and repeats finished, and runs only the others.
# Expect hours: with 2 cores (torch f32 at about 100 GFLOP/s), the diffusers side takes about
# 1.5 to 2 hours at repeats 1 (tr1024 about 50 min with its warm-up, image about 30, tr512 about
# 10, loading 16 GB of weights a minute or two per part), remixd's side as long as its speed
# makes it; so about 3 to 4 hours in all. Each further repeat adds about 50 min per side.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
repeats="${2:-1}"
parts_arg="${3:-all}"

for v in threads repeats; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $v must be a positive integer, not '${!v}'" >&2; exit 2; }
done
# The order parts run in: cheapest first, so a broken side shows early.
run_order=(text vae_encode vae_decode tr512 image tr1024)
if [[ "$parts_arg" == all ]]; then
  parts=("${run_order[@]}")
else
  IFS=, read -r -a asked <<<"$parts_arg"
  ((${#asked[@]})) || { echo "error: no parts in '$parts_arg'" >&2; exit 2; }
  for p in "${asked[@]}"; do
    [[ " ${run_order[*]} " == *" $p "* ]] ||
      { echo "error: unknown part '$p' (parts: all, or a comma-separated list of ${run_order[*]})" >&2; exit 2; }
  done
  parts=()
  for p in "${run_order[@]}"; do
    [[ " ${asked[*]} " == *" $p "* ]] && parts+=("$p")
  done
fi

model=target/flux2-klein-4b-random
out=target/bench-flux2
runs="$out/t$threads-r$repeats"
bench_py=scripts/sd-oracle/bench_flux2.py

# shellcheck source=scripts/sd-oracle/venv.sh
source scripts/sd-oracle/venv.sh

# CPU only, no network, the same thread count for both sides' thread pools (torch also gets
# torch.set_num_threads, remixd --threads and RAYON_NUM_THREADS).
export CUDA_VISIBLE_DEVICES=""
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"

mem_gb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1048576 }' /proc/meminfo 2>/dev/null || echo 0)
if ((mem_gb > 0 && mem_gb < 22)); then
  echo "warning: this machine has $mem_gb GB of memory; diffusers' transformer and text encoder parts" \
    "hold 16 GB of f32 weights, tr1024 about 20 GB in all" >&2
fi

start=$(date +%s)
"$SD_ORACLE_PYTHON" "$bench_py" make-model --out "$model" --threads "$threads"
echo "== model: $(du -sh "$model" | cut -f1) in $model" >&2

if [[ -n "${REMIXD_BIN:-}" ]]; then
  bin="$REMIXD_BIN"
else
  echo "== building remixd (release)" >&2
  cargo build --release --locked -q -p remixd
  bin=target/release/remixd
fi
# Fail before the long diffusers runs when the binary cannot run the other side.
if ! "$bin" bench flux2 --help >/dev/null 2>&1; then
  echo "error: '$bin bench flux2' does not run (no such binary, or a remixd without the FLUX.2" \
    "benchmark command); nothing was measured" >&2
  exit 1
fi

mkdir -p "$runs"
rm -f "$out/diffusers.json" "$out/remixd.json"
if [[ "${BENCH_FLUX2_KEEP:-}" != 1 ]]; then
  for p in "${parts[@]}"; do
    rm -f "$runs/diffusers.$p.json" "$runs/remixd.$p.json"
  done
fi

# Rewrites $out/<side>.json from the part-runs of this invocation's parts that succeeded.
merge() {
  local side=$1 p args=()
  for p in "${parts[@]}"; do
    [[ -s "$runs/$side.$p.json" ]] && args+=("$p=$runs/$side.$p.json")
  done
  ((${#args[@]})) || return 0
  "$SD_ORACLE_PYTHON" "$bench_py" merge --impl "$side" --out "$out/$side.json" "${args[@]}"
}

# One part on one side, in its own process: stdout (one JSON object) to $runs/<side>.<part>.json,
# stderr shown and kept in $runs/<side>.<part>.log. Returns non-zero when it fails.
run_part() {
  local side=$1 part=$2 t rc=0
  local json="$runs/$side.$part.json" log="$runs/$side.$part.log"
  if [[ -s "$json" ]]; then
    echo "== $side $part: kept from an earlier run ($json)" >&2
    merge "$side"
    return
  fi
  rm -f "$json.bad"
  echo "== $side $part: $threads threads, $repeats repeats" >&2
  t=$(date +%s)
  if [[ "$side" == diffusers ]]; then
    "$SD_ORACLE_PYTHON" "$bench_py" diffusers --model "$model" --threads "$threads" --part "$part" \
      --repeats "$repeats" >"$json.tmp" 2> >(tee "$log" >&2) || rc=$?
  else
    RAYON_NUM_THREADS="$threads" "$bin" bench flux2 --model-dir "$model" --threads "$threads" --part "$part" \
      --repeats "$repeats" >"$json.tmp" 2> >(tee "$log" >&2) || rc=$?
  fi
  if ((rc != 0)); then
    echo "== $side $part FAILED (exit $rc) after $(($(date +%s) - t)) s; log: $log" >&2
    rm -f "$json.tmp"
    return 1
  fi
  # The object must keep the contract (checked alone, so a bad one spoils nothing else).
  if ! "$SD_ORACLE_PYTHON" "$bench_py" merge --impl "$side" --out "$json.check" "$part=$json.tmp"; then
    mv "$json.tmp" "$json.bad"
    echo "== $side $part FAILED: its output breaks the JSON contract; kept in $json.bad" >&2
    return 1
  fi
  rm -f "$json.check"
  mv "$json.tmp" "$json"
  echo "== $side $part: $(($(date +%s) - t)) s" >&2
  merge "$side"
}

failed=()
for part in "${parts[@]}"; do
  for side in diffusers remixd; do
    run_part "$side" "$part" || failed+=("$side $part")
  done
done

echo
"$SD_ORACLE_PYTHON" "$bench_py" table --diffusers "$out/diffusers.json" --remixd "$out/remixd.json"
echo "== done in $(($(date +%s) - start)) s" >&2
if ((${#failed[@]})); then
  printf 'error: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
