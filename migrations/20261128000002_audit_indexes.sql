-- Audit queries bounded in time (`from` / `to`) are answered in occurrence order,
-- (occurred_at, seq), so that a time range is one ordered range of an index however wide it is
-- (in recording order it is not: PostgreSQL would read every row of the range and sort them, or
-- walk `seq` from the start of the log to the first row of the range). audit_by_occurred serves
-- a time range alone; these two serve it combined with the two criteria that match many rows.
-- A correlation id, an aggregate or a worker's actor match few rows, which are sorted in memory.
CREATE INDEX audit_by_type_occurred ON audit_log (event_type, occurred_at, seq);
CREATE INDEX audit_by_actor_occurred ON audit_log (actor, occurred_at, seq);
