-- The upload quota sums an account's unexpired uploads on every upload.
CREATE INDEX uploads_account ON uploads(account_id, expire_time);
