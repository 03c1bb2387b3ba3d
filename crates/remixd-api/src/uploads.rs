//! File uploads (API.md §6) and signed download links (§5).
//!
//! Uploads answer in their own envelope, `{"success", "code", "msg", "data"}`, with the
//! codes 400, 401, 413 and 500. The type comes from the bytes (JPEG, PNG or WebP: uploads
//! exist to be task inputs), the size is capped while reading, and the file lands under
//! `uploads/<128 random bits>/<uploadPath>/<fileName>`, kept for `retention.uploads_hours`.
//! Its `downloadUrl` can be given to createTask; workers read it from storage directly.

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
use serde::Serialize;
use serde_json::Value;

use crate::auth::{authenticate, Caller};
use crate::error::{ok, ApiError, Envelope};
use crate::AppState;

/// An upload failure, in the upload envelope.
#[derive(Debug)]
pub struct UploadError {
    code: u16,
    msg: String,
}

fn bad(msg: impl Into<String>) -> UploadError {
    UploadError {
        code: 400,
        msg: msg.into(),
    }
}

impl From<ApiError> for UploadError {
    fn from(e: ApiError) -> Self {
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
        }
    }
}

impl From<remixd_store::StoreError> for UploadError {
    fn from(e: remixd_store::StoreError) -> Self {
        tracing::error!(error = %e, "upload: store error");
        UploadError {
            code: 500,
            msg: "internal error".into(),
        }
    }
}

/// The upload envelope of a failure.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Failure<'a> {
    /// Always `false`.
    success: bool,
    /// 400, 401, 403, 413 or 500; the HTTP status is the same.
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

async fn store_upload(
    state: &AppState,
    caller: &Caller,
    path: String,
    name: Option<&str>,
    bytes: Bytes,
) -> UploadResult {
    let limit = state.cfg.max_upload_bytes;
    if bytes.len() as u64 > limit {
        return Err(UploadError {
            code: 413,
            msg: format!("file is larger than the limit of {limit} bytes"),
        });
    }
    if bytes.is_empty() {
        return Err(bad("file is empty"));
    }
    let kind = remixd_fetch::sniff(&bytes).ok_or_else(|| {
        bad("unsupported file type: only JPEG, PNG and WebP images can be uploaded")
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
        tracing::error!(error = %e, "upload: storage error");
        UploadError {
            code: 500,
            msg: "could not store the file".into(),
        }
    })?;
    let now = now_millis();
    state
        .store
        .record_upload(&UploadRecord {
            key: key.clone(),
            account_id: caller.account_id.clone(),
            file_size: size as i64,
            mime_type: kind.mime().to_string(),
            create_time: now,
            expire_time: now + state.cfg.uploads_ttl_ms,
        })
        .await?;
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
    state.check_enabled("upload")?;
    let caller = authenticate(&*state.store, &headers).await?;
    // A missing or non-multipart Content-Type answers in the upload envelope too.
    let mut form = form.map_err(|e| bad(format!("malformed multipart body: {}", e.body_text())))?;
    let limit = state.cfg.max_upload_bytes;
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
                let mut buf = Vec::new();
                // Stop reading at the cap: nothing past it is buffered.
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    if (buf.len() + chunk.len()) as u64 > limit {
                        return Err(UploadError {
                            code: 413,
                            msg: format!("file is larger than the limit of {limit} bytes"),
                        });
                    }
                    buf.extend_from_slice(&chunk);
                }
                file = Some(Bytes::from(buf));
            }
            "uploadPath" => path = Some(field.text().await.map_err(malformed)?),
            "fileName" => name = Some(field.text().await.map_err(malformed)?),
            _ => {}
        }
    }
    let file = file.ok_or_else(|| bad("Missing required parameter: file"))?;
    let path = upload_path(path)?;
    let name = name.filter(|n| !n.is_empty()).or(part_name);
    store_upload(&state, &caller, path, name.as_deref(), file).await
}

async fn json_object(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<serde_json::Map<String, Value>, UploadError> {
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
    let _ = state;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| UploadError {
            code: 413,
            msg: format!("request body is larger than the limit of {limit} bytes"),
        })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad("request body must be a JSON object")),
        Err(e) => Err(bad(format!("request body is not valid JSON: {e}"))),
    }
}

fn string_field(
    o: &serde_json::Map<String, Value>,
    k: &str,
) -> Result<Option<String>, UploadError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{k} must be a string"))),
    }
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
    state.check_enabled("upload")?;
    let caller = authenticate(&*state.store, &headers).await?;
    let o = json_object(&state, &headers, body, 64 * 1024).await?;
    let url =
        string_field(&o, "fileUrl")?.ok_or_else(|| bad("Missing required parameter: fileUrl"))?;
    let path = upload_path(string_field(&o, "uploadPath")?)?;
    let name = string_field(&o, "fileName")?;
    let limit = state.cfg.max_upload_bytes;
    let bytes = state
        .fetcher
        .download(&url, limit)
        .await
        .map_err(|e| match e {
            remixd_fetch::FetchError::TooLarge { .. } => UploadError {
                code: 413,
                msg: format!("fileUrl {e}"),
            },
            e => bad(format!("fileUrl {e}")),
        })?;
    let from_url = name.clone().or_else(|| {
        url::Url::parse(&url).ok().and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next_back().map(str::to_string))
        })
    });
    store_upload(&state, &caller, path, from_url.as_deref(), bytes).await
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
    state.check_enabled("upload")?;
    let caller = authenticate(&*state.store, &headers).await?;
    let limit = (state.cfg.max_upload_bytes as usize / 3 + 1) * 4 + 64 * 1024;
    let o = json_object(&state, &headers, body, limit).await?;
    let data = string_field(&o, "base64Data")?
        .ok_or_else(|| bad("Missing required parameter: base64Data"))?;
    let path = upload_path(string_field(&o, "uploadPath")?)?;
    let name = string_field(&o, "fileName")?;
    let bytes = base64_data(&data)?;
    store_upload(&state, &caller, path, name.as_deref(), Bytes::from(bytes)).await
}

/// The bytes of `base64Data`: a data URL (`data:<mime>;base64,...`) or plain base64;
/// the declared type is ignored and ASCII whitespace is skipped.
fn base64_data(data: &str) -> Result<Vec<u8>, UploadError> {
    let b64 = match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, b)| b)
            .ok_or_else(|| bad("base64Data is a data URL without ';base64,'"))?,
        None => data,
    };
    let cleaned: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| bad(format!("base64Data is not valid base64: {e}")))
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
    let expires = now_millis() + DOWNLOAD_LINK_MS;
    let signer = state.link_signer().await?;
    Ok(ok(signer.link(&state.cfg.public_url, &file_key, expires)))
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
        super::base64_data(data).map_err(|e| e.msg)
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
        assert_eq!(base64_data("aGk=").unwrap(), b"hi");
        assert_eq!(base64_data("data:image/png;base64,aG k=\n").unwrap(), b"hi");
        // The declared type is ignored, even when empty.
        assert_eq!(base64_data("data:;base64,aGk=").unwrap(), b"hi");
        let err = base64_data("data:image/png,aGk=").unwrap_err().msg;
        assert_eq!(err, "base64Data is a data URL without ';base64,'");
        let err = base64_data("aGk").unwrap_err().msg;
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
}
