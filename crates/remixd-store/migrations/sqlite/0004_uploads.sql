-- Uploaded files (API.md §6), kept until expire_time; and server-wide values such as
-- the key that signs download links, shared by every node of a cluster.
CREATE TABLE uploads (
    key         TEXT PRIMARY KEY,      -- storage key, uploads/<token>/<path>/<name>
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    file_size   INTEGER NOT NULL,
    mime_type   TEXT NOT NULL,
    create_time INTEGER NOT NULL,
    expire_time INTEGER NOT NULL
);
CREATE INDEX uploads_expire ON uploads(expire_time);

CREATE TABLE server_values (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
