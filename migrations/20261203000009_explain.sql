-- What `hodei explain` reads to say why a job is where it is.
-- The dispatchers' placement settings, written by each dispatcher at its start (the last
-- one started wins; instances are meant to share one configuration): the capacity and the
-- warm pool's size.
CREATE TABLE dispatch_settings (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_workers    integer     NOT NULL CHECK (max_workers >= 0),
    warm_pool_size integer     NOT NULL CHECK (warm_pool_size >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- Each provider's circuit, written by the provider-manager when it opens or closes.
ALTER TABLE provider_offers
    ADD COLUMN circuit          text        NOT NULL DEFAULT 'Closed'
        CHECK (circuit IN ('Closed', 'Open', 'HalfOpen')),
    ADD COLUMN circuit_failures integer     NOT NULL DEFAULT 0,
    ADD COLUMN circuit_retry_at timestamptz,
    ADD COLUMN circuit_error    text;
