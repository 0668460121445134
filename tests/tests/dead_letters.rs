//! Dead letters: a message no consumer can handle and an outbox row that cannot be published
//! end in HODEI_DLQ with their reason, without holding anything else up, and operators can
//! list, show, replay (back through the normal path) and discard them, each audited.

use std::time::Duration;

use hodei_messaging::api::request;
use hodei_messaging::message_headers;
use hodei_protocol::api::{AuditQuery, DeadLetter, DeadLetterRef, ListDeadLetters, Page};
use hodei_protocol::{subjects, ApiError, ErrorCode};
use hodei_tests::{job, System};
use uuid::Uuid;

async fn dead_letters(system: &System) -> Vec<DeadLetter> {
    let body = ListDeadLetters {
        schema_version: 1,
        limit: Some(500),
        cursor: None,
    };
    let page: Page<DeadLetter> = request(
        &system.client,
        subjects::API_DLQ_LIST,
        None,
        &body,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    page.items
}

async fn act(system: &System, subject: &str, seq: u64) -> Result<DeadLetter, ApiError> {
    let body = DeadLetterRef {
        schema_version: 1,
        seq,
        actor: Some("alice".into()),
    };
    request(
        &system.client,
        subject,
        None,
        &body,
        Duration::from_secs(10),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_consumer_can_handle_ends_in_the_dlq_and_can_be_replayed_and_discarded() {
    let system = System::start().await;
    let subject = format!("hodei.events.job.{}.JobQueued", Uuid::now_v7());
    system
        .js
        .publish_with_headers(
            subject.clone(),
            message_headers("poison-1", Some("corr-poison")),
            "{broken".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // The dispatcher and the audit service each read JobQueued (the registry takes only the
    // events by which a job may leave its worker).
    system
        .wait_for("two dead letters", Duration::from_secs(30), || async {
            dead_letters(&system).await.len() == 2
        })
        .await;
    let dead = dead_letters(&system).await;
    let mut consumers: Vec<_> = dead.iter().map(|d| d.consumer.as_str()).collect();
    consumers.sort();
    assert_eq!(consumers, ["audit", "dispatcher-job-queued"]);
    let registry = system
        .js
        .get_stream("HODEI_EVENTS")
        .await
        .unwrap()
        .consumer_info("registry-job-events")
        .await
        .unwrap();
    assert_eq!(
        (registry.delivered.consumer_sequence, registry.num_pending),
        (0, 0),
        "the registry was never given the JobQueued event"
    );
    assert!(dead.iter().all(|d| d.original_subject == subject
        && d.source == "HODEI_EVENTS"
        && !d.reason.is_empty()));

    let shown = act(&system, subjects::API_DLQ_SHOW, dead[0].seq)
        .await
        .unwrap();
    assert_eq!(
        shown.payload,
        Some(serde_json::Value::String("{broken".into()))
    );

    // Replay: removed from the DLQ, back on its subject (where it fails again, being broken).
    let replayed = act(&system, subjects::API_DLQ_REPLAY, dead[0].seq)
        .await
        .unwrap();
    assert_eq!(replayed.seq, dead[0].seq);
    let last = system
        .js
        .get_stream("HODEI_EVENTS")
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(
        last.headers.get("Nats-Msg-Id").unwrap().as_str(),
        format!("replay-dlq-{}", dead[0].seq)
    );
    assert_eq!(
        act(&system, subjects::API_DLQ_SHOW, dead[0].seq)
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    system
        .wait_for(
            "the replay to fail again",
            Duration::from_secs(30),
            // one left of the two, and the two consumers' new ones
            || async { dead_letters(&system).await.len() == 3 },
        )
        .await;

    // Discard: gone for good.
    act(&system, subjects::API_DLQ_DISCARD, dead[1].seq)
        .await
        .unwrap();
    assert!(dead_letters(&system)
        .await
        .iter()
        .all(|d| d.seq != dead[1].seq));

    let actions = system
        .audit(AuditQuery {
            actor: Some("alice".into()),
            ..Default::default()
        })
        .await;
    let types: Vec<_> = actions.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["DeadLetterReplayed", "DeadLetterDiscarded"]);
    assert!(actions
        .iter()
        .all(|e| e.correlation_id == "corr-poison" && e.aggregate_type == "dead_letter"));
    let log = system.log_of("dispatcher");
    assert!(
        log.contains("moving it to the dead-letter stream"),
        "rejections are logged at error level"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_that_cannot_be_published_is_marked_dead_without_holding_up_other_jobs() {
    let system = System::start_with(&[("HODEI_RELAY_MAX_ATTEMPTS", "2")]).await;
    let event_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox_events (event_id, kind, subject, aggregate_type, aggregate_id, event_type, payload, metadata) \
         VALUES ($1, 'event', 'hodei.nowhere.x', 'job', $2, 'Orphan', '{}'::jsonb, '{\"correlation_id\":\"orphan\"}'::jsonb)",
    )
    .bind(event_id)
    .bind(Uuid::now_v7())
    .execute(&system.pool)
    .await
    .unwrap();
    let accepted = system.submit(&job("true", &[])).await.unwrap();
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(60))
        .await;

    let pool = system.pool.clone();
    system
        .wait_for("the row to be dead", Duration::from_secs(30), || async {
            let (status,): (String,) =
                sqlx::query_as("SELECT status FROM outbox_events WHERE event_id = $1")
                    .bind(event_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            status == "dead"
        })
        .await;
    let dead = dead_letters(&system).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].source.as_str(),
            dead[0].consumer.as_str(),
            dead[0].original_subject.as_str()
        ),
        ("outbox", "relay", "hodei.nowhere.x")
    );
    assert!(system.log_of("relay").contains("outbox row is dead"));
}

/// A batch with one event the database refuses (a NUL in its correlation id) records every
/// other event of the batch and dead-letters only that one, from the audit service alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_poison_event_records_the_others_and_dead_letters_only_it() {
    use hodei_domain::{Actor, Job, JobSpec};
    let mut system = System::start().await;
    // The audit service is away while the events arrive: they wait, and it reads them as one
    // batch when it is back.
    for service in system.services.iter_mut().filter(|s| s.name == "audit") {
        service.stop(Duration::from_secs(10));
    }
    let submitted = |correlation_id: &str| {
        Job::submit(
            Uuid::now_v7(),
            JobSpec {
                command: "true".into(),
                ..Default::default()
            },
            Default::default(),
            correlation_id.into(),
            None,
            &Actor::service("test"),
        )
        .unwrap()
        .1
    };
    let mut events = Vec::new();
    for i in 0..5 {
        events.extend(submitted(&format!("corr-good-{i}")));
    }
    let poison = submitted("corr-\u{0}-poison").remove(0);
    events.insert(3, poison.clone());
    for event in &events {
        system.publish_event(event).await;
    }
    system.restart("audit");

    let recorded = || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM audit_log WHERE event_id = ANY($1)")
                .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
                .fetch_one(&system.pool)
                .await
                .unwrap();
        n
    };
    system
        .wait_for(
            "the good events recorded",
            Duration::from_secs(30),
            || async { recorded().await == events.len() as i64 - 1 },
        )
        .await;
    system
        .wait_for(
            "the poison dead-lettered",
            Duration::from_secs(30),
            || async {
                dead_letters(&system)
                    .await
                    .iter()
                    .any(|d| d.consumer == "audit")
            },
        )
        .await;
    let dead: Vec<DeadLetter> = dead_letters(&system)
        .await
        .into_iter()
        .filter(|d| d.consumer == "audit")
        .collect();
    assert_eq!(dead.len(), 1, "only the poison: {dead:?}");
    assert!(
        dead[0]
            .original_subject
            .contains(&poison.aggregate_id.to_string()),
        "{dead:?}"
    );
    assert!(dead[0].reason.contains("refuses this event"), "{dead:?}");
    assert_eq!(recorded().await, events.len() as i64 - 1);
    assert!(system
        .log_of("audit")
        .contains("recording its events one at a time"));
}
