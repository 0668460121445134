-- Whether any container job waits (the dispatcher's look before it takes the placement lock
-- with a warm pool and no free worker): only container jobs are in it, so process jobs cost
-- it nothing.
CREATE INDEX jobs_pending_in_containers ON jobs (id)
    WHERE state = 'Pending' AND spec ? 'image';
