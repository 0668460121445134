-- Each writing service publishes its own outbox rows right after its commit, so the relay no
-- longer needs waking on every commit: it is woken by a publisher that could not publish
-- (pg_notify from `hodei_store::outbox::notify_relay`), and otherwise looks when the oldest
-- pending row's grace ends, or on its sweep. A notification per commit cost every commit a
-- trigger and the notification queue, and piled up on the relay's listening connection.
DROP TRIGGER outbox_events_notify ON outbox_events;
DROP FUNCTION hodei_outbox_notify();
