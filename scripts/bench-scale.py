#!/usr/bin/env python3
"""Scale-out figures, printed, never asserted (scripts/bench-scale.sh runs this).

Usage: bench-scale.py REMIXD_BIN POSTGRES_URL [TASKS] [CLAIM_TASKS]

1. Queue claims per second (`remixd bench queue`: no HTTP, no engine; each task takes
   the fetch claim, inputs ready, the generate claim and success, as in a worker):
   SQLite in one process; PostgreSQL in one process; PostgreSQL in two processes
   claiming the same queue at once (their tasks added up over the span from the first
   start to the last claim). Then the shared rate counters alone: checks per second.
2. End-to-end tasks per second with the preview engine at 512x512: a backlog of TASKS
   tasks created over HTTP on an API node (inputs uploaded to remixd, so no task
   fetches over the network), then drained by SQLite in one process (role all), by one
   PostgreSQL worker process, and by two. The rate is taken from the database:
   tasks / (last completion - first generation start), so process start-up is not in it.

Every run gets a fresh database (a new SQLite file, or a new PostgreSQL schema) and
files in a directory the nodes share. Python's standard library only.
"""

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN, PG = sys.argv[1], sys.argv[2]
TASKS = int(sys.argv[3]) if len(sys.argv) > 3 else 300
CLAIM_TASKS = int(sys.argv[4]) if len(sys.argv) > 4 else 3000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = tempfile.mkdtemp(prefix="remixd-scale.")
SCHEMAS = []


def psql(url, sql):
    out = subprocess.run(["psql", url, "-Atqc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def fresh_schema(name):
    psql(PG, f"DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")
    SCHEMAS.append(name)
    sep = "&" if "?" in PG else "?"
    return f"{PG}{sep}options=-csearch_path%3D{name}"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def config(name, db, files, port, public):
    """A node's config: its own data dir and port; the shared database, files and public
    URL (every node names files by the same URLs)."""
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "remixd.toml")
    with open(path, "w") as f:
        f.write(f"""data_dir = "{d}"
[server]
listen = "127.0.0.1:{port}"
public_url = "{public}"
[database]
url = "{db}"
[storage]
url = "file://{files}"
min_free_mb = 0
[limits]
create_per_10s = 1000000
query_per_s = 1000000
[engine]
concurrency = 1
""")
    return path, d


def serve(cfg, role):
    env = dict(os.environ, RUST_LOG="warn")
    return subprocess.Popen([BIN, "serve", "--role", role, "--config", cfg], env=env,
                            stdout=subprocess.DEVNULL)


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)


def wait_ready(base, proc):
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"the node for {base} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{base}/readyz", timeout=2)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{base} never became ready")


def call(base, key, path, body):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = json.load(r)
    if doc.get("code") != 200:
        raise SystemExit(f"{path}: {doc}")
    return doc["data"]


def bench_queue(db, phase, concurrency=4, tasks=None):
    env = dict(os.environ, RUST_LOG="warn", REMIXD__DATABASE__URL=db,
               REMIXD__DATA_DIR=os.path.join(WORK, "queue"))
    return subprocess.Popen([BIN, "bench", "queue", "--tasks", str(tasks or CLAIM_TASKS), "--concurrency",
                             str(concurrency), "--phase", phase], env=env,
                            stdout=subprocess.PIPE, text=True)


def reports(p):
    out, _ = p.communicate(timeout=1800)
    if p.returncode != 0:
        raise SystemExit("bench queue failed")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def claims():
    rows = []
    sqlite_db = f"sqlite://{WORK}/queue-sqlite.db"
    r = reports(bench_queue(sqlite_db, "both"))
    rows.append(("SQLite, 1 process", r[0]["per_s"], r[1]["per_s"]))
    one = fresh_schema("scale_claims_1")
    r = reports(bench_queue(one, "both"))
    rows.append(("PostgreSQL, 1 process", r[0]["per_s"], r[1]["per_s"]))
    two = fresh_schema("scale_claims_2")
    fill = reports(bench_queue(two, "fill"))[0]
    procs = [bench_queue(two, "claim") for _ in range(2)]
    got = [reports(p)[0] for p in procs]
    n = sum(g["count"] for g in got)
    span = (max(g["last_ms"] for g in got) - min(g["first_ms"] for g in got)) / 1000
    if n != CLAIM_TASKS:
        raise SystemExit(f"two claimers took {n} claims of {CLAIM_TASKS} tasks")
    rows.append(("PostgreSQL, 2 processes", fill["per_s"], n / span))
    print(f"\nqueue: {CLAIM_TASKS} tasks created (4 at once, each reserving a credit), then "
          "walked through both stages by 4 claimers per process (fetch claim, inputs ready, "
          "generate claim, success: 2 claims per task)")
    print(f"{'store':<26} {'creates/s':>10} {'tasks/s':>10} {'claims/s':>10}")
    for name, c, k in rows:
        print(f"{name:<26} {c:>10.0f} {k:>10.0f} {2 * k:>10.0f}")
    print(f"PostgreSQL claims, 2 processes / 1: {rows[2][2] / rows[1][2]:.2f}")
    rate = reports(bench_queue(fresh_schema("scale_rate"), "rate", tasks=20000))[0]
    print(f"shared rate counters (PostgreSQL): {rate['per_s']:.0f} checks/s over 100 keys, "
          f"4 at once: {4000 / rate['per_s']:.2f} ms per check, the cost one limited request "
          "adds (SQLite counts in memory)")


def drained(db):
    """(terminal tasks, successes, first generation start, last completion)."""
    sql = ("SELECT count(*), count(*) FILTER (WHERE state = 'success'), min(start_time), "
           "max(complete_time) FROM tasks WHERE state IN ('success', 'fail')")
    if db.startswith("sqlite://"):
        con = sqlite3.connect(f"file:{db[len('sqlite://'):]}?mode=ro", uri=True)
        try:
            row = con.execute(sql.replace("count(*) FILTER (WHERE state = 'success')",
                                          "sum(state = 'success')")).fetchone()
        finally:
            con.close()
        return tuple(v or 0 for v in row)
    return tuple(int(v or 0) for v in psql(db, sql).split("|"))


def end_to_end(label, db, workers):
    files = os.path.join(WORK, f"files-{label}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg, data = config(f"api-{label}", db, files, port, base)
    api = serve(cfg, "api")
    wait_ready(base, api)
    key = open(os.path.join(data, "default.key")).read().strip()
    subprocess.run([BIN, "credits", "add", "--config", cfg, "--account", "default",
                    str(TASKS * 100)], check=True, stdout=subprocess.DEVNULL)
    urls = []
    for name in ("coffee.webp", "astronaut.webp"):
        data64 = base64.b64encode(open(os.path.join(ROOT, "assets", name), "rb").read()).decode()
        up = call(base, key, "/api/file-base64-upload",
                  {"base64Data": data64, "uploadPath": "bench", "fileName": name})
        urls.append(up["downloadUrl"])
    body = {"model": "ideogram/character-remix",
            "input": {"prompt": "bench", "image_url": urls[0], "reference_image_urls": [urls[1]],
                      "image_size": "square", "rendering_speed": "TURBO"}}
    for _ in range(TASKS):
        call(base, key, "/api/v1/jobs/createTask", body)
    if workers == 0:
        # One process: the API node makes way for a node of every role on the same data.
        stop(api)
        nodes = [serve(cfg, "all")]
    else:
        nodes = [api]
        for i in range(workers):
            wcfg, _ = config(f"w{i}-{label}", db, files, free_port(), base)
            nodes.append(serve(wcfg, "worker"))
    deadline = time.time() + 900
    while True:
        done, ok, first, last = drained(db)
        if done == TASKS:
            break
        if time.time() > deadline:
            raise SystemExit(f"{label}: only {done} of {TASKS} tasks ended")
        time.sleep(0.2)
    for p in nodes:
        stop(p)
    if ok != TASKS:
        raise SystemExit(f"{label}: {TASKS - ok} tasks failed")
    return TASKS / ((last - first) / 1000)


def main():
    print(f"remixd scale-out figures, {os.cpu_count()} cores, PostgreSQL "
          f"{psql(PG, 'SHOW server_version')}")
    claims()
    rows = [
        ("SQLite, 1 process (role all)", end_to_end("sqlite", f"sqlite://{WORK}/e2e.db", 0)),
        ("PostgreSQL, 1 worker process", end_to_end("pg1", fresh_schema("scale_e2e_1"), 1)),
        ("PostgreSQL, 2 worker processes", end_to_end("pg2", fresh_schema("scale_e2e_2"), 2)),
    ]
    print(f"\nend to end: {TASKS} tasks of one 512x512 TURBO preview image, inputs uploaded to "
          "remixd, drained from a backlog; engine.concurrency = 1 per process")
    print(f"{'store and workers':<32} {'tasks/s':>8}")
    for name, rate in rows:
        print(f"{name:<32} {rate:>8.1f}")
    print(f"PostgreSQL, 2 worker processes / 1: {rows[2][1] / rows[1][1]:.2f}")
    print(f"PostgreSQL 1 worker / SQLite 1 process: {rows[1][1] / rows[0][1]:.2f}")


try:
    main()
finally:
    for s in SCHEMAS:
        try:
            psql(PG, f"DROP SCHEMA IF EXISTS {s} CASCADE")
        except subprocess.CalledProcessError:
            pass
    subprocess.run(["rm", "-rf", WORK])
