//! The HTTP server's own defences and manners (`crates/remixd/src/serve.rs`): each
//! timeout on its own, the connection cap under a flood of connections that never
//! finish (the real binary under a low open-files limit), the drain deadline and SSE
//! streams on SIGTERM, shared stream watchers with their per-key cap, and hyper's own
//! error answers in the contract's envelope. Every socket is on 127.0.0.1.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use remixd_testkit::{Api, ImageServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr_of(api: &Api) -> String {
    api.base.trim_start_matches("http://").to_string()
}

async fn connect(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    if !bytes.is_empty() {
        s.write_all(bytes).await.expect("write");
    }
    s
}

/// Reads until the server closes the connection (EOF or reset) or `limit` passes;
/// returns what was read and when it closed, measured from `since`.
async fn until_closed(
    s: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    until_closed_read(s, since, limit).await
}

async fn until_closed_read(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    since: Instant,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = since + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(since.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether the connection is still open after `wait` (nothing read, no EOF).
async fn still_open(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(wait, s.read(&mut buf)).await.is_err()
}

/// The JSON envelope in a raw HTTP answer.
fn envelope(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    let v = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, v)
}

fn create_head(key: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /api/v1/jobs/createTask HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\n{extra}\r\n"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------
// Each timeout on its own (in-process server).

#[tokio::test]
async fn the_header_timeout_closes_silent_and_slow_heads() {
    let srv = TestServer::start_with(|s| {
        s.server.header_timeout_ms = 500;
        s.server.idle_timeout_ms = 60_000;
    })
    .await;
    let addr = addr_of(&srv.api);
    let start = Instant::now();
    let mut silent = connect(&addr, b"").await;
    let mut slow = connect(&addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await;
    // A slow-loris client keeps sending header bytes; that does not extend its time.
    let dripper = tokio::spawn(async move {
        for i in 0..40 {
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        until_closed(&mut slow, start, Duration::from_secs(6)).await
    });
    assert!(
        still_open(&mut silent, Duration::from_millis(250)).await,
        "not closed before the timeout"
    );
    let (_, closed) = until_closed(&mut silent, start, Duration::from_secs(6)).await;
    let closed = closed.expect("a silent connection is closed");
    assert!(
        closed >= Duration::from_millis(450) && closed < Duration::from_secs(3),
        "{closed:?}"
    );
    let (_, closed) = dripper.await.unwrap();
    let closed = closed.expect("a dripping head is closed");
    assert!(closed < Duration::from_secs(3), "{closed:?}");
    srv.stop().await;
}

#[tokio::test]
async fn the_idle_timeout_closes_kept_alive_connections_between_requests() {
    let srv = TestServer::start_with(|s| {
        s.server.header_timeout_ms = 5_000;
        s.server.idle_timeout_ms = 400;
    })
    .await;
    let addr = addr_of(&srv.api);
    let mut fresh = connect(&addr, b"").await;
    let sent = Instant::now();
    let mut kept = connect(&addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let (got, closed) = until_closed(&mut kept, sent, Duration::from_secs(6)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200 OK"));
    let closed = closed.expect("an idle kept-alive connection is closed");
    assert!(
        closed >= Duration::from_millis(380) && closed < Duration::from_secs(3),
        "{closed:?}"
    );
    // A connection that has not sent its first request is under the header timeout.
    assert!(
        still_open(&mut fresh, Duration::from_millis(600)).await,
        "the idle timeout is not applied before the first request"
    );
    // Requests on one connection keep it alive (each resets the idle clock).
    let mut s = connect(&addr, b"").await;
    for _ in 0..4 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("\"data\":\"ok\""));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn the_body_timeout_answers_422_for_partial_dripping_and_unfinished_chunked_bodies() {
    let srv = TestServer::start_with(|s| {
        s.server.body_timeout_ms = 800;
        s.server.header_timeout_ms = 5_000;
    })
    .await;
    let addr = addr_of(&srv.api);
    let key = srv.api.key.clone();
    let mut partial = create_head(&key, "Content-Length: 100\r\n");
    partial.extend_from_slice(b"{\"model\":");
    let mut chunked = create_head(&key, "Transfer-Encoding: chunked\r\n");
    chunked.extend_from_slice(b"9\r\n{\"model\":\r\n");
    let mut cases = Vec::new();
    for (name, bytes) in [("partial", partial), ("chunked", chunked)] {
        let start = Instant::now();
        let s = connect(&addr, &bytes).await;
        cases.push((name, start, s));
    }
    // A body that keeps dripping a byte every 100 ms still has to end within 800 ms.
    let drip_start = Instant::now();
    let mut drip = connect(&addr, &create_head(&key, "Content-Length: 1000\r\n")).await;
    let dripper = tokio::spawn(async move {
        for _ in 0..60 {
            if drip.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drip
    });
    for (name, start, mut s) in cases {
        let (got, closed) = until_closed(&mut s, start, Duration::from_secs(6)).await;
        let closed = closed.unwrap_or_else(|| panic!("{name}: closed"));
        assert!(
            closed >= Duration::from_millis(750) && closed < Duration::from_secs(4),
            "{name}: {closed:?}"
        );
        let (status, v) = envelope(&got);
        assert_eq!(
            (status, v["code"].as_i64()),
            (422, Some(422)),
            "{name}: {v}"
        );
        assert!(
            v["msg"]
                .as_str()
                .unwrap()
                .contains("did not arrive in full within 800 ms"),
            "{name}: {v}"
        );
        assert!(v["data"].is_null());
    }
    let mut drip = dripper.await.unwrap();
    let (got, closed) = until_closed(&mut drip, drip_start, Duration::from_secs(2)).await;
    let (status, _) = envelope(&got);
    assert_eq!(status, 422);
    assert!(closed.is_some(), "the dripping connection is closed");
    // A body that arrives in time is not affected.
    let img = ImageServer::start().await;
    srv.api.create_ok(&img.sample_task(json!({}))).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------
// hyper's own answers, in the envelope.

#[tokio::test]
async fn requests_hyper_cannot_parse_are_answered_in_the_envelope() {
    let srv = TestServer::start().await;
    let addr = addr_of(&srv.api);
    let many_headers: String = (0..150).map(|i| format!("X-{i}: a\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "control byte in the URI",
            b"GET /he\x01lthz HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
            "not valid HTTP/1.1",
        ),
        (
            "bad bytes in the query",
            b"GET /api/v1/jobs/recordInfo?taskId=\xff HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
            "not valid HTTP/1.1",
        ),
        (
            "unknown version",
            b"GET /healthz HTTP/9.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
            "not valid HTTP/1.1",
        ),
        (
            "bad Content-Length",
            b"POST /api/v1/jobs/createTask HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n"
                .to_vec(),
            400,
            "not valid HTTP/1.1",
        ),
        (
            "garbage",
            b"garbage\r\n\r\n".to_vec(),
            400,
            "not valid HTTP/1.1",
        ),
        // hyper's head limit (about 400 KB) is loose: a head a little over it may
        // still be read whole in one go and served, so this one is well over.
        (
            "a huge header",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
                "a".repeat(2_000_000)
            )
            .into_bytes(),
            431,
            "header section is too large",
        ),
        (
            "too many headers",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n").into_bytes(),
            431,
            "header section is too large",
        ),
    ];
    for (name, bytes, want, words) in cases {
        let start = Instant::now();
        let s = TcpStream::connect(&addr).await.unwrap();
        // Written aside while the answer is read: the server answers a huge head, and
        // closes, before it has read all of it.
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&bytes).await;
            w
        });
        let (got, closed) = until_closed_read(&mut r, start, Duration::from_secs(5)).await;
        drop(writer);
        assert!(closed.is_some(), "{name}: closed after the answer");
        let (status, v) = envelope(&got);
        assert_eq!(status, want, "{name}");
        assert_eq!(v["code"].as_u64(), Some(want as u64), "{name}: {v}");
        assert!(v["msg"].as_str().unwrap().contains(words), "{name}: {v}");
        assert!(v["data"].is_null(), "{name}");
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(text.contains("content-type: application/json"), "{name}");
    }
    // The router's own answers are untouched, and the server still serves.
    let a = srv.api.get("/no/such/route").await;
    assert_eq!((a.status, a.code()), (404, 404));
    let a = srv.api.get("/healthz").await;
    assert_eq!(a.code(), 200);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------
// SSE: shared watchers, the per-key cap.

async fn open_stream(api: &Api, id: &str) -> reqwest::Response {
    api.http
        .get(format!("{}/api/v1/jobs/stream?taskId={id}", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap()
}

/// The `task` events of a whole stream, read until the server ends it.
async fn events(resp: reqwest::Response) -> Vec<Value> {
    let text = tokio::time::timeout(Duration::from_secs(60), resp.text())
        .await
        .expect("the stream ends by itself")
        .unwrap();
    text.split("\n\n")
        .filter(|e| e.contains("event: task"))
        .map(|e| {
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn streams_share_a_watcher_get_every_change_and_are_capped_per_key() {
    let srv = TestServer::start_with(|s| {
        s.engine.preview.delay_ms = 400;
        s.limits.streams_per_key = 3;
    })
    .await;
    let img = ImageServer::start().await;
    let id = srv
        .api
        .create_ok(&img.sample_task(json!({"num_images": 3})))
        .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let r = open_stream(&srv.api, &id).await;
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    // The fourth stream of the key is refused in the envelope, with Retry-After.
    let a = srv
        .api
        .get(&format!("/api/v1/jobs/stream?taskId={id}"))
        .await;
    assert_eq!((a.status, a.code()), (429, 429), "{:?}", a.body);
    assert!(a.msg().contains("streams open"), "{}", a.msg());
    assert!(a.retry_after() >= 1);
    // Another key of the same account has slots of its own.
    let other = srv.account("other", 1000, Default::default()).await;
    let a = other.get(&format!("/api/v1/jobs/stream?taskId={id}")).await;
    assert_eq!(a.code(), 404, "and sees only its own account's tasks");
    // Closing a stream frees its slot (the server notices the closed connection).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let replacement = loop {
        let r = open_stream(&srv.api, &id).await;
        if r.status() == 200 {
            break r;
        }
        assert_eq!(r.status(), 429);
        assert!(
            Instant::now() < deadline,
            "the closed stream's slot came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    open.push(replacement);
    // Every stream follows the task to its end and then closes by itself.
    let all = futures::future::join_all(open.into_iter().map(events)).await;
    for evs in &all {
        let last = evs.last().expect("events");
        assert_eq!(
            (last["state"].as_str(), last["progress"].as_i64()),
            (Some("success"), Some(100))
        );
        let progress: Vec<i64> = evs
            .iter()
            .map(|e| e["progress"].as_i64().unwrap())
            .collect();
        assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        for w in evs.windows(2) {
            assert!(
                w[0]["state"] != w[1]["state"] || w[0]["progress"] != w[1]["progress"],
                "one event per change"
            );
        }
    }
    // Each stream saw the task generate and then succeed (a stream that falls behind
    // may skip progress values in between: the watcher keeps only the latest).
    for evs in &all {
        let mut states: Vec<&str> = Vec::new();
        for e in evs {
            let st = e["state"].as_str().unwrap();
            if states.last() != Some(&st) {
                states.push(st);
            }
        }
        assert!(states.ends_with(&["generating", "success"]), "{states:?}");
    }
    // After the end every slot is free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    while again.len() < 3 {
        let r = open_stream(&srv.api, &id).await;
        if r.status() == 200 {
            again.push(r);
        } else {
            assert!(
                Instant::now() < deadline,
                "slots freed after the streams ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    srv.stop().await;
}

// ---------------------------------------------------------------------------------
// The real binary: a connection flood under a low open-files limit, and SIGTERM.

/// A config file: `server` keys, `worker` keys and further tables are the test's.
fn write_config(dir: &Path, port: u16, server: &str, worker: &str, more: &str) -> PathBuf {
    let cfg = format!(
        r#"data_dir = "{dir}"
[server]
listen = "127.0.0.1:{port}"
{server}
[fetch]
allow = ["127.0.0.1/32"]
[limits]
create_per_10s = 10000
query_per_s = 10000
[worker]
poll_ms = 50
{worker}
{more}
"#,
        dir = dir.display()
    );
    let path = dir.join("remixd.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Starts `remixd serve` with its stderr in `log`, under an open-files limit
/// (soft and hard) when `nofile` is given.
/// The server process; killed if a failing test leaves it running.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(config: &Path, log: &Path, nofile: Option<u64>) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remixd"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: only the setrlimit system call runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, n, n));
        }
    }
    Server(cmd.spawn().expect("start remixd"))
}

/// The server's log, without the colour codes of its formatter.
fn read_log(log: &Path) -> String {
    let raw = std::fs::read_to_string(log).unwrap();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence ends with its first letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            common::signal(child, "-KILL");
            panic!("remixd did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kinds of connections a hostile client opens and never finishes.
const KINDS: [&str; 5] = [
    "idle",
    "half head",
    "partial body, no key",
    "partial body",
    "unfinished chunked body",
];

fn attack_bytes(kind: &str, key: &str) -> Vec<u8> {
    match kind {
        "idle" => Vec::new(),
        "half head" => b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ".to_vec(),
        "partial body, no key" => {
            b"POST /api/v1/jobs/createTask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"model\":".to_vec()
        }
        "partial body" => {
            let mut b = create_head(key, "Content-Length: 5000\r\n");
            b.extend_from_slice(b"{\"model\":");
            b
        }
        _ => {
            let mut b = create_head(key, "Transfer-Encoding: chunked\r\n");
            b.extend_from_slice(b"9\r\n{\"model\":\r\n");
            b
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unfinished_connections_cannot_starve_healthz_or_createtask() {
    // This process opens hundreds of sockets; the server gets 256 descriptors.
    rlimit::increase_nofile_limit(4096).unwrap();
    const NOFILE: u64 = 256;
    const HEADER_MS: u64 = 1_000;
    const BODY_MS: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = write_config(
        dir.path(),
        port,
        &format!(
            "header_timeout_ms = {HEADER_MS}\nbody_timeout_ms = {BODY_MS}\nidle_timeout_ms = 1500"
        ),
        "",
        "",
    );
    let log = dir.path().join("stderr.log");
    let mut child = spawn(&config, &log, Some(NOFILE));
    let base = format!("http://127.0.0.1:{port}");
    let key = common::ready_client(&base, dir.path()).await.key;
    let addr = format!("127.0.0.1:{port}");
    let logged = read_log(&log);
    assert!(
        logged.contains("open-files limit") && logged.contains("max_connections=44"),
        "the limit and the derived cap are logged: {logged}"
    );

    // 500 attack connections (twice the open-files limit), 100 a second, each watched
    // until the server closes it.
    let attack = {
        let (addr, key) = (addr.clone(), key.clone());
        tokio::spawn(async move {
            let mut watchers = Vec::new();
            for wave in 0..50 {
                for i in 0..10 {
                    let kind = KINDS[(wave * 10 + i) % KINDS.len()];
                    let bytes = attack_bytes(kind, &key);
                    let addr = addr.clone();
                    watchers.push(tokio::spawn(async move {
                        let opened = Instant::now();
                        let mut s = match TcpStream::connect(&addr).await {
                            Ok(s) => s,
                            Err(e) => panic!("{kind}: connect: {e}"),
                        };
                        let _ = s.write_all(&bytes).await;
                        let (got, closed) =
                            until_closed(&mut s, opened, Duration::from_secs(20)).await;
                        (kind, got, closed)
                    }));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            futures::future::join_all(watchers).await
        })
    };

    // Meanwhile real clients, each on a fresh connection, are answered promptly.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let client = Api {
        base: base.clone(),
        key: key.clone(),
        http: fresh.clone(),
    };
    let img = ImageServer::start().await;
    let mut created = Vec::new();
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let t = Instant::now();
        let r = fresh
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("/healthz during the flood: {e:?}"));
        assert_eq!(r.status(), 200);
        slowest = slowest.max(t.elapsed());
        if created.len() < 3 {
            created.push(client.create_ok(&img.sample_task(json!({}))).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < Duration::from_secs(2),
        "slowest /healthz {slowest:?}"
    );

    // Every attack connection was closed by the server within its timeout.
    let results = attack.await.unwrap();
    let bound = Duration::from_millis(BODY_MS) + Duration::from_secs(4);
    let mut answered_422 = 0;
    for r in results {
        let (kind, got, closed) = r.unwrap();
        let closed = closed.unwrap_or_else(|| panic!("{kind}: never closed"));
        assert!(closed < bound, "{kind}: closed after {closed:?}");
        if kind == "partial body" && !got.is_empty() {
            let (status, v) = envelope(&got);
            assert_eq!(status, 422, "{v}");
            answered_422 += 1;
        }
    }
    eprintln!("slowest /healthz {slowest:?}; {answered_422} partial bodies answered 422");
    for id in &created {
        let d = client.wait_done(id, Duration::from_secs(60)).await;
        assert_eq!(d["state"], "success", "{d}");
    }
    common::signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child.0, Duration::from_secs(20)).success());
    let logged = read_log(&log);
    assert!(
        !logged.contains("Too many open files"),
        "the server never ran out of descriptors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_ends_open_streams_and_the_drain_has_a_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = write_config(
        dir.path(),
        port,
        "shutdown_timeout_ms = 1000\nbody_timeout_ms = 120000",
        "shutdown_grace_ms = 300",
        "[engine.preview]\ndelay_ms = 120000",
    );
    let log = dir.path().join("stderr.log");
    let mut child = spawn(&config, &log, None);
    let base = format!("http://127.0.0.1:{port}");
    let api = common::ready_client(&base, dir.path()).await;
    let img = ImageServer::start().await;
    let id = api.create_ok(&img.sample_task(json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.record(&id).await.body["data"]["state"] != "generating" {
        assert!(Instant::now() < deadline, "the task starts generating");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An open stream on the unfinished task, its first event read.
    let mut stream = open_stream(&api, &id).await;
    assert_eq!(stream.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("generating"));
    // And a request in flight that would hold the drain for two minutes: its handler
    // is reading the body (hyper says `100 Continue` then), which never completes.
    let mut held = connect(
        &addr_of(&api),
        &create_head(&api.key, "Content-Length: 5000\r\nExpect: 100-continue\r\n"),
    )
    .await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buf))
        .await
        .expect("100 Continue")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    held.write_all(b"{\"model\":").await.unwrap();

    common::signal(&child.0, "-TERM");
    let termed = Instant::now();
    let stream_end = tokio::spawn(async move {
        loop {
            match stream.chunk().await {
                Ok(Some(_)) => continue,
                _ => return termed.elapsed(),
            }
        }
    });
    let (_, held_closed) = until_closed(&mut held, termed, Duration::from_secs(15)).await;
    let status = wait_exit(&mut child.0, Duration::from_secs(15));
    let exited = termed.elapsed();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), stream_end)
        .await
        .expect("the stream ended")
        .unwrap();
    assert!(
        ended < Duration::from_secs(5),
        "stream ended after {ended:?}"
    );
    let held_closed = held_closed.expect("the held connection was dropped");
    assert!(
        held_closed >= Duration::from_millis(900) && held_closed < Duration::from_secs(6),
        "dropped at the drain deadline, not before: {held_closed:?}"
    );
    assert!(exited < Duration::from_secs(10), "exited after {exited:?}");
    let logged = read_log(&log);
    assert!(logged.contains("shutdown_timeout_ms"), "the drop is logged");
}
