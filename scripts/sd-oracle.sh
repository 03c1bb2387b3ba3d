#!/usr/bin/env bash
# Rewrites remixd-diffusion's parity fixtures (crates/remixd-diffusion/tests/fixtures/)
# with the Python reference implementation (diffusers and transformers on PyTorch, CPU, f32).
#
# Needs python3 (3.11 is what the pins were made with) and the Python package registry; the
# virtualenv is made on demand under target/sd-oracle-venv (about 5 GB with torch's CUDA
# libraries) and reused while scripts/sd-oracle/requirements.txt is unchanged.
# CI never runs this: it reads the committed fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sd-oracle-venv
req=scripts/sd-oracle/requirements.txt
fixtures=crates/remixd-diffusion/tests/fixtures
python=${PYTHON:-python3}

stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "== making $venv"
  rm -rf "$venv"
  mkdir -p target
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$req"
  echo "$want" >"$stamp"
fi

# Deterministic CPU run: no GPU, one thread, a fixed hash seed; the script seeds the rest.
export CUDA_VISIBLE_DEVICES=""
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONHASHSEED=0
export CUBLAS_WORKSPACE_CONFIG=:4096:8
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== writing $fixtures"
start=$(date +%s)
"$venv/bin/python" scripts/sd-oracle/make_fixtures.py --out "$fixtures"
echo "== done in $(($(date +%s) - start)) s; $(du -sh "$fixtures" | cut -f1) in $fixtures"
