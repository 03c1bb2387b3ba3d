#!/usr/bin/env bash
# Rewrites remixd-diffusion's parity fixtures (crates/remixd-diffusion/tests/fixtures/)
# with the Python reference implementation (diffusers and transformers on PyTorch, CPU, f32).
#
# Needs python3 (3.11 is what the pins were made with) and the Python package registry; the
# virtualenv is made on demand under target/sd-oracle-venv by scripts/sd-oracle/venv.sh (about
# 5 GB with torch's CUDA libraries) and reused while scripts/sd-oracle/requirements.txt is
# unchanged. scripts/bench-sd.sh shares it.
# CI never runs this: it reads the committed fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."

fixtures=crates/remixd-diffusion/tests/fixtures

# shellcheck source=scripts/sd-oracle/venv.sh
source scripts/sd-oracle/venv.sh

# Deterministic CPU run: no GPU, one thread, a fixed hash seed; the script seeds the rest.
export CUDA_VISIBLE_DEVICES=""
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONHASHSEED=0
export CUBLAS_WORKSPACE_CONFIG=:4096:8
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== writing $fixtures"
start=$(date +%s)
"$SD_ORACLE_PYTHON" scripts/sd-oracle/make_fixtures.py --out "$fixtures" "$@"
echo "== done in $(($(date +%s) - start)) s; $(du -sh "$fixtures" | cut -f1) in $fixtures"
