//! File uploads (API.md §6) and signed download links (§5).
//!
//! Uploads answer in their own envelope, `{"success", "code", "msg", "data"}`, with the
//! codes 400, 401, 413, 429 and 500. The type comes from the bytes (JPEG, PNG or WebP:
//! uploads exist to be task inputs) and the header is checked as a fetched input's is
//! (complete file, pixel limit); the size is capped while reading, and the file lands
//! under `uploads/<128 random bits>/<uploadPath>/<fileName>`, kept for
//! `retention.uploads_hours`. Its `downloadUrl` can be given to createTask; workers read
//! it from storage directly.
//!
//! Before a body is read an upload must pass the account's upload rate
//! (`limits.uploads_per_10s`), get one of the slots for uploads in flight (per account
//! and in all: these bound the memory uploads take) and find room in the account's
//! quota of stored bytes (`limits.upload_quota_bytes`); the quota is checked again,
//! with the file's size, in the same statement that records it. Base64 bodies are
//! parsed borrowing from the request bytes and decoded into one buffer of exactly the
//! decoded size, and an oversized one is refused from its encoded length first.

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use rand::RngCore;
use remixd_domain::now_millis;
use remixd_store::blobs::{classify_url, FileUrl};
use remixd_store::UploadRecord;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::auth::{authenticate, Caller};
use crate::error::{ok, ApiError, Envelope};
use crate::limits::{SlotRefused, UploadSlot};
use crate::AppState;

/// An upload failure, in the upload envelope.
#[derive(Debug)]
pub struct UploadError {
    code: u16,
    msg: String,
    /// Seconds for `Retry-After` (429, and 500 while storage is full).
    retry_after: Option<u64>,
}

fn bad(msg: impl Into<String>) -> UploadError {
    UploadError {
        code: 400,
        msg: msg.into(),
        retry_after: None,
    }
}

fn too_large(msg: impl Into<String>) -> UploadError {
    UploadError {
        code: 413,
        msg: msg.into(),
        retry_after: None,
    }
}

fn too_many(msg: impl Into<String>, retry_after: u64) -> UploadError {
    UploadError {
        code: 429,
        msg: msg.into(),
        retry_after: Some(retry_after.max(1)),
    }
}

/// The answer while storage is full: nothing was stored and the client may retry. The
/// upload envelope's codes are 400, 401, 413 and 500, so it is a 500 with the reason
/// and a `Retry-After`.
fn storage_full() -> UploadError {
    UploadError {
        code: 500,
        msg: crate::error::STORAGE_FULL.into(),
        retry_after: Some(30),
    }
}

impl From<ApiError> for UploadError {
    fn from(e: ApiError) -> Self {
        if let ApiError::Unavailable(_) = e {
            return storage_full();
        }
        let code = match e.code() {
            401 => 401,
            500 => 500,
            505 => 403,
            429 => 429,
            _ => 400,
        };
        UploadError {
            code,
            msg: e.to_string(),
            retry_after: None,
        }
    }
}

impl From<remixd_store::StoreError> for UploadError {
    fn from(e: remixd_store::StoreError) -> Self {
        if let remixd_store::StoreError::Full(detail) = &e {
            tracing::warn!(error = %detail, "upload: storage full");
            return storage_full();
        }
        tracing::error!(error = %e, "upload: store error");
        UploadError {
            code: 500,
            msg: "internal error".into(),
            retry_after: None,
        }
    }
}

/// The upload envelope of a failure.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Failure<'a> {
    /// Always `false`.
    success: bool,
    /// 400, 401, 403, 413, 429 or 500; the HTTP status is the same.
    code: u16,
    /// A short English sentence, e.g. `Missing required parameter: uploadPath`.
    #[schema(value_type = String)]
    msg: &'a str,
}

impl IntoResponse for UploadError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (
            status,
            Json(Failure {
                success: false,
                code: self.code,
                msg: &self.msg,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        r.extensions_mut().insert(crate::error::IsEnvelopeError);
        r
    }
}

/// The uploaded file.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadData {
    file_name: String,
    /// `<uploadPath>/<fileName>`.
    file_path: String,
    /// A URL of this server; usable as `image_url`, reference or mask.
    download_url: String,
    /// Bytes.
    file_size: usize,
    /// From the bytes: `image/jpeg`, `image/png` or `image/webp`.
    #[schema(value_type = String)]
    mime_type: &'static str,
    /// RFC 3339 with milliseconds, UTC.
    uploaded_at: String,
}

/// The upload envelope of a success.
#[derive(Serialize, utoipa::ToSchema)]
pub struct UploadOk {
    /// Always `true`.
    success: bool,
    /// `200`.
    code: u16,
    /// `File uploaded successfully`.
    #[schema(value_type = String)]
    msg: &'static str,
    data: UploadData,
}

type UploadResult = Result<Json<UploadOk>, UploadError>;

/// Checks `uploadPath`: relative, segments of `[A-Za-z0-9._-]`, no `.`/`..`.
fn upload_path(p: Option<String>) -> Result<String, UploadError> {
    let p = p
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("Missing required parameter: uploadPath"))?;
    if p.starts_with('/') || p.ends_with('/') {
        return Err(bad("uploadPath must not start or end with a slash"));
    }
    if p.len() > 200
        || !p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
    {
        return Err(bad("uploadPath may hold only letters, digits, '.', '_', '-' and '/' (at most 200 characters)"));
    }
    Ok(p)
}

/// A safe file name: other characters become `_`; none given, a random one.
fn file_name(given: Option<&str>, ext: &str) -> String {
    let cleaned: String = given
        .unwrap_or("")
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        let mut b = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut b);
        format!("{}.{ext}", hex::encode(b))
    } else {
        cleaned
    }
}

/// What every upload passes before its body is read: the endpoint is on, the caller
/// authenticated, under the account's upload rate, holding an upload slot (kept until
/// the handler ends), and the account has room left in its quota.
async fn admit(state: &AppState, headers: &HeaderMap) -> Result<(Caller, UploadSlot), UploadError> {
    state.check_enabled("upload")?;
    let caller = authenticate(&*state.store, headers).await?;
    state.check_space()?;
    if let Err(wait) = state.limits.check_upload(&caller.account_id).await {
        return Err(too_many(
            format!(
                "too many uploads: at most {} every 10 seconds per account",
                state.cfg.uploads_per_10s
            ),
            wait,
        ));
    }
    let slot = state
        .limits
        .upload_slot(&caller.account_id)
        .map_err(|refused| match refused {
            SlotRefused::Account { limit } => too_many(
                format!(
                    "this account already has {limit} uploads in progress; wait for one to finish"
                ),
                1,
            ),
            SlotRefused::Server { limit } => too_many(
                format!(
                    "the server is handling its most uploads at once ({limit}); try again shortly"
                ),
                1,
            ),
        })?;
    let quota = state.cfg.upload_quota_bytes;
    if quota > 0 {
        let used = state
            .store
            .upload_bytes(&caller.account_id, now_millis())
            .await?;
        if used as u64 >= quota {
            return Err(quota_full(quota));
        }
    }
    Ok((caller, slot))
}

/// How long a refused request's body is read and thrown away for, at most.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what is left of a refused request's body (at most `limit`
/// bytes, for at most [`DRAIN_FOR`]) before the refusal is answered. A server that
/// closes a connection with unread data makes the kernel reset it, and a client still
/// sending its body then sees the reset instead of the 429 or 413 (a measurement saw 7
/// of 36 refused uploads end that way). Nothing is kept, so memory stays flat.
async fn drain(body: Body, limit: u64) {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        let mut seen = 0u64;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len() as u64;
            if seen > limit {
                return;
            }
        }
    })
    .await;
}

/// [`drain`] for a multipart body.
async fn drain_form(mut form: Multipart, limit: u64) {
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        let mut seen = 0u64;
        while let Ok(Some(mut field)) = form.next_field().await {
            while let Ok(Some(chunk)) = field.chunk().await {
                seen += chunk.len() as u64;
                if seen > limit {
                    return;
                }
            }
        }
    })
    .await;
}

fn quota_full(quota: u64) -> UploadError {
    too_large(format!(
        "the account's stored uploads would exceed its quota of {quota} bytes; uploads free their space when they expire"
    ))
}

/// Checks and stores one uploaded file; `field` names the request part it came from.
async fn store_upload(
    state: &AppState,
    caller: &Caller,
    field: &str,
    path: String,
    name: Option<&str>,
    bytes: Bytes,
) -> UploadResult {
    let limit = state.cfg.max_upload_bytes;
    if bytes.len() as u64 > limit {
        return Err(too_large(format!(
            "file is larger than the limit of {limit} bytes"
        )));
    }
    if bytes.is_empty() {
        return Err(bad("file is empty"));
    }
    // The same header check as a fetched input's, so an upload that could never be
    // used (truncated, too many pixels) is refused now, not when a task reads it.
    let (kind, _, _) =
        remixd_fetch::probe(&bytes, state.fetcher.config().max_pixels).map_err(|e| match e {
            remixd_fetch::FetchError::NotImage => {
                bad("unsupported file type: only JPEG, PNG and WebP images can be uploaded")
            }
            e => bad(format!("{field} {e}")),
        })?;
    let name = file_name(name, kind.extension());
    let mut token = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut token);
    let key = format!("uploads/{}/{path}/{name}", hex::encode(token));
    if !remixd_store::blobs::valid_key(&key) {
        return Err(bad("uploadPath and fileName together are too long"));
    }
    let size = bytes.len();
    state.blobs.put(&key, bytes).await.map_err(|e| {
        if e.is_full() {
            tracing::warn!(error = %e, "upload: storage full");
            return storage_full();
        }
        tracing::error!(error = %e, "upload: storage error");
        UploadError {
            code: 500,
            msg: "could not store the file".into(),
            retry_after: None,
        }
    })?;
    let now = now_millis();
    let record = UploadRecord {
        key: key.clone(),
        account_id: caller.account_id.clone(),
        file_size: size as i64,
        mime_type: kind.mime().to_string(),
        create_time: now,
        expire_time: now + state.cfg.uploads_ttl_ms,
    };
    let quota = state.cfg.upload_quota_bytes;
    let recorded = if quota == 0 {
        state.store.record_upload(&record).await.map(|()| true)
    } else {
        state
            .store
            .record_upload_within(&record, i64::try_from(quota).unwrap_or(i64::MAX))
            .await
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            let _ = state.blobs.delete(&key).await;
            return Err(quota_full(quota));
        }
        Err(e) => {
            let _ = state.blobs.delete(&key).await;
            return Err(e.into());
        }
    }
    let uploaded_at = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(now as u64),
    )
    .to_string();
    Ok(Json(UploadOk {
        success: true,
        code: 200,
        msg: "File uploaded successfully",
        data: UploadData {
            file_name: name.clone(),
            file_path: format!("{path}/{name}"),
            download_url: format!("{}/files/{key}", state.cfg.public_url.trim_end_matches('/')),
            file_size: size,
            mime_type: kind.mime(),
            uploaded_at,
        },
    }))
}

/// `POST /api/file-stream-upload`, multipart: `file`, `uploadPath`, `fileName`.
#[utoipa::path(
    post,
    path = "/api/file-stream-upload",
    operation_id = "fileStreamUpload",
    tag = "uploads",
    request_body(content = crate::openapi::StreamUploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Stored.", body = UploadOk),
        crate::openapi::UploadErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn stream_upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> UploadResult {
    let limit = state.cfg.max_upload_bytes;
    let (caller, _slot) = match admit(&state, &headers).await {
        Ok(admitted) => admitted,
        Err(e) => {
            if let Ok(form) = form {
                drain_form(form, limit + (1 << 20)).await;
            }
            return Err(e);
        }
    };
    // A missing or non-multipart Content-Type answers in the upload envelope too.
    let mut form = form.map_err(|e| bad(format!("malformed multipart body: {}", e.body_text())))?;
    let (mut file, mut path, mut name, mut part_name) = (None, None, None, None);
    let malformed = |e: axum::extract::multipart::MultipartError| {
        bad(format!("malformed multipart body: {}", e.body_text()))
    };
    // Each known part at most once: a repeated one is ambiguous, so it is refused.
    let twice = |name: &str| bad(format!("{name} is given more than once"));
    while let Some(mut field) = form.next_field().await.map_err(malformed)? {
        match field.name().unwrap_or("") {
            "file" if file.is_some() => return Err(twice("file")),
            "uploadPath" if path.is_some() => return Err(twice("uploadPath")),
            "fileName" if name.is_some() => return Err(twice("fileName")),
            "file" => {
                part_name = field.file_name().map(str::to_string);
                // The chunks are kept as they come and joined once at the end, into one
                // buffer of the exact size (a growing buffer would copy itself as it
                // doubles). Reading stops at the cap: nothing past it is buffered.
                let (mut chunks, mut len) = (Vec::new(), 0u64);
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    len += chunk.len() as u64;
                    if len > limit {
                        return Err(too_large(format!(
                            "file is larger than the limit of {limit} bytes"
                        )));
                    }
                    chunks.push(chunk);
                }
                file = Some(match chunks.len() {
                    1 => chunks.pop().expect("one chunk"),
                    _ => {
                        let mut buf = Vec::with_capacity(len as usize);
                        for c in &chunks {
                            buf.extend_from_slice(c);
                        }
                        Bytes::from(buf)
                    }
                });
            }
            "uploadPath" => path = Some(field.text().await.map_err(malformed)?),
            "fileName" => name = Some(field.text().await.map_err(malformed)?),
            _ => {}
        }
    }
    let file = file.ok_or_else(|| bad("Missing required parameter: file"))?;
    let path = upload_path(path)?;
    let name = name.filter(|n| !n.is_empty()).or(part_name);
    store_upload(&state, &caller, "file", path, name.as_deref(), file).await
}

/// Reads a JSON request body of at most `limit` bytes.
async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, UploadError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return Err(bad("Content-Type must be application/json"));
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        too_large(format!(
            "request body is larger than the limit of {limit} bytes"
        ))
    })
}

/// The fields of the JSON upload bodies, each left as its raw JSON text inside the
/// request bytes: nothing is copied until a field is read ([`text`]).
#[derive(Deserialize)]
struct UploadFields<'a> {
    #[serde(rename = "fileUrl", borrow, default)]
    file_url: Option<&'a RawValue>,
    #[serde(rename = "base64Data", borrow, default)]
    base64_data: Option<&'a RawValue>,
    #[serde(rename = "uploadPath", borrow, default)]
    upload_path: Option<&'a RawValue>,
    #[serde(rename = "fileName", borrow, default)]
    file_name: Option<&'a RawValue>,
}

fn fields(body: &[u8]) -> Result<UploadFields<'_>, UploadError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(bad("request body must be a JSON object")),
            Err(e) => Err(bad(format!("request body is not valid JSON: {e}"))),
        };
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("request body is not valid JSON: {e}")))
}

/// A string field: borrowed from the request when it has no escapes (base64 never
/// has), owned otherwise; `None` when absent, null or empty.
fn text<'a>(raw: Option<&'a RawValue>, k: &str) -> Result<Option<Cow<'a, str>>, UploadError> {
    let Some(raw) = raw else { return Ok(None) };
    if let Ok(s) = serde_json::from_str::<&'a str>(raw.get()) {
        return Ok((!s.is_empty()).then_some(Cow::Borrowed(s)));
    }
    match serde_json::from_str::<Option<String>>(raw.get()) {
        Ok(s) => Ok(s.filter(|s| !s.is_empty()).map(Cow::Owned)),
        Err(_) => Err(bad(format!("{k} must be a string"))),
    }
}

/// Base64 with the standard alphabet; padding optional, as clients differ on it.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Skips ASCII whitespace (MIME line breaks) on the way into the base64 decoder.
/// By hand because the decoder refuses whitespace and stripping it first would copy
/// the whole text.
struct SkipSpace<'a>(&'a [u8]);

impl Read for SkipSpace<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let Some((&c, rest)) = self.0.split_first() else {
                break;
            };
            self.0 = rest;
            if !c.is_ascii_whitespace() {
                buf[n] = c;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Decodes `text` into one buffer of exactly the decoded size. The size comes from
/// the encoded length (whitespace and padding left out), so more than `limit` bytes is
/// refused before anything is decoded or allocated.
fn decode_base64(text: &str, limit: u64) -> Result<Vec<u8>, UploadError> {
    let b = text.as_bytes();
    let spaces = b.iter().filter(|c| c.is_ascii_whitespace()).count();
    let padding = b
        .iter()
        .rev()
        .filter(|c| !c.is_ascii_whitespace())
        .take(2)
        .take_while(|&&c| c == b'=')
        .count();
    let size = (b.len() - spaces - padding) * 3 / 4;
    if size as u64 > limit {
        return Err(too_large(format!(
            "file is larger than the limit of {limit} bytes"
        )));
    }
    let invalid = |e: &dyn std::fmt::Display| bad(format!("base64Data is not valid base64: {e}"));
    let mut out = vec![0u8; size];
    if spaces == 0 {
        let n = BASE64.decode_slice(b, &mut out).map_err(|e| invalid(&e))?;
        if n != size {
            return Err(invalid(&"its length does not match its padding"));
        }
    } else {
        let mut reader = base64::read::DecoderReader::new(SkipSpace(b), &BASE64);
        reader.read_exact(&mut out).map_err(|e| invalid(&e))?;
        if reader.read(&mut [0u8; 1]).map_err(|e| invalid(&e))? != 0 {
            return Err(invalid(&"its length does not match its padding"));
        }
    }
    Ok(out)
}

/// `POST /api/file-url-upload`, JSON `{fileUrl, uploadPath, fileName?}`.
#[utoipa::path(
    post,
    path = "/api/file-url-upload",
    operation_id = "fileUrlUpload",
    tag = "uploads",
    description = "The server downloads `fileUrl` (30 s timeout, the address policy of user-supplied URLs).",
    request_body(content = crate::openapi::UrlUploadRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored.", body = UploadOk),
        crate::openapi::UploadErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn url_upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> UploadResult {
    let (caller, _slot) = match admit(&state, &headers).await {
        Ok(admitted) => admitted,
        Err(e) => {
            drain(body, 64 * 1024).await;
            return Err(e);
        }
    };
    let body = json_body(&headers, body, 64 * 1024).await?;
    let f = fields(&body)?;
    let url =
        text(f.file_url, "fileUrl")?.ok_or_else(|| bad("Missing required parameter: fileUrl"))?;
    let path = upload_path(text(f.upload_path, "uploadPath")?.map(Cow::into_owned))?;
    let name = text(f.file_name, "fileName")?.map(Cow::into_owned);
    let limit = state.cfg.max_upload_bytes;
    let bytes = state
        .fetcher
        .download(&url, limit)
        .await
        .map_err(|e| match e {
            remixd_fetch::FetchError::TooLarge { .. } => too_large(format!("fileUrl {e}")),
            e => bad(format!("fileUrl {e}")),
        })?;
    let from_url = name.clone().or_else(|| {
        url::Url::parse(&url).ok().and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next_back().map(str::to_string))
        })
    });
    store_upload(&state, &caller, "fileUrl", path, from_url.as_deref(), bytes).await
}

/// `POST /api/file-base64-upload`, JSON `{base64Data, uploadPath, fileName?}`.
#[utoipa::path(
    post,
    path = "/api/file-base64-upload",
    operation_id = "fileBase64Upload",
    tag = "uploads",
    request_body(content = crate::openapi::Base64UploadRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored.", body = UploadOk),
        crate::openapi::UploadErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn base64_upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> UploadResult {
    let max = state.cfg.max_upload_bytes;
    let limit = (max as usize / 3 + 1) * 4 + 64 * 1024;
    let (caller, _slot) = match admit(&state, &headers).await {
        Ok(admitted) => admitted,
        Err(e) => {
            drain(body, limit as u64).await;
            return Err(e);
        }
    };
    let body = json_body(&headers, body, limit).await?;
    let f = fields(&body)?;
    let data = text(f.base64_data, "base64Data")?
        .ok_or_else(|| bad("Missing required parameter: base64Data"))?;
    let path = upload_path(text(f.upload_path, "uploadPath")?.map(Cow::into_owned))?;
    let name = text(f.file_name, "fileName")?.map(Cow::into_owned);
    let bytes = base64_data(&data, max)?;
    // The request (base64 is a third larger than the file) is not needed past here.
    drop(data);
    drop(body);
    store_upload(
        &state,
        &caller,
        "base64Data",
        path,
        name.as_deref(),
        Bytes::from(bytes),
    )
    .await
}

/// The bytes of `base64Data`: a data URL (`data:<mime>;base64,...`) or plain base64;
/// the declared type is ignored, ASCII whitespace skipped, at most `max` bytes.
fn base64_data(data: &str, max: u64) -> Result<Vec<u8>, UploadError> {
    let b64 = match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, b)| b)
            .ok_or_else(|| bad("base64Data is a data URL without ';base64,'"))?,
        None => data,
    };
    decode_base64(b64, max)
}

pub use crate::links::DOWNLOAD_LINK_MS;

/// Whether `expires`/`signature` query values make a valid, unexpired link to
/// `file_key`: only the canonical signature counts (see [`crate::links::LinkSigner::verify`]).
pub(crate) async fn link_valid(
    state: &AppState,
    file_key: &str,
    expires: &str,
    signature: &str,
) -> Result<bool, ApiError> {
    let signer = state.link_signer().await?;
    Ok(signer.verify(file_key, expires, signature, now_millis()))
}

/// `POST /api/v1/common/download-url` `{"url": ...}`: a link to one of this server's files, valid 20 minutes.
#[utoipa::path(
    post,
    path = "/api/v1/common/download-url",
    operation_id = "downloadUrl",
    tag = "account",
    description = "The URL may be spelt any way that names this server (host, port, case, dot segments, percent escapes); only the caller's own uploads and the results of its own tasks are signed.",
    request_body(content = crate::openapi::DownloadUrlRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "A signed link, valid 20 minutes.", body = Envelope<String>),
        crate::openapi::DownloadUrlErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn download_url(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Envelope<String>>, ApiError> {
    state.check_enabled("download-url")?;
    let caller = authenticate(&*state.store, &headers).await?;
    let body = crate::handlers::json_body(&state, &headers, body).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::validation(format!("request body is not valid JSON: {e}")))?;
    let url = v
        .get("url")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::validation("url is required"))?;
    let file_key = own_file_key(&state, url).ok_or_else(|| {
        ApiError::validation("url is not a result or upload URL issued by this server")
    })?;
    // Only the caller's own files: a link to another account's file is never signed. One
    // message for unknown, expired and foreign files, so a guess learns nothing.
    if !crate::links::account_may_use(&state, &caller.account_id, &file_key).await? {
        return Err(ApiError::validation(
            "url is not usable by this account: the file does not exist or has expired, or belongs to another account",
        ));
    }
    Ok(ok(crate::links::download_link(&state, &file_key).await?))
}

/// The storage key behind a URL of this server's `/files/` (a result or an upload), by
/// any spelling of this server ([`remixd_store::blobs::classify_url`]).
pub fn own_file_key(state: &AppState, url: &str) -> Option<String> {
    match classify_url(&crate::links::origin(state)?, url) {
        FileUrl::File(key) => Some(key),
        FileUrl::Foreign | FileUrl::NotAFile => None,
    }
}

/// The upload parsers for the fuzzing harness (`fuzz/`); not part of the API. Errors
/// are the messages the client would get.
#[doc(hidden)]
pub mod fuzzing {
    /// `uploadPath`'s rule.
    pub fn upload_path(path: Option<String>) -> Result<String, String> {
        super::upload_path(path).map_err(|e| e.msg)
    }

    /// The stored file name for a given `fileName` and a sniffed extension.
    pub fn file_name(given: Option<&str>, ext: &str) -> String {
        super::file_name(given, ext)
    }

    /// `base64Data` (plain or a data URL) to bytes.
    pub fn base64_data(data: &str) -> Result<Vec<u8>, String> {
        super::base64_data(data, u64::MAX).map_err(|e| e.msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_paths() {
        assert_eq!(
            upload_path(Some("images/user-uploads".into())).unwrap(),
            "images/user-uploads"
        );
        for bad in ["", "/abs", "trail/", "a//b", "a/../b", "sp ace", "ü"] {
            assert!(upload_path(Some(bad.into())).is_err(), "{bad}");
        }
        assert_eq!(
            upload_path(None).unwrap_err().msg,
            "Missing required parameter: uploadPath"
        );
    }

    #[test]
    fn base64_data_plain_or_data_url() {
        assert_eq!(base64_data("aGk=", 1000).unwrap(), b"hi");
        assert_eq!(
            base64_data("data:image/png;base64,aG k=\n", 1000).unwrap(),
            b"hi"
        );
        // The declared type is ignored, even when empty.
        assert_eq!(base64_data("data:;base64,aGk=", 1000).unwrap(), b"hi");
        let err = base64_data("data:image/png,aGk=", 1000).unwrap_err().msg;
        assert_eq!(err, "base64Data is a data URL without ';base64,'");
        // Padding is optional; a character outside the alphabet is not.
        assert_eq!(base64_data("aGk", 1000).unwrap(), b"hi");
        let err = base64_data("aGk=!!", 1000).unwrap_err().msg;
        assert!(err.starts_with("base64Data is not valid base64"), "{err}");
    }

    #[test]
    fn file_names_are_made_safe() {
        assert_eq!(file_name(Some("a.png"), "png"), "a.png");
        assert_eq!(file_name(Some("../../etc/passwd"), "png"), "passwd");
        assert_eq!(file_name(Some("my cat (1).png"), "png"), "my_cat__1_.png");
        assert_eq!(file_name(Some(".hidden"), "png"), "hidden");
        assert!(file_name(None, "webp").ends_with(".webp"));
    }

    #[test]
    fn base64_decodes_into_a_buffer_of_exactly_the_file_size() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        for len in 0..70usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let padded = STANDARD.encode(&data);
            // MIME-style line breaks every 76 characters, and stray spaces.
            let wrapped: String = padded
                .as_bytes()
                .chunks(7)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\r\n ");
            for text in [padded.clone(), STANDARD_NO_PAD.encode(&data), wrapped] {
                let out = decode_base64(&text, 1000).unwrap();
                assert_eq!(out, data, "{text:?}");
                assert_eq!(out.capacity(), data.len(), "one exact buffer for {text:?}");
            }
        }
        let e = decode_base64("aGk=!!", 1000).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(
            e.msg.starts_with("base64Data is not valid base64"),
            "{}",
            e.msg
        );
        assert_eq!(decode_base64("a", 1000).unwrap_err().code, 400);
    }

    #[test]
    fn oversized_base64_is_refused_from_its_length_before_decoding() {
        // Not even valid base64: a 413, not a 400, shows nothing was decoded.
        let text = "@".repeat(1336);
        let e = decode_base64(&text, 1000).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (413, "file is larger than the limit of 1000 bytes")
        );
        // 1336 characters are 1002 bytes; with padding and whitespace left out, 1000 fit.
        let ok = format!("{}==\n", "A".repeat(1334));
        assert_eq!(decode_base64(&ok, 1000).unwrap().len(), 1000);
    }

    #[test]
    fn json_fields_borrow_from_the_request() {
        let body = br#"{"base64Data":"QUJD","uploadPath":"a\/b","fileName":null,"x":[1]}"#;
        let f = fields(body).unwrap();
        let data = text(f.base64_data, "base64Data").unwrap().unwrap();
        assert!(matches!(data, Cow::Borrowed("QUJD")), "{data:?}");
        let path = text(f.upload_path, "uploadPath").unwrap().unwrap();
        assert!(matches!(&path, Cow::Owned(p) if p == "a/b"), "{path:?}");
        assert!(text(f.file_name, "fileName").unwrap().is_none());
        assert!(text(f.file_url, "fileUrl").unwrap().is_none());
        let f = fields(br#"{"fileName": 5}"#).unwrap();
        assert_eq!(
            text(f.file_name, "fileName").unwrap_err().msg,
            "fileName must be a string"
        );
        assert_eq!(
            fields(b"[1]").err().unwrap().msg,
            "request body must be a JSON object"
        );
        assert!(fields(b"{nope")
            .err()
            .unwrap()
            .msg
            .starts_with("request body is not valid JSON"));
    }
}
