#!/usr/bin/env bash
# Measures remixd over loopback and prints figures (asserts nothing):
#  - createTask and recordInfo throughput and latency, each as a ratio to GET /healthz
#    of the same server measured in the same run (wrk, installed here when missing);
#  - the preview engine's time per image at 1024x1024.
# Usage: scripts/bench.sh [seconds per endpoint, default 10] [connections, default 16]
# Environment: BENCH_DATABASE_URL runs the server on that database (postgres://…; the
# default is SQLite in a temporary directory); BENCH_PREVIEW=0 skips the preview engine.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNS="${2:-16}"

if ! command -v wrk >/dev/null; then
  echo "installing wrk from Debian's packages" >&2
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi

cargo build --release --locked -q -p remixd
BIN=target/release/remixd
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DB_TOML=""
[[ -n "${BENCH_DATABASE_URL:-}" ]] && DB_TOML=$(printf '[database]\nurl = "%s"' "$BENCH_DATABASE_URL")
cat > "$WORK/remixd.toml" <<TOML
data_dir = "$WORK/data"
[server]
listen = "127.0.0.1:$PORT"
$DB_TOML
[limits]
create_per_10s = 1000000
query_per_s = 1000000
TOML
# The API role alone: tasks pile up in the queue, so the figures are the API's.
RUST_LOG=warn "$BIN" serve --role api --config "$WORK/remixd.toml" >"$WORK/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  sleep 0.1
done
"$BIN" credits add --config "$WORK/remixd.toml" --account default 1000000000 >/dev/null
KEY=$(cat "$WORK/data/default.key")
BODY='{"model":"ideogram/character-remix","input":{"prompt":"bench","image_url":"http://127.0.0.1:9/a.png","reference_image_urls":["http://127.0.0.1:9/b.png"],"image_size":"square"}}'
TASK=$(curl -sf -X POST "http://127.0.0.1:$PORT/api/v1/jobs/createTask" -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' -d "$BODY" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["taskId"])')

cat > "$WORK/create.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA

run() { # name, url, extra args...
  local name=$1 url=$2; shift 2
  wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$@" "$url" >"$WORK/$name.txt"
  python3 - "$WORK/$name.txt" "$name" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def dur(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s); v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p = {k: dur(v) for k, v in re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.M)}
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(f"{sys.argv[2]} {rps:.1f} {p['50']:.3f} {p['99']:.3f} {errs.group(1) if errs else 0}")
PY
}

echo "remixd loopback benchmark: ${DURATION}s per endpoint, $CONNS connections, wrk -t2, $(nproc) cores, database ${BENCH_DATABASE_URL:-SQLite}"
R_H=$(run healthz "http://127.0.0.1:$PORT/healthz")
R_Q=$(run recordInfo "http://127.0.0.1:$PORT/api/v1/jobs/recordInfo?taskId=$TASK" -H "Authorization: Bearer $KEY")
R_C=$(run createTask "http://127.0.0.1:$PORT/api/v1/jobs/createTask" -s "$WORK/create.lua")
python3 - "$R_H" "$R_Q" "$R_C" <<'PY'
import sys
rows = [r.split() for r in sys.argv[1:]]
base = rows[0]
print(f"{'endpoint':<12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'req/s vs healthz':>17} {'p50 vs healthz':>15}")
for name, rps, p50, p99, errs in rows:
    print(f"{name:<12} {float(rps):>10.1f} {float(p50):>8.3f} {float(p99):>8.3f} {errs:>8} "
          f"{float(rps)/float(base[1]):>17.3f} {float(p50)/float(base[2]):>15.2f}")
PY
if [[ "${BENCH_PREVIEW:-1}" != 0 ]]; then
  echo
  "$BIN" bench preview --size square_hd --iterations 20
fi
