-- Job policies (timeouts, retries, priority) and the deadlines of the state-timeout monitor.
ALTER TABLE jobs
    ADD COLUMN policy      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN priority    integer     NOT NULL DEFAULT 0,
    ADD COLUMN start_by    timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN deadline_at timestamptz,
    ADD COLUMN not_before  timestamptz;

-- The monitor's sweeps: overdue jobs, and retried jobs whose backoff is over.
CREATE INDEX jobs_by_deadline ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;
CREATE INDEX jobs_by_not_before ON jobs (not_before) WHERE not_before IS NOT NULL;

-- The dispatcher's next job: highest priority first, then oldest, among those not waiting out a backoff.
DROP INDEX jobs_pending_fifo;
CREATE INDEX jobs_pending_by_priority ON jobs (priority DESC, created_at, id) WHERE state = 'Pending' AND not_before IS NULL;

ALTER TABLE workers ADD COLUMN deadline_at timestamptz;
CREATE INDEX workers_by_deadline ON workers (deadline_at) WHERE deadline_at IS NOT NULL;

-- The relay keeps one aggregate's rows in order past a row that waits for a retry.
CREATE INDEX outbox_pending_by_aggregate ON outbox_events (aggregate_id, id) WHERE status = 'pending';
