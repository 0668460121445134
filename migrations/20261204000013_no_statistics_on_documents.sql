-- The JSON documents of the churning tables are never what a query filters, joins or sorts
-- by (a job's labels have their own expression index, whose statistics stay): ANALYZE, which
-- the relay runs on outbox_events and jobs at every housekeeping round, need not sample,
-- sort and compare them.
ALTER TABLE outbox_events ALTER COLUMN payload SET STATISTICS 0,
                          ALTER COLUMN metadata SET STATISTICS 0;
ALTER TABLE jobs ALTER COLUMN spec SET STATISTICS 0,
                 ALTER COLUMN policy SET STATISTICS 0;
ALTER TABLE audit_log ALTER COLUMN payload SET STATISTICS 0;
