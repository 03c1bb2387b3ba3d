//! The one error table: every way a request can fail, its envelope code, its HTTP
//! status and its message.
//!
//! Handlers return [`ApiError`]; nothing else builds an error response. The HTTP status
//! mirrors the envelope code (433 → 429, 455 → 503, 501 → 500, 505 → 403), unless the
//! operator chose `api.error_http_status = "always-200"`, which a middleware applies
//! to responses carrying the [`IsEnvelopeError`] marker. Internal details go to the
//! log, never to the client.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// The contract's envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Envelope<T: Serialize> {
    /// The envelope code; `200` on success. The body code is authoritative.
    pub code: u16,
    /// `success` (readyz: `ready` or `not ready`).
    pub msg: String,
    pub data: T,
}

/// The envelope of every error of the task API: `data` is always `null`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    /// The envelope code: 401, 402, 404, 422, 429, 433, 455, 500 or 505. The HTTP status
    /// mirrors it (433 → 429, 455 → 503, 505 → 403) unless the operator chose
    /// `api.error_http_status = "always-200"`.
    pub code: u16,
    /// A short English sentence; validation errors name the field.
    pub msg: String,
    /// Always `null`.
    #[schema(schema_with = null_schema)]
    pub data: (),
}

/// The JSON Schema of `null`.
fn null_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Null)
        .build()
}

/// A successful envelope: `{"code":200,"msg":"success","data":...}`.
pub fn ok<T: Serialize>(data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        code: 200,
        msg: "success".into(),
        data,
    })
}

/// Every failure a handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    InsufficientCredits(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Validation(String),
    #[error("{msg}")]
    RateLimited { msg: String, retry_after_s: u64 },
    #[error("{msg}")]
    KeyLimit { msg: String, retry_after_s: u64 },
    #[error("the service is in maintenance; task creation is paused")]
    Maintenance,
    /// The server cannot take the request now (its storage is full); nothing was stored.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
    #[error("{0}")]
    Disabled(String),
}

/// Marks a response as an error envelope, so the status middleware can rewrite it.
#[derive(Debug, Clone, Copy)]
pub struct IsEnvelopeError;

/// Seconds clients should wait after a 455 before trying again.
const MAINTENANCE_RETRY_AFTER_S: u64 = 60;
/// Seconds clients should wait when the server's storage is full.
const STORAGE_FULL_RETRY_AFTER_S: u64 = 30;

/// The answer while the disk is full: the client did nothing wrong and may retry.
pub const STORAGE_FULL: &str = "the server's storage is full; nothing was stored, try again later";

impl ApiError {
    pub fn validation(msg: impl Into<String>) -> Self {
        Self::Validation(msg.into())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// The envelope code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::Unauthorized(_) => 401,
            ApiError::InsufficientCredits(_) => 402,
            ApiError::NotFound(_) => 404,
            ApiError::Validation(_) => 422,
            ApiError::RateLimited { .. } => 429,
            ApiError::KeyLimit { .. } => 433,
            ApiError::Maintenance | ApiError::Unavailable(_) => 455,
            ApiError::Internal(_) => 500,
            ApiError::Disabled(_) => 505,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_s, .. }
            | ApiError::KeyLimit { retry_after_s, .. } => Some((*retry_after_s).max(1)),
            ApiError::Maintenance => Some(MAINTENANCE_RETRY_AFTER_S),
            ApiError::Unavailable(_) => Some(STORAGE_FULL_RETRY_AFTER_S),
            _ => None,
        }
    }
}

/// The HTTP status for an envelope code, in `mirror` mode.
pub fn http_status_for(code: u16) -> StatusCode {
    let mapped = match code {
        433 => 429,
        455 => 503,
        501 => 500,
        505 => 403,
        c => c,
    };
    StatusCode::from_u16(mapped).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let body = ErrorEnvelope {
            code,
            msg: self.to_string(),
            data: (),
        };
        let mut resp = (http_status_for(code), Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(IsEnvelopeError);
        resp
    }
}

impl From<remixd_store::StoreError> for ApiError {
    fn from(e: remixd_store::StoreError) -> Self {
        match e {
            remixd_store::StoreError::Full(detail) => {
                tracing::warn!(error = %detail, "storage full");
                ApiError::Unavailable(STORAGE_FULL.into())
            }
            e => ApiError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_matches_the_contract() {
        for (code, http) in [
            (200, 200),
            (401, 401),
            (402, 402),
            (404, 404),
            (422, 422),
            (429, 429),
            (433, 429),
            (455, 503),
            (500, 500),
            (501, 500),
            (505, 403),
        ] {
            assert_eq!(http_status_for(code).as_u16(), http, "code {code}");
        }
    }

    #[test]
    fn retry_after_on_every_429_and_503() {
        for e in [
            ApiError::RateLimited {
                msg: "x".into(),
                retry_after_s: 0,
            },
            ApiError::KeyLimit {
                msg: "x".into(),
                retry_after_s: 3600,
            },
            ApiError::Maintenance,
            ApiError::from(remixd_store::StoreError::Full("disk".into())),
        ] {
            let r = e.into_response();
            assert!(matches!(r.status().as_u16(), 429 | 503));
            let v: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(v >= 1);
        }
    }
}
