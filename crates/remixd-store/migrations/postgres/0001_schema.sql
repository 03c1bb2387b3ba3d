-- remixd's schema on PostgreSQL: the same tables, columns and meanings as the SQLite
-- migrations (migrations/sqlite, 0001 to 0008) in one step. Times are Unix milliseconds
-- (BIGINT); every integer is BIGINT so rows read back as i64 on both stores, and so
-- `remixd store copy` moves them column for column.

CREATE TABLE accounts (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    -- The CHECK is a second line of defence: reservation is a conditional UPDATE.
    credits        BIGINT NOT NULL CHECK (credits >= 0),
    webhook_secret TEXT,
    create_time    BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,          -- 16 hex digits, public
    account_id   TEXT NOT NULL REFERENCES accounts(id),
    label        TEXT NOT NULL DEFAULT '',
    key_hash     BYTEA NOT NULL,            -- SHA-256 of the whole key
    hourly_limit BIGINT,
    daily_limit  BIGINT,
    total_limit  BIGINT,
    create_time  BIGINT NOT NULL,
    revoke_time  BIGINT
);
CREATE INDEX api_keys_account ON api_keys(account_id);

CREATE TABLE tasks (
    -- UUIDv7 hex: time-ordered. Byte order (COLLATE "C") is creation order.
    id               TEXT COLLATE "C" PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    key_id           TEXT NOT NULL REFERENCES api_keys(id),
    model            TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('waiting','queuing','generating','success','fail')),
    param            TEXT NOT NULL,         -- the create request as received
    input            TEXT NOT NULL,         -- the validated input (internal JSON)
    callback_url     TEXT,
    result_json      TEXT NOT NULL DEFAULT '',
    fail_code        TEXT NOT NULL DEFAULT '',
    fail_msg         TEXT NOT NULL DEFAULT '',
    cost             BIGINT NOT NULL,       -- credits reserved at creation
    credits_consumed BIGINT NOT NULL,       -- cost, or 0 once refunded
    progress         BIGINT NOT NULL DEFAULT 0,
    fetch_attempts   BIGINT NOT NULL DEFAULT 0,
    attempts         BIGINT NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_until      BIGINT,
    not_before       BIGINT NOT NULL DEFAULT 0,
    start_time       BIGINT,
    cost_time        BIGINT NOT NULL DEFAULT 0,
    create_time      BIGINT NOT NULL,
    update_time      BIGINT NOT NULL,
    complete_time    BIGINT,
    -- Retention: whether the result files of a finished task have been deleted.
    files_swept      BIGINT NOT NULL DEFAULT 0,
    -- An upstream engine's handle on the provider's request (never a provider key).
    upstream         TEXT
);
-- The queue: claims scan only live tasks.
CREATE INDEX tasks_queue ON tasks(state, not_before, id) WHERE state IN ('waiting', 'queuing');
-- The reaper: only leased tasks.
CREATE INDEX tasks_leases ON tasks(lease_until) WHERE lease_owner IS NOT NULL;
-- Per-key usage caps.
CREATE INDEX tasks_key_time ON tasks(key_id, create_time);
CREATE INDEX tasks_results_due ON tasks(complete_time) WHERE state = 'success' AND files_swept = 0;
CREATE INDEX tasks_created ON tasks(create_time);
-- The task list: an account's tasks, newest first, by id (UUIDv7, time-ordered).
CREATE INDEX tasks_account_id ON tasks(account_id, id);

-- The callback outbox: one row per delivery, written in the transaction that makes
-- its task terminal, sent by the deliverer.
CREATE TABLE deliveries (
    id               TEXT COLLATE "C" PRIMARY KEY, -- the webhook-id, stable across attempts
    task_id          TEXT COLLATE "C" NOT NULL REFERENCES tasks(id),
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    url              TEXT NOT NULL,
    remained_credits BIGINT NOT NULL,      -- the balance when the task finished
    payload          TEXT,                 -- the body, fixed at the first attempt
    state            TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt     BIGINT NOT NULL,
    lease_owner      TEXT,
    lease_until      BIGINT,
    last_status      BIGINT,
    last_error       TEXT NOT NULL DEFAULT '',
    create_time      BIGINT NOT NULL,
    update_time      BIGINT NOT NULL,
    complete_time    BIGINT
);
CREATE INDEX deliveries_due ON deliveries(next_attempt) WHERE state = 'pending';
CREATE INDEX deliveries_state ON deliveries(state, update_time);
CREATE INDEX deliveries_task ON deliveries(task_id);

-- Idempotency-Key on createTask: the same key and body within 24 h give the same task.
CREATE TABLE idempotency_keys (
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    key         TEXT NOT NULL,
    body_hash   TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_time ON idempotency_keys(create_time);
CREATE INDEX idempotency_keys_task ON idempotency_keys(task_id);

-- Uploaded files, kept until expire_time.
CREATE TABLE uploads (
    key         TEXT PRIMARY KEY,      -- storage key, uploads/<token>/<path>/<name>
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    file_size   BIGINT NOT NULL,
    mime_type   TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    expire_time BIGINT NOT NULL
);
CREATE INDEX uploads_expire ON uploads(expire_time);
CREATE INDEX uploads_account ON uploads(account_id, expire_time);

-- Server-wide values (the key that signs download links), shared by every node.
CREATE TABLE server_values (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
