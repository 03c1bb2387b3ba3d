//! The embedded store: SQLite through sqlx, in WAL mode.
//!
//! SQLite has one writer at a time, which makes the queue simple: a claim is one
//! `UPDATE … WHERE id = (SELECT …) RETURNING *`, atomic by construction. Transactions
//! that read before they write start with `BEGIN IMMEDIATE`, so they take the write
//! lock up front instead of failing to upgrade a read lock under contention; the busy
//! timeout makes concurrent writers queue instead of erroring.
//!
//! `synchronous = FULL`: an accepted task (a committed insert) survives not only a
//! killed process (which WAL alone guarantees) but also a power cut.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use remixd_domain::{FailCode, Millis, TaskId, TaskState};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::rows::{
    attempt_columns, corrupt, delivery_busy, key_cap_windows, new_delivery_id, reap_decision,
    records, task_id, task_ids_lenient, AccountRow, DeliveryRow, KeyRow, TaskRow, UploadRow,
    KEY_SELECT, TASK_COLUMNS, UPLOAD_COLUMNS,
};
use crate::{
    Account, ApiKeyRecord, AttemptOutcome, CreateOutcome, DeliveryRecord, DeliveryState, Finish,
    NewKey, NewTask, ReapReport, Result, Stage, Store, StoreError, TaskRecord, UploadRecord,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    /// Readers: several connections, concurrent under WAL.
    pool: SqlitePool,
    /// The one writer connection. SQLite admits one writer at a time anyway; queueing
    /// writers here, in async FIFO order, replaces SQLite's sleep-and-retry busy handler
    /// (which gave createTask a p99 in the hundreds of milliseconds under load). Other
    /// processes on the same file still meet the busy timeout.
    write: SqlitePool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at a `sqlite://PATH` URL.
    pub async fn open(url: &str) -> Result<Self> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| StoreError::Unsupported(url.to_string()))?;
        let io = |what: &str, e: std::io::Error| {
            StoreError::Database(sqlx::Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot create {what}: {e}"),
            )))
        };
        if let Some(parent) = std::path::Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| io(&parent.display().to_string(), e))?;
            }
        }
        // The database holds key hashes, webhook secrets and every task's inputs: only
        // remixd's own user may read it. SQLite gives its -wal and -shm files the mode
        // of the database file, so creating that one 0600 covers all three.
        if path != ":memory:" && !std::path::Path::new(path).exists() {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(path, e)),
            }
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            // A connection still inside a transaction is never handed out again. When a
            // COMMIT fails for lack of space, SQLite may already have rolled the
            // transaction back itself; the ROLLBACK that sqlx then sends fails ("no
            // transaction is active") and sqlx keeps counting the transaction as open, so
            // every later BEGIN on that connection would fail until a restart. The pool
            // pings a connection on its return, which flushes that queued ROLLBACK, so
            // here the count is final: a connection that still claims a transaction is
            // closed and a fresh one takes its place.
            .before_acquire(|conn, _meta| {
                Box::pin(async move {
                    use sqlx::TransactionManager;
                    let depth = sqlx::sqlite::SqliteTransactionManager::get_transaction_depth(conn);
                    if depth > 0 {
                        tracing::warn!(
                            depth,
                            "writer connection left inside a failed transaction; reopening it"
                        );
                    }
                    Ok(depth == 0)
                })
            })
            .connect_with(opts.clone())
            .await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(opts)
            .await?;
        Ok(Self { pool, write })
    }

    /// The readers' pool (the store copy reads a snapshot through it).
    pub fn read_pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The one writer connection's pool (the store copy writes through it).
    pub fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.write).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        // Through the writer, and a real write: a database that can be read but not
        // written (a full disk) is not ready.
        sqlx::query(
            "INSERT INTO server_values (name, value) VALUES ('readyz-probe', '') \
             ON CONFLICT (name) DO UPDATE SET value = ''",
        )
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn create_account(
        &self,
        id: &str,
        name: &str,
        credits: i64,
        now: Millis,
    ) -> Result<Account> {
        let row: AccountRow = sqlx::query_as(
            "INSERT INTO accounts (id, name, credits, create_time) VALUES (?, ?, ?, ?) RETURNING *",
        )
        .bind(id)
        .bind(name)
        .bind(credits)
        .bind(now)
        .fetch_one(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("account {name:?}"))
            } else {
                e.into()
            }
        })?;
        Ok(row.into())
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>> {
        let row: Option<AccountRow> = sqlx::query_as("SELECT * FROM accounts WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Into::into))
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        let rows: Vec<AccountRow> = sqlx::query_as("SELECT * FROM accounts ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn balance(&self, account_id: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT credits FROM accounts WHERE id = ?")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("account {account_id}")))
    }

    async fn add_credits(&self, account_name: &str, delta: i64) -> Result<i64> {
        let mut tx = self.begin().await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT credits FROM accounts WHERE name = ?")
                .bind(account_name)
                .fetch_optional(&mut *tx)
                .await?;
        let current =
            current.ok_or_else(|| StoreError::NotFound(format!("account {account_name:?}")))?;
        let new = current
            .checked_add(delta)
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                StoreError::Conflict(format!("a balance of {current} minus {}", -delta))
            })?;
        sqlx::query("UPDATE accounts SET credits = ? WHERE name = ?")
            .bind(new)
            .bind(account_name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(new)
    }

    async fn count_accounts(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn create_key(&self, key: NewKey, now: Millis) -> Result<ApiKeyRecord> {
        let account = self
            .account_by_name(&key.account_name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("account {:?}", key.account_name)))?;
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, label, key_hash, hourly_limit, daily_limit, total_limit, create_time) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&account.id)
        .bind(&key.label)
        .bind(&key.key_hash)
        .bind(key.limits.hourly)
        .bind(key.limits.daily)
        .bind(key.limits.total)
        .bind(now)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("key {}", key.id))
            } else {
                e.into()
            }
        })?;
        self.key_by_id(&key.id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {}", key.id)))
    }

    async fn key_by_id(&self, key_id: &str) -> Result<Option<ApiKeyRecord>> {
        let row: Option<KeyRow> = sqlx::query_as(&format!("{KEY_SELECT} WHERE k.id = ?"))
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Into::into))
    }

    async fn list_keys(&self, account_name: Option<&str>) -> Result<Vec<ApiKeyRecord>> {
        let rows: Vec<KeyRow> = match account_name {
            Some(name) => {
                sqlx::query_as(&format!(
                    "{KEY_SELECT} WHERE a.name = ? ORDER BY k.create_time"
                ))
                .bind(name)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(&format!("{KEY_SELECT} ORDER BY a.name, k.create_time"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_key(&self, key_id: &str, now: Millis) -> Result<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoke_time = ? WHERE id = ? AND revoke_time IS NULL")
                .bind(now)
                .bind(key_id)
                .execute(&self.write)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_task(&self, t: NewTask) -> Result<CreateOutcome> {
        let input = serde_json::to_string(&t.input).map_err(|e| corrupt(format!("input: {e}")))?;
        let mut tx = self.begin().await?;

        if let Some(idem) = &t.idempotency {
            let seen: Option<(String, String, i64)> = sqlx::query_as(
                "SELECT body_hash, task_id, create_time FROM idempotency_keys WHERE account_id = ? AND key = ?",
            )
            .bind(&t.account_id)
            .bind(&idem.key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((hash, id, at)) = seen {
                if at > t.now - crate::IDEMPOTENCY_WINDOW_MS {
                    if hash != idem.body_hash {
                        return Ok(CreateOutcome::IdempotencyConflict);
                    }
                    return Ok(CreateOutcome::Existing {
                        task_id: task_id(&id)?,
                    });
                }
            }
        }

        // The key's caps count credits charged through the key (refunded tasks count 0).
        let limits: Option<(Option<i64>, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT hourly_limit, daily_limit, total_limit FROM api_keys WHERE id = ?",
        )
        .bind(&t.key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let limits = limits.ok_or_else(|| StoreError::NotFound(format!("key {}", t.key_id)))?;
        for (cap, limit, since) in key_cap_windows(limits, t.now) {
            let used: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(credits_consumed), 0) FROM tasks WHERE key_id = ? AND create_time >= ?",
            )
            .bind(&t.key_id)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?;
            if used + t.cost > limit {
                return Ok(CreateOutcome::KeyLimit { cap, limit, used });
            }
        }

        // Reserve: the conditional update is what keeps balances non-negative.
        let balance: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET credits = credits - ? WHERE id = ? AND credits >= ? RETURNING credits",
        )
        .bind(t.cost)
        .bind(&t.account_id)
        .bind(t.cost)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(balance) = balance else {
            let balance = sqlx::query_scalar("SELECT credits FROM accounts WHERE id = ?")
                .bind(&t.account_id)
                .fetch_one(&mut *tx)
                .await?;
            return Ok(CreateOutcome::InsufficientCredits { balance });
        };

        sqlx::query(
            "INSERT INTO tasks (id, account_id, key_id, model, state, param, input, callback_url, cost, \
             credits_consumed, create_time, update_time) VALUES (?, ?, ?, ?, 'waiting', ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(t.id.to_string())
        .bind(&t.account_id)
        .bind(&t.key_id)
        .bind(&t.model)
        .bind(&t.param)
        .bind(&input)
        .bind(&t.callback_url)
        .bind(t.cost)
        .bind(t.cost)
        .bind(t.now)
        .bind(t.now)
        .execute(&mut *tx)
        .await?;
        if let Some(idem) = &t.idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys (account_id, key, body_hash, task_id, create_time) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (account_id, key) DO UPDATE SET body_hash = excluded.body_hash, \
                 task_id = excluded.task_id, create_time = excluded.create_time",
            )
            .bind(&t.account_id)
            .bind(&idem.key)
            .bind(&idem.body_hash)
            .bind(t.id.to_string())
            .bind(t.now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(CreateOutcome::Created { balance })
    }

    async fn get_task(&self, id: &TaskId, account_id: &str) -> Result<Option<TaskRecord>> {
        let row: Option<TaskRow> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = ? AND account_id = ?"
        ))
        .bind(id.to_string())
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>> {
        let row: Option<TaskRow> =
            sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn list_tasks(
        &self,
        account_id: &str,
        before: Option<&TaskId>,
        limit: i64,
    ) -> Result<Vec<TaskRecord>> {
        // Ids are UUIDv7 hex, so their order is creation order.
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE account_id = ? AND (? IS NULL OR id < ?) \
             ORDER BY id DESC LIMIT ?"
        );
        let before = before.map(|b| b.to_string());
        let rows: Vec<TaskRow> = sqlx::query_as(&sql)
            .bind(account_id)
            .bind(&before)
            .bind(&before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        records(rows)
    }

    async fn claim(
        &self,
        stage: Stage,
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<TaskRecord>> {
        let sql = match stage {
            Stage::Fetch => {
                return self
                    .claim_fetch(owner, now, lease_until, u32::MAX)
                    .await
            }
            Stage::Generate => format!(
                "UPDATE tasks SET state = 'generating', lease_owner = ?1, lease_until = ?2, attempts = attempts + 1, \
                 progress = 0, start_time = ?3, update_time = ?3 WHERE id = (SELECT id FROM tasks WHERE state = 'queuing' \
                 AND lease_owner IS NULL AND not_before <= ?3 ORDER BY state, not_before, id LIMIT 1) RETURNING {TASK_COLUMNS}"
            ),
        };
        let row: Option<TaskRow> = sqlx::query_as(&sql)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .fetch_optional(&self.write)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn claim_fetch(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        per_account: u32,
    ) -> Result<Option<TaskRecord>> {
        // `f` counts, per account, the tasks this owner is fetching under a live lease;
        // accounts at the cap are left out and the least-served account goes first. One
        // statement on the single writer connection, so two claims never pick the same
        // task or both slip under the cap.
        let sql = format!(
            "UPDATE tasks SET lease_owner = ?1, lease_until = ?2, fetch_attempts = fetch_attempts + 1, \
             update_time = ?3 WHERE id = (SELECT t.id FROM tasks t LEFT JOIN (SELECT account_id, COUNT(*) AS n \
             FROM tasks WHERE state = 'waiting' AND lease_owner = ?1 AND lease_until >= ?3 GROUP BY account_id) f \
             ON f.account_id = t.account_id WHERE t.state = 'waiting' AND t.lease_owner IS NULL \
             AND t.not_before <= ?3 AND COALESCE(f.n, 0) < ?4 ORDER BY COALESCE(f.n, 0), t.not_before, t.id LIMIT 1) \
             RETURNING {TASK_COLUMNS}"
        );
        let row: Option<TaskRow> = sqlx::query_as(&sql)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(i64::from(per_account))
            .fetch_optional(&self.write)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn extend_lease(
        &self,
        id: &TaskId,
        owner: &str,
        lease_until: Millis,
        now: Millis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET lease_until = ? WHERE id = ? AND lease_owner = ? AND lease_until >= ? \
             AND state IN ('waiting', 'generating')",
        )
        .bind(lease_until)
        .bind(id.to_string())
        .bind(owner)
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn inputs_ready(&self, id: &TaskId, owner: &str, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET state = 'queuing', lease_owner = NULL, lease_until = NULL, update_time = ? \
             WHERE id = ? AND lease_owner = ? AND state = 'waiting'",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_progress(
        &self,
        id: &TaskId,
        owner: &str,
        progress: u8,
        now: Millis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET progress = ?, update_time = ? WHERE id = ? AND lease_owner = ? AND state = 'generating' \
             AND progress < ?",
        )
        .bind(progress as i64)
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .bind(progress as i64)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_upstream(
        &self,
        id: &TaskId,
        owner: &str,
        upstream: &str,
        now: Millis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET upstream = ?, update_time = ? WHERE id = ? AND lease_owner = ? AND state = 'generating'",
        )
        .bind(upstream)
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn succeed(
        &self,
        id: &TaskId,
        owner: &str,
        result_json: &str,
        now: Millis,
    ) -> Result<Finish> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE tasks SET state = 'success', result_json = ?, progress = 100, lease_owner = NULL, \
             lease_until = NULL, cost_time = ? - COALESCE(start_time, create_time), complete_time = ?, update_time = ? \
             WHERE id = ? AND lease_owner = ? AND state = 'generating'",
        )
        .bind(result_json)
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(Finish::NotOwner);
        }
        enqueue_callback_in_tx(&mut tx, id, now).await?;
        tx.commit().await?;
        Ok(Finish::Done { refunded: 0 })
    }

    async fn fail(
        &self,
        id: &TaskId,
        owner: Option<&str>,
        code: FailCode,
        msg: &str,
        now: Millis,
    ) -> Result<Finish> {
        let mut tx = self.begin().await?;
        let live: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM tasks WHERE id = ? AND state NOT IN ('success', 'fail') AND (? IS NULL OR lease_owner = ?)",
        )
        .bind(id.to_string())
        .bind(owner)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        if live.is_none() {
            return Ok(Finish::NotOwner);
        }
        let refunded = fail_in_tx(&mut tx, id, code, msg, now).await?;
        tx.commit().await?;
        Ok(Finish::Done { refunded })
    }

    async fn release(
        &self,
        id: &TaskId,
        owner: &str,
        not_before: Millis,
        count_attempt: bool,
        now: Millis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET state = CASE state WHEN 'generating' THEN 'queuing' ELSE state END, \
             lease_owner = NULL, lease_until = NULL, not_before = ?, progress = 0, update_time = ?, \
             attempts = CASE WHEN ? OR state <> 'generating' THEN attempts ELSE attempts - 1 END, \
             fetch_attempts = CASE WHEN ? OR state <> 'waiting' THEN fetch_attempts ELSE fetch_attempts - 1 END \
             WHERE id = ? AND lease_owner = ? AND state IN ('waiting', 'generating')",
        )
        .bind(not_before)
        .bind(now)
        .bind(count_attempt)
        .bind(count_attempt)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn reap(&self, now: Millis, max_attempts: i64) -> Result<ReapReport> {
        let mut tx = self.begin().await?;
        let expired: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, state, fetch_attempts, attempts FROM tasks \
             WHERE lease_owner IS NOT NULL AND lease_until < ? AND state IN ('waiting', 'generating') ORDER BY id",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = ReapReport::default();
        for (id, state, fetch_attempts, attempts) in expired {
            // Each row under its own savepoint: one row that cannot be handled is
            // reported and left for the next pass, and the others still go back to
            // their queue.
            let mut row = sqlx::Connection::begin(&mut *tx).await?;
            match reap_one(
                &mut row,
                &id,
                &state,
                fetch_attempts,
                attempts,
                now,
                max_attempts,
            )
            .await
            {
                Ok(Reaped::Requeued(t)) => {
                    row.commit().await?;
                    report.requeued.push(t);
                }
                Ok(Reaped::Failed(t)) => {
                    row.commit().await?;
                    report.failed.push(t);
                }
                Err(e) => {
                    row.rollback().await?;
                    report.skipped.push((id, e.to_string()));
                }
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn credits_in_tasks(&self, account_id: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(credits_consumed), 0) FROM tasks WHERE account_id = ?",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn count_by_state(&self) -> Result<Vec<(TaskState, i64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM tasks GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::new();
        for (s, n) in rows {
            out.push((s.parse().map_err(corrupt)?, n));
        }
        Ok(out)
    }

    async fn set_webhook_secret(&self, account_name: &str, secret: &str) -> Result<()> {
        let done = sqlx::query("UPDATE accounts SET webhook_secret = ? WHERE name = ?")
            .bind(secret)
            .bind(account_name)
            .execute(&self.write)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("account {account_name:?}")));
        }
        Ok(())
    }

    async fn webhook_secret(&self, account_id: &str) -> Result<Option<String>> {
        let v: Option<Option<String>> =
            sqlx::query_scalar("SELECT webhook_secret FROM accounts WHERE id = ?")
                .bind(account_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.flatten())
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "UPDATE deliveries SET lease_owner = ?1, lease_until = ?2 WHERE id IN (SELECT id FROM deliveries \
             WHERE state = 'pending' AND next_attempt <= ?3 AND (lease_until IS NULL OR lease_until < ?3) \
             ORDER BY next_attempt LIMIT ?4) RETURNING *",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.write)
        .await?;
        records(rows)
    }

    async fn record_attempt(
        &self,
        id: &str,
        owner: &str,
        payload: &str,
        outcome: &AttemptOutcome,
        now: Millis,
    ) -> Result<bool> {
        let (state, status, error, next, complete) = attempt_columns(outcome, now);
        let done = sqlx::query(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?, \
             next_attempt = COALESCE(?, next_attempt), complete_time = ?, payload = COALESCE(payload, ?), \
             lease_owner = NULL, lease_until = NULL, update_time = ? WHERE id = ? AND lease_owner = ? AND state = 'pending'",
        )
        .bind(state)
        .bind(status)
        .bind(error)
        .bind(next)
        .bind(complete)
        .bind(payload)
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT * FROM deliveries WHERE (?1 IS NULL OR state = ?1) ORDER BY update_time DESC, id DESC LIMIT ?2",
        )
        .bind(state.map(|s| s.as_str()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        records(rows)
    }

    async fn redeliver(&self, id: &str, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt = ?, lease_owner = NULL, \
             lease_until = NULL, complete_time = NULL, update_time = ? \
             WHERE id = ? AND (lease_owner IS NULL OR lease_until < ?)",
        )
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(now)
        .execute(&self.write)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        let leased: Option<Option<i64>> =
            sqlx::query_scalar("SELECT lease_until FROM deliveries WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        match leased {
            None => Ok(false),
            Some(until) => Err(delivery_busy(id, until, now)),
        }
    }

    async fn deliveries_of(&self, task_id: &TaskId) -> Result<Vec<DeliveryRecord>> {
        let rows: Vec<DeliveryRow> =
            sqlx::query_as("SELECT * FROM deliveries WHERE task_id = ? ORDER BY create_time")
                .bind(task_id.to_string())
                .fetch_all(&self.pool)
                .await?;
        records(rows)
    }

    async fn record_upload(&self, u: &UploadRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
        ))
        .bind(&u.key)
        .bind(&u.account_id)
        .bind(u.file_size)
        .bind(&u.mime_type)
        .bind(u.create_time)
        .bind(u.expire_time)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn upload(&self, key: &str) -> Result<Option<UploadRecord>> {
        let row: Option<UploadRow> = sqlx::query_as(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE key = ?"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    async fn upload_bytes(&self, account_id: &str, now: Millis) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(file_size), 0) FROM uploads WHERE account_id = ? AND expire_time >= ?",
        )
        .bind(account_id)
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn record_upload_within(&self, u: &UploadRecord, quota: i64) -> Result<bool> {
        // One statement on the single writer connection: the sum it reads is the one
        // it inserts against.
        let done = sqlx::query(&format!(
            "INSERT INTO uploads ({UPLOAD_COLUMNS}) \
             SELECT ?, ?, ?, ?, ?, ? WHERE ? + (SELECT COALESCE(SUM(file_size), 0) FROM uploads \
             WHERE account_id = ? AND expire_time >= ?) <= ?"
        ))
        .bind(&u.key)
        .bind(&u.account_id)
        .bind(u.file_size)
        .bind(&u.mime_type)
        .bind(u.create_time)
        .bind(u.expire_time)
        .bind(u.file_size)
        .bind(&u.account_id)
        .bind(u.create_time)
        .bind(quota)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn results_due(&self, before: Millis, limit: i64) -> Result<Vec<TaskId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE state = 'success' AND files_swept = 0 AND complete_time < ? ORDER BY complete_time LIMIT ?",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| task_id(id)).collect()
    }

    async fn mark_results_swept(&self, ids: &[TaskId]) -> Result<()> {
        let mut tx = self.begin().await?;
        for id in ids {
            sqlx::query("UPDATE tasks SET files_swept = 1 WHERE id = ?")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn uploads_due(&self, now: Millis, limit: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key FROM uploads WHERE expire_time < ? ORDER BY expire_time LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_uploads(&self, keys: &[String]) -> Result<()> {
        let mut tx = self.begin().await?;
        for k in keys {
            sqlx::query("DELETE FROM uploads WHERE key = ?")
                .bind(k)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn old_tasks(&self, before: Millis, limit: i64) -> Result<Vec<TaskId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE create_time < ? AND state IN ('success', 'fail') ORDER BY create_time LIMIT ?",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(task_ids_lenient(&ids))
    }

    async fn delete_tasks(&self, ids: &[TaskId]) -> Result<()> {
        let mut tx = self.begin().await?;
        for id in ids {
            let id = id.to_string();
            let terminal: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM tasks WHERE id = ? AND state IN ('success', 'fail')",
            )
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            if terminal.is_none() {
                continue;
            }
            for sql in [
                "DELETE FROM deliveries WHERE task_id = ?",
                "DELETE FROM idempotency_keys WHERE task_id = ?",
                "DELETE FROM tasks WHERE id = ?",
            ] {
                sqlx::query(sql).bind(&id).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn tasks_by_ids(&self, ids: &[TaskId]) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        // SQLite's bound-parameter limit is far above this; chunks keep statements small.
        for chunk in ids.chunks(200) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id IN ({marks})");
            let mut q = sqlx::query_as(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            let rows: Vec<TaskRow> = q.fetch_all(&self.pool).await?;
            out.extend(records::<TaskRow, TaskRecord>(rows)?);
        }
        Ok(out)
    }

    async fn delete_old_idempotency_keys(&self, before: Millis) -> Result<u64> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE create_time < ?")
            .bind(before)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    async fn server_value(
        &self,
        name: &str,
        make: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO server_values (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(make())
        .execute(&self.write)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM server_values WHERE name = ?")
                .bind(name)
                .fetch_one(&self.write)
                .await?,
        )
    }
}

enum Reaped {
    Requeued(TaskId),
    Failed(TaskId),
}

/// The reaper's work on one expired row, inside the caller's savepoint.
async fn reap_one(
    tx: &mut sqlx::SqliteConnection,
    id: &str,
    state: &str,
    fetch_attempts: i64,
    attempts: i64,
    now: Millis,
    max_attempts: i64,
) -> Result<Reaped> {
    let task_id = task_id(id)?;
    if let Some(msg) = reap_decision(state, fetch_attempts, attempts, max_attempts) {
        fail_in_tx(tx, &task_id, FailCode::Internal, &msg, now).await?;
        return Ok(Reaped::Failed(task_id));
    }
    sqlx::query(
        "UPDATE tasks SET state = CASE state WHEN 'generating' THEN 'queuing' ELSE state END, \
         lease_owner = NULL, lease_until = NULL, progress = 0, update_time = ? WHERE id = ?",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    Ok(Reaped::Requeued(task_id))
}

/// Moves a live task to `fail` and refunds what it had consumed, inside the caller's
/// transaction. The caller has checked that the task is live.
async fn fail_in_tx(
    tx: &mut sqlx::SqliteConnection,
    id: &TaskId,
    code: FailCode,
    msg: &str,
    now: Millis,
) -> Result<i64> {
    let (account_id, refund): (String, i64) = sqlx::query_as(
        "SELECT account_id, credits_consumed FROM tasks WHERE id = ? AND state NOT IN ('success', 'fail')",
    )
    .bind(id.to_string())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE tasks SET state = 'fail', fail_code = ?, fail_msg = ?, credits_consumed = 0, \
         lease_owner = NULL, lease_until = NULL, \
         cost_time = CASE WHEN start_time IS NULL THEN 0 ELSE ? - start_time END, \
         complete_time = ?, update_time = ? WHERE id = ?",
    )
    .bind(code.as_str())
    .bind(msg)
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE accounts SET credits = credits + ? WHERE id = ?")
        .bind(refund)
        .bind(&account_id)
        .execute(&mut *tx)
        .await?;
    enqueue_callback_in_tx(tx, id, now).await?;
    Ok(refund)
}

/// Records the callback of a task that just became terminal, in the same transaction,
/// when the task has a callback URL. The balance is read after any refund.
async fn enqueue_callback_in_tx(
    tx: &mut sqlx::SqliteConnection,
    id: &TaskId,
    now: Millis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO deliveries (id, task_id, account_id, url, remained_credits, state, next_attempt, create_time, update_time) \
         SELECT ?, t.id, t.account_id, t.callback_url, a.credits, 'pending', ?, ?, ? \
         FROM tasks t JOIN accounts a ON a.id = t.account_id WHERE t.id = ? AND t.callback_url IS NOT NULL",
    )
    .bind(new_delivery_id())
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
