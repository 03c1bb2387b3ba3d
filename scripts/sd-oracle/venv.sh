# Sourced (not run) from the repository root by scripts/sd-oracle.sh and scripts/bench-sd.sh.
# Makes the Python reference's virtualenv under target/sd-oracle-venv when it is missing or
# was made from another scripts/sd-oracle/requirements.txt, and sets SD_ORACLE_PYTHON to its
# interpreter. Needs python3 (3.11 is what the pins were made with; $PYTHON overrides) and the
# Python package registry the first time; about 5 GB with torch's CUDA libraries.
sd_oracle_venv=target/sd-oracle-venv
sd_oracle_req=scripts/sd-oracle/requirements.txt
sd_oracle_stamp="$sd_oracle_venv/.requirements.sha256"
sd_oracle_want=$(sha256sum "$sd_oracle_req" | cut -d' ' -f1)
if [[ ! -x "$sd_oracle_venv/bin/python" || ! -f "$sd_oracle_stamp" ||
  "$(cat "$sd_oracle_stamp")" != "$sd_oracle_want" ]]; then
  echo "== making $sd_oracle_venv" >&2
  rm -rf "$sd_oracle_venv"
  mkdir -p target
  "${PYTHON:-python3}" -m venv "$sd_oracle_venv"
  "$sd_oracle_venv/bin/python" -m pip install --quiet --upgrade pip
  "$sd_oracle_venv/bin/python" -m pip install --quiet -r "$sd_oracle_req"
  echo "$sd_oracle_want" >"$sd_oracle_stamp"
fi
SD_ORACLE_PYTHON="$sd_oracle_venv/bin/python"
