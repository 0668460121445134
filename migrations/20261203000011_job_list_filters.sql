-- Lists of jobs filtered by concurrency key or labels (`hodei list`, the web console).
CREATE INDEX jobs_by_key_and_creation ON jobs (concurrency_key, created_at DESC, id DESC)
    WHERE concurrency_key <> '';
CREATE INDEX jobs_labels ON jobs USING gin ((spec->'labels') jsonb_path_ops);
