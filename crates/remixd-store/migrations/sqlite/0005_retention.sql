-- Retention: which finished tasks have had their result files deleted.
ALTER TABLE tasks ADD COLUMN files_swept INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_results_due ON tasks(complete_time) WHERE state = 'success' AND files_swept = 0;
CREATE INDEX tasks_created ON tasks(create_time);
