//! remixd's HTTP API.
//!
//! The only crate that knows the contract's wire types: the envelope, the field names
//! of createTask and recordInfo, the HTTP status table. Handlers authenticate, check
//! limits, turn the request into domain values once ([`validate`]), and call the store.
//! Every error, including malformed JSON, a wrong content type, an oversized body, an
//! unknown route and a panic, answers in the envelope through [`error::ApiError`].

pub mod auth;
pub mod error;
mod handlers;
pub mod limits;
pub mod openapi;
pub mod uploads;
pub mod validate;
pub mod wire;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use remixd_domain::CreditPrices;
use remixd_engine::Engine;
use remixd_store::{Blobs, Store};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, IsEnvelopeError};
use crate::limits::Limits;

/// How error envelopes map to HTTP statuses (`api.error_http_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorHttpStatus {
    /// The HTTP status mirrors the envelope code (non-standard codes mapped).
    #[default]
    Mirror,
    /// HTTP 200 for every envelope, as the hosted service is observed to answer.
    #[serde(rename = "always-200")]
    Always200,
}

/// Endpoint names for `api.disabled`.
pub const ENDPOINTS: [&str; 7] = [
    "createTask",
    "recordInfo",
    "credit",
    "cancel",
    "stream",
    "upload",
    "download-url",
];

/// The API's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub error_http_status: ErrorHttpStatus,
    pub maintenance: bool,
    /// Endpoint names (see [`ENDPOINTS`]) answered with 505.
    pub disabled: Vec<String>,
    pub create_per_10s: u32,
    pub query_per_s: u32,
    pub prices: CreditPrices,
    /// Largest JSON body accepted.
    pub max_json_bytes: usize,
    /// Base of every URL handed out (`server.public_url`).
    pub public_url: String,
    /// Largest upload.
    pub max_upload_bytes: u64,
    /// How long uploads are kept.
    pub uploads_ttl_ms: i64,
    /// Uploads per account per 10 s (0: no limit).
    pub uploads_per_10s: u32,
    /// Bytes of unexpired uploads an account may keep (0: no quota).
    pub upload_quota_bytes: u64,
    /// Uploads being handled at once for one account (0: no cap).
    pub uploads_in_flight_per_account: usize,
    /// Uploads being handled at once in this process (0: no cap).
    pub uploads_in_flight: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            error_http_status: ErrorHttpStatus::Mirror,
            maintenance: false,
            disabled: Vec::new(),
            create_per_10s: 20,
            query_per_s: 10,
            prices: CreditPrices::default(),
            max_json_bytes: 1 << 20,
            public_url: "http://127.0.0.1:8080".into(),
            max_upload_bytes: 10 * 1024 * 1024,
            uploads_ttl_ms: 24 * 3_600_000,
            uploads_per_10s: 20,
            upload_quota_bytes: 1 << 30,
            uploads_in_flight_per_account: 4,
            uploads_in_flight: 8,
        }
    }
}

/// What the API tells the rest of its process (the binary wires these to the workers).
#[derive(Clone)]
pub struct Hooks {
    /// A task was created: wake a fetch worker.
    pub created: Arc<dyn Fn() + Send + Sync>,
    /// A task was cancelled (already failed in the store): stop its work, send its callback.
    pub cancelled: Arc<dyn Fn(&remixd_domain::TaskId) + Send + Sync>,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            created: Arc::new(|| {}),
            cancelled: Arc::new(|_| {}),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blobs: Blobs,
    pub engine: Arc<dyn Engine>,
    pub fetcher: remixd_fetch::Fetcher,
    pub cfg: ApiConfig,
    pub limits: Limits,
    pub hooks: Hooks,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Blobs,
        engine: Arc<dyn Engine>,
        fetcher: remixd_fetch::Fetcher,
        cfg: ApiConfig,
        hooks: Hooks,
    ) -> Self {
        let limits = Limits::new(cfg.create_per_10s, cfg.query_per_s).with_uploads(
            cfg.uploads_per_10s,
            cfg.uploads_in_flight_per_account,
            cfg.uploads_in_flight,
        );
        Self {
            store,
            blobs,
            engine,
            fetcher,
            cfg,
            limits,
            hooks,
        }
    }

    /// 505 when the operator switched this endpoint off.
    pub(crate) fn check_enabled(&self, endpoint: &str) -> Result<(), ApiError> {
        if self.cfg.disabled.iter().any(|d| d == endpoint) {
            return Err(ApiError::Disabled(format!(
                "the {endpoint} endpoint is disabled on this server"
            )));
        }
        Ok(())
    }
}

/// The whole router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/jobs/createTask", post(handlers::create_task))
        .route("/api/v1/jobs/recordInfo", get(handlers::record_info))
        .route("/api/v1/jobs/cancel", post(handlers::cancel))
        .route("/api/v1/jobs/stream", get(handlers::stream))
        .route("/api/v1/chat/credit", get(handlers::credit))
        .route("/api/v1/common/download-url", post(uploads::download_url))
        .route(
            "/api/file-stream-upload",
            // Multipart framing around a file at the limit.
            post(uploads::stream_upload).layer(axum::extract::DefaultBodyLimit::max(
                state.cfg.max_upload_bytes as usize + (1 << 20),
            )),
        )
        .route("/api/file-url-upload", post(uploads::url_upload))
        .route("/api/file-base64-upload", post(uploads::base64_upload))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/files/{*key}", get(handlers::file))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error_status,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Only `/healthz` and `/readyz`, for worker-only processes.
pub fn health_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .fallback(handlers::not_found)
        .with_state(state)
}

/// Applies `api.error_http_status = "always-200"` to error envelopes.
async fn error_status(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if state.cfg.error_http_status == ErrorHttpStatus::Always200
        && resp.extensions().get::<IsEnvelopeError>().is_some()
    {
        *resp.status_mut() = StatusCode::OK;
    }
    resp
}
