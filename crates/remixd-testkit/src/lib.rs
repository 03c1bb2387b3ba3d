//! Test support for remixd's integration tests.
//!
//! - [`ImageServer`]: an HTTP server on 127.0.0.1:0 serving named byte blobs, plus
//!   misbehaving routes (slow, redirecting, erroring) for the fetch tests. It counts
//!   the requests it saw, so a test can prove a blocked URL was never requested.
//! - [`samples`]: the bundled sample photos and small synthetic images.
//! - [`Api`]: a typed-enough client for the task API that polls until a task is done.
//! - [`tmpfs::Tmpfs`]: a small real filesystem to run out of disk on.
//! - [`postgres`]: a fresh schema per test on the suite's throwaway PostgreSQL.
//! - [`s3::S3Server`]: an S3-protocol server with one bucket, on loopback.
//!
//! Nothing here talks to anything but loopback.

pub mod exif;
pub mod postgres;
pub mod providers;
pub mod s3;
pub mod tmpfs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{json, Value};

/// Sample images: the bundled photos and synthetic ones.
pub mod samples {
    use std::io::Cursor;

    pub const COFFEE_WEBP: &[u8] = include_bytes!("../../../assets/coffee.webp");
    pub const ASTRONAUT_WEBP: &[u8] = include_bytes!("../../../assets/astronaut.webp");
    pub const ASTRONAUT_MASK_PNG: &[u8] = include_bytes!("../../../assets/astronaut_mask.png");

    /// A solid-colour PNG of the given size.
    pub fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    /// A gradient JPEG of the given size.
    pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg)
            .expect("encode jpeg");
        out.into_inner()
    }

    /// The first bytes of a PNG that claims `w`×`h` pixels: a decompression bomb's header.
    pub fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
        let mut v = png(1, 1, [0, 0, 0]);
        // IHDR's width and height sit at bytes 16..24; the CRC after them is recomputed
        // so the header is well-formed and only the size is absurd.
        v[16..20].copy_from_slice(&w.to_be_bytes());
        v[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&v[12..29]);
        v[29..33].copy_from_slice(&crc.to_be_bytes());
        v
    }

    fn crc32(data: &[u8]) -> u32 {
        // The PNG CRC (ISO 3309), bitwise; a few dozen bytes need no table.
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
}

#[derive(Default)]
struct Files {
    files: Mutex<HashMap<String, (Bytes, &'static str)>>,
    hits: AtomicUsize,
}

/// A loopback HTTP server of test images.
#[derive(Clone)]
pub struct ImageServer {
    pub base: String,
    state: Arc<Files>,
}

impl ImageServer {
    /// Starts on 127.0.0.1 with the bundled samples at `/coffee.webp`, `/astronaut.webp`,
    /// `/mask.png`, and the special routes `/slow/{ms}`, `/status/{code}`,
    /// `/redirect/{n}` (n hops, then `/coffee.webp`), `/text`, `/hang` (never answers).
    /// Every request counts as a hit, unknown paths (answered 404) included.
    pub async fn start() -> Self {
        let state = Arc::new(Files::default());
        let app = axum::Router::new()
            .route("/{name}", get(serve_file))
            .route("/hang", get(hang))
            .route("/slow/{ms}", get(slow))
            .route("/status/{code}", get(status))
            .route("/redirect/{n}", get(redirect))
            .fallback(unknown)
            .with_state(state.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind image server");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        let s = Self { base, state };
        s.put("coffee.webp", samples::COFFEE_WEBP.to_vec(), "image/webp");
        s.put(
            "astronaut.webp",
            samples::ASTRONAUT_WEBP.to_vec(),
            "image/webp",
        );
        s.put(
            "mask.png",
            samples::ASTRONAUT_MASK_PNG.to_vec(),
            "image/png",
        );
        s.put("text", b"hello, I am not an image".to_vec(), "text/plain");
        s
    }

    /// Serves `bytes` at `/<name>`.
    pub fn put(&self, name: &str, bytes: Vec<u8>, content_type: &'static str) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(name.to_string(), (Bytes::from(bytes), content_type));
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// A createTask body using this server's sample base and character images.
    pub fn sample_task(&self, extra: Value) -> Value {
        task_body(&self.url("coffee.webp"), &self.url("astronaut.webp"), extra)
    }

    /// How many requests the server has answered.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

async fn serve_file(State(s): State<Arc<Files>>, Path(name): Path<String>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    match s.files.lock().unwrap().get(&name) {
        Some((b, ct)) => ([(header::CONTENT_TYPE, *ct)], b.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Never answers (within the hour): a URL that holds a connection open.
async fn hang(State(s): State<Arc<Files>>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    StatusCode::REQUEST_TIMEOUT.into_response()
}

async fn unknown(State(s): State<Arc<Files>>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::NOT_FOUND.into_response()
}

async fn slow(State(s): State<Arc<Files>>, Path(ms): Path<u64>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    (
        [(header::CONTENT_TYPE, "image/png")],
        samples::png(4, 4, [1, 2, 3]),
    )
        .into_response()
}

async fn status(State(s): State<Arc<Files>>, Path(code): Path<u16>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(code)
        .unwrap_or(StatusCode::IM_A_TEAPOT)
        .into_response()
}

async fn redirect(State(s): State<Arc<Files>>, Path(n): Path<u32>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let to = if n == 0 {
        "/coffee.webp".to_string()
    } else {
        format!("/redirect/{}", n - 1)
    };
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

/// A client of the task API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

/// An answer: HTTP status, headers and parsed body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> i64 {
        self.body["code"].as_i64().unwrap_or(-1)
    }
    pub fn msg(&self) -> &str {
        self.body["msg"].as_str().unwrap_or("")
    }
    /// The `Retry-After` header in seconds; panics when it is missing or not a number.
    pub fn retry_after(&self) -> u64 {
        let h = self
            .headers
            .get("retry-after")
            .expect("a Retry-After header");
        h.to_str().unwrap().parse().expect("Retry-After in seconds")
    }
}

impl Api {
    pub fn new(base: &str, key: &str) -> Self {
        Self {
            base: base.to_string(),
            key: key.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn with_key(&self, key: &str) -> Self {
        Self {
            key: key.to_string(),
            ..self.clone()
        }
    }

    async fn answer(r: reqwest::Response) -> Answer {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// POSTs raw bytes with a content type to a path.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        Self::answer(r).await
    }

    pub async fn create(&self, body: &Value) -> Answer {
        self.post_raw(
            "/api/v1/jobs/createTask",
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn get(&self, path_and_query: &str) -> Answer {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .expect("request");
        Self::answer(r).await
    }

    pub async fn record(&self, task_id: &str) -> Answer {
        self.get(&format!("/api/v1/jobs/recordInfo?taskId={task_id}"))
            .await
    }

    pub async fn balance(&self) -> i64 {
        let a = self.get("/api/v1/chat/credit").await;
        a.body["data"]
            .as_i64()
            .unwrap_or_else(|| panic!("credit: {:?}", a.body))
    }

    /// Uploads `bytes` through `/api/file-stream-upload` as `uploadPath=inputs`,
    /// `fileName=name`; returns the downloadUrl, panicking on refusal.
    pub async fn upload_ok(&self, bytes: &[u8], name: &str) -> String {
        let form = reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string()),
            )
            .text("uploadPath", "inputs");
        let r = self
            .http
            .post(format!("{}/api/file-stream-upload", self.base))
            .bearer_auth(&self.key)
            .multipart(form)
            .send()
            .await
            .expect("upload");
        let v: Value = r.json().await.expect("upload answer");
        assert_eq!(v["code"], 200, "upload: {v}");
        v["data"]["downloadUrl"]
            .as_str()
            .expect("downloadUrl")
            .to_string()
    }

    /// `POST /api/v1/jobs/cancel?taskId=…`.
    pub async fn cancel(&self, task_id: &str) -> Answer {
        self.post_raw(
            &format!("/api/v1/jobs/cancel?taskId={task_id}"),
            "application/json",
            vec![],
        )
        .await
    }

    /// Creates a task and returns its id, panicking on refusal.
    pub async fn create_ok(&self, body: &Value) -> String {
        let a = self.create(body).await;
        assert_eq!(a.code(), 200, "createTask: {:?}", a.body);
        a.body["data"]["taskId"]
            .as_str()
            .expect("taskId")
            .to_string()
    }

    /// Polls recordInfo until the task is terminal; returns its data object.
    pub async fn wait_done(&self, task_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let a = self.record(task_id).await;
            if a.code() == 429 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            assert_eq!(a.code(), 200, "recordInfo: {:?}", a.body);
            let state = a.body["data"]["state"].as_str().unwrap_or("").to_string();
            if state == "success" || state == "fail" {
                return a.body["data"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} still {state} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server at {} not ready after {timeout:?}",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A createTask body with the given image URLs and extra input fields.
pub fn task_body(base_url: &str, character_url: &str, extra: Value) -> Value {
    let mut input = json!({
        "prompt": "an astronaut having coffee",
        "image_url": base_url,
        "reference_image_urls": [character_url],
        "image_size": "square",
    });
    if let (Some(i), Some(e)) = (input.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            i.insert(k.clone(), v.clone());
        }
    }
    json!({"model": "ideogram/character-remix", "input": input})
}

/// One request a [`Receiver`] saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    /// Unix milliseconds when it arrived.
    pub at_ms: i64,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("callback body is JSON")
    }
}

#[derive(Default)]
struct Inbox {
    seen: Mutex<Vec<Received>>,
    /// Failures still to answer, per webhook-id, on `/flaky/{n}`.
    failures: Mutex<HashMap<String, u32>>,
}

/// A callback receiver on 127.0.0.1 that records what arrives. Routes:
/// `/ok` (200), `/flaky/{n}` (500 for the first n attempts of each webhook-id, then
/// 200), `/gone` (410), `/hang` (never answers within a minute), `/redirect` (302 to
/// `/ok`), `/status/{code}`.
#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    inbox: Arc<Inbox>,
}

impl Receiver {
    pub async fn start() -> Self {
        let inbox = Arc::new(Inbox::default());
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(receive))
            .with_state(inbox.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Self { base, inbox }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// Everything received so far, in arrival order.
    pub fn seen(&self) -> Vec<Received> {
        self.inbox.seen.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived (at most `timeout`); returns them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "receiver got {} of {n} requests in {timeout:?}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn receive(
    State(inbox): State<Arc<Inbox>>,
    Path(path): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let id = headers.get("webhook-id").cloned().unwrap_or_default();
    inbox.seen.lock().unwrap().push(Received {
        path: path.clone(),
        headers,
        body,
        at_ms: now_ms(),
    });
    let mut parts = path.split('/');
    match (parts.next().unwrap_or(""), parts.next()) {
        ("ok", _) => StatusCode::OK.into_response(),
        ("flaky", Some(n)) => {
            let n: u32 = n.parse().unwrap_or(1);
            let mut f = inbox.failures.lock().unwrap();
            let left = f.entry(id).or_insert(n);
            if *left > 0 {
                *left -= 1;
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            } else {
                StatusCode::NO_CONTENT.into_response()
            }
        }
        ("gone", _) => StatusCode::GONE.into_response(),
        ("hang", _) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::OK.into_response()
        }
        ("redirect", _) => (StatusCode::FOUND, [(header::LOCATION, "/ok")]).into_response(),
        ("status", Some(code)) => StatusCode::from_u16(code.parse().unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
