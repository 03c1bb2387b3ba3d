//! The handlers: createTask, recordInfo, credit, health, readiness and result files.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use remixd_domain::{now_millis, TaskId, MODEL_NAME};
use remixd_store::{BlobError, CreateOutcome, NewTask};
use serde::Serialize;

use crate::auth::authenticate;
use crate::error::{ok, ApiError, Envelope};
use crate::validate;
use crate::wire::RecordInfo;
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;

/// Reads a JSON body: the content type must say JSON, the size is capped.
async fn json_body(state: &AppState, headers: &HeaderMap, body: Body) -> AppResult<bytes::Bytes> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::validation(
            "Content-Type must be application/json",
        ));
    }
    let limit = state.cfg.max_json_bytes;
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util_limit::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::validation(format!(
                "request body is larger than the limit of {limit} bytes"
            ))
        } else {
            ApiError::validation("request body could not be read")
        }
    })
}

mod http_body_util_limit {
    //! The length-limit error type, named for the downcast above.
    pub use axum::extract::rejection::LengthLimitError;
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    task_id: String,
}

pub async fn create_task(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> AppResult<Json<Envelope<Created>>> {
    state.check_enabled("createTask")?;
    let caller = authenticate(&*state.store, &headers).await?;
    if state.cfg.maintenance {
        return Err(ApiError::Maintenance);
    }
    state
        .limits
        .check_create(&caller.account_id)
        .map_err(|secs| ApiError::RateLimited {
            msg: "too many tasks created; slow down".into(),
            retry_after_s: secs,
        })?;
    let body = json_body(&state, &headers, body).await?;
    let req = validate::create_request(&body, || rand::thread_rng().gen())?;
    let cost = state
        .cfg
        .prices
        .cost(req.input.rendering_speed, req.input.num_images);
    let id = TaskId::new();
    let outcome = state
        .store
        .create_task(NewTask {
            id,
            account_id: caller.account_id.clone(),
            key_id: caller.key_id.clone(),
            model: MODEL_NAME.into(),
            param: req.param,
            input: req.input,
            callback_url: req.callback_url,
            cost,
            now: now_millis(),
        })
        .await?;
    match outcome {
        CreateOutcome::Created { .. } => {
            tracing::info!(task = %id, account = %caller.account_id, cost, "task created");
            (state.on_created)();
            Ok(ok(Created {
                task_id: id.to_string(),
            }))
        }
        CreateOutcome::InsufficientCredits { balance } => Err(ApiError::InsufficientCredits(
            format!("insufficient credits: the task costs {cost}, the balance is {balance}"),
        )),
        CreateOutcome::KeyLimit { cap, limit, used } => Err(ApiError::KeyLimit {
            msg: format!(
                "this API key's {} limit of {limit} credits is reached ({used} used)",
                cap.as_str()
            ),
            retry_after_s: match cap {
                remixd_store::KeyCap::Hourly => 3600,
                remixd_store::KeyCap::Daily => 86_400,
                remixd_store::KeyCap::Total => 86_400,
            },
        }),
    }
}

fn query_param(raw: &Option<String>, name: &str) -> Option<String> {
    let q = raw.as_deref()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub async fn record_info(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> AppResult<Json<Envelope<RecordInfo>>> {
    state.check_enabled("recordInfo")?;
    let caller = authenticate(&*state.store, &headers).await?;
    state
        .limits
        .check_query(&caller.key_id)
        .map_err(|secs| ApiError::RateLimited {
            msg: "too many queries; slow down".into(),
            retry_after_s: secs,
        })?;
    let task_id = query_param(&q, "taskId")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::validation("taskId is required"))?;
    let not_found = || ApiError::NotFound("Task not found".into());
    let id: TaskId = task_id.parse().map_err(|_| not_found())?;
    let task = state
        .store
        .get_task(&id, &caller.account_id)
        .await?
        .ok_or_else(not_found)?;
    Ok(ok(RecordInfo::from(task)))
}

pub async fn credit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> AppResult<Json<Envelope<i64>>> {
    state.check_enabled("credit")?;
    let caller = authenticate(&*state.store, &headers).await?;
    state
        .limits
        .check_query(&caller.key_id)
        .map_err(|secs| ApiError::RateLimited {
            msg: "too many queries; slow down".into(),
            retry_after_s: secs,
        })?;
    Ok(ok(state.store.balance(&caller.account_id).await?))
}

pub async fn healthz() -> Json<Envelope<&'static str>> {
    Json(Envelope {
        code: 200,
        msg: "success".into(),
        data: "ok",
    })
}

#[derive(Serialize)]
pub struct Readiness {
    database: String,
    storage: String,
    engine: String,
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (db, files, engine) = tokio::join!(
        state.store.ping(),
        state.blobs.probe(),
        state.engine.ready()
    );
    let word = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".into());
    let r = Readiness {
        database: word(db.map_err(|e| e.to_string())),
        storage: word(files.map_err(|e| e.to_string())),
        engine: word(engine.map_err(|e| e.to_string())),
    };
    let ready = r.database == "ok" && r.storage == "ok" && r.engine == "ok";
    if ready {
        (
            StatusCode::OK,
            Json(Envelope {
                code: 200,
                msg: "ready".into(),
                data: r,
            }),
        )
            .into_response()
    } else {
        tracing::warn!(database = %r.database, storage = %r.storage, engine = %r.engine, "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Envelope {
                code: 500,
                msg: "not ready".into(),
                data: r,
            }),
        )
            .into_response()
    }
}

/// Storage prefixes served under `/files/`.
const PUBLIC_PREFIXES: [&str; 1] = ["results/"];

/// Serves a stored file (results now, uploads later) by its unguessable key.
pub async fn file(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> AppResult<Response> {
    let not_found = || ApiError::NotFound("File not found".into());
    // Only results are public; fetched inputs and probes stay private.
    if !remixd_store::blobs::valid_key(&key) || !PUBLIC_PREFIXES.iter().any(|p| key.starts_with(p))
    {
        return Err(not_found());
    }
    let bytes = match state.blobs.get(&key).await {
        Ok(b) => b,
        Err(BlobError::NotFound | BlobError::BadKey(_)) => return Err(not_found()),
        Err(e) => return Err(ApiError::internal(e)),
    };
    let ct = match key.rsplit('.').next() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "private, max-age=86400"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}
