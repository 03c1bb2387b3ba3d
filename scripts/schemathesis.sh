#!/usr/bin/env bash
# Runs schemathesis against a real `remixd serve` on 127.0.0.1, driven by the server's own
# GET /openapi.json: every documented operation is called with generated requests, and
# every answer must be no server error and must match the document (status code, content
# type, headers, body schema); schema-violating requests must be refused with a 4xx.
#
# Network safety: schemathesis talks only to 127.0.0.1 (the schema URL and --url below).
# remixd itself must not be made to fetch anything either, so two operations are excluded:
#   POST /api/v1/jobs/createTask  (its workers would download the generated image URLs)
#   POST /api/file-url-upload     (the server downloads fileUrl)
# Their generated URLs may name arbitrary public hosts, which remixd's address policy
# allows. The Rust tests (crates/remixd/tests/integration/api.rs, uploads.rs) cover both
# against a loopback image server. The one task this script creates itself (below, so that the task
# endpoints are also tested on a real task) has an upload of this server as its inputs,
# which the worker reads from storage, and no callBackUrl. The server runs with
# `[fetch] allow = []`, so nothing here opens a connection off this machine.
#
# The virtual environment lives in target/schemathesis-venv and is created once.
# Environment: SCHEMATHESIS_MAX_EXAMPLES (default 25), SCHEMATHESIS_SEED (default 1),
# SCHEMATHESIS_TIMEOUT_S (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/schemathesis-venv
if [ ! -x "$VENV/bin/schemathesis" ]; then
  echo "== schemathesis: creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check schemathesis
fi
"$VENV/bin/schemathesis" --version

echo "== schemathesis: building remixd"
cargo build --locked --bin remixd

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port on 127.0.0.1 (the kernel picks it; a race with another process is unlikely).
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
BASE="http://127.0.0.1:$PORT"

cat >"$WORK/remixd.toml" <<EOF
data_dir = "$WORK/data"

[server]
listen = "127.0.0.1:$PORT"
public_url = "$BASE"

[fetch]
allow = []

[limits]
create_per_10s = 1000000
query_per_s = 1000000
uploads_per_10s = 0
upload_quota_bytes = 0
EOF

echo "== schemathesis: starting remixd on $BASE"
target/debug/remixd --config "$WORK/remixd.toml" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 200); do
  if curl -fsS "$BASE/readyz" >/dev/null 2>&1 && [ -s "$WORK/data/default.key" ]; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "remixd exited early:" >&2
    cat "$WORK/server.log" >&2
    exit 1
  fi
  sleep 0.1
done
curl -fsS "$BASE/readyz" >/dev/null
KEY=$(tr -d '[:space:]' <"$WORK/data/default.key")

# Seed one finished task, so that recordInfo, cancel, stream and /files/ are also tested
# on a real task and a real result, not only on unknown ids: upload a PNG, create a task
# whose inputs are that upload (read from storage, no HTTP), wait for it, and hand its id
# and its first result's key to schemathesis as fixed parameter values.
echo "== schemathesis: seeding a task"
python3 - "$BASE" "$KEY" "$WORK/schemathesis.toml" <<'PY'
import base64, json, struct, sys, time, urllib.error, urllib.request, zlib

base, key, out = sys.argv[1], sys.argv[2], sys.argv[3]
assert base.startswith("http://127.0.0.1:"), base

def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + key,
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: {e.code} {e.read()!r}")

def png(w, h):
    rows = (b"\0" + bytes(v for x in range(w) for v in (x * 7 % 256, y * 5 % 256, 128))
            for y in range(h))
    raw = b"".join(rows)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

up = call("POST", "/api/file-base64-upload",
          {"base64Data": base64.b64encode(png(128, 128)).decode(), "uploadPath": "schemathesis"})
url = up["data"]["downloadUrl"]
assert url.startswith(base + "/files/"), url
task = call("POST", "/api/v1/jobs/createTask", {
    "model": "ideogram/character-remix",
    "input": {"prompt": "schemathesis", "image_url": url, "reference_image_urls": [url],
              "rendering_speed": "TURBO", "image_size": "square"}})["data"]["taskId"]
deadline = time.time() + 60
while True:
    data = call("GET", "/api/v1/jobs/recordInfo?taskId=" + task)["data"]
    if data["state"] in ("success", "fail"):
        break
    if time.time() > deadline:
        sys.exit(f"task {task} not done: {data}")
    time.sleep(0.2)
if data["state"] != "success":
    sys.exit(f"task {task} failed: {data}")
result = json.loads(data["resultJson"])["resultUrls"][0]
file_key = result.split("/files/", 1)[1]
with open(out, "w") as f:
    f.write("[parameters]\n")
    f.write(f'"query.taskId" = {json.dumps(task)}\n')
    f.write(f'"path.key" = {json.dumps(file_key)}\n')
print(f"task {task}, result {file_key}")
PY
# The checks: no 5xx; status code, content type, headers and body as documented;
# schema-violating requests refused with a 4xx; operations that declare the bearer scheme
# refuse requests without it.
# Multipart form fields are text: `false` or `0.0` in uploadPath or fileName is a valid
# string, not the boolean or number schemathesis meant to send, so "schema-violating
# request accepted" cannot be judged for that operation. Every other check still runs on it.
cat >>"$WORK/schemathesis.toml" <<'EOF'

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_headers_conformance.enabled = true
response_schema_conformance.enabled = true
negative_data_rejection.enabled = true
ignored_auth.enabled = true

[[operations]]
include-operation-id = "fileStreamUpload"
checks.negative_data_rejection.enabled = false
EOF

echo "== schemathesis run $BASE/openapi.json"
# Run from the temporary directory: schemathesis keeps a cache (.schemathesis/) in its
# working directory.
ROOT=$PWD
status=0
(cd "$WORK" && timeout "${SCHEMATHESIS_TIMEOUT_S:-600}" "$ROOT/$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" run "$BASE/openapi.json" \
  --url "$BASE" \
  --header "Authorization: Bearer $KEY" \
  --exclude-operation-id createTask \
  --exclude-operation-id fileUrlUpload \
  --phases examples,coverage,fuzzing \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-25}" \
  --max-redirects 0 \
  --request-timeout 10 \
  --seed "${SCHEMATHESIS_SEED:-1}" \
  --generation-database none \
  --no-color) || status=$?

if [ "$status" -ne 0 ]; then
  echo "schemathesis failed (exit $status); the server's log:" >&2
  tail -n 50 "$WORK/server.log" >&2
fi
exit "$status"
