//! A loopback stand-in for the upstream providers, speaking both fal's queue API and
//! Ideogram's remix API as their public documentation describes them (see
//! `shared/spec/PROVIDERS.md`), and recording every request so tests can assert what
//! remixd sent: paths, auth headers, JSON fields and types, multipart parts and bytes.
//!
//! Behaviour is scripted through [`StandIn::script`]: replies to queue up before the
//! normal answer (a 429 storm, a 500, a 422, a hang), the status sequence of a fal
//! request, holding requests in progress, unsafe images, result files that 404.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde_json::{json, Value};

/// One scripted answer, used before the normal one.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status and JSON body, with an optional `Retry-After` (seconds).
    Status(u16, Value, Option<u64>),
    /// Never answers.
    Hang,
}

/// One multipart part as received.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub bytes: Bytes,
}

impl Part {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub json: Option<Value>,
    pub parts: Vec<Part>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }
    pub fn parts_named(&self, name: &str) -> Vec<&Part> {
        self.parts.iter().filter(|p| p.name == name).collect()
    }
}

/// What the stand-in does; change it at any time through [`StandIn::script`].
#[derive(Debug)]
pub struct Script {
    /// Answers to fal submits before the normal one, in order.
    pub fal_submit: VecDeque<Reply>,
    /// Answers to fal status requests before the normal ones.
    pub fal_status: VecDeque<Reply>,
    /// Answers to fal result requests before the normal one.
    pub fal_result: VecDeque<Reply>,
    /// Answers to Ideogram remix requests before the normal one.
    pub ideogram: VecDeque<Reply>,
    /// The statuses a fal request goes through, one per status request; the last one
    /// repeats. Each is `IN_QUEUE:<position>`, `IN_PROGRESS:<log lines>` or `COMPLETED`.
    pub fal_sequence: Vec<String>,
    /// While set, fal requests stay IN_PROGRESS (a long generation).
    pub hold: bool,
    /// Ideogram flags every image unsafe.
    pub unsafe_images: bool,
    /// Result files answer 404.
    pub results_404: bool,
    /// The size of result images.
    pub result_size: (u32, u32),
    /// fal: fetch the input URLs of each submit, as the provider would (statuses in
    /// [`StandIn::input_fetches`]).
    pub fetch_inputs: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            fal_submit: VecDeque::new(),
            fal_status: VecDeque::new(),
            fal_result: VecDeque::new(),
            ideogram: VecDeque::new(),
            fal_sequence: vec![
                "IN_QUEUE:2".into(),
                "IN_QUEUE:1".into(),
                "IN_PROGRESS:3".into(),
                "COMPLETED".into(),
            ],
            hold: false,
            unsafe_images: false,
            results_404: false,
            result_size: (64, 48),
            fetch_inputs: false,
        }
    }
}

#[derive(Default)]
struct Inner {
    script: Mutex<Script>,
    seen: Mutex<Vec<Seen>>,
    /// fal request id → (status requests answered, images asked for).
    requests: Mutex<HashMap<String, (usize, u64)>>,
    next_id: AtomicUsize,
    input_fetches: Mutex<Vec<(String, u16)>>,
    base: Mutex<String>,
    /// fal request id → (its submit body, when COMPLETED was first answered, Unix ms).
    fal_log: Mutex<HashMap<String, (Value, Option<i64>)>>,
}

/// The stand-in server on 127.0.0.1.
#[derive(Clone)]
pub struct StandIn {
    pub base: String,
    inner: Arc<Inner>,
}

impl StandIn {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/fal-ai/ideogram/character/remix", post(fal_submit))
            .route("/fal-ai/ideogram/requests/{id}/status", get(fal_status))
            .route("/fal-ai/ideogram/requests/{id}/cancel", put(fal_cancel))
            .route("/fal-ai/ideogram/requests/{id}", get(fal_result))
            .route("/v1/ideogram-v3/remix", post(ideogram_remix))
            .route("/files/{id}/{name}", get(result_file))
            .with_state(inner.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in provider");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        *inner.base.lock().unwrap() = base.clone();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Self { base, inner }
    }

    /// Changes the script.
    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.inner.script.lock().unwrap());
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// The requests to `path` with `method`.
    pub fn seen_at(&self, method: &str, path_prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == method && s.path.starts_with(path_prefix))
            .collect()
    }

    /// fal submits so far.
    pub fn fal_submits(&self) -> Vec<Seen> {
        self.seen_at("POST", "/fal-ai/ideogram/character/remix")
    }

    /// fal cancels so far.
    pub fn fal_cancels(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "PUT" && s.path.ends_with("/cancel"))
            .collect()
    }

    /// Ideogram remix requests so far.
    pub fn ideogram_requests(&self) -> Vec<Seen> {
        self.seen_at("POST", "/v1/ideogram-v3/remix")
    }

    /// Status requests of fal request `id` so far.
    pub fn status_polls(&self, id: &str) -> usize {
        self.inner
            .requests
            .lock()
            .unwrap()
            .get(id)
            .map_or(0, |r| r.0)
    }

    /// Each fal request: its id, submit body, and when COMPLETED was first answered for
    /// it (Unix milliseconds).
    pub fn fal_requests(&self) -> Vec<(String, Value, Option<i64>)> {
        self.inner
            .fal_log
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (v, t))| (k.clone(), v.clone(), *t))
            .collect()
    }

    /// (URL, status) of each input the stand-in fetched (with `fetch_inputs`).
    pub fn input_fetches(&self) -> Vec<(String, u16)> {
        self.inner.input_fetches.lock().unwrap().clone()
    }
}

fn record(
    inner: &Inner,
    method: &str,
    path: String,
    headers: &HeaderMap,
    json: Option<Value>,
    parts: Vec<Part>,
) {
    inner.seen.lock().unwrap().push(Seen {
        method: method.into(),
        path,
        headers: headers.clone(),
        json,
        parts,
    });
}

/// Records a GET, then answers the next scripted reply of `queue`, if any.
async fn seen_get(
    inner: &Inner,
    path: String,
    headers: &HeaderMap,
    queue: fn(&mut Script) -> &mut VecDeque<Reply>,
) -> Option<Response> {
    record(inner, "GET", path, headers, None, vec![]);
    let reply = queue(&mut inner.script.lock().unwrap()).pop_front();
    scripted(reply).await
}

/// fal's answer for a request id it does not know.
fn request_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"detail": "Request not found"})),
    )
        .into_response()
}

/// The next scripted reply of a queue, if any.
async fn scripted(reply: Option<Reply>) -> Option<Response> {
    match reply? {
        Reply::Status(code, body, after) => {
            let mut r = (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response();
            if let Some(s) = after {
                r.headers_mut()
                    .insert("retry-after", s.to_string().parse().unwrap());
            }
            Some(r)
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
    }
}

async fn fal_submit(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    record(
        &inner,
        "POST",
        "/fal-ai/ideogram/character/remix".into(),
        &headers,
        json.clone(),
        vec![],
    );
    let reply = inner.script.lock().unwrap().fal_submit.pop_front();
    if let Some(r) = scripted(reply).await {
        return r;
    }
    let json = json.unwrap_or(Value::Null);
    if inner.script.lock().unwrap().fetch_inputs {
        let mut urls: Vec<String> = Vec::new();
        for k in ["image_url"] {
            if let Some(u) = json.get(k).and_then(Value::as_str) {
                urls.push(u.into());
            }
        }
        for k in ["reference_image_urls", "reference_mask_urls", "image_urls"] {
            for u in json.get(k).and_then(Value::as_array).into_iter().flatten() {
                if let Some(u) = u.as_str() {
                    urls.push(u.into());
                }
            }
        }
        let client = reqwest::Client::new();
        for u in urls {
            let status = match client.get(&u).send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            inner.input_fetches.lock().unwrap().push((u, status));
        }
    }
    let n = json.get("num_images").and_then(Value::as_u64).unwrap_or(1);
    let id = format!("req-{}", inner.next_id.fetch_add(1, Ordering::SeqCst));
    inner.requests.lock().unwrap().insert(id.clone(), (0, n));
    inner
        .fal_log
        .lock()
        .unwrap()
        .insert(id.clone(), (json.clone(), None));
    let base = inner.base.lock().unwrap().clone();
    let app = format!("{base}/fal-ai/ideogram/requests/{id}");
    axum::Json(json!({
        "request_id": id,
        "response_url": app,
        "status_url": format!("{app}/status"),
        "cancel_url": format!("{app}/cancel"),
        "status": "IN_QUEUE",
        "queue_position": 2,
    }))
    .into_response()
}

async fn fal_status(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/fal-ai/ideogram/requests/{id}/status");
    if let Some(r) = seen_get(&inner, path, &headers, |s| &mut s.fal_status).await {
        return r;
    }
    let step = {
        let mut reqs = inner.requests.lock().unwrap();
        let Some(r) = reqs.get_mut(&id) else {
            return request_not_found();
        };
        r.0 += 1;
        r.0 - 1
    };
    let s = inner.script.lock().unwrap();
    let state = if s.hold {
        "IN_PROGRESS:1".to_string()
    } else {
        s.fal_sequence[step.min(s.fal_sequence.len() - 1)].clone()
    };
    drop(s);
    let (name, n) = state.split_once(':').unwrap_or((state.as_str(), "0"));
    let n: u64 = n.parse().unwrap_or(0);
    match name {
        "IN_QUEUE" => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"status": "IN_QUEUE", "queue_position": n})),
        )
            .into_response(),
        "IN_PROGRESS" => {
            let logs: Vec<Value> = (0..n)
                .map(|i| json!({"message": format!("step {i}"), "level": "INFO"}))
                .collect();
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({"status": "IN_PROGRESS", "logs": logs})),
            )
                .into_response()
        }
        _ => {
            if let Some(entry) = inner.fal_log.lock().unwrap().get_mut(&id) {
                entry.1.get_or_insert_with(unix_ms);
            }
            axum::Json(
                json!({"status": "COMPLETED", "logs": [], "metrics": {"inference_time": 1.5}}),
            )
            .into_response()
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn fal_cancel(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    record(
        &inner,
        "PUT",
        format!("/fal-ai/ideogram/requests/{id}/cancel"),
        &headers,
        None,
        vec![],
    );
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"status": "CANCELLATION_REQUESTED"})),
    )
        .into_response()
}

async fn fal_result(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/fal-ai/ideogram/requests/{id}");
    if let Some(r) = seen_get(&inner, path, &headers, |s| &mut s.fal_result).await {
        return r;
    }
    let Some((_, n)) = inner.requests.lock().unwrap().get(&id).cloned() else {
        return request_not_found();
    };
    let base = inner.base.lock().unwrap().clone();
    let (w, h) = inner.script.lock().unwrap().result_size;
    let images: Vec<Value> = (0..n)
        .map(|i| json!({"url": format!("{base}/files/{id}/{i}.png"), "content_type": "image/png", "file_name": format!("{i}.png"), "width": w, "height": h}))
        .collect();
    axum::Json(json!({"images": images, "seed": 4242})).into_response()
}

async fn ideogram_remix(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    let mut parts = Vec::new();
    while let Ok(Some(f)) = form.next_field().await {
        let name = f.name().unwrap_or_default().to_string();
        let file_name = f.file_name().map(str::to_string);
        let content_type = f.content_type().map(str::to_string);
        let bytes = f.bytes().await.unwrap_or_default();
        parts.push(Part {
            name,
            file_name,
            content_type,
            bytes,
        });
    }
    let n: u64 = parts
        .iter()
        .find(|p| p.name == "num_images")
        .and_then(|p| p.text().parse().ok())
        .unwrap_or(1);
    record(
        &inner,
        "POST",
        "/v1/ideogram-v3/remix".into(),
        &headers,
        None,
        parts,
    );
    let reply = inner.script.lock().unwrap().ideogram.pop_front();
    if let Some(r) = scripted(reply).await {
        return r;
    }
    let id = format!("ideo-{}", inner.next_id.fetch_add(1, Ordering::SeqCst));
    let base = inner.base.lock().unwrap().clone();
    let s = inner.script.lock().unwrap();
    let (w, h) = s.result_size;
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if s.unsafe_images {
                json!({"prompt": "p", "resolution": format!("{w}x{h}"), "is_image_safe": false, "seed": 7 + i, "style_type": "AUTO"})
            } else {
                json!({"url": format!("{base}/files/{id}/{i}.png"), "prompt": "p", "resolution": format!("{w}x{h}"), "is_image_safe": true, "seed": 7 + i, "style_type": "AUTO"})
            }
        })
        .collect();
    axum::Json(json!({"created": "2026-12-02T10:00:00Z", "data": data})).into_response()
}

async fn result_file(
    State(inner): State<Arc<Inner>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    record(
        &inner,
        "GET",
        format!("/files/{id}/{name}"),
        &headers,
        None,
        vec![],
    );
    let s = inner.script.lock().unwrap();
    if s.results_404 {
        return StatusCode::NOT_FOUND.into_response();
    }
    let (w, h) = s.result_size;
    drop(s);
    // A distinct picture per file: a gradient keyed by the name.
    let salt = name
        .bytes()
        .fold(id.len() as u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, salt])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    ([("content-type", "image/png")], out).into_response()
}
