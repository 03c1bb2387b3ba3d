//! remixd's persistence.
//!
//! [`Store`] is everything remixd keeps in its database: accounts and their credits,
//! API keys, and the task table, which doubles as the durable work queue. Callers hold
//! an `Arc<dyn Store>` and never see SQL; [`sqlite::SqliteStore`] is the embedded
//! implementation and [`postgres::PostgresStore`] the shared one for several nodes; both
//! pass the same contract tests ([`contract`]) and read rows through [`rows`].
//!
//! [`blobs::Blobs`] is the file side: uploads and result images, on the local disk or,
//! later, in an S3-compatible bucket.
//!
//! Invariants every implementation keeps:
//! - an account's balance never goes below zero, whatever the concurrency: credits are
//!   reserved by a conditional update in the same transaction that inserts the task;
//! - a task's credits are refunded at most once, in the same transaction that moves
//!   it to `fail`; a terminal task never changes state again;
//! - a worker changes a task only while it holds the task's lease (`lease_owner`).

pub mod blobs;
#[cfg(any(test, feature = "contract-tests"))]
pub mod contract;
pub mod copy;
pub mod links;
pub mod postgres;
mod rows;
pub mod space;
pub mod sqlite;

use async_trait::async_trait;
use remixd_domain::{FailCode, KeyLimits, Millis, TaskId, TaskInput, TaskState};

pub use blobs::{BlobError, Blobs};
pub use postgres::PostgresStore;
pub use space::{SpaceError, SpaceGuard};
pub use sqlite::SqliteStore;

/// Errors of the store. Constraint outcomes that callers act on (not enough credits,
/// a key over its cap) are values of [`CreateOutcome`], not errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// The database or the file storage has no space left. Nothing was written; the
    /// same call succeeds once space is back (the connection recovers by itself).
    #[error("storage is full: {0}")]
    Full(String),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    /// Work in flight holds the row; the message says what and for how long.
    #[error("{0}")]
    Busy(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}")]
    Unsupported(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_disk_full(&e) {
            StoreError::Full(e.to_string())
        } else {
            StoreError::Database(e)
        }
    }
}

/// SQLite's `SQLITE_FULL` (13, in the low byte of its extended codes), PostgreSQL's
/// `disk_full` (SQLSTATE 53100), or an IO error that says the device is out of space.
fn is_disk_full(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
            d.code()
                .and_then(|c| c.parse::<i64>().ok())
                .is_some_and(|c| c & 0xff == 13)
        }
        sqlx::Error::Database(d) => d.code().as_deref() == Some("53100"),
        sqlx::Error::Io(io) => io.raw_os_error() == Some(28), // ENOSPC
        _ => false,
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub credits: i64,
    pub create_time: Millis,
}

/// A stored key: never the key itself, only its hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub account_id: String,
    pub account_name: String,
    pub label: String,
    pub key_hash: Vec<u8>,
    pub limits: KeyLimits,
    pub create_time: Millis,
    pub revoke_time: Option<Millis>,
}

impl std::fmt::Debug for ApiKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyRecord")
            .field("id", &self.id)
            .field("account", &self.account_name)
            .field("label", &self.label)
            .field("key_hash", &"<redacted>")
            .field("limits", &self.limits)
            .field("revoked", &self.revoke_time.is_some())
            .finish()
    }
}

/// What to store for a new key.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub account_name: String,
    pub label: String,
    pub key_hash: Vec<u8>,
    pub limits: KeyLimits,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub id: TaskId,
    pub account_id: String,
    pub key_id: String,
    pub model: String,
    pub state: TaskState,
    pub param: String,
    pub input: TaskInput,
    pub callback_url: Option<String>,
    pub result_json: String,
    pub fail_code: Option<FailCode>,
    pub fail_msg: String,
    pub cost: i64,
    pub credits_consumed: i64,
    pub progress: u8,
    pub fetch_attempts: i64,
    pub attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<Millis>,
    pub cost_time: Millis,
    pub create_time: Millis,
    pub update_time: Millis,
    pub complete_time: Option<Millis>,
    /// An upstream engine's handle on the provider's request (see [`Store::set_upstream`]).
    pub upstream: Option<String>,
}

/// A task to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub account_id: String,
    pub key_id: String,
    pub model: String,
    pub param: String,
    pub input: TaskInput,
    pub callback_url: Option<String>,
    pub cost: i64,
    pub now: Millis,
    /// `Idempotency-Key` and a hash of the request body, when the client sent a key.
    pub idempotency: Option<Idempotency>,
}

/// An idempotent create: the key, and what the body hashed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub body_hash: String,
}

/// How long an idempotency key holds.
pub const IDEMPOTENCY_WINDOW_MS: Millis = 24 * 3_600_000;

/// Which cap of a key was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCap {
    Hourly,
    Daily,
    Total,
}

impl KeyCap {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyCap::Hourly => "hourly",
            KeyCap::Daily => "daily",
            KeyCap::Total => "total",
        }
    }
}

/// The outcome of [`Store::create_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Inserted; the cost is reserved. Carries the balance left.
    Created { balance: i64 },
    /// The account's balance is below the cost; nothing was written.
    InsufficientCredits { balance: i64 },
    /// The key would pass one of its caps; nothing was written.
    KeyLimit { cap: KeyCap, limit: i64, used: i64 },
    /// The same Idempotency-Key and body were seen within the window: that task, no charge.
    Existing { task_id: TaskId },
    /// The Idempotency-Key was used with a different body within the window.
    IdempotencyConflict,
}

/// The two queue stages a worker claims from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `waiting` tasks whose inputs need fetching; the state stays `waiting`.
    Fetch,
    /// `queuing` tasks; the claim moves them to `generating`.
    Generate,
}

/// What the reaper did in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Tasks whose lease expired and that went back to the queue.
    pub requeued: Vec<TaskId>,
    /// Tasks whose lease expired with no attempts left; failed with `500` and refunded.
    pub failed: Vec<TaskId>,
    /// Expired rows that could not be handled (a corrupt id, say): the raw id and the
    /// error. They stay as they are; the rest of the pass is not held up by them.
    pub skipped: Vec<(String, String)>,
}

/// How a terminal transition went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The task moved; for a failure, `refunded` credits went back to the account.
    Done { refunded: i64 },
    /// The task was no longer ours (lease lost) or already terminal; nothing changed.
    NotOwner,
}

/// A file uploaded through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub key: String,
    pub account_id: String,
    pub file_size: i64,
    pub mime_type: String,
    pub create_time: Millis,
    pub expire_time: Millis,
}

/// Where a callback delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Given up: the schedule ran out, or the receiver answered 410.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One callback delivery from the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    /// The `webhook-id`, stable across attempts.
    pub id: String,
    pub task_id: TaskId,
    pub account_id: String,
    pub url: String,
    /// The account's balance when the task finished (`remainedCredits`).
    pub remained_credits: i64,
    /// The body, fixed at the first attempt so every retry signs the same bytes.
    pub payload: Option<String>,
    pub state: DeliveryState,
    pub attempts: i64,
    pub next_attempt: Millis,
    pub last_status: Option<i64>,
    pub last_error: String,
    pub create_time: Millis,
    pub update_time: Millis,
    pub complete_time: Option<Millis>,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// 2xx: done.
    Delivered { status: u16 },
    /// Try again at `next_attempt`.
    Retry {
        status: Option<u16>,
        error: String,
        next_attempt: Millis,
    },
    /// Stop trying (410, or the schedule is spent).
    GiveUp { status: Option<u16>, error: String },
}

/// News a node gives the others through the database, so their idle loops wake at once
/// instead of at their next poll. Best effort: a signal lost (a dropped connection, a
/// store with no channel) costs at most one poll interval, never a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A task was created: fetch workers, look.
    Created,
    /// A task's inputs are ready: generate workers, look.
    InputsReady,
    /// A task became terminal: its callback may be due.
    Finished,
    /// A task was cancelled (already failed in the store): stop working on it.
    Cancelled(TaskId),
}

impl Signal {
    /// The notification's text.
    pub fn encode(&self) -> String {
        match self {
            Signal::Created => "created".into(),
            Signal::InputsReady => "inputs-ready".into(),
            Signal::Finished => "finished".into(),
            Signal::Cancelled(id) => format!("cancelled {id}"),
        }
    }

    /// The signal a notification's text names; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        match s {
            "created" => Some(Signal::Created),
            "inputs-ready" => Some(Signal::InputsReady),
            "finished" => Some(Signal::Finished),
            _ => s
                .strip_prefix("cancelled ")
                .and_then(|id| id.parse().ok())
                .map(Signal::Cancelled),
        }
    }
}

/// What a shared rate limit said to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Counted; go ahead.
    Allowed,
    /// Over the limit (not counted): the next request passes in this many microseconds.
    Wait { us: i64 },
}

/// Everything remixd keeps in its database.
///
/// Times come in as arguments (`now`), so tests control the clock and all nodes of a
/// cluster agree on what "expired" means only through the values they pass.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<()>;
    /// A cheap round trip, for `/readyz`, that includes a tiny write: a database that
    /// cannot be written (a full disk) is not ready.
    async fn ping(&self) -> Result<()>;

    // Accounts and credits.
    async fn create_account(
        &self,
        id: &str,
        name: &str,
        credits: i64,
        now: Millis,
    ) -> Result<Account>;
    async fn account_by_name(&self, name: &str) -> Result<Option<Account>>;
    async fn list_accounts(&self) -> Result<Vec<Account>>;
    async fn balance(&self, account_id: &str) -> Result<i64>;
    /// Adds (or, negative, removes) credits; refuses to go below zero. Returns the new balance.
    async fn add_credits(&self, account_name: &str, delta: i64) -> Result<i64>;
    async fn count_accounts(&self) -> Result<i64>;

    // Keys.
    async fn create_key(&self, key: NewKey, now: Millis) -> Result<ApiKeyRecord>;
    async fn key_by_id(&self, key_id: &str) -> Result<Option<ApiKeyRecord>>;
    async fn list_keys(&self, account_name: Option<&str>) -> Result<Vec<ApiKeyRecord>>;
    /// Revokes a key; false when it did not exist or was already revoked.
    async fn revoke_key(&self, key_id: &str, now: Millis) -> Result<bool>;

    // Tasks.
    /// Checks the key's caps, reserves the cost and inserts the task, atomically.
    async fn create_task(&self, task: NewTask) -> Result<CreateOutcome>;
    /// A task of this account; `None` for an unknown id or another account's task.
    async fn get_task(&self, id: &TaskId, account_id: &str) -> Result<Option<TaskRecord>>;
    /// A task by id alone, for workers and operators.
    async fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>>;
    /// Up to `limit` tasks of an account, newest first, those older than `before` when
    /// given (the task list's pages).
    async fn list_tasks(
        &self,
        account_id: &str,
        before: Option<&TaskId>,
        limit: i64,
    ) -> Result<Vec<TaskRecord>>;

    // The queue.
    /// Claims a ready task of a stage with a lease until `lease_until`: for
    /// [`Stage::Generate`] the oldest; for [`Stage::Fetch`] as [`Store::claim_fetch`]
    /// with no cap per account.
    async fn claim(
        &self,
        stage: Stage,
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<TaskRecord>>;
    /// Claims a `waiting` task fairly between accounts, in one atomic statement: among
    /// accounts with a claimable task, the one with the fewest tasks this `owner` is
    /// fetching now (live leases) goes first, then the oldest task (`not_before`, id).
    /// An account that already has `per_account` fetches in flight under this owner gets
    /// none, so one account can never fill every fetch slot of a worker.
    async fn claim_fetch(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        per_account: u32,
    ) -> Result<Option<TaskRecord>>;
    /// Extends a lease; false when the lease is no longer ours.
    async fn extend_lease(
        &self,
        id: &TaskId,
        owner: &str,
        lease_until: Millis,
        now: Millis,
    ) -> Result<bool>;
    /// `waiting → queuing` after the inputs were fetched; releases the lease.
    async fn inputs_ready(&self, id: &TaskId, owner: &str, now: Millis) -> Result<bool>;
    /// Records progress of a generating task.
    async fn set_progress(
        &self,
        id: &TaskId,
        owner: &str,
        progress: u8,
        now: Millis,
    ) -> Result<bool>;
    /// Records an upstream engine's handle on the provider's request for a generating
    /// task (opaque to the store; never a secret), while `owner` holds its lease. A
    /// later claim of the task finds it in [`TaskRecord::upstream`] and resumes the
    /// request instead of submitting again. `false` when the lease is not `owner`'s.
    async fn set_upstream(
        &self,
        id: &TaskId,
        owner: &str,
        upstream: &str,
        now: Millis,
    ) -> Result<bool>;
    /// `generating → success`, keeping the credits.
    async fn succeed(
        &self,
        id: &TaskId,
        owner: &str,
        result_json: &str,
        now: Millis,
    ) -> Result<Finish>;
    /// Any live state → `fail`, refunding the credits. `owner: None` acts regardless of
    /// the lease (operators, cancellation).
    async fn fail(
        &self,
        id: &TaskId,
        owner: Option<&str>,
        code: FailCode,
        msg: &str,
        now: Millis,
    ) -> Result<Finish>;
    /// Gives a claimed task back without spending an attempt (graceful shutdown), or
    /// with a delay before it may be claimed again (an engine temporarily unavailable).
    async fn release(
        &self,
        id: &TaskId,
        owner: &str,
        not_before: Millis,
        count_attempt: bool,
        now: Millis,
    ) -> Result<bool>;
    /// Returns tasks whose lease expired to their queue, or fails them once
    /// `max_attempts` claims of a stage have been spent.
    async fn reap(&self, now: Millis, max_attempts: i64) -> Result<ReapReport>;
    /// The sum of credits reserved or consumed by live and successful tasks of an account
    /// (for consistency checks and `accounts list`).
    async fn credits_in_tasks(&self, account_id: &str) -> Result<i64>;
    /// The number of tasks in each state, for metrics and tests.
    async fn count_by_state(&self) -> Result<Vec<(TaskState, i64)>>;

    // Callbacks.
    /// Sets (or replaces) an account's callback signing secret.
    async fn set_webhook_secret(&self, account_name: &str, secret: &str) -> Result<()>;
    /// The account's callback signing secret, if it has one.
    async fn webhook_secret(&self, account_id: &str) -> Result<Option<String>>;
    /// Claims up to `limit` due deliveries with a lease until `lease_until`.
    async fn claim_deliveries(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>>;
    /// Records an attempt (and the payload it sent); false when the lease was lost.
    async fn record_attempt(
        &self,
        id: &str,
        owner: &str,
        payload: &str,
        outcome: &AttemptOutcome,
        now: Millis,
    ) -> Result<bool>;
    /// Deliveries, newest first, optionally of one state.
    async fn list_deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>>;
    /// Puts a delivery back in the queue for an attempt now (operators); false if unknown.
    /// A delivery with an attempt in flight (its lease not yet expired) is left alone:
    /// [`StoreError::Busy`], so two attempts never run at once.
    async fn redeliver(&self, id: &str, now: Millis) -> Result<bool>;
    /// The deliveries of one task (tests, operators).
    async fn deliveries_of(&self, task_id: &TaskId) -> Result<Vec<DeliveryRecord>>;

    // Uploads and server values.
    async fn record_upload(&self, upload: &UploadRecord) -> Result<()>;
    async fn upload(&self, key: &str) -> Result<Option<UploadRecord>>;
    /// Bytes of the account's uploads not yet expired at `now` (the upload quota's use).
    async fn upload_bytes(&self, account_id: &str, now: Millis) -> Result<i64>;
    /// Records an upload only when the account's unexpired uploads at its
    /// `create_time`, with this one, take at most `quota` bytes; `false` (nothing
    /// recorded) otherwise. Check and insert are one statement, so uploads racing for
    /// the last room cannot all pass.
    async fn record_upload_within(&self, upload: &UploadRecord, quota: i64) -> Result<bool>;
    // Retention.
    /// Successful tasks finished before `before` whose result files are still there.
    async fn results_due(&self, before: Millis, limit: i64) -> Result<Vec<TaskId>>;
    /// Records that these tasks' result files are gone.
    async fn mark_results_swept(&self, ids: &[TaskId]) -> Result<()>;
    /// Uploads that expired before `now`.
    async fn uploads_due(&self, now: Millis, limit: i64) -> Result<Vec<String>>;
    async fn delete_uploads(&self, keys: &[String]) -> Result<()>;
    /// Up to `limit` terminal tasks created before `before`, oldest first. The sweeper
    /// deletes their files, then [`Store::delete_tasks`] their rows: files before rows,
    /// so a crash in between leaves rows that point at nothing, never lost files.
    async fn old_tasks(&self, before: Millis, limit: i64) -> Result<Vec<TaskId>>;
    /// Deletes these tasks (terminal ones only) with their deliveries and idempotency keys.
    async fn delete_tasks(&self, ids: &[TaskId]) -> Result<()>;
    /// The tasks among `ids` that exist, by id alone (the orphan-file sweep).
    async fn tasks_by_ids(&self, ids: &[TaskId]) -> Result<Vec<TaskRecord>>;
    /// Forgets idempotency keys recorded before `before`.
    async fn delete_old_idempotency_keys(&self, before: Millis) -> Result<u64>;
    /// A server-wide value, created with `make` by the first caller (all nodes agree).
    async fn server_value(
        &self,
        name: &str,
        make: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<String>;

    // Rate limits shared by every node.
    /// Counts one request against a GCRA limit shared by every node (a request every
    /// `interval_us` microseconds on average, `burst` at once), on the database's clock.
    /// `None` when this store keeps no shared counters: each process then limits alone.
    async fn rate_check(
        &self,
        _key: &str,
        _interval_us: i64,
        _burst: i64,
    ) -> Result<Option<RateDecision>> {
        Ok(None)
    }
    /// Forgets counters that have run out (they count as none anyway).
    async fn prune_rates(&self) -> Result<u64> {
        Ok(0)
    }

    // Signals between nodes.
    /// Tells every node listening on this database. A store with no channel between
    /// processes does nothing: other processes find the work at their next poll.
    async fn publish(&self, _signal: Signal) -> Result<()> {
        Ok(())
    }
    /// The signals every node publishes (this one's included), from now on; `None` when
    /// the store has no channel between processes. The receiver ends when the store's
    /// listener gives up; a dropped connection is re-established by the store, and what
    /// was published meanwhile is lost (polling covers it).
    async fn subscribe(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Signal>>> {
        Ok(None)
    }
}
