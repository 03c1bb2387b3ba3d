-- The callback outbox: one row per delivery, written in the transaction that makes
-- its task terminal, sent by the deliverer. Times are Unix milliseconds.
CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,     -- the webhook-id, stable across attempts
    task_id          TEXT NOT NULL REFERENCES tasks(id),
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    url              TEXT NOT NULL,
    remained_credits INTEGER NOT NULL,     -- the balance when the task finished
    payload          TEXT,                 -- the body, fixed at the first attempt
    state            TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt     INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_until      INTEGER,
    last_status      INTEGER,
    last_error       TEXT NOT NULL DEFAULT '',
    create_time      INTEGER NOT NULL,
    update_time      INTEGER NOT NULL,
    complete_time    INTEGER
);
CREATE INDEX deliveries_due ON deliveries(next_attempt) WHERE state = 'pending';
CREATE INDEX deliveries_state ON deliveries(state, update_time);
