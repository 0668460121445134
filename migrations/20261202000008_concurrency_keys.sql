-- Concurrency keys (issue 12): a job may carry `concurrency: {key, max}` in its spec; at most `max` jobs
-- of a key are placed (Assigned, Scheduled or Running) at once. The count is taken from the
-- jobs' states under the placement lock, so a slot is free exactly when its job leaves the
-- placed states and none can leak. Jobs without a key form the key '' (the default group)
-- for fairness and have no limit.
ALTER TABLE jobs
    ADD COLUMN concurrency_key text NOT NULL
        GENERATED ALWAYS AS (coalesce(spec #>> '{concurrency,key}', '')) STORED,
    ADD COLUMN concurrency_max integer
        GENERATED ALWAYS AS ((spec #>> '{concurrency,max}')::integer) STORED;

-- Placement walks the keys that have pending jobs (one probe per key) and takes each key's
-- head by priority, then age.
DROP INDEX jobs_pending_by_priority;
CREATE INDEX jobs_pending_by_key ON jobs (concurrency_key, priority DESC, created_at, id)
    WHERE state = 'Pending' AND not_before IS NULL;
-- The placed jobs of a key: its slots in use.
CREATE INDEX jobs_placed_by_key ON jobs (concurrency_key)
    WHERE state IN ('Assigned', 'Scheduled', 'Running');
