-- An upstream engine's handle on a task's request at the provider (its request id and
-- the URLs to follow), written before the engine waits on the provider, so a worker
-- that restarts resumes the same request instead of submitting the task again.
-- Never holds a provider key.
ALTER TABLE tasks ADD COLUMN upstream TEXT;
