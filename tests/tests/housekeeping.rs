//! The active relay's housekeeping: published outbox rows past their retention are deleted
//! and the churning tables vacuumed, whether or not autovacuum runs.

use std::time::Duration;

use hodei_tests::{job, System, EVENTS_OF_A_JOB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_outbox_rows_are_deleted_after_their_retention_and_queue_tables_vacuumed() {
    let system = System::start_with(&[
        ("HODEI_MAINTENANCE_SECS", "1"),
        ("HODEI_OUTBOX_RETENTION_SECS", "0"),
    ])
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(system.submit(&job("true", &[])).await.unwrap().job_id);
    }
    system
        .wait_until_settled(&ids, Duration::from_secs(60))
        .await;
    system.wait_audit_complete(Duration::from_secs(30)).await;
    // A dead row is the record of an event that could not be published: it stays.
    sqlx::query(
        "INSERT INTO outbox_events (event_id, kind, subject, aggregate_type, aggregate_id, \
                                    event_type, payload, status) \
         VALUES (gen_random_uuid(), 'event', 'x', 'job', gen_random_uuid(), 'X', '{}', 'dead')",
    )
    .execute(&system.pool)
    .await
    .unwrap();
    system
        .wait_for(
            "published rows deleted and tables vacuumed",
            Duration::from_secs(30),
            || async {
                let (published, dead): (i64, i64) = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE status = 'published'), \
                        count(*) FILTER (WHERE status = 'dead') FROM outbox_events",
                )
                .fetch_one(&system.pool)
                .await
                .unwrap();
                let (vacuumed,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM pg_stat_user_tables \
                 WHERE relname IN ('outbox_events', 'jobs', 'workers') AND last_vacuum IS NOT NULL",
                )
                .fetch_one(&system.pool)
                .await
                .unwrap();
                published == 0 && dead == 1 && vacuumed == 3
            },
        )
        .await;
    assert!(system.log_of("relay").contains("housekeeping done"));
    // The jobs and their audit trail are untouched.
    for id in &ids {
        assert!(system.get(*id).await.unwrap().state.is_terminal());
    }
    let (audited,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(audited as usize, ids.len() * EVENTS_OF_A_JOB.len());
}
