-- remixd core schema (SQLite). Times are Unix milliseconds.

CREATE TABLE accounts (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    -- The CHECK is a second line of defence: reservation is a conditional UPDATE.
    credits        INTEGER NOT NULL CHECK (credits >= 0),
    webhook_secret TEXT,
    create_time    INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,          -- 16 hex digits, public
    account_id   TEXT NOT NULL REFERENCES accounts(id),
    label        TEXT NOT NULL DEFAULT '',
    key_hash     BLOB NOT NULL,             -- SHA-256 of the whole key
    hourly_limit INTEGER,
    daily_limit  INTEGER,
    total_limit  INTEGER,
    create_time  INTEGER NOT NULL,
    revoke_time  INTEGER
);
CREATE INDEX api_keys_account ON api_keys(account_id);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,      -- UUIDv7 hex: time-ordered
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
    cost             INTEGER NOT NULL,      -- credits reserved at creation
    credits_consumed INTEGER NOT NULL,      -- cost, or 0 once refunded
    progress         INTEGER NOT NULL DEFAULT 0,
    fetch_attempts   INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_until      INTEGER,
    not_before       INTEGER NOT NULL DEFAULT 0,
    start_time       INTEGER,
    cost_time        INTEGER NOT NULL DEFAULT 0,
    create_time      INTEGER NOT NULL,
    update_time      INTEGER NOT NULL,
    complete_time    INTEGER
);
-- The queue: claims scan only live tasks.
CREATE INDEX tasks_queue ON tasks(state, not_before, id) WHERE state IN ('waiting', 'queuing');
-- The reaper: only leased tasks.
CREATE INDEX tasks_leases ON tasks(lease_until) WHERE lease_owner IS NOT NULL;
-- Per-key usage caps.
CREATE INDEX tasks_key_time ON tasks(key_id, create_time);
