-- A job whose worker was lost waits for that worker's teardown to be confirmed (its
-- WorkerTerminated) before it may run again: fenced_by names the worker it waits for.
ALTER TABLE jobs ADD COLUMN fenced_by uuid;

CREATE INDEX jobs_fenced_by ON jobs (fenced_by) WHERE fenced_by IS NOT NULL;

-- Backoffs the monitor releases: only jobs not fenced.
DROP INDEX jobs_by_not_before;
CREATE INDEX jobs_by_not_before ON jobs (not_before) WHERE not_before IS NOT NULL AND fenced_by IS NULL;
