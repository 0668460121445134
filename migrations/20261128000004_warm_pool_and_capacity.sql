-- Warm pools and provider capacity.
-- A pooled worker is provisioned ahead of demand and reused for up to max_jobs jobs; an
-- ephemeral worker has max_jobs = 1.
ALTER TABLE workers
    ADD COLUMN pooled   boolean NOT NULL DEFAULT false,
    ADD COLUMN max_jobs integer NOT NULL DEFAULT 1 CHECK (max_jobs >= 1),
    ADD COLUMN jobs_run integer NOT NULL DEFAULT 0 CHECK (jobs_run >= 0);
-- The dispatcher counts the workers alive (capacity) and the pool's members on every
-- placement that may create one: a small partial index, never a scan of ended workers.
CREATE INDEX workers_live ON workers (pooled, state) WHERE state <> 'Terminated';
