-- Schedules (issue 12): a job spec run on a cron expression or an interval. The definition
-- (trigger, overlap and catch-up policies, the job's spec and policy) is fixed at creation
-- and kept as JSON; what the schedulers query is a column of its own.
CREATE TABLE schedules (
    id             uuid PRIMARY KEY,
    name           text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('Active', 'Paused', 'Deleted')),
    definition     jsonb       NOT NULL,
    next_tick_at   timestamptz,
    anchor_at      timestamptz NOT NULL,
    last_tick_at   timestamptz,
    last_job_id    uuid,
    correlation_id text        NOT NULL,
    version        bigint      NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    CHECK ((state = 'Active') = (next_tick_at IS NOT NULL))
);
-- A name names one schedule that is not deleted.
CREATE UNIQUE INDEX schedules_live_name ON schedules (name) WHERE state <> 'Deleted';
-- The schedulers' sweep: the ticks that are due, and the next one to sleep until.
CREATE INDEX schedules_due ON schedules (next_tick_at) WHERE state = 'Active';
-- Lists, newest first.
CREATE INDEX schedules_by_creation ON schedules (created_at DESC, id DESC);
