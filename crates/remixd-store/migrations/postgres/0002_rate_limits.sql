-- Rate limits shared by every API node (limits.create_per_10s, limits.query_per_s,
-- limits.uploads_per_10s): one GCRA counter per limited key, its theoretical arrival
-- time in microseconds of the database's clock. A row whose time has passed counts as
-- no row, so old rows are deleted at leisure.
CREATE TABLE rate_limits (
    key TEXT PRIMARY KEY,   -- "<limit> <account or key id>"
    tat BIGINT NOT NULL
);
CREATE INDEX rate_limits_tat ON rate_limits(tat);
