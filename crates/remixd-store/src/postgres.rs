//! The shared store: PostgreSQL through sqlx, for several API and worker nodes.
//!
//! The same tables and guarantees as [`crate::sqlite`], kept by PostgreSQL's row locks
//! instead of SQLite's single writer:
//! - queue claims pick their row with `FOR UPDATE SKIP LOCKED`, so claims from many
//!   workers never wait on each other and never take the same task;
//! - everything that reads a balance, a cap or a quota before writing locks the
//!   account's row first (`SELECT … FOR UPDATE`), so concurrent creates and uploads of
//!   one account are serialised and none slips past a limit;
//! - fetch claims of one owner are serialised by a transaction-scoped advisory lock on
//!   the owner's name, so its per-account cap is exact;
//! - locks are always taken task rows before account rows, never the reverse, so the
//!   reaper, failures and creates cannot deadlock.
//!
//! Transactions run at PostgreSQL's default `READ COMMITTED`: each statement sees what
//! was committed before it started, which the locks above make sufficient.

use std::time::Duration;

use async_trait::async_trait;
use remixd_domain::{FailCode, Millis, TaskId, TaskState};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::rows::{
    attempt_columns, corrupt, delivery_busy, key_cap_windows, new_delivery_id, reap_decision,
    records, task_id, task_ids_lenient, AccountRow, DeliveryRow, KeyRow, TaskRow, UploadRow,
    KEY_SELECT, TASK_COLUMNS, UPLOAD_COLUMNS,
};
use crate::{
    Account, ApiKeyRecord, AttemptOutcome, CreateOutcome, DeliveryRecord, DeliveryState, Finish,
    NewKey, NewTask, RateDecision, ReapReport, Result, Signal, Stage, Store, StoreError,
    TaskRecord, UploadRecord,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

impl PostgresStore {
    /// Connects to the database at a `postgres://` (or `postgresql://`) URL. The URL may
    /// carry libpq's parameters (`sslmode`, `host=/socket/dir`, `options`); the pool holds
    /// at most `max_connections` connections.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Unsupported(url.to_string()));
        }
        let opts: PgConnectOptions = url.parse()?;
        Self::connect(opts, max_connections).await
    }

    /// Connects with options built by the caller (tests put each store in its own schema).
    pub async fn connect(opts: PgConnectOptions, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    /// The connection pool, for LISTEN/NOTIFY and the store copy.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin(&self) -> Result<Tx> {
        Ok(self.pool.begin().await?)
    }
}

fn unique_to_conflict(what: String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what),
        _ => e.into(),
    }
}

/// Locks an account's row until the end of the transaction; its balance, or `None`
/// when there is no such account.
async fn lock_account(tx: &mut Tx, account_id: &str) -> Result<Option<i64>> {
    Ok(
        sqlx::query_scalar("SELECT credits FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(account_id)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<()> {
        // sqlx takes an advisory lock for the run, so nodes starting together migrate once.
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        // A real write: a database that can be read but not written is not ready.
        sqlx::query(
            "INSERT INTO server_values (name, value) VALUES ('readyz-probe', '') \
             ON CONFLICT (name) DO UPDATE SET value = ''",
        )
        .execute(&self.pool)
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
            "INSERT INTO accounts (id, name, credits, create_time) VALUES ($1, $2, $3, $4) \
             RETURNING id, name, credits, create_time",
        )
        .bind(id)
        .bind(name)
        .bind(credits)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(unique_to_conflict(format!("account {name:?}")))?;
        Ok(row.into())
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>> {
        let row: Option<AccountRow> =
            sqlx::query_as("SELECT id, name, credits, create_time FROM accounts WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(Into::into))
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        let rows: Vec<AccountRow> =
            sqlx::query_as("SELECT id, name, credits, create_time FROM accounts ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn balance(&self, account_id: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT credits FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("account {account_id}")))
    }

    async fn add_credits(&self, account_name: &str, delta: i64) -> Result<i64> {
        let mut tx = self.begin().await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT credits FROM accounts WHERE name = $1 FOR UPDATE")
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
        sqlx::query("UPDATE accounts SET credits = $1 WHERE name = $2")
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
        let done = sqlx::query(
            "INSERT INTO api_keys (id, account_id, label, key_hash, hourly_limit, daily_limit, \
             total_limit, create_time) SELECT $1, id, $3, $4, $5, $6, $7, $8 FROM accounts WHERE name = $2",
        )
        .bind(&key.id)
        .bind(&key.account_name)
        .bind(&key.label)
        .bind(&key.key_hash)
        .bind(key.limits.hourly)
        .bind(key.limits.daily)
        .bind(key.limits.total)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(unique_to_conflict(format!("key {}", key.id)))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "account {:?}",
                key.account_name
            )));
        }
        self.key_by_id(&key.id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {}", key.id)))
    }

    async fn key_by_id(&self, key_id: &str) -> Result<Option<ApiKeyRecord>> {
        let row: Option<KeyRow> = sqlx::query_as(&format!("{KEY_SELECT} WHERE k.id = $1"))
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Into::into))
    }

    async fn list_keys(&self, account_name: Option<&str>) -> Result<Vec<ApiKeyRecord>> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "{KEY_SELECT} WHERE ($1::text IS NULL OR a.name = $1) ORDER BY a.name, k.create_time, k.id"
        ))
        .bind(account_name)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_key(&self, key_id: &str, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoke_time = $1 WHERE id = $2 AND revoke_time IS NULL",
        )
        .bind(now)
        .bind(key_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_task(&self, t: NewTask) -> Result<CreateOutcome> {
        let input = serde_json::to_string(&t.input).map_err(|e| corrupt(format!("input: {e}")))?;
        let mut tx = self.begin().await?;
        // Every create of this account waits here for the one before it: the
        // idempotency check, the key's caps and the balance below are read under the lock.
        let Some(balance) = lock_account(&mut tx, &t.account_id).await? else {
            return Err(StoreError::NotFound(format!("account {}", t.account_id)));
        };

        if let Some(idem) = &t.idempotency {
            let seen: Option<(String, String, i64)> = sqlx::query_as(
                "SELECT body_hash, task_id, create_time FROM idempotency_keys \
                 WHERE account_id = $1 AND key = $2",
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
            "SELECT hourly_limit, daily_limit, total_limit FROM api_keys WHERE id = $1",
        )
        .bind(&t.key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let limits = limits.ok_or_else(|| StoreError::NotFound(format!("key {}", t.key_id)))?;
        for (cap, limit, since) in key_cap_windows(limits, t.now) {
            let used: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(credits_consumed), 0)::BIGINT FROM tasks \
                 WHERE key_id = $1 AND create_time >= $2",
            )
            .bind(&t.key_id)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?;
            if used + t.cost > limit {
                return Ok(CreateOutcome::KeyLimit { cap, limit, used });
            }
        }

        if balance < t.cost {
            return Ok(CreateOutcome::InsufficientCredits { balance });
        }
        let balance: i64 = sqlx::query_scalar(
            "UPDATE accounts SET credits = credits - $1 WHERE id = $2 RETURNING credits",
        )
        .bind(t.cost)
        .bind(&t.account_id)
        .fetch_one(&mut *tx)
        .await?;

        sqlx::query(
            "INSERT INTO tasks (id, account_id, key_id, model, state, param, input, callback_url, \
             cost, credits_consumed, create_time, update_time) \
             VALUES ($1, $2, $3, $4, 'waiting', $5, $6, $7, $8, $8, $9, $9)",
        )
        .bind(t.id.to_string())
        .bind(&t.account_id)
        .bind(&t.key_id)
        .bind(&t.model)
        .bind(&t.param)
        .bind(&input)
        .bind(&t.callback_url)
        .bind(t.cost)
        .bind(t.now)
        .execute(&mut *tx)
        .await?;
        if let Some(idem) = &t.idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys (account_id, key, body_hash, task_id, create_time) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, key) DO UPDATE SET \
                 body_hash = excluded.body_hash, task_id = excluded.task_id, \
                 create_time = excluded.create_time",
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
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND account_id = $2"
        ))
        .bind(id.to_string())
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>> {
        let row: Option<TaskRow> =
            sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
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
        // Ids are UUIDv7 hex in a `COLLATE "C"` column, so their order is creation order.
        let rows: Vec<TaskRow> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE account_id = $1 \
             AND ($2::text IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        ))
        .bind(account_id)
        .bind(before.map(|b| b.to_string()))
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
        if stage == Stage::Fetch {
            return self.claim_fetch(owner, now, lease_until, u32::MAX).await;
        }
        let row: Option<TaskRow> = sqlx::query_as(&format!(
            "UPDATE tasks SET state = 'generating', lease_owner = $1, lease_until = $2, \
             attempts = attempts + 1, progress = 0, start_time = $3, update_time = $3 \
             WHERE id = (SELECT id FROM tasks WHERE state = 'queuing' AND lease_owner IS NULL \
             AND not_before <= $3 ORDER BY state, not_before, id LIMIT 1 \
             FOR UPDATE SKIP LOCKED) RETURNING {TASK_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(&self.pool)
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
        let mut tx = self.begin().await?;
        // One claim of this owner at a time: the count of its fetches in flight that the
        // statement below reads is then the one it adds to.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('remixd claim_fetch ' || $1, 0))",
        )
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        // `f` counts, per account, the tasks this owner is fetching under a live lease;
        // accounts at the cap are left out and the least-served account goes first.
        let row: Option<TaskRow> = sqlx::query_as(&format!(
            "UPDATE tasks SET lease_owner = $1, lease_until = $2, fetch_attempts = fetch_attempts + 1, \
             update_time = $3 WHERE id = (SELECT t.id FROM tasks t LEFT JOIN (SELECT account_id, \
             COUNT(*) AS n FROM tasks WHERE state = 'waiting' AND lease_owner = $1 AND lease_until >= $3 \
             GROUP BY account_id) f ON f.account_id = t.account_id WHERE t.state = 'waiting' \
             AND t.lease_owner IS NULL AND t.not_before <= $3 AND COALESCE(f.n, 0) < $4 \
             ORDER BY COALESCE(f.n, 0), t.not_before, t.id LIMIT 1 FOR UPDATE OF t SKIP LOCKED) \
             RETURNING {TASK_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(i64::from(per_account))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
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
            "UPDATE tasks SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND lease_until >= $4 \
             AND state IN ('waiting', 'generating')",
        )
        .bind(lease_until)
        .bind(id.to_string())
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn inputs_ready(&self, id: &TaskId, owner: &str, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET state = 'queuing', lease_owner = NULL, lease_until = NULL, update_time = $1 \
             WHERE id = $2 AND lease_owner = $3 AND state = 'waiting'",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
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
            "UPDATE tasks SET progress = $1, update_time = $2 WHERE id = $3 AND lease_owner = $4 \
             AND state = 'generating' AND progress < $1",
        )
        .bind(i64::from(progress))
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
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
            "UPDATE tasks SET upstream = $1, update_time = $2 WHERE id = $3 AND lease_owner = $4 \
             AND state = 'generating'",
        )
        .bind(upstream)
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
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
            "UPDATE tasks SET state = 'success', result_json = $1, progress = 100, lease_owner = NULL, \
             lease_until = NULL, cost_time = $2 - COALESCE(start_time, create_time), complete_time = $2, \
             update_time = $2 WHERE id = $3 AND lease_owner = $4 AND state = 'generating'",
        )
        .bind(result_json)
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(Finish::NotOwner);
        }
        enqueue_callback(&mut tx, id, now).await?;
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
        let live: Option<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE id = $1 AND state NOT IN ('success', 'fail') \
             AND ($2::text IS NULL OR lease_owner = $2) FOR UPDATE",
        )
        .bind(id.to_string())
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        if live.is_none() {
            return Ok(Finish::NotOwner);
        }
        let refunded = fail_locked(&mut tx, id, code, msg, now).await?;
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
             lease_owner = NULL, lease_until = NULL, not_before = $1, progress = 0, update_time = $2, \
             attempts = CASE WHEN $3 OR state <> 'generating' THEN attempts ELSE attempts - 1 END, \
             fetch_attempts = CASE WHEN $3 OR state <> 'waiting' THEN fetch_attempts ELSE fetch_attempts - 1 END \
             WHERE id = $4 AND lease_owner = $5 AND state IN ('waiting', 'generating')",
        )
        .bind(not_before)
        .bind(now)
        .bind(count_attempt)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn reap(&self, now: Millis, max_attempts: i64) -> Result<ReapReport> {
        let mut tx = self.begin().await?;
        // Rows another reaper is handling are skipped, not waited for.
        let expired: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, state, fetch_attempts, attempts FROM tasks WHERE lease_owner IS NOT NULL \
             AND lease_until < $1 AND state IN ('waiting', 'generating') ORDER BY id \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = ReapReport::default();
        for (id, state, fetch_attempts, attempts) in expired {
            // Each row under its own savepoint: a row that cannot be handled is reported
            // and left for the next pass; the others still go back to their queue.
            let mut row = sqlx::Connection::begin(&mut *tx).await?;
            let outcome = async {
                let task = task_id(&id)?;
                match reap_decision(&state, fetch_attempts, attempts, max_attempts) {
                    Some(msg) => {
                        fail_locked(&mut row, &task, FailCode::Internal, &msg, now).await?;
                        Ok::<_, StoreError>((task, true))
                    }
                    None => {
                        sqlx::query(
                            "UPDATE tasks SET state = CASE state WHEN 'generating' THEN 'queuing' \
                             ELSE state END, lease_owner = NULL, lease_until = NULL, progress = 0, \
                             update_time = $1 WHERE id = $2",
                        )
                        .bind(now)
                        .bind(&id)
                        .execute(&mut *row)
                        .await?;
                        Ok((task, false))
                    }
                }
            }
            .await;
            match outcome {
                Ok((task, failed)) => {
                    row.commit().await?;
                    if failed {
                        report.failed.push(task);
                    } else {
                        report.requeued.push(task);
                    }
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
            "SELECT COALESCE(SUM(credits_consumed), 0)::BIGINT FROM tasks WHERE account_id = $1",
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
        rows.into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(corrupt)?, n)))
            .collect()
    }

    async fn set_webhook_secret(&self, account_name: &str, secret: &str) -> Result<()> {
        let done = sqlx::query("UPDATE accounts SET webhook_secret = $1 WHERE name = $2")
            .bind(secret)
            .bind(account_name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("account {account_name:?}")));
        }
        Ok(())
    }

    async fn webhook_secret(&self, account_id: &str) -> Result<Option<String>> {
        let v: Option<Option<String>> =
            sqlx::query_scalar("SELECT webhook_secret FROM accounts WHERE id = $1")
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
            "UPDATE deliveries SET lease_owner = $1, lease_until = $2 WHERE id IN (SELECT id FROM deliveries \
             WHERE state = 'pending' AND next_attempt <= $3 AND (lease_until IS NULL OR lease_until < $3) \
             ORDER BY next_attempt LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING *",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
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
            "UPDATE deliveries SET state = $1, attempts = attempts + 1, last_status = $2, last_error = $3, \
             next_attempt = COALESCE($4, next_attempt), complete_time = $5, payload = COALESCE(payload, $6), \
             lease_owner = NULL, lease_until = NULL, update_time = $7 \
             WHERE id = $8 AND lease_owner = $9 AND state = 'pending'",
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
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT * FROM deliveries WHERE ($1::text IS NULL OR state = $1) \
             ORDER BY update_time DESC, id DESC LIMIT $2",
        )
        .bind(state.map(|s| s.as_str()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        records(rows)
    }

    async fn redeliver(&self, id: &str, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt = $1, lease_owner = NULL, \
             lease_until = NULL, complete_time = NULL, update_time = $1 \
             WHERE id = $2 AND (lease_owner IS NULL OR lease_until < $1)",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        let leased: Option<Option<i64>> =
            sqlx::query_scalar("SELECT lease_until FROM deliveries WHERE id = $1")
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
            sqlx::query_as("SELECT * FROM deliveries WHERE task_id = $1 ORDER BY create_time, id")
                .bind(task_id.to_string())
                .fetch_all(&self.pool)
                .await?;
        records(rows)
    }

    async fn record_upload(&self, u: &UploadRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        ))
        .bind(&u.key)
        .bind(&u.account_id)
        .bind(u.file_size)
        .bind(&u.mime_type)
        .bind(u.create_time)
        .bind(u.expire_time)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn upload(&self, key: &str) -> Result<Option<UploadRecord>> {
        let row: Option<UploadRow> = sqlx::query_as(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    async fn upload_bytes(&self, account_id: &str, now: Millis) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(file_size), 0)::BIGINT FROM uploads \
             WHERE account_id = $1 AND expire_time >= $2",
        )
        .bind(account_id)
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn record_upload_within(&self, u: &UploadRecord, quota: i64) -> Result<bool> {
        let mut tx = self.begin().await?;
        // Uploads of one account racing for the last room queue on the account's row.
        lock_account(&mut tx, &u.account_id).await?;
        let done = sqlx::query(&format!(
            "INSERT INTO uploads ({UPLOAD_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6 \
             WHERE $3 + (SELECT COALESCE(SUM(file_size), 0) FROM uploads \
             WHERE account_id = $2 AND expire_time >= $5) <= $7"
        ))
        .bind(&u.key)
        .bind(&u.account_id)
        .bind(u.file_size)
        .bind(&u.mime_type)
        .bind(u.create_time)
        .bind(u.expire_time)
        .bind(quota)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn results_due(&self, before: Millis, limit: i64) -> Result<Vec<TaskId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE state = 'success' AND files_swept = 0 AND complete_time < $1 \
             ORDER BY complete_time LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| task_id(id)).collect()
    }

    async fn mark_results_swept(&self, ids: &[TaskId]) -> Result<()> {
        sqlx::query("UPDATE tasks SET files_swept = 1 WHERE id = ANY($1)")
            .bind(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn uploads_due(&self, now: Millis, limit: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key FROM uploads WHERE expire_time < $1 ORDER BY expire_time LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_uploads(&self, keys: &[String]) -> Result<()> {
        sqlx::query("DELETE FROM uploads WHERE key = ANY($1)")
            .bind(keys)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn old_tasks(&self, before: Millis, limit: i64) -> Result<Vec<TaskId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE create_time < $1 AND state IN ('success', 'fail') \
             ORDER BY create_time LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(task_ids_lenient(&ids))
    }

    async fn delete_tasks(&self, ids: &[TaskId]) -> Result<()> {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let mut tx = self.begin().await?;
        let terminal: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE id = ANY($1) AND state IN ('success', 'fail') FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        for sql in [
            "DELETE FROM deliveries WHERE task_id = ANY($1)",
            "DELETE FROM idempotency_keys WHERE task_id = ANY($1)",
            "DELETE FROM tasks WHERE id = ANY($1)",
        ] {
            sqlx::query(sql).bind(&terminal).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn tasks_by_ids(&self, ids: &[TaskId]) -> Result<Vec<TaskRecord>> {
        let rows: Vec<TaskRow> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1)"
        ))
        .bind(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        records(rows)
    }

    async fn delete_old_idempotency_keys(&self, before: Millis) -> Result<u64> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE create_time < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn server_value(
        &self,
        name: &str,
        make: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO server_values (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(make())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM server_values WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn rate_check(
        &self,
        key: &str,
        interval_us: i64,
        burst: i64,
    ) -> Result<Option<RateDecision>> {
        // GCRA: the request passes when the counter's next theoretical arrival time,
        // pushed one interval past now, is within `burst` intervals of now. One
        // statement: the row lock of the upsert serialises requests on the same key.
        let passed: Option<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO rate_limits (key, tat) VALUES ($1, {NOW_US} + $2) \
             ON CONFLICT (key) DO UPDATE SET tat = GREATEST(rate_limits.tat, {NOW_US}) + $2 \
             WHERE GREATEST(rate_limits.tat, {NOW_US}) + $2 - {NOW_US} <= $3 * $2 RETURNING tat"
        ))
        .bind(key)
        .bind(interval_us)
        .bind(burst)
        .fetch_optional(&self.pool)
        .await?;
        if passed.is_some() {
            return Ok(Some(RateDecision::Allowed));
        }
        let wait: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT GREATEST(tat, {NOW_US}) + $2 - {NOW_US} - $3 * $2 FROM rate_limits WHERE key = $1"
        ))
        .bind(key)
        .bind(interval_us)
        .bind(burst)
        .fetch_optional(&self.pool)
        .await?;
        Ok(Some(RateDecision::Wait {
            us: wait.unwrap_or(interval_us).max(1),
        }))
    }

    async fn prune_rates(&self) -> Result<u64> {
        let done = sqlx::query(&format!("DELETE FROM rate_limits WHERE tat < {NOW_US}"))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn publish(&self, signal: Signal) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(signal.encode())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Signal>>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                // `try_recv` gives `None` when the connection dropped; the next call
                // reconnects and listens again.
                let next = tokio::select! {
                    n = listener.try_recv() => n,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(Some(n)) => {
                        if let Some(s) = Signal::decode(n.payload()) {
                            // A full queue means the node is behind on signals already
                            // telling it to look: dropping one loses nothing.
                            let _ = tx.try_send(s);
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("lost the database's notification channel; reconnecting")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "database notifications: retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Some(rx))
    }
}

/// Now on the database's clock, in microseconds: one clock for every node's limits. The
/// same value everywhere in one statement.
const NOW_US: &str = "(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000)::BIGINT";

/// The NOTIFY channel remixd's nodes talk on.
const CHANNEL: &str = "remixd";

/// Moves a live task, whose row the caller has locked, to `fail` and refunds what it had
/// consumed, inside the caller's transaction.
async fn fail_locked(
    tx: &mut sqlx::PgConnection,
    id: &TaskId,
    code: FailCode,
    msg: &str,
    now: Millis,
) -> Result<i64> {
    let (account_id, refund): (String, i64) = sqlx::query_as(
        "SELECT account_id, credits_consumed FROM tasks WHERE id = $1 \
         AND state NOT IN ('success', 'fail')",
    )
    .bind(id.to_string())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE tasks SET state = 'fail', fail_code = $1, fail_msg = $2, credits_consumed = 0, \
         lease_owner = NULL, lease_until = NULL, \
         cost_time = CASE WHEN start_time IS NULL THEN 0 ELSE $3 - start_time END, \
         complete_time = $3, update_time = $3 WHERE id = $4",
    )
    .bind(code.as_str())
    .bind(msg)
    .bind(now)
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE accounts SET credits = credits + $1 WHERE id = $2")
        .bind(refund)
        .bind(&account_id)
        .execute(&mut *tx)
        .await?;
    enqueue_callback(tx, id, now).await?;
    Ok(refund)
}

/// Records the callback of a task that just became terminal, in the same transaction,
/// when the task has a callback URL. The balance is read after any refund.
async fn enqueue_callback(tx: &mut sqlx::PgConnection, id: &TaskId, now: Millis) -> Result<()> {
    sqlx::query(
        "INSERT INTO deliveries (id, task_id, account_id, url, remained_credits, state, next_attempt, \
         create_time, update_time) SELECT $1, t.id, t.account_id, t.callback_url, a.credits, 'pending', \
         $2, $2, $2 FROM tasks t JOIN accounts a ON a.id = t.account_id \
         WHERE t.id = $3 AND t.callback_url IS NOT NULL",
    )
    .bind(new_delivery_id())
    .bind(now)
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
