//! Every service serves Prometheus `/metrics` and `/healthz`, and the numbers move when jobs run.

use std::time::Duration;

use hodei_tests::{http_get, job, prometheus_value, System};

const SERVICES: [&str; 6] = ["relay", "scheduler", "dispatcher", "registry", "provider-manager", "audit"];

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
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{service} is healthy");
        before.push(scrape(service).await);
    }

    let mut ids = Vec::new();
    for code in [0, 0, 3] {
        ids.push(system.submit(&job("sh", &["-c", &format!("exit {code}")])).await.unwrap().job_id);
    }
    system.wait_until_settled(&ids, Duration::from_secs(60)).await;
    system
        .wait_for("the audit log", Duration::from_secs(30), || async {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log").fetch_one(&system.pool).await.unwrap();
            n == 39
        })
        .await;

    let after: Vec<String> = futures::future::join_all(SERVICES.map(scrape)).await;
    let moved = |service: &str, series: &str| {
        let i = SERVICES.iter().position(|s| *s == service).unwrap();
        (prometheus_value(&before[i], series), prometheus_value(&after[i], series))
    };
    assert_eq!(moved("scheduler", r#"hodei_jobs{state="Succeeded"}"#), (0.0, 2.0));
    assert_eq!(moved("scheduler", r#"hodei_jobs{state="Failed"}"#), (0.0, 1.0));
    assert_eq!(moved("scheduler", r#"hodei_events_total{event_type="JobCreated"}"#), (0.0, 3.0));
    assert_eq!(moved("registry", r#"hodei_workers{state="Terminated"}"#), (0.0, 3.0));
    assert_eq!(moved("dispatcher", r#"hodei_events_total{event_type="JobAssigned"}"#), (0.0, 3.0));
    assert_eq!(moved("dispatcher", "hodei_dispatch_latency_seconds_count"), (0.0, 3.0));
    assert_eq!(moved("provider-manager", r#"hodei_events_total{event_type="WorkerTerminated"}"#), (0.0, 3.0));
    assert_eq!(moved("relay", "hodei_outbox_published_total"), (0.0, 39.0 + 3.0), "39 events and 3 RunJob commands");
    assert_eq!(moved("relay", "hodei_outbox_depth").1, 0.0);
    assert_eq!(moved("audit", r#"hodei_consumer_messages_total{consumer="audit",outcome="done"}"#), (0.0, 39.0));
}
