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
pub mod links;
pub mod openapi;
pub mod playground;
pub mod uploads;
pub mod validate;
pub mod watch;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use remixd_domain::CreditPrices;
use remixd_engine::Engine;
use remixd_store::{Blobs, Store, TaskRecord};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

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
pub const ENDPOINTS: [&str; 8] = [
    "createTask",
    "recordInfo",
    "credit",
    "cancel",
    "stream",
    "list",
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
    /// `storage.private_files`: plain `/files/` URLs answer 404; answers sign result URLs.
    pub private_files: bool,
    /// `storage.public = "presigned"`: answers and `download-url` hand out presigned
    /// bucket URLs for this server's files (the storage must be a bucket).
    pub presigned_links: bool,
    /// The bucket's origin (`scheme://host:port`) when answers show presigned links: the
    /// playground's policy lets images load from it.
    pub presigned_origin: Option<String>,
    /// `server.playground`: `GET /` and `/playground` serve the web page.
    pub playground: bool,
    /// Open SSE streams per API key (`limits.streams_per_key`); `0`: no cap.
    pub streams_per_key: usize,
    /// How often a stream's shared watcher reads its task.
    pub stream_poll: Duration,
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
            private_files: false,
            presigned_links: false,
            presigned_origin: None,
            playground: true,
            streams_per_key: 8,
            stream_poll: Duration::from_millis(200),
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
    /// Free space of the database's and the files' filesystems (off unless set).
    pub space: remixd_store::SpaceGuard,
    /// The link key, read from the database once: it never changes after it is made.
    signer: tokio::sync::OnceCell<links::LinkSigner>,
    /// The process's shutdown token: open SSE streams end when it fires.
    pub shutdown: CancellationToken,
    /// One shared poller per streamed task.
    pub watchers: watch::Watchers<TaskRecord>,
    /// Open streams per API key.
    pub stream_slots: watch::StreamSlots,
}

/// The error a request body yields when it has not arrived in full within the
/// server's body timeout (`server.body_timeout_ms`). The serving layer produces it;
/// handlers that read a body answer it with a 422 envelope saying so.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in full within {} ms", .0.as_millis())]
pub struct BodyTimeout(pub Duration);

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Blobs,
        engine: Arc<dyn Engine>,
        fetcher: remixd_fetch::Fetcher,
        cfg: ApiConfig,
        hooks: Hooks,
    ) -> Self {
        let limits = Limits::new(cfg.create_per_10s, cfg.query_per_s)
            .with_uploads(
                cfg.uploads_per_10s,
                cfg.uploads_in_flight_per_account,
                cfg.uploads_in_flight,
            )
            .shared_through(store.clone());
        let reader = store.clone();
        let fetch: watch::FetchFn<TaskRecord> = Arc::new(move |id| {
            let store = reader.clone();
            Box::pin(async move { store.task(&id).await.map_err(|e| e.to_string()) })
        });
        let watchers = watch::Watchers::new(fetch, |t| t.state.is_terminal(), cfg.stream_poll);
        let stream_slots = watch::StreamSlots::new(cfg.streams_per_key);
        Self {
            store,
            blobs,
            engine,
            fetcher,
            cfg,
            limits,
            hooks,
            space: remixd_store::SpaceGuard::default(),
            signer: tokio::sync::OnceCell::new(),
            shutdown: CancellationToken::new(),
            watchers,
            stream_slots,
        }
    }

    /// The signer of download links and list cursors.
    pub(crate) async fn link_signer(&self) -> Result<links::LinkSigner, remixd_store::StoreError> {
        self.signer
            .get_or_try_init(|| links::LinkSigner::load(&*self.store))
            .await
            .cloned()
    }

    /// Refuses writes (tasks, uploads) while storage is under its free-space minimum.
    pub fn with_space(mut self, space: remixd_store::SpaceGuard) -> Self {
        self.space = space;
        self
    }

    /// 455 while the storage is under its free-space minimum: accepting work now would
    /// only fail it later.
    pub(crate) fn check_space(&self) -> Result<(), ApiError> {
        self.space.check().map_err(|e| {
            tracing::warn!(reason = %e, "refusing a write: storage is low");
            ApiError::Unavailable(crate::error::STORAGE_FULL.into())
        })
    }

    /// Ties the state to the process's shutdown token (SSE streams end when it fires).
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
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
    let playground = if state.cfg.playground {
        playground::routes()
    } else {
        Router::new()
    };
    playground
        .route("/api/v1/jobs/createTask", post(handlers::create_task))
        .route("/api/v1/jobs/recordInfo", get(handlers::record_info))
        .route("/api/v1/jobs/cancel", post(handlers::cancel))
        .route("/api/v1/jobs/stream", get(handlers::stream))
        .route("/api/v1/jobs/list", get(handlers::list))
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
