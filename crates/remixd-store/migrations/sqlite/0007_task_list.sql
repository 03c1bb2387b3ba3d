-- The task list (GET /api/v1/jobs/list): an account's tasks, newest first, by id
-- (UUIDv7, time-ordered), one index range per page.
CREATE INDEX tasks_account_id ON tasks(account_id, id);
