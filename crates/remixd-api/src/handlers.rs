//! The handlers: createTask, recordInfo, credit, health, readiness and result files.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use remixd_domain::{now_millis, TaskId, MODEL_NAME};
use remixd_store::blobs::PUBLIC_PREFIXES;
use remixd_store::{BlobError, CreateOutcome, NewTask};
use serde::Serialize;

use crate::auth::authenticate;
use crate::error::{ok, ApiError, Envelope};
use crate::validate;
use crate::wire::RecordInfo;
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;

/// Reads a JSON body: the content type must say JSON, the size is capped.
pub(crate) async fn json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> AppResult<bytes::Bytes> {
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
        if let Some(t) = cause::<crate::BodyTimeout>(&e) {
            return ApiError::validation(format!(
                "request body did not arrive in full within {} ms",
                t.0.as_millis()
            ));
        }
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

/// The first error of type `E` in `e`'s chain of sources.
pub(crate) fn cause<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

mod http_body_util_limit {
    //! The length-limit error type, named for the downcast above.
    pub use axum::extract::rejection::LengthLimitError;
}

/// createTask's `data`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    /// 32 lowercase hex characters (UUIDv7 digits).
    #[schema(pattern = "^[0-9a-f]{32}$")]
    task_id: String,
}

/// Creates a task; its cost is reserved at once.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/createTask",
    operation_id = "createTask",
    tag = "tasks",
    request_body(content = crate::openapi::CreateTaskRequest, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "Extension: the same key and body within 24 h give the same taskId; the same key with another body is a 422. 1 to 255 visible ASCII characters."),
    ),
    responses(
        (status = 200, description = "The task was accepted.", body = Envelope<Created>),
        crate::openapi::CreateErrors,
    ),
    security(("bearer" = [])),
)]
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
    state.check_space()?;
    state
        .limits
        .check_create(&caller.account_id)
        .await
        .map_err(|secs| ApiError::RateLimited {
            msg: "too many tasks created; slow down".into(),
            retry_after_s: secs,
        })?;
    let body = json_body(&state, &headers, body).await?;
    let req = validate::create_request(&body, || rand::thread_rng().gen())?;
    let idempotency = idempotency(&headers, &req.param)?;
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
            idempotency,
        })
        .await?;
    match outcome {
        CreateOutcome::Created { .. } => {
            tracing::info!(task = %id, account = %caller.account_id, cost, "task created");
            (state.hooks.created)();
            Ok(ok(Created {
                task_id: id.to_string(),
            }))
        }
        CreateOutcome::Existing { task_id } => {
            tracing::info!(task = %task_id, "idempotent replay of createTask");
            Ok(ok(Created {
                task_id: task_id.to_string(),
            }))
        }
        CreateOutcome::IdempotencyConflict => Err(ApiError::validation(
            "Idempotency-Key was already used with a different request body",
        )),
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

/// One query parameter's value. A parameter given more than once is refused
/// rather than read as its first (or last) value: the two readings differ, and a
/// client sending both has a bug it should hear about.
fn query_param(raw: &Option<String>, name: &str) -> AppResult<Option<String>> {
    let Some(q) = raw.as_deref() else {
        return Ok(None);
    };
    let mut values = url::form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == name);
    let first = values.next().map(|(_, v)| v.into_owned());
    if values.next().is_some() {
        return Err(ApiError::validation(format!(
            "{name} is given more than once"
        )));
    }
    Ok(first)
}

/// One task of the caller's account.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/recordInfo",
    operation_id = "recordInfo",
    tag = "tasks",
    params(crate::openapi::TaskIdQuery),
    responses(
        (status = 200, description = "The task.", body = Envelope<RecordInfo>),
        crate::openapi::TaskErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn record_info(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> AppResult<Json<Envelope<RecordInfo>>> {
    let caller = querying_caller(&state, &headers, "recordInfo").await?;
    let task = caller_task(&state, &caller, &q).await?;
    let links = crate::links::AnswerLinks::for_answer(&state).await?;
    Ok(ok(links.record(task).await))
}

/// list's `data`: a page of the caller's tasks, newest first.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskPage {
    /// Each as the recordInfo object.
    tasks: Vec<RecordInfo>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// What a list cursor signs: the account, so another account's cursor is refused, and
/// the last task shown. Two newlines: never confusable with a link's "key\nexpires".
fn cursor_message(account_id: &str, last: &TaskId) -> String {
    format!("list-cursor\n{account_id}\n{last}")
}

/// Extension: the caller's own tasks, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/list",
    operation_id = "list",
    tag = "tasks",
    description = "Extension: the caller's own tasks, newest first, each as the recordInfo object. Counts against the key's query rate like recordInfo.",
    params(
        ("limit" = Option<u32>, Query, description = "Tasks per page, 1 to 100; default 20.", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "The `nextCursor` of the previous page; a cursor this server did not issue, or of another account, is a 422."),
    ),
    responses(
        (status = 200, description = "A page of tasks.", body = Envelope<TaskPage>),
        crate::openapi::ListErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> AppResult<Json<Envelope<TaskPage>>> {
    let caller = querying_caller(&state, &headers, "list").await?;
    let limit = match query_param(&q, "limit")? {
        None => 20,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::validation("limit must be an integer from 1 to 100"))?,
    };
    let signer = state.link_signer().await?;
    let before = match query_param(&q, "cursor")?.filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let bad = || {
                ApiError::validation("cursor is not a cursor this server issued to this account")
            };
            let (id, tag) = c.split_once('.').ok_or_else(bad)?;
            let id: TaskId = id.parse().map_err(|_| bad())?;
            if id.to_string() != c[..c.len() - tag.len() - 1]
                || !signer.tag_matches(&cursor_message(&caller.account_id, &id), tag)
            {
                return Err(bad());
            }
            Some(id)
        }
    };
    let mut tasks = state
        .store
        .list_tasks(&caller.account_id, before.as_ref(), limit + 1)
        .await?;
    let next_cursor = if tasks.len() as i64 > limit {
        tasks.truncate(limit as usize);
        tasks.last().map(|t| {
            let tag = signer.tag(&cursor_message(&caller.account_id, &t.id));
            format!("{}.{tag}", t.id)
        })
    } else {
        None
    };
    let links = crate::links::AnswerLinks::for_answer(&state).await?;
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(links.record(t).await);
    }
    Ok(ok(TaskPage {
        tasks: records,
        next_cursor,
    }))
}

/// The account's credit balance.
#[utoipa::path(
    get,
    path = "/api/v1/chat/credit",
    operation_id = "credit",
    tag = "account",
    responses(
        (status = 200, description = "The balance, an integer.", body = Envelope<i64>),
        crate::openapi::QueryErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn credit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> AppResult<Json<Envelope<i64>>> {
    let caller = querying_caller(&state, &headers, "credit").await?;
    Ok(ok(state.store.balance(&caller.account_id).await?))
}

/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses((status = 200, description = "Up.", body = Envelope<String>)),
    security(()),
)]
pub async fn healthz() -> Json<Envelope<&'static str>> {
    Json(Envelope {
        code: 200,
        msg: "success".into(),
        data: "ok",
    })
}

/// readyz's `data`: `ok`, or what is wrong, for each dependency.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    database: String,
    storage: String,
    engine: String,
}

/// The database and storage are reachable and the engine is ready.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready (`msg` is `ready`).", body = Envelope<Readiness>),
        (status = 503, description = "Not ready: the envelope code is 500, `msg` is `not ready`, and `data` says what is wrong.", body = Envelope<Readiness>),
    ),
    security(()),
)]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (db, files, engine) = tokio::join!(
        state.store.ping(),
        state.blobs.probe(),
        state.engine.ready()
    );
    // Details (which may hold paths) go to the log; the answer says what is wrong.
    let db = db.map_err(|e| {
        tracing::warn!(error = %e, "readyz: database");
        match e {
            remixd_store::StoreError::Full(_) => "cannot write: the disk is full".to_string(),
            _ => "cannot read or write".to_string(),
        }
    });
    let files = files.map_err(|e| {
        tracing::warn!(error = %e, "readyz: storage");
        if e.is_full() {
            "cannot write: the disk is full".to_string()
        } else {
            "cannot write or read back a file".to_string()
        }
    });
    // Under the free-space minimum is not ready either, even while writes still work.
    let (db, files) = match state.space.check() {
        Err(
            e @ remixd_store::SpaceError::Low {
                what: "database", ..
            },
        ) => (db.and(Err(e.to_string())), files),
        Err(e) => (db, files.and(Err(e.to_string()))),
        Ok(()) => (db, files),
    };
    let word = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".into());
    let r = Readiness {
        database: word(db),
        storage: word(files),
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

/// Serves a stored file (a result or an upload) by its unguessable key. With
/// `storage.private_files`, only through a valid signed link.
#[utoipa::path(
    get,
    path = "/files/{key}",
    operation_id = "file",
    tag = "files",
    params(
        ("key" = String, Path, description = "The file's storage key under `results/` or `uploads/`, as in a result or upload URL (it may contain slashes)."),
        ("expires" = Option<String>, Query, description = "Of a signed link (download-url): Unix milliseconds."),
        ("signature" = Option<String>, Query, description = "Of a signed link (download-url): its HMAC, hex."),
    ),
    responses(
        (status = 200, description = "The file; its type comes from its bytes.", content(
            ("image/png"),
            ("image/jpeg"),
            ("image/webp"),
            ("application/octet-stream"),
        )),
        crate::openapi::FileErrors,
    ),
    security(()),
)]
pub async fn file(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> AppResult<Response> {
    let not_found = || ApiError::NotFound("File not found".into());
    // A key that is not UTF-8 once percent-decoded names no file.
    let Path(key) = key.map_err(|_| not_found())?;
    // Only results and uploads are public; fetched inputs and probes stay private.
    if !remixd_store::blobs::valid_key(&key) || !PUBLIC_PREFIXES.iter().any(|p| key.starts_with(p))
    {
        return Err(not_found());
    }
    // A signed link (download-url) must carry a valid, unexpired signature; a link
    // whose signature was removed is a plain URL, which private files refuse.
    let signed = match query_param(&q, "signature").map_err(|_| not_found())? {
        Some(sig) => {
            let expires = query_param(&q, "expires")
                .map_err(|_| not_found())?
                .unwrap_or_default();
            if !crate::uploads::link_valid(&state, &key, &expires, &sig).await? {
                return Err(not_found());
            }
            true
        }
        None => false,
    };
    if state.cfg.private_files && !signed {
        return Err(not_found());
    }
    let mut ct = match key.rsplit('.').next() {
        Some("png") => "image/png".to_string(),
        Some("jpg" | "jpeg") => "image/jpeg".to_string(),
        Some("webp") => "image/webp".to_string(),
        _ => "application/octet-stream".to_string(),
    };
    if key.starts_with("uploads/") {
        // Uploads expire; their type was taken from their bytes.
        let up = state.store.upload(&key).await?.ok_or_else(not_found)?;
        if up.expire_time < now_millis() {
            return Err(not_found());
        }
        ct = up.mime_type;
    }
    let bytes = match state.blobs.get(&key).await {
        Ok(b) => b,
        Err(BlobError::NotFound | BlobError::BadKey(_)) => return Err(not_found()),
        Err(e) => return Err(ApiError::internal(e)),
    };
    Ok((
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
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

/// Reads `Idempotency-Key`: 1 to 255 visible ASCII characters, hashed with the body.
fn idempotency(headers: &HeaderMap, param: &str) -> AppResult<Option<remixd_store::Idempotency>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::validation("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })?;
    use sha2::Digest;
    let body_hash = hex::encode(sha2::Sha256::digest(param.as_bytes()));
    Ok(Some(remixd_store::Idempotency {
        key: key.to_string(),
        body_hash,
    }))
}

/// The `taskId` query parameter, resolved to a task of the caller's account.
async fn caller_task(
    state: &AppState,
    caller: &crate::auth::Caller,
    q: &Option<String>,
) -> AppResult<remixd_store::TaskRecord> {
    let task_id = query_param(q, "taskId")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::validation("taskId is required"))?;
    let not_found = || ApiError::NotFound("Task not found".into());
    let id: TaskId = task_id.parse().map_err(|_| not_found())?;
    state
        .store
        .get_task(&id, &caller.account_id)
        .await?
        .ok_or_else(not_found)
}

/// `POST /api/v1/jobs/cancel?taskId=`: a live task ends `fail` with failCode 499, refunded.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/cancel",
    operation_id = "cancel",
    tag = "tasks",
    description = "Extension: cancels a task that is not yet terminal; it ends `fail` with failCode `499` and its credits are refunded. A terminal task answers 422.",
    params(crate::openapi::TaskIdQuery),
    responses(
        (status = 200, description = "The cancelled task.", body = Envelope<RecordInfo>),
        crate::openapi::TaskErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> AppResult<Json<Envelope<RecordInfo>>> {
    let caller = querying_caller(&state, &headers, "cancel").await?;
    let task = caller_task(&state, &caller, &q).await?;
    let already = |s: &str| {
        ApiError::validation(format!(
            "taskId {} is already {s} and cannot be cancelled",
            task.id
        ))
    };
    if task.state.is_terminal() {
        return Err(already(task.state.as_str()));
    }
    match state
        .store
        .fail(
            &task.id,
            None,
            remixd_domain::FailCode::Cancelled,
            "cancelled by the client",
            now_millis(),
        )
        .await?
    {
        remixd_store::Finish::Done { refunded } => {
            tracing::info!(task = %task.id, refunded, "task cancelled");
            (state.hooks.cancelled)(&task.id);
        }
        remixd_store::Finish::NotOwner => {
            let now = state
                .store
                .task(&task.id)
                .await?
                .map(|t| t.state.as_str())
                .unwrap_or("gone");
            return Err(already(now));
        }
    }
    let task = state
        .store
        .task(&task.id)
        .await?
        .ok_or_else(|| ApiError::NotFound("Task not found".into()))?;
    let links = crate::links::AnswerLinks::for_answer(&state).await?;
    Ok(ok(links.record(task).await))
}

/// `GET /api/v1/jobs/stream?taskId=`: Server-Sent Events, one `task` event per change of
/// state or progress (its data is the recordInfo object), closing after a terminal state.
///
/// Streams on one task share one watcher that reads the database every 200 ms
/// ([`crate::watch`]), so it works whichever node runs the task and costs one read per
/// interval however many streams are open. The query limit is charged once, when the
/// stream opens; a key has at most `limits.streams_per_key` streams open (429 past
/// it). Every stream ends when the server begins to shut down.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/stream",
    operation_id = "stream",
    tag = "tasks",
    description = "Extension: Server-Sent Events, one `task` event per change of state or progress (its data is the recordInfo object), closing after the terminal state. A key has a limited number of streams open at once (429 past it).",
    params(crate::openapi::TaskIdQuery),
    responses(
        (status = 200, description = "An event stream of `task` events, each carrying a recordInfo object as JSON.", content_type = "text/event-stream", body = crate::openapi::TaskEvent),
        crate::openapi::TaskErrors,
    ),
    security(("bearer" = [])),
)]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> AppResult<
    axum::response::sse::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
> {
    use crate::watch::Seen;
    use axum::response::sse::{Event, KeepAlive, Sse};
    let caller = querying_caller(&state, &headers, "stream").await?;
    let first = caller_task(&state, &caller, &q).await?;
    let slot = state.stream_slots.acquire(&caller.key_id).ok_or_else(|| {
        ApiError::RateLimited {
            msg: format!(
                "this API key already has {} streams open, the most allowed; close one first",
                state.stream_slots.cap()
            ),
            // A slot frees when one of the key's streams ends, which cannot be foreseen.
            retry_after_s: 5,
        }
    })?;
    let rx = (!first.state.is_terminal()).then(|| state.watchers.subscribe(first.id));
    struct Follow {
        first: Option<remixd_store::TaskRecord>,
        rx: Option<tokio::sync::watch::Receiver<Seen<remixd_store::TaskRecord>>>,
        last: Option<(&'static str, u8)>,
        done: bool,
        shutdown: tokio_util::sync::CancellationToken,
        links: crate::links::AnswerLinks,
        _slot: crate::watch::StreamSlot,
    }
    // Links signed when the stream opens, valid DOWNLOAD_LINK_MS from then.
    let links = crate::links::AnswerLinks::for_answer(&state).await?;
    let follow = Follow {
        first: Some(first),
        rx,
        last: None,
        done: false,
        shutdown: state.shutdown.clone(),
        links,
        _slot: slot,
    };
    let events = futures::stream::unfold(follow, |mut f| async move {
        if f.done {
            return None;
        }
        loop {
            let task = match f.first.take() {
                Some(t) => t,
                None => {
                    let rx = f.rx.as_mut()?;
                    tokio::select! {
                        biased;
                        _ = f.shutdown.cancelled() => return None,
                        changed = rx.changed() => changed.ok()?,
                    }
                    match &*rx.borrow_and_update() {
                        Seen::Unread => continue,
                        Seen::Gone => return None,
                        Seen::Task(t) => t.clone(),
                    }
                }
            };
            let key = (task.state.as_str(), task.progress);
            if Some(key) == f.last {
                continue;
            }
            f.done = task.state.is_terminal();
            f.last = Some(key);
            let event = Event::default()
                .event("task")
                .json_data(f.links.record(task).await)
                .ok()?;
            return Some((Ok(event), f));
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The common gate of the query endpoints: enabled (505), authenticated (401), within
/// the key's query rate (429).
async fn querying_caller(
    state: &AppState,
    headers: &HeaderMap,
    endpoint: &str,
) -> AppResult<crate::auth::Caller> {
    state.check_enabled(endpoint)?;
    let caller = authenticate(&*state.store, headers).await?;
    state
        .limits
        .check_query(&caller.key_id)
        .await
        .map_err(|secs| ApiError::RateLimited {
            msg: "too many queries; slow down".into(),
            retry_after_s: secs,
        })?;
    Ok(caller)
}
