//! One job, end to end, through five services over JetStream — fifty of them at once.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use hodei_domain::JobState;
use hodei_protocol::api::{AuditQuery, SubmitJob};
use hodei_protocol::logs::LogStream;
use hodei_tests::{job, System};

/// What a job of the mix must end as.
struct Expected {
    request: SubmitJob,
    state: JobState,
    exit_code: i32,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

fn mix(i: usize) -> Expected {
    match i % 3 {
        0 => {
            let n = 50 + i * 4;
            Expected {
                request: job("sh", &["-c", &format!("i=1; while [ $i -le {n} ]; do echo \"job {i} line $i\"; i=$((i+1)); done")]),
                state: JobState::Succeeded,
                exit_code: 0,
                stdout: (1..=n).map(|k| format!("job {i} line {k}")).collect(),
                stderr: vec![],
            }
        }
        1 => {
            let code = 1 + (i % 120) as i32;
            Expected {
                request: job(
                    "sh",
                    &[
                        "-c",
                        &format!("echo 'about to fail {i}'; echo 'error {i}' >&2; exit {code}"),
                    ],
                ),
                state: JobState::Failed,
                exit_code: code,
                stdout: vec![format!("about to fail {i}")],
                stderr: vec![format!("error {i}")],
            }
        }
        _ => {
            let mut request = job("sh", &["-c", "echo \"$GREETING from $(pwd)\""]);
            request.env = BTreeMap::from([("GREETING".to_owned(), format!("hello {i}"))]);
            request.working_dir = Some("/tmp".to_owned());
            Expected {
                request,
                state: JobState::Succeeded,
                exit_code: 0,
                stdout: vec![format!("hello {i} from /tmp")],
                stderr: vec![],
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_submitted_at_once_end_right_with_complete_logs_and_a_full_audit_trail() {
    let system = System::start().await;
    let expected: Vec<Expected> = (0..50).map(mix).collect();

    let accepted = join_all(expected.iter().map(|e| system.submit(&e.request))).await;
    let job_ids: Vec<_> = accepted
        .into_iter()
        .map(|a| a.expect("submission accepted").job_id)
        .collect();
    assert_eq!(
        job_ids.iter().collect::<HashSet<_>>().len(),
        50,
        "fifty distinct jobs"
    );

    system
        .wait_until_settled(&job_ids, Duration::from_secs(180))
        .await;
    system.wait_audit_complete(Duration::from_secs(60)).await;

    for (job_id, want) in job_ids.iter().zip(&expected) {
        let job = system.get(*job_id).await.expect("job exists");
        assert_eq!(job.state, want.state, "state of {job_id}: {job:?}");
        assert_eq!(job.exit_code, Some(want.exit_code), "exit code of {job_id}");

        // Logs: numbered without gaps, the last one carries the exit code, every line in order.
        let batches = system.logs_of(*job_id).await;
        let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
        assert_eq!(
            seqs,
            (0..batches.len() as u64).collect::<Vec<_>>(),
            "log batches of {job_id} are numbered in order"
        );
        let last = batches.last().unwrap();
        assert!(last.eof);
        assert_eq!(last.exit_code, Some(want.exit_code));
        let lines = |stream: LogStream| hodei_tests::lines_of(&batches, stream);
        assert_eq!(lines(LogStream::Stdout), want.stdout, "stdout of {job_id}");
        assert_eq!(lines(LogStream::Stderr), want.stderr, "stderr of {job_id}");

        // Audit: the whole sequence, once each, all under the job's correlation id.
        let trail = system
            .audit(AuditQuery {
                correlation_id: Some(job.correlation_id.clone()),
                ..Default::default()
            })
            .await;
        let types: Vec<&str> = trail.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            hodei_tests::EVENTS_OF_A_JOB,
            "audit trail of {job_id}"
        );
        // The worker made for the job got it in its registration, from the registry, not one
        // round through the stream later from the dispatcher.
        let busy = trail
            .iter()
            .find(|e| e.event_type == "WorkerStatusChanged" && e.payload["to"] == "Busy")
            .expect("the worker went Busy");
        assert_eq!(busy.actor, "registry", "who gave {job_id} its worker");
        // The report of the job's end started its worker's teardown in its own transaction:
        // the registry, hearing of the end, had nothing left to do.
        let terminating = trail
            .iter()
            .find(|e| e.event_type == "WorkerTerminating")
            .expect("the worker was torn down");
        assert_eq!(
            terminating.actor, "scheduler",
            "who tore {job_id}'s worker down"
        );
        assert_eq!(
            trail
                .iter()
                .map(|e| e.event_id)
                .collect::<HashSet<_>>()
                .len(),
            trail.len(),
            "each event once"
        );
        assert!(trail.iter().all(|e| e.correlation_id == job.correlation_id));
        assert!(trail
            .iter()
            .filter(|e| e.aggregate_type == "job")
            .all(|e| e.aggregate_id == *job_id));
        assert!(trail
            .iter()
            .filter(|e| e.aggregate_type == "worker")
            .all(|e| Some(e.aggregate_id) == job.worker_id));
    }

    // No worker process is left, and the outbox has nothing left to publish.
    system
        .wait_for(
            "agent processes to be gone",
            Duration::from_secs(10),
            || async { system.live_agents().is_empty() },
        )
        .await;
    let (pending,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM outbox_events WHERE status <> 'published'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(pending, 0);

    // The services and their agents log to files here, not to a terminal: plain text, no
    // colour codes between a field's name and its value.
    for service in hodei_tests::SERVICES {
        let log = system.log_of(service);
        assert!(!log.is_empty(), "{service} logged nothing");
        assert!(
            !log.contains('\u{1b}'),
            "{service}'s log has terminal escape codes"
        );
    }
}

/// A short job's start goes with its end: its agent sends one report (finished, `started`
/// set), which the scheduler applies as both changes; a longer job's start is reported on
/// its own, while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_job_reports_its_start_with_its_end_and_a_longer_job_reports_its_start_while_it_runs(
) {
    use futures::StreamExt;
    use hodei_protocol::agent::{JobFinished, JobStarted};

    // A window wide enough that `true` ends within it however loaded the machine is, and
    // a job longer than it.
    let system = System::start_with(&[("HODEI_AGENT_REPORT_TOGETHER_MS", "1000")]).await;
    let mut reports = system.client.subscribe("hodei.agent.*.*").await.unwrap();
    system.client.flush().await.unwrap();
    let short = system.submit(&job("true", &[])).await.unwrap().job_id;
    let long = system.submit(&job("sleep", &["2"])).await.unwrap().job_id;
    system
        .wait_until_settled(&[short, long], Duration::from_secs(60))
        .await;

    // Every report of the two jobs, as published (the stream deletes them once applied).
    let mut started = Vec::new();
    let mut finished = Vec::new();
    while finished.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), reports.next())
            .await
            .expect("both jobs' finished reports were published")
            .unwrap();
        match message.subject.rsplit('.').next() {
            Some("started") => {
                started.push(serde_json::from_slice::<JobStarted>(&message.payload).unwrap())
            }
            Some("finished") => {
                finished.push(serde_json::from_slice::<JobFinished>(&message.payload).unwrap())
            }
            _ => {}
        }
    }
    let finished_of = |job_id| finished.iter().find(|f| f.job_id == job_id).unwrap();
    assert_eq!(
        started.iter().map(|s| s.job_id).collect::<Vec<_>>(),
        vec![long],
        "only the longer job's start is reported on its own"
    );
    assert!(finished_of(short).started, "{:?}", finished_of(short));
    assert!(!finished_of(long).started, "{:?}", finished_of(long));
    // An ephemeral agent's one job is its last: the scheduler looks for no next job for it.
    assert!(
        finished_of(short).last && finished_of(long).last,
        "{finished:?}"
    );

    // Both went through Running to Succeeded, with every event a job raises.
    for job_id in [short, long] {
        assert_eq!(system.get(job_id).await.unwrap().state, JobState::Succeeded);
        let correlation_id = system.get(job_id).await.unwrap().correlation_id;
        let query = || AuditQuery {
            correlation_id: Some(correlation_id.clone()),
            ..Default::default()
        };
        system
            .wait_for("the job's audit trail", Duration::from_secs(30), || async {
                system.audit(query()).await.len() == hodei_tests::EVENTS_OF_A_JOB.len()
            })
            .await;
        let trail = system.audit(query()).await;
        let running = trail
            .iter()
            .position(|e| e.event_type == "JobStatusChanged" && e.payload["to"] == "Running")
            .unwrap_or_else(|| panic!("{job_id} went Running: {trail:?}"));
        let completed = trail
            .iter()
            .position(|e| e.event_type == "JobCompleted")
            .unwrap();
        assert!(running < completed, "{trail:?}");
    }
}

/// The audit service records events that come a few at a time in a few statements: a batch
/// gathers for a moment after its first event. Forty events published a millisecond apart are
/// written by about one INSERT per 20 ms window (each INSERT's rows share its transaction's
/// `recorded_at`), not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arriving_a_few_at_a_time_are_recorded_in_a_few_statements() {
    use hodei_domain::{Actor, Job, JobSpec};
    let system = System::start().await;
    let mut events = Vec::new();
    for i in 0..20 {
        let (_, submitted) = Job::submit(
            uuid::Uuid::now_v7(),
            JobSpec {
                command: "true".into(),
                ..Default::default()
            },
            Default::default(),
            format!("corr-gather-{i}"),
            None,
            &Actor::service("test"),
        )
        .unwrap();
        events.extend(submitted);
    }
    let started = std::time::Instant::now();
    for event in &events {
        system.publish_event(event).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let span = started.elapsed();
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    let counts = || async {
        let (rows, statements): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT recorded_at) FROM audit_log WHERE event_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&system.pool)
        .await
        .unwrap();
        (rows, statements)
    };
    system
        .wait_for("every event recorded", Duration::from_secs(30), || async {
            counts().await.0 == events.len() as i64
        })
        .await;
    let (_, statements) = counts().await;
    // A batch takes every event that arrives within 20 ms of its first: over the span of the
    // publishing, at most one batch per window, and the last.
    let bound = span.as_millis() as i64 / 20 + 2;
    assert!(
        statements <= bound,
        "{} events published over {span:?} were recorded by {statements} statements (at most {bound})",
        events.len()
    );
}
