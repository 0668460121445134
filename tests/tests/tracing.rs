//! One trace per job: spans of every service, exported over OTLP/HTTP to a real receiver in
//! the test, linked parent to child from the client's own span down to the job's process.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use hodei_messaging::api::request;
use hodei_protocol::api::{AuditQuery, SubmitAccepted};
use hodei_protocol::subjects;
use hodei_tests::otlp::Receiver;
use hodei_tests::{job, System};

// The relay publishes only what a service left unpublished after its commit: not here.
const SERVICES: [&str; 6] = [
    "hodei-scheduler",
    "hodei-dispatcher",
    "hodei-provider-manager",
    "hodei-registry",
    "hodei-agent",
    "hodei-audit",
];

/// The steps of a job's life that each have a span in its trace.
const STEPS: [&str; 9] = [
    "submit",
    "persist",
    "dispatch decision",
    "provision",
    "register",
    "assign",
    "run job",
    "report",
    "audit write",
];

async fn traced_system(receiver: &Receiver) -> System {
    System::start_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ])
    .await
}

/// Wait until spans of every service and every one of `steps` have arrived for `trace_id`,
/// and the parent of every span has too (spans are exported when they end, parents after
/// their children, and each service in its own batches: an agent's "report" may come an
/// export after its "run job").
/// Returns the snapshot it found complete: spans keep arriving (a later span's parent may be
/// in the next export), so the assertions look at that one snapshot.
async fn wait_for_trace(
    system: &System,
    receiver: &Receiver,
    trace_id: &str,
    root_parent: &str,
    steps: &[&str],
) -> Vec<hodei_tests::otlp::ReceivedSpan> {
    let complete = std::sync::Mutex::new(Vec::new());
    system
        .wait_for(
            "a complete trace with spans of every service",
            Duration::from_secs(30),
            || async {
                let spans = receiver.spans_of_trace(trace_id);
                let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
                let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
                let names: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                let done = SERVICES.iter().all(|s| services.contains(*s))
                    && steps.iter().all(|step| names.contains(step))
                    && spans.iter().all(|s| {
                        s.parent_span_id == root_parent || ids.contains(s.parent_span_id.as_str())
                    });
                if done {
                    *complete.lock().unwrap() = spans;
                }
                done
            },
        )
        .await;
    complete.into_inner().unwrap()
}

/// A job that prints its `TRACEPARENT`, submitted by a client in span `client_span` of trace
/// `trace_id`.
async fn submit_printing_traceparent(
    system: &System,
    trace_id: &str,
    client_span: &str,
) -> SubmitAccepted {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").as_str(),
    );
    request(
        &system.client,
        subjects::API_JOBS_SUBMIT,
        Some(headers),
        &printing_traceparent(),
        Duration::from_secs(10),
    )
    .await
    .unwrap()
}

fn printing_traceparent() -> hodei_protocol::api::SubmitJob {
    job("sh", &["-c", "echo \"TRACEPARENT=$TRACEPARENT\""])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_with_a_traceparent_is_one_trace_across_every_service_and_its_process() {
    let receiver = Receiver::start().await;
    let system = traced_system(&receiver).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let accepted = submit_printing_traceparent(&system, trace_id, client_span).await;
    assert_eq!(
        accepted.correlation_id, trace_id,
        "the correlation id is the client's trace id"
    );
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(60))
        .await;
    let spans = wait_for_trace(&system, &receiver, trace_id, client_span, &STEPS).await;

    // The job's own process saw the trace.
    let lines: Vec<String> = system
        .logs_of(accepted.job_id)
        .await
        .iter()
        .flat_map(|b| b.lines.clone())
        .map(|l| l.line)
        .collect();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(&format!("TRACEPARENT=00-{trace_id}-")),
        "{lines:?}"
    );

    // One trace: every span's parent is the client's span or another span of the trace.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        assert!(
            span.parent_span_id == client_span || ids.contains(span.parent_span_id.as_str()),
            "span {} of {} has a parent outside the trace: {}",
            span.name,
            span.service,
            span.parent_span_id
        );
    }
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == client_span)
        .collect();
    assert_eq!(roots.len(), 1, "one span hangs off the client's: {roots:?}");
    assert_eq!(roots[0].service, "hodei-scheduler");
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for step in STEPS {
        assert!(
            names.contains(step),
            "a span named {step:?} among {names:?}"
        );
    }
    // Every state change of the job and its worker shows in the trace, as an event on the
    // span of the step that recorded it (the worker's teardown may come in a later export).
    let recorded = || -> BTreeSet<String> {
        receiver
            .spans_of_trace(trace_id)
            .iter()
            .flat_map(|s| &s.events)
            .filter(|e| e.name == "event recorded")
            .flat_map(|e| &e.attributes)
            .filter(|(key, _)| key == "event_type")
            .map(|(_, value)| value.clone())
            .collect()
    };
    let every_event: BTreeSet<String> = hodei_tests::EVENTS_OF_A_JOB
        .iter()
        .map(|e| e.to_string())
        .collect();
    system
        .wait_for(
            "every event of the job recorded in its trace",
            Duration::from_secs(30),
            || async { recorded() == every_event },
        )
        .await;
    // The job reaches its ephemeral worker in the answer to the registration: no RunJob
    // copy is published for it.
    assert!(
        names.iter().any(|n| n.starts_with("publish Job")) && !names.contains("publish RunJob"),
        "{names:?}"
    );
    // The process' TRACEPARENT names the agent's run span.
    let process_parent = lines[0].split('-').nth(2).unwrap();
    let run = spans
        .iter()
        .find(|s| s.span_id == process_parent)
        .expect("the process' parent span was exported");
    assert_eq!(
        (run.service.as_str(), run.name.as_str()),
        ("hodei-agent", "run job")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_trace_context_gets_a_generated_correlation_id_everywhere() {
    let receiver = Receiver::start().await;
    let system = traced_system(&receiver).await;
    let accepted = system.submit(&job("true", &[])).await.unwrap();
    let correlation = accepted.correlation_id.clone();
    assert_eq!(correlation.len(), 32);
    assert!(correlation.bytes().all(|b| b.is_ascii_hexdigit()));
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(60))
        .await;

    // In its trace...
    wait_for_trace(&system, &receiver, &correlation, "", &[]).await;
    // ...on the job...
    assert_eq!(
        system.get(accepted.job_id).await.unwrap().correlation_id,
        correlation
    );
    // ...in every event and audit row...
    system
        .wait_for("the audit trail", Duration::from_secs(30), || async {
            system
                .audit(AuditQuery {
                    correlation_id: Some(correlation.clone()),
                    ..Default::default()
                })
                .await
                .len()
                == hodei_tests::EVENTS_OF_A_JOB.len()
        })
        .await;
    let (other,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_log WHERE correlation_id <> $1")
            .bind(&correlation)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(other, 0);
    // ...and in the log lines of the services that handled it.
    for service in ["scheduler", "dispatcher", "registry", "provider-manager"] {
        let log = system.log_of(service);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&accepted.job_id.to_string()))
            .collect();
        assert!(!lines.is_empty(), "{service} logged about the job");
        assert!(
            lines.iter().all(|l| l.contains(&correlation)),
            "{service}: every line about the job has its correlation id:\n{}",
            lines.join("\n")
        );
    }
}

/// Without an exporter no OpenTelemetry span is built, but the trace context still goes from
/// the client through every service to the job's process, and the log lines say it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_trace_context_still_reaches_the_process_and_the_logs() {
    let system = System::start().await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let accepted = submit_printing_traceparent(&system, trace_id, client_span).await;
    assert_eq!(accepted.correlation_id, trace_id);
    // A job without trace context starts a trace of its own, named by its correlation id.
    let (view, line) = system.run_to_end(&printing_traceparent()).await;
    let own = view.correlation_id;
    assert!(
        own.len() == 32 && own.bytes().all(|b| b.is_ascii_hexdigit()) && own != trace_id,
        "{own}"
    );
    assert!(
        line.as_deref()
            .is_some_and(|l| l.starts_with(&format!("TRACEPARENT=00-{own}-"))),
        "{line:?}"
    );

    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(60))
        .await;
    let line = system.logs_first_line(accepted.job_id).await.unwrap();
    let fields: Vec<&str> = line.trim_start_matches("TRACEPARENT=").split('-').collect();
    assert_eq!(fields.len(), 4, "{line}");
    assert_eq!((fields[0], fields[1], fields[3]), ("00", trace_id, "01"));
    assert!(
        fields[2].len() == 16 && fields[2] != "0000000000000000",
        "a parent span: {line}"
    );
    // Each service's lines in that trace carry its id, as a field of their span.
    for service in ["scheduler", "dispatcher", "provider-manager", "registry"] {
        let log = system.log_of(service);
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("trace_id=\"{trace_id}\""))),
            "{service} logged in the trace:\n{log}"
        );
    }
}
