-- What each provider offers (written by the provider-manager at start): its labels and its
-- capacity. The scheduler refuses a job no provider can ever run; the dispatcher keeps a
-- container job Pending while its provider's memory is taken.
CREATE TABLE provider_offers (
    provider    text PRIMARY KEY,
    labels      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    cpu_millis  integer     NOT NULL,
    memory_mb   integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The container jobs holding a provider's memory, for the dispatcher's capacity check.
CREATE INDEX jobs_placed_in_containers ON jobs (id)
    WHERE state IN ('Assigned', 'Scheduled', 'Running') AND spec ? 'image';
