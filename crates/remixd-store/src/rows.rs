//! Rows as both stores read them, and their conversion to the store's records.
//!
//! Each struct mirrors a table's columns with the types SQLite and PostgreSQL both
//! decode (`TEXT`, `BIGINT`/`INTEGER` as `i64`, `BYTEA`/`BLOB` as bytes), so the two
//! backends share one mapping and one set of checks on what they read.

use remixd_domain::{FailCode, KeyLimits, TaskId, TaskInput};

use crate::{
    Account, ApiKeyRecord, DeliveryRecord, DeliveryState, Result, StoreError, TaskRecord,
    UploadRecord,
};

/// The columns of `tasks` every task read selects.
pub(crate) const TASK_COLUMNS: &str = "id, account_id, key_id, model, state, param, input, \
    callback_url, result_json, fail_code, fail_msg, cost, credits_consumed, progress, \
    fetch_attempts, attempts, lease_owner, lease_until, cost_time, create_time, update_time, \
    complete_time, upstream";

/// A key with its account's name; the caller appends the `WHERE` and `ORDER BY`.
pub(crate) const KEY_SELECT: &str = "SELECT k.id, k.account_id, a.name AS account_name, \
    k.label, k.key_hash, k.hourly_limit, k.daily_limit, k.total_limit, k.create_time, \
    k.revoke_time FROM api_keys k JOIN accounts a ON a.id = k.account_id";

/// The columns of `uploads`.
pub(crate) const UPLOAD_COLUMNS: &str =
    "key, account_id, file_size, mime_type, create_time, expire_time";

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A stored task id, checked.
pub(crate) fn task_id(id: &str) -> Result<TaskId> {
    id.parse().map_err(|_| corrupt(format!("task id {id:?}")))
}

#[derive(sqlx::FromRow)]
pub(crate) struct TaskRow {
    id: String,
    account_id: String,
    key_id: String,
    model: String,
    state: String,
    param: String,
    input: String,
    callback_url: Option<String>,
    result_json: String,
    fail_code: String,
    fail_msg: String,
    cost: i64,
    credits_consumed: i64,
    progress: i64,
    fetch_attempts: i64,
    attempts: i64,
    lease_owner: Option<String>,
    lease_until: Option<i64>,
    cost_time: i64,
    create_time: i64,
    update_time: i64,
    complete_time: Option<i64>,
    upstream: Option<String>,
}

impl TryFrom<TaskRow> for TaskRecord {
    type Error = StoreError;

    fn try_from(r: TaskRow) -> Result<Self> {
        let id = task_id(&r.id)?;
        Ok(TaskRecord {
            input: serde_json::from_str::<TaskInput>(&r.input)
                .map_err(|e| corrupt(format!("task {id} input: {e}")))?,
            state: r.state.parse().map_err(corrupt)?,
            fail_code: if r.fail_code.is_empty() {
                None
            } else {
                Some(
                    FailCode::parse(&r.fail_code)
                        .ok_or_else(|| corrupt(format!("fail code {:?}", r.fail_code)))?,
                )
            },
            id,
            account_id: r.account_id,
            key_id: r.key_id,
            model: r.model,
            param: r.param,
            callback_url: r.callback_url,
            result_json: r.result_json,
            fail_msg: r.fail_msg,
            cost: r.cost,
            credits_consumed: r.credits_consumed,
            progress: r.progress.clamp(0, 100) as u8,
            fetch_attempts: r.fetch_attempts,
            attempts: r.attempts,
            lease_owner: r.lease_owner,
            lease_until: r.lease_until,
            cost_time: r.cost_time,
            create_time: r.create_time,
            update_time: r.update_time,
            complete_time: r.complete_time,
            upstream: r.upstream,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    id: String,
    name: String,
    credits: i64,
    create_time: i64,
}

impl From<AccountRow> for Account {
    fn from(r: AccountRow) -> Self {
        Account {
            id: r.id,
            name: r.name,
            credits: r.credits,
            create_time: r.create_time,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    id: String,
    account_id: String,
    account_name: String,
    label: String,
    key_hash: Vec<u8>,
    hourly_limit: Option<i64>,
    daily_limit: Option<i64>,
    total_limit: Option<i64>,
    create_time: i64,
    revoke_time: Option<i64>,
}

impl From<KeyRow> for ApiKeyRecord {
    fn from(r: KeyRow) -> Self {
        ApiKeyRecord {
            id: r.id,
            account_id: r.account_id,
            account_name: r.account_name,
            label: r.label,
            key_hash: r.key_hash,
            limits: KeyLimits {
                hourly: r.hourly_limit,
                daily: r.daily_limit,
                total: r.total_limit,
            },
            create_time: r.create_time,
            revoke_time: r.revoke_time,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryRow {
    id: String,
    task_id: String,
    account_id: String,
    url: String,
    remained_credits: i64,
    payload: Option<String>,
    state: String,
    attempts: i64,
    next_attempt: i64,
    last_status: Option<i64>,
    last_error: String,
    create_time: i64,
    update_time: i64,
    complete_time: Option<i64>,
}

impl TryFrom<DeliveryRow> for DeliveryRecord {
    type Error = StoreError;

    fn try_from(r: DeliveryRow) -> Result<Self> {
        Ok(DeliveryRecord {
            task_id: task_id(&r.task_id)?,
            state: DeliveryState::parse(&r.state)
                .ok_or_else(|| corrupt(format!("delivery state {:?}", r.state)))?,
            id: r.id,
            account_id: r.account_id,
            url: r.url,
            remained_credits: r.remained_credits,
            payload: r.payload,
            attempts: r.attempts,
            next_attempt: r.next_attempt,
            last_status: r.last_status,
            last_error: r.last_error,
            create_time: r.create_time,
            update_time: r.update_time,
            complete_time: r.complete_time,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct UploadRow {
    key: String,
    account_id: String,
    file_size: i64,
    mime_type: String,
    create_time: i64,
    expire_time: i64,
}

impl From<UploadRow> for UploadRecord {
    fn from(r: UploadRow) -> Self {
        UploadRecord {
            key: r.key,
            account_id: r.account_id,
            file_size: r.file_size,
            mime_type: r.mime_type,
            create_time: r.create_time,
            expire_time: r.expire_time,
        }
    }
}

/// Converts rows read with [`sqlx::query_as`] into records.
pub(crate) fn records<R, T>(rows: Vec<R>) -> Result<Vec<T>>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// Parses task ids read from the database, skipping (and logging) corrupt ones: a sweep
/// is not held up by one bad row.
pub(crate) fn task_ids_lenient(ids: &[String]) -> Vec<TaskId> {
    ids.iter()
        .filter_map(|id| match id.parse() {
            Ok(t) => Some(t),
            Err(_) => {
                tracing::warn!(id = %id, "skipping a task row with a corrupt id");
                None
            }
        })
        .collect()
}

/// What the reaper does with a task whose lease expired: requeue it, or fail it with
/// this message once the stage's attempts are spent.
pub(crate) fn reap_decision(
    state: &str,
    fetch_attempts: i64,
    attempts: i64,
    max_attempts: i64,
) -> Option<String> {
    let (spent, what) = if state == "waiting" {
        (fetch_attempts, "fetching its inputs")
    } else {
        (attempts, "generating")
    };
    (spent >= max_attempts)
        .then(|| format!("the worker was lost while {what}, {spent} times; giving up"))
}

/// The windows a key's caps count over, at `now`: (cap, limit, counted since).
pub(crate) fn key_cap_windows(
    limits: (Option<i64>, Option<i64>, Option<i64>),
    now: i64,
) -> impl Iterator<Item = (crate::KeyCap, i64, i64)> {
    let (hourly, daily, total) = limits;
    [
        (crate::KeyCap::Hourly, hourly, now - 3_600_000),
        (crate::KeyCap::Daily, daily, now - 86_400_000),
        (crate::KeyCap::Total, total, i64::MIN),
    ]
    .into_iter()
    .filter_map(|(cap, limit, since)| limit.map(|l| (cap, l, since)))
}

/// The fields of a finished delivery attempt as the `deliveries` row records them:
/// (state, last status, last error, next attempt, complete time).
pub(crate) fn attempt_columns(
    outcome: &crate::AttemptOutcome,
    now: i64,
) -> (&'static str, Option<i64>, &str, Option<i64>, Option<i64>) {
    use crate::AttemptOutcome;
    match outcome {
        AttemptOutcome::Delivered { status } => {
            ("delivered", Some(i64::from(*status)), "", None, Some(now))
        }
        AttemptOutcome::Retry {
            status,
            error,
            next_attempt,
        } => (
            "pending",
            status.map(i64::from),
            error.as_str(),
            Some(*next_attempt),
            None,
        ),
        AttemptOutcome::GiveUp { status, error } => (
            "failed",
            status.map(i64::from),
            error.as_str(),
            None,
            Some(now),
        ),
    }
}

/// The message of [`StoreError::Busy`] for a delivery whose attempt is in flight.
pub(crate) fn delivery_busy(id: &str, lease_until: Option<i64>, now: i64) -> StoreError {
    StoreError::Busy(format!(
        "an attempt of delivery {id} is in flight (its lease ends in {} s); try again then",
        (lease_until.unwrap_or(now) - now).max(0) / 1000 + 1
    ))
}

/// A new delivery's id (the `webhook-id`).
pub(crate) fn new_delivery_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}
