//! Hostile clients against the real nats-server with authentication: every probe is refused
//! by the server (a permissions violation, in its log) or by Hodei (a typed error, in the
//! service's log), and changes nothing: rows, outbox and streams are the same before and
//! after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use hodei_auth::Role;
use hodei_domain::{Actor, JobState, Purpose, Worker};
use hodei_protocol::agent::{Heartbeat, JobFinished, RegisterWorker, Registered};
use hodei_protocol::{subjects, ApiError, ErrorCode};
use hodei_tests::{job, System};
use tokio::sync::mpsc;
use uuid::Uuid;

/// A client with the credential at `creds`, and the errors the server sends it.
async fn client_as(
    system: &System,
    name: &str,
    creds: &Path,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = hodei_messaging::options(name, Some(creds))
        .await
        .unwrap()
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        })
        .connect(hodei_messaging::servers(&system.nats.url).unwrap())
        .await
        .expect("an authenticated client connects");
    (client, rx)
}

/// Wait for the server's permissions violation naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(error) = errors.recv().await {
            if error.to_lowercase().contains("permissions violation") && error.contains(subject) {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no permissions violation for {subject}");
}

/// What a probe must not change: rows, the outbox, the audit log and every stream.
async fn snapshot(system: &System) -> Vec<String> {
    let (jobs, job_versions, workers, worker_versions, outbox, audit): (i64, i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM jobs), (SELECT coalesce(sum(version), 0)::int8 FROM jobs), \
                    (SELECT count(*) FROM workers), (SELECT coalesce(sum(version), 0)::int8 FROM workers), \
                    (SELECT count(*) FROM outbox_events), (SELECT count(*) FROM audit_log)",
        )
        .fetch_one(&system.pool)
        .await
        .unwrap();
    let mut state = vec![format!(
        "jobs {jobs} v{job_versions}, workers {workers} v{worker_versions}, outbox {outbox}, audit {audit}"
    )];
    for name in [
        "HODEI_EVENTS",
        "HODEI_WORKER_CMDS",
        "HODEI_AGENT",
        "HODEI_LOGS",
        "HODEI_DLQ",
        "HODEI_SUBMISSIONS",
    ] {
        let mut stream = system.js.get_stream(name).await.expect("the stream exists");
        let info = stream.info().await.unwrap();
        state.push(format!(
            "{name}: {} messages, last {}, {} consumers",
            info.state.messages, info.state.last_sequence, info.state.consumer_count
        ));
    }
    state
}

fn worker_creds(system: &System, dir: &Path, worker_id: Uuid, job_id: Uuid, ttl: u64) -> PathBuf {
    let path = dir.join(format!("{worker_id}.creds"));
    system
        .nats
        .authority
        .signer()
        .write_creds(
            &path,
            &worker_id.to_string(),
            &Role::Worker {
                worker_id,
                job_id: Some(job_id),
            },
            Some(Duration::from_secs(ttl)),
        )
        .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_and_change_nothing() {
    let system = System::start().await;
    let dir = std::env::temp_dir().join(format!("hodei-hostile-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();

    // A job that runs while the probes go on, on a real worker.
    let running = system.submit(&job("sleep", &["60"])).await.unwrap().job_id;
    system
        .wait_for("the job to run", Duration::from_secs(30), || async {
            system
                .get(running)
                .await
                .is_ok_and(|j| j.state == JobState::Running)
        })
        .await;
    let view = system.get(running).await.unwrap();
    let victim = view.worker_id.expect("a running job has a worker");

    // Its agent no longer holds its bootstrap token, not even in /proc/<pid>/environ.
    let (pid,): (String,) =
        sqlx::query_as("SELECT resource_id FROM provider_resources WHERE worker_id = $1")
            .bind(victim)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    for var in environ.split(|b| *b == 0) {
        assert!(
            !var.starts_with(b"HODEI_BOOTSTRAP_TOKEN=")
                || var.len() == "HODEI_BOOTSTRAP_TOKEN=".len(),
            "the agent's environment still holds its token"
        );
        assert!(
            !var.starts_with(b"HODEI_DATABASE_URL="),
            "the agent got the service's database URL"
        );
    }

    // The snapshot is of a system at rest: the audit has recorded the running job's events
    // (JobStatusChanged → Running may still be on its way when the job is seen Running).
    system.wait_audit_complete(Duration::from_secs(30)).await;
    let before = snapshot(&system).await;

    // No credentials: the server refuses the connection.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(hodei_messaging::servers(&system.nats.url).unwrap())
        .await;
    assert!(
        anonymous.is_err(),
        "a connection without credentials is refused"
    );

    // A submitter.
    let (submitter, mut errors) =
        client_as(&system, "hostile-submitter", &system.submitter_creds()).await;
    let _commands = submitter.subscribe("hodei.worker.*.cmd").await.unwrap();
    refused(&mut errors, "hodei.worker.*.cmd").await;
    let _inbox = submitter.subscribe("_INBOX.operator.>").await.unwrap();
    refused(&mut errors, "_INBOX.operator.>").await;
    let _queue = submitter
        .queue_subscribe(subjects::API_JOBS_SUBMIT, "scheduler".into())
        .await
        .unwrap();
    refused(&mut errors, subjects::API_JOBS_SUBMIT).await;
    let forged = format!("hodei.events.job.{running}.JobCompleted");
    submitter
        .publish(forged.clone(), "{}".into())
        .await
        .unwrap();
    refused(&mut errors, &forged).await;
    let finished = JobFinished {
        schema_version: 1,
        worker_id: victim,
        job_id: running,
        attempt: view.attempt,
        exit_code: Some(0),
        error: None,
        started: false,
        last: false,
    };
    submitter
        .publish(
            subjects::agent_finished(victim),
            serde_json::to_vec(&finished).unwrap().into(),
        )
        .await
        .unwrap();
    refused(&mut errors, &subjects::agent_finished(victim)).await;
    for api in [
        "$JS.API.STREAM.DELETE.HODEI_EVENTS",
        "$JS.API.STREAM.PURGE.HODEI_EVENTS",
    ] {
        let answer =
            tokio::time::timeout(Duration::from_secs(3), submitter.request(api, "".into())).await;
        assert!(
            !matches!(answer, Ok(Ok(_))),
            "{api} must not be answered for a submitter"
        );
        refused(&mut errors, api).await;
    }
    let dlq: Result<serde_json::Value, ApiError> = hodei_messaging::api::request(
        &submitter,
        subjects::API_DLQ_LIST,
        None,
        &serde_json::json!({}),
        Duration::from_secs(2),
    )
    .await;
    assert!(dlq.is_err(), "dead letters answer only operators");
    refused(&mut errors, subjects::API_DLQ_LIST).await;
    // ...while what a submitter may do works.
    let own: Result<serde_json::Value, ApiError> = hodei_messaging::api::request(
        &submitter,
        subjects::API_JOBS_GET,
        None,
        &serde_json::json!({"schema_version": 1, "job_id": running}),
        Duration::from_secs(5),
    )
    .await;
    assert!(own.is_ok(), "a submitter gets a job: {own:?}");

    // Worker A's credential, minted as the provider mints one, against worker B (the
    // victim) and B's job.
    let a = Uuid::new_v4();
    let a_creds = worker_creds(&system, &dir, a, Uuid::new_v4(), 60);
    let (worker_a, mut a_errors) = client_as(&system, "hostile-worker", &a_creds).await;
    let _b_commands = worker_a
        .subscribe(subjects::worker_cmd(victim))
        .await
        .unwrap();
    refused(&mut a_errors, &subjects::worker_cmd(victim)).await;
    let js = jetstream::new(worker_a.clone());
    let stolen = tokio::time::timeout(
        Duration::from_secs(3),
        js.create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                name: Some(hodei_auth::worker_consumer(victim)),
                filter_subject: subjects::worker_cmd(victim),
                ..Default::default()
            },
            "HODEI_WORKER_CMDS",
        ),
    )
    .await;
    assert!(
        !matches!(stolen, Ok(Ok(_))),
        "A cannot open B's command consumer"
    );
    let heartbeat = Heartbeat {
        schema_version: 1,
        worker_id: victim,
        job_id: None,
    };
    for (subject, body) in [
        (
            subjects::agent_finished(victim),
            serde_json::to_vec(&finished).unwrap(),
        ),
        (
            subjects::agent_heartbeat(victim),
            serde_json::to_vec(&heartbeat).unwrap(),
        ),
        (subjects::logs(running), b"{}".to_vec()),
    ] {
        worker_a
            .publish(subject.clone(), body.into())
            .await
            .unwrap();
        refused(&mut a_errors, &subject).await;
    }

    // An expired worker credential: the server refuses it (from the second it expires).
    let expired = worker_creds(&system, &dir, Uuid::new_v4(), Uuid::new_v4(), 1);
    system
        .wait_for(
            "an expired credential to be refused",
            Duration::from_secs(10),
            || async {
                hodei_messaging::options("expired", Some(&expired))
                    .await
                    .unwrap()
                    .connect(hodei_messaging::servers(&system.nats.url).unwrap())
                    .await
                    .is_err()
            },
        )
        .await;

    assert_eq!(
        system.get(running).await.unwrap().state,
        JobState::Running,
        "the forged reports changed nothing"
    );
    let after = snapshot(&system).await;
    assert_eq!(before, after, "the probes changed nothing");
    let log = system.nats.log();
    for subject in [
        "hodei.worker.*.cmd",
        "$JS.API.STREAM.DELETE.HODEI_EVENTS",
        &forged,
    ] {
        assert!(
            log.lines()
                .any(|line| line.contains("Violation") && line.contains(subject)),
            "the server logs the refusal on {subject}"
        );
    }
    system.cancel(running).await.unwrap();
    system
        .wait_until_settled(&[running], Duration::from_secs(30))
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bootstrap token is spent at registration: the same token again, from anyone but the
/// agent that registered, is refused and changes nothing; that agent's repeat (its answer
/// was lost) is answered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_bootstrap_token_is_refused() {
    let mut system = System::start().await;
    // Without a dispatcher nobody acts on the registered worker (it has no job): it stays
    // Ready for the repeats below.
    system.service("dispatcher").stop(Duration::from_secs(10));
    let dir = std::env::temp_dir().join(format!("hodei-token-{}", Uuid::new_v4().simple()));
    let actor = Actor::service("test");
    let worker_id = Uuid::new_v4();
    let (mut worker, _) = Worker::request(
        worker_id,
        "test",
        Purpose::Pool { max_jobs: 1 },
        "c".into(),
        Duration::from_secs(60),
        &actor,
    );
    worker
        .provisioned(hodei_store::hash_token("the-token"), &actor)
        .unwrap();
    let mut conn = system.pool.acquire().await.unwrap();
    hodei_store::workers::insert(&mut conn, &worker)
        .await
        .unwrap();
    drop(conn);

    let creds = worker_creds(&system, &dir, worker_id, Uuid::new_v4(), 60);
    let (agent, _) = client_as(&system, "agent", &creds).await;
    let register = |instance: Option<&str>| RegisterWorker {
        schema_version: 1,
        worker_id,
        token: "the-token".into(),
        instance: instance.map(str::to_owned),
        pid: None,
        hostname: None,
    };
    let ask = |body: RegisterWorker| {
        let agent = agent.clone();
        async move {
            hodei_messaging::api::request::<_, Registered>(
                &agent,
                &subjects::agent_register(worker_id),
                None,
                &body,
                Duration::from_secs(5),
            )
            .await
        }
    };
    ask(register(Some("first")))
        .await
        .expect("the first registration");
    let version = |pool: sqlx::PgPool| async move {
        let (v,): (i64,) = sqlx::query_as("SELECT version FROM workers WHERE id = $1")
            .bind(worker_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        v
    };
    let registered = version(system.pool.clone()).await;
    for stranger in [Some("another"), None] {
        let refused = ask(register(stranger)).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidBootstrapToken);
    }
    assert!(
        ask(register(Some("first"))).await.is_ok(),
        "the agent that registered is answered again"
    );
    assert_eq!(
        version(system.pool.clone()).await,
        registered,
        "nothing changed"
    );
    assert!(
        system
            .log_of("registry")
            .contains("INVALID_BOOTSTRAP_TOKEN")
            || system
                .log_of("registry")
                .to_lowercase()
                .contains("bootstrap token"),
        "the registry logs the refusal"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job's environment values are secrets: after the job they are nowhere in plaintext
/// (the stored spec, the outbox, the audit log, the streams, the logs, the metrics), and
/// `dlq show` masks them. A dead letter replays only into the stream it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_secrets_are_kept_nowhere_after_the_job_and_replays_stay_in_their_stream() {
    use hodei_protocol::api::{DeadLetter, DeadLetterRef, ListDeadLetters, Page};
    let system = System::start().await;
    let secret = format!("s3cret-{}", Uuid::new_v4().simple());
    let mut request = job("sh", &["-c", "test -n \"$API_TOKEN\""]);
    request.env = [("API_TOKEN".to_owned(), secret.clone())].into();
    let job_id = system.submit(&request).await.unwrap().job_id;
    system
        .wait_until_settled(&[job_id], Duration::from_secs(30))
        .await;
    let ended = system.get(job_id).await.unwrap();
    assert_eq!(
        ended.state,
        JobState::Succeeded,
        "the job had its secret: {ended:?}"
    );

    // A durable submission no scheduler can read (an unknown field), dead-lettered, with a
    // secret in its environment.
    let unreadable = serde_json::json!({
        "schema_version": 1,
        "command": "true",
        "env": {"API_TOKEN": secret},
        "no_such_field": 1,
    });
    system
        .js
        .publish_with_headers(
            subjects::JOBS_SUBMIT,
            hodei_messaging::message_headers("secret-refused", None),
            serde_json::to_vec(&unreadable).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let list = || async {
        hodei_messaging::api::request::<_, Page<DeadLetter>>(
            &system.client,
            subjects::API_DLQ_LIST,
            None,
            &ListDeadLetters {
                schema_version: 1,
                limit: Some(100),
                cursor: None,
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .items
    };
    system
        .wait_for(
            "the refused submission in the DLQ",
            Duration::from_secs(30),
            || async { !list().await.is_empty() },
        )
        .await;
    let dead = list().await.remove(0);
    assert!(
        !dead.reason.contains(&secret),
        "the reason holds the secret"
    );
    let shown: DeadLetter = hodei_messaging::api::request(
        &system.client,
        subjects::API_DLQ_SHOW,
        None,
        &DeadLetterRef {
            schema_version: 1,
            seq: dead.seq,
            actor: None,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let shown_text = serde_json::to_string(&shown).unwrap();
    assert!(
        !shown_text.contains(&secret),
        "dlq show prints the secret: {shown_text}"
    );
    assert!(shown_text.contains("API_TOKEN"), "the name is shown");

    // Nowhere in the database...
    for (table, column) in [
        ("jobs", "spec"),
        ("outbox_events", "payload"),
        ("outbox_events", "metadata"),
        ("audit_log", "payload"),
    ] {
        let (found,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM {table} WHERE {column}::text LIKE '%' || $1 || '%'"
        ))
        .bind(&secret)
        .fetch_one(&system.pool)
        .await
        .unwrap();
        assert_eq!(found, 0, "{table}.{column} holds the secret");
    }
    // ...nor in the streams the job went through (the refused submission is a dead letter)...
    for name in [
        "HODEI_EVENTS",
        "HODEI_WORKER_CMDS",
        "HODEI_AGENT",
        "HODEI_LOGS",
    ] {
        let mut stream = system.js.get_stream(name).await.unwrap();
        let info = stream.info().await.unwrap();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if let Ok(message) = stream.get_raw_message(seq).await {
                assert!(
                    !String::from_utf8_lossy(&message.payload).contains(&secret),
                    "{name} #{seq} holds the secret"
                );
            }
        }
    }
    // ...nor in any log or metric.
    for service in hodei_tests::SERVICES {
        assert!(
            !system.log_of(service).contains(&secret),
            "{service} logged it"
        );
        let (_, metrics) = hodei_tests::http_get(&system.metrics_base(service), "/metrics").await;
        assert!(!metrics.contains(&secret), "{service}'s metrics hold it");
    }

    // A dead letter whose headers point outside its own stream is not replayed there.
    let forged = format!("hodei.events.job.{}.JobCompleted", Uuid::now_v7());
    let mut headers = hodei_messaging::message_headers("forged-dead-letter", None);
    headers.insert("Hodei-Dlq-Stream", "HODEI_SUBMISSIONS");
    headers.insert("Hodei-Dlq-Subject", forged.as_str());
    headers.insert("Hodei-Dlq-Reason", "test");
    let seq = system
        .js
        .publish_with_headers(
            "hodei.dlq.HODEI_SUBMISSIONS.scheduler-submissions",
            headers,
            "{}".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let replay: Result<DeadLetter, ApiError> = hodei_messaging::api::request(
        &system.client,
        subjects::API_DLQ_REPLAY,
        None,
        &DeadLetterRef {
            schema_version: 1,
            seq,
            actor: Some("mallory".into()),
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(replay.unwrap_err().code, ErrorCode::Conflict);
    assert!(
        system
            .js
            .get_stream("HODEI_EVENTS")
            .await
            .unwrap()
            .get_last_raw_message_by_subject(&forged)
            .await
            .is_err(),
        "nothing was published on {forged}"
    );
}
