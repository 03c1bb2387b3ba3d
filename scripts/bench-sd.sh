#!/usr/bin/env bash
# Stable Diffusion 1.5 on this machine's CPU: remixd (candle) against diffusers (PyTorch), both
# in f32, same sizes, steps and thread count, in one run. Prints figures and asserts nothing.
#
# The model is SD 1.5's architecture with fixed-seed random weights (full size: the cost is the
# real model's), made once under target/sd15-random (about 2 GB, f16 safetensors) by
# scripts/sd-oracle/bench_sd.py. Measured on each side, median of the repeats after a warm-up:
#  - one UNet forward at batch 1 and at batch 2 (64x64 latents, 77 tokens, timestep 500);
#  - VAE encode of a 512x512 image, VAE decode of 64x64 latents;
#  - one whole 512x512 img2img image (PNDM, the given steps and strength, guidance 7.5; the
#    diffusers half times max(1, repeats / 2) images after a one-step warm-up);
#  - the f32 matmul peak of each side's own library (torch, candle).
# The table gives seconds, the ratio diffusers/remixd (> 1: remixd is faster), and each side's
# GFLOP/s as a share of its own matmul peak, with FLOPs counted once, on diffusers.
# Figures land in target/bench-sd/{diffusers,remixd}.json.
#
# Usage: scripts/bench-sd.sh [threads, default 2] [steps, default 10] [strength, default 0.5]
#                            [repeats, default 3]
# Needs python3 and, the first time, the Python package registry (scripts/sd-oracle/venv.sh
# makes the virtualenv, about 5 GB). REMIXD_BIN=path uses that remixd binary instead of
# building one. Expect minutes: on 2 cores the diffusers half alone takes about 5 (repeats 3),
# and making the model about 1, once.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
steps="${2:-10}"
strength="${3:-0.5}"
repeats="${4:-3}"

for v in threads steps repeats; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $v must be a positive integer, not '${!v}'" >&2; exit 2; }
done
[[ "$strength" =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v s="$strength" 'BEGIN { exit !(s > 0 && s <= 1) }' ||
  { echo "error: strength must be a number in (0, 1], not '$strength'" >&2; exit 2; }

model=target/sd15-random
out=target/bench-sd
bench_py=scripts/sd-oracle/bench_sd.py

# shellcheck source=scripts/sd-oracle/venv.sh
source scripts/sd-oracle/venv.sh

# CPU only, no network, the same thread count for both sides' thread pools (torch also gets
# torch.set_num_threads, remixd --threads and RAYON_NUM_THREADS).
export CUDA_VISIBLE_DEVICES=""
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"

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
# Fail before the long diffusers half when the binary cannot run the other half.
if ! "$bin" bench sd --help >/dev/null 2>&1; then
  echo "error: '$bin bench sd' does not run (no such binary, or a remixd without the SD" \
    "benchmark command); nothing was measured" >&2
  exit 1
fi

mkdir -p "$out"
rm -f "$out/diffusers.json" "$out/remixd.json"

echo "== diffusers: $threads threads, $steps steps, strength $strength, $repeats repeats" >&2
t=$(date +%s)
"$SD_ORACLE_PYTHON" "$bench_py" diffusers --model "$model" --threads "$threads" \
  --steps "$steps" --strength "$strength" --repeats "$repeats" >"$out/diffusers.json.tmp"
mv "$out/diffusers.json.tmp" "$out/diffusers.json"
echo "== diffusers half: $(($(date +%s) - t)) s" >&2

echo "== remixd: $threads threads, $steps steps, strength $strength, $repeats repeats" >&2
t=$(date +%s)
RAYON_NUM_THREADS="$threads" "$bin" bench sd --model-dir "$model" --threads "$threads" --steps "$steps" \
  --strength "$strength" --repeats "$repeats" >"$out/remixd.json.tmp"
mv "$out/remixd.json.tmp" "$out/remixd.json"
echo "== remixd half: $(($(date +%s) - t)) s" >&2

echo
"$SD_ORACLE_PYTHON" "$bench_py" table --diffusers "$out/diffusers.json" --remixd "$out/remixd.json"
echo "== done in $(($(date +%s) - start)) s" >&2
