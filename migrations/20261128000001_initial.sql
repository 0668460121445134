-- Jobs: the job aggregate (scheduler owns it; the dispatcher places jobs).
CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    state           text        NOT NULL,
    spec            jsonb       NOT NULL,
    attempt         integer     NOT NULL,
    worker_id       uuid,
    exit_code       integer,
    error           text,
    correlation_id  text        NOT NULL,
    idempotency_key text UNIQUE,
    version         bigint      NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
-- `hodei list` (newest first, optionally by state) and the dispatcher's oldest pending job.
CREATE INDEX jobs_by_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_by_state_created ON jobs (state, created_at DESC, id DESC);
CREATE INDEX jobs_pending_fifo ON jobs (created_at, id) WHERE state = 'Pending';
CREATE INDEX jobs_by_worker ON jobs (worker_id) WHERE worker_id IS NOT NULL;

-- Workers: the worker aggregate (registry owns it; the dispatcher and provider-manager change it).
CREATE TABLE workers (
    id                uuid PRIMARY KEY,
    state             text        NOT NULL,
    provider          text        NOT NULL,
    reserved_job_id   uuid,
    current_job_id    uuid,
    token_hash        text,
    correlation_id    text        NOT NULL,
    last_heartbeat_at timestamptz,
    version           bigint      NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);
CREATE INDEX workers_by_state_created ON workers (state, created_at DESC, id DESC);
CREATE INDEX workers_by_created ON workers (created_at DESC, id DESC);
-- The dispatcher's "a ready worker nobody reserved".
CREATE INDEX workers_ready_free ON workers (created_at, id) WHERE state = 'Ready' AND reserved_job_id IS NULL;

-- The transactional outbox: events and worker commands, written with the change that causes them.
CREATE TABLE outbox_events (
    id              bigserial PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    kind            text        NOT NULL CHECK (kind IN ('event', 'command')),
    subject         text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key text,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);
CREATE INDEX outbox_pending ON outbox_events (id) WHERE status = 'pending';

-- Wake the relay once per transaction that wrote outbox rows (identical notifications of one
-- transaction are folded into one by Postgres).
CREATE FUNCTION hodei_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hodei_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events
    FOR EACH STATEMENT EXECUTE FUNCTION hodei_outbox_notify();

-- The audit log: every domain event once, queried by correlation id, type, actor, aggregate, time.
CREATE TABLE audit_log (
    seq            bigserial PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    event_type     text        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   uuid        NOT NULL,
    correlation_id text        NOT NULL,
    actor          text        NOT NULL,
    payload        jsonb       NOT NULL
);
CREATE INDEX audit_by_correlation ON audit_log (correlation_id, seq);
CREATE INDEX audit_by_type ON audit_log (event_type, seq);
CREATE INDEX audit_by_actor ON audit_log (actor, seq);
CREATE INDEX audit_by_aggregate ON audit_log (aggregate_id, seq);
CREATE INDEX audit_by_occurred ON audit_log (occurred_at, seq);

-- What each provider created for a worker, so it can be destroyed even by another instance.
CREATE TABLE provider_resources (
    worker_id   uuid PRIMARY KEY,
    provider    text        NOT NULL,
    resource_id text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
