-- Idempotency-Key on createTask: the same key and body within 24 h give the same task.
CREATE TABLE idempotency_keys (
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    key         TEXT NOT NULL,
    body_hash   TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    create_time INTEGER NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_time ON idempotency_keys(create_time);
