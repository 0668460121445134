//! Every service serves Prometheus `/metrics` and `/healthz`, and the numbers move when jobs run.

use std::time::Duration;

use hodei_tests::{http_get, job, prometheus_value, System, EVENTS_OF_A_JOB, SERVICES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_when_jobs_run() {
    let system = System::start().await;
    let scrape = |service: &'static str| {
        let base = system.metrics_base(service);
        async move {
            let (status, body) = http_get(&base, "/metrics").await;
            assert_eq!(status, 200, "{service} /metrics");
            body
        }
    };
    let mut before = Vec::new();
    for service in SERVICES {
        let (status, body) = http_get(&system.metrics_base(service), "/healthz").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "ok\n"),
            "{service} is healthy"
        );
        before.push(scrape(service).await);
    }

    // The events of the three jobs.
    const EVENTS: usize = 3 * EVENTS_OF_A_JOB.len();
    let mut ids = Vec::new();
    for code in [0, 0, 3] {
        ids.push(
            system
                .submit(&job("sh", &["-c", &format!("exit {code}")]))
                .await
                .unwrap()
                .job_id,
        );
    }
    system
        .wait_until_settled(&ids, Duration::from_secs(60))
        .await;
    system
        .wait_for("the audit log", Duration::from_secs(30), || async {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
                .fetch_one(&system.pool)
                .await
                .unwrap();
            n == EVENTS as i64
        })
        .await;

    // Counters move right after the work they count: scrape until they all show it.
    let expected: [(&str, &str, f64); 9] = [
        ("scheduler", r#"hodei_jobs{state="Succeeded"}"#, 2.0),
        ("scheduler", r#"hodei_jobs{state="Failed"}"#, 1.0),
        (
            "scheduler",
            r#"hodei_events_total{event_type="JobCreated"}"#,
            3.0,
        ),
        ("registry", r#"hodei_workers{state="Terminated"}"#, 3.0),
        (
            "dispatcher",
            r#"hodei_events_total{event_type="JobAssigned"}"#,
            3.0,
        ),
        ("dispatcher", "hodei_dispatch_latency_seconds_count", 3.0),
        (
            "provider-manager",
            r#"hodei_events_total{event_type="WorkerTerminated"}"#,
            3.0,
        ),
        ("relay", "hodei_outbox_depth", 0.0),
        (
            "audit",
            r#"hodei_consumer_messages_total{consumer="audit",outcome="done"}"#,
            EVENTS as f64,
        ),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let after: Vec<String> = futures::future::join_all(SERVICES.map(scrape)).await;
        let values: Vec<(f64, f64)> = expected
            .iter()
            .map(|(service, series, _)| {
                let i = SERVICES.iter().position(|s| s == service).unwrap();
                (
                    prometheus_value(&before[i], series),
                    prometheus_value(&after[i], series),
                )
            })
            .collect();
        let all_moved = values
            .iter()
            .zip(&expected)
            .all(|((was, now), (_, series, want))| {
                *now == *want && (series.ends_with("depth") || *was == 0.0)
            });
        // Every service publishes its own commits, the relay what they left: every event, some
        // perhaps twice (the stream keeps one); the jobs reach their workers in the answers
        // to their registrations, with no RunJob command.
        let published: f64 = SERVICES
            .iter()
            .enumerate()
            .map(|(i, _)| {
                prometheus_value(&after[i], "hodei_outbox_published_total")
                    - prometheus_value(&before[i], "hodei_outbox_published_total")
            })
            .sum();
        if all_moved && published >= EVENTS as f64 {
            return;
        }
        if std::time::Instant::now() > deadline {
            for ((was, now), (service, series, want)) in values.iter().zip(&expected) {
                eprintln!("{service} {series}: {was} -> {now} (want {want})");
            }
            eprintln!("hodei_outbox_published_total over all services: {published} (want >= 42)");
            panic!("the metrics did not move as the jobs ran");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
