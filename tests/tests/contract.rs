//! The contract holds at the edges: idempotent submission, typed refusals that change
//! nothing, and bad input that is answered (or dead-lettered) without harm.

use std::time::Duration;

use futures::StreamExt;
use hodei_messaging::api::request;
use hodei_messaging::{encode, message_headers};
use hodei_protocol::agent::{JobFinished, RegisterWorker, ReportAccepted};
use hodei_protocol::api::{SubmitAccepted, SubmitJob};
use hodei_protocol::{headers, subjects, ApiError, ErrorCode, Reply};
use hodei_tests::{job, System};
use uuid::Uuid;

async fn job_count(system: &System) -> i64 {
    sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM jobs")
        .fetch_one(&system.pool)
        .await
        .unwrap()
        .0
}

async fn outbox_count(system: &System) -> i64 {
    sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM outbox_events")
        .fetch_one(&system.pool)
        .await
        .unwrap()
        .0
}

/// Publish to a stream with `Hodei-Reply-To` and wait for the service's answer.
async fn publish_for_answer<T: serde::de::DeserializeOwned>(
    system: &System,
    subject: String,
    msg_id: &str,
    payload: bytes::Bytes,
) -> Result<T, ApiError> {
    let inbox = system.client.new_inbox();
    let mut answers = system.client.subscribe(inbox.clone()).await.unwrap();
    let mut map = message_headers(msg_id, None);
    map.insert(headers::REPLY_TO, inbox.as_str());
    system
        .js
        .publish_with_headers(subject, map, payload)
        .await
        .unwrap()
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("an answer")
        .unwrap();
    serde_json::from_slice::<Reply<T>>(&answer.payload)
        .unwrap()
        .into_result()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_makes_one_job() {
    let system = System::start().await;

    // Request/reply: the same key, twice at once and once more later.
    let mut submit = job("true", &[]);
    submit.idempotency_key = Some("order-42".into());
    let (a, b) = tokio::join!(system.submit(&submit), system.submit(&submit));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.job_id, b.job_id);
    assert!(
        a.created ^ b.created,
        "exactly one of the two created the job"
    );
    let again = system.submit(&submit).await.unwrap();
    assert_eq!((again.job_id, again.created), (a.job_id, false));

    // The durable stream: the same Nats-Msg-Id twice is dropped by the stream itself...
    let body = encode(&job("true", &[]));
    let first: SubmitAccepted = publish_for_answer(
        &system,
        subjects::JOBS_SUBMIT.into(),
        "stream-key-1",
        body.clone(),
    )
    .await
    .unwrap();
    let ack = system
        .js
        .publish_with_headers(
            subjects::JOBS_SUBMIT,
            message_headers("stream-key-1", None),
            body,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        ack.duplicate,
        "the stream drops a second message with the same Nats-Msg-Id"
    );
    assert!(first.created);

    // ...and a key repeated beyond the stream's window still finds the first job.
    let mut keyed = job("true", &[]);
    keyed.idempotency_key = Some("stream-key-2".into());
    let one: SubmitAccepted =
        publish_for_answer(&system, subjects::JOBS_SUBMIT.into(), "m1", encode(&keyed))
            .await
            .unwrap();
    let two: SubmitAccepted =
        publish_for_answer(&system, subjects::JOBS_SUBMIT.into(), "m2", encode(&keyed))
            .await
            .unwrap();
    assert_eq!(one.job_id, two.job_id);
    assert!(one.created && !two.created);

    assert_eq!(job_count(&system).await, 3, "three keys, three jobs");
    system
        .wait_until_settled(
            &[a.job_id, first.job_id, one.job_id],
            Duration::from_secs(60),
        )
        .await;
}

/// Jobs submitted while the scheduler's transaction runs are accepted together in the next
/// one. When the database refuses one of them (here a trigger of the test's own), the batch
/// is accepted one job at a time: only that job is refused, and nothing of it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_submissions_with_one_the_database_refuses_accepts_the_others() {
    let system = System::start().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.spec->>'command' = 'poison' THEN \
           RAISE EXCEPTION 'the test refuses the poison job'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON jobs \
           FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&system.pool)
    .await
    .unwrap();
    // Hold every insert into jobs: the first submissions' transaction waits for the lock
    // while the next ones queue up behind it.
    let mut hold = system.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE jobs IN SHARE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    // One job first: its transaction takes it alone and waits for the lock.
    let first_requests = [job("echo", &["first"])];
    let mut second_requests = vec![job("poison", &[])];
    second_requests.extend((0..5).map(|i| job("echo", &[&format!("second-{i}")])));
    let first = futures::future::join_all(first_requests.iter().map(|r| system.submit(r)));
    let second = async {
        system
            .wait_for(
                "the first transaction to wait for the lock",
                Duration::from_secs(30),
                || async {
                    sqlx::query_as::<_, (i64,)>(
                        "SELECT count(*) FROM pg_locks \
                         WHERE relation = 'jobs'::regclass AND NOT granted",
                    )
                    .fetch_one(&system.pool)
                    .await
                    .unwrap()
                    .0 == 1
                },
            )
            .await;
        let second = futures::future::join_all(second_requests.iter().map(|r| system.submit(r)));
        let release = async {
            // Every one of the second submissions waits in the scheduler's queue: they go
            // in the next transaction together.
            let metrics = system.metrics_base("scheduler");
            system
                .wait_for(
                    "the second submissions to wait in the scheduler's queue",
                    Duration::from_secs(30),
                    || async {
                        let (_, text) = hodei_tests::http_get(&metrics, "/metrics").await;
                        hodei_tests::prometheus_value(&text, "hodei_submissions_waiting")
                            == second_requests.len() as f64
                    },
                )
                .await;
            hold.rollback().await.unwrap();
        };
        tokio::join!(second, release).0
    };
    let (first, second) = tokio::join!(first, second);

    assert!(first.iter().all(Result::is_ok), "{first:?}");
    let refused = second[0].as_ref().expect_err("the poison job is refused");
    assert_eq!(refused.code, ErrorCode::Internal, "{refused:?}");
    assert!(
        refused.message.contains("the test refuses the poison job"),
        "{refused:?}"
    );
    let accepted: Vec<Uuid> = first
        .iter()
        .chain(&second[1..])
        .map(|r| r.as_ref().expect("accepted").job_id)
        .collect();
    system
        .wait_until_settled(&accepted, Duration::from_secs(60))
        .await;
    for id in &accepted {
        assert_eq!(
            system.get(*id).await.unwrap().state,
            hodei_domain::JobState::Succeeded
        );
    }
    assert_eq!(job_count(&system).await, 6);
    let poison_events: i64 = sqlx::query_as::<_, (i64,)>(
        "SELECT count(*) FROM outbox_events WHERE payload::text LIKE '%poison%'",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap()
    .0;
    assert_eq!(poison_events, 0, "nothing of the poison job is written");
    assert!(system
        .log_of("scheduler")
        .contains("a batch's transaction failed; accepting its jobs one at a time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reports_are_answered_with_typed_errors_change_nothing_and_are_logged() {
    let system = System::start().await;
    let accepted = system.submit(&job("sh", &["-c", "exit 0"])).await.unwrap();
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(60))
        .await;
    let job_id = accepted.job_id;
    let holder = system
        .get(job_id)
        .await
        .unwrap()
        .worker_id
        .expect("the job had a worker");
    let stranger = Uuid::now_v7();
    let before: (String, i64, Option<i32>) =
        sqlx::query_as("SELECT state, version, exit_code FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    let outbox_before = outbox_count(&system).await;

    let finished = |worker_id: Uuid, job_id: Uuid| JobFinished {
        schema_version: 1,
        worker_id,
        job_id,
        attempt: 1,
        exit_code: Some(9),
        error: None,
        started: false,
        last: false,
    };
    let refused = |result: Result<ReportAccepted, ApiError>| {
        result.expect_err("the report must be refused").code
    };

    // A worker reporting on a job it does not hold.
    let r = publish_for_answer(
        &system,
        subjects::agent_finished(stranger),
        "r1",
        encode(&finished(stranger, job_id)),
    )
    .await;
    assert_eq!(refused(r), ErrorCode::JobNotHeldByWorker);
    // The holder reporting a result for a job that already finished.
    let r = publish_for_answer(
        &system,
        subjects::agent_finished(holder),
        "r2",
        encode(&finished(holder, job_id)),
    )
    .await;
    assert_eq!(refused(r), ErrorCode::InvalidJobTransition);
    // The holder reporting on another attempt than the job's (a report delivered again
    // after a retry).
    let r = publish_for_answer(
        &system,
        subjects::agent_finished(holder),
        "r2b",
        encode(&JobFinished {
            attempt: 2,
            ..finished(holder, job_id)
        }),
    )
    .await;
    let error = r
        .map(|accepted: ReportAccepted| accepted)
        .expect_err("a report on another attempt is refused");
    assert_eq!(error.code, ErrorCode::InvalidJobTransition);
    assert!(
        error.message.contains("about attempt 2") && error.message.contains("at attempt 1"),
        "{error:?}"
    );
    // A worker speaking for another.
    let r = publish_for_answer(
        &system,
        subjects::agent_finished(stranger),
        "r3",
        encode(&finished(holder, job_id)),
    )
    .await;
    assert_eq!(refused(r), ErrorCode::WorkerMismatch);
    // A job that does not exist.
    let r = publish_for_answer(
        &system,
        subjects::agent_finished(holder),
        "r4",
        encode(&finished(holder, Uuid::now_v7())),
    )
    .await;
    assert_eq!(refused(r), ErrorCode::NotFound);
    // Malformed JSON: answered, and dead-lettered rather than redelivered for ever.
    let r = publish_for_answer(
        &system,
        subjects::agent_started(holder),
        "r5",
        bytes::Bytes::from_static(b"{oops"),
    )
    .await;
    assert_eq!(refused(r), ErrorCode::BadRequest);

    let after: (String, i64, Option<i32>) =
        sqlx::query_as("SELECT state, version, exit_code FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(after, before, "refused reports change nothing");
    assert_eq!(
        outbox_count(&system).await,
        outbox_before,
        "and emit nothing"
    );

    let log = system.log_of("scheduler");
    for code in [
        "JOB_NOT_HELD_BY_WORKER",
        "INVALID_JOB_TRANSITION",
        "WORKER_MISMATCH",
        "NOT_FOUND",
    ] {
        assert!(log.contains(code), "the scheduler logs the refusal {code}");
    }
    // The refusal is answered first, then the message is dead-lettered.
    let dlq = system.js.get_stream("HODEI_DLQ").await.unwrap();
    let last_dead =
        || dlq.get_last_raw_message_by_subject("hodei.dlq.HODEI_AGENT.scheduler-reports");
    system
        .wait_for(
            "the malformed report in the DLQ",
            Duration::from_secs(10),
            || async { last_dead().await.is_ok() },
        )
        .await;
    let dead = last_dead()
        .await
        .expect("the malformed report is in the dead-letter stream");
    assert_eq!(&dead.payload[..], b"{oops");

    // Registration: a spent or wrong token is refused, and so is an unknown worker.
    let register = |worker_id: Uuid| RegisterWorker {
        schema_version: 1,
        worker_id,
        token: "guess".into(),
        instance: None,
        pid: None,
        hostname: None,
    };
    let t = Duration::from_secs(5);
    let r: Result<serde_json::Value, ApiError> = request(
        &system.client,
        &subjects::agent_register(holder),
        None,
        &register(holder),
        t,
    )
    .await;
    assert_eq!(r.unwrap_err().code, ErrorCode::InvalidBootstrapToken);
    let r: Result<serde_json::Value, ApiError> = request(
        &system.client,
        &subjects::agent_register(stranger),
        None,
        &register(stranger),
        t,
    )
    .await;
    assert_eq!(r.unwrap_err().code, ErrorCode::NotFound);
    let r: Result<serde_json::Value, ApiError> = request(
        &system.client,
        &subjects::agent_register(stranger),
        None,
        &register(holder),
        t,
    )
    .await;
    assert_eq!(r.unwrap_err().code, ErrorCode::WorkerMismatch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_change_nothing() {
    let system = System::start().await;
    let t = Duration::from_secs(5);
    let raw = |payload: Vec<u8>| {
        let client = system.client.clone();
        async move {
            let reply = client
                .request(subjects::API_JOBS_SUBMIT, payload.into())
                .await
                .unwrap();
            let code = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::ERROR_CODE))
                .map(|v| v.to_string());
            let body: Reply<serde_json::Value> = serde_json::from_slice(&reply.payload).unwrap();
            (code, body.into_result().unwrap_err().code)
        }
    };
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        (b"not json".to_vec(), ErrorCode::BadRequest),
        (
            br#"{"command":"true","surprise":1}"#.to_vec(),
            ErrorCode::BadRequest,
        ),
        (br#"{"args":["x"]}"#.to_vec(), ErrorCode::BadRequest),
        (
            br#"{"schema_version":2,"command":"true"}"#.to_vec(),
            ErrorCode::UnsupportedSchemaVersion,
        ),
        (br#"{"command":"   "}"#.to_vec(), ErrorCode::InvalidJobSpec),
        (
            br#"{"command":"x","env":{"A=B":"1"}}"#.to_vec(),
            ErrorCode::InvalidJobSpec,
        ),
        (
            format!(
                r#"{{"command":"echo","args":["{}"]}}"#,
                "x".repeat(600 * 1024)
            )
            .into_bytes(),
            ErrorCode::PayloadTooLarge,
        ),
    ];
    for (payload, expected) in cases {
        let (header, code) = raw(payload).await;
        assert_eq!(code, expected);
        assert_eq!(
            header.as_deref(),
            Some(expected.as_str()),
            "the error code is also a header"
        );
    }
    let unknown: Result<serde_json::Value, ApiError> = request(
        &system.client,
        subjects::API_JOBS_GET,
        None,
        &serde_json::json!({"job_id": Uuid::now_v7()}),
        t,
    )
    .await;
    assert_eq!(unknown.unwrap_err().code, ErrorCode::NotFound);
    let bad_id: Result<serde_json::Value, ApiError> = request(
        &system.client,
        subjects::API_JOBS_GET,
        None,
        &serde_json::json!({"job_id": "nope"}),
        t,
    )
    .await;
    assert_eq!(bad_id.unwrap_err().code, ErrorCode::BadRequest);
    let bad_page: Result<serde_json::Value, ApiError> = request(
        &system.client,
        subjects::API_AUDIT_QUERY,
        None,
        &serde_json::json!({"cursor": "x"}),
        t,
    )
    .await;
    assert_eq!(bad_page.unwrap_err().code, ErrorCode::BadRequest);

    assert_eq!(job_count(&system).await, 0);
    assert_eq!(outbox_count(&system).await, 0);
    // Still healthy after all that.
    let ok = system
        .submit(&SubmitJob {
            command: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    system
        .wait_until_settled(&[ok.job_id], Duration::from_secs(60))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_stops_cleanly_on_sigterm() {
    let mut system = System::start().await;
    for service in &mut system.services {
        let status = service.stop(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} exits 0 on SIGTERM, got {status:?}",
            service.name
        );
        let log = std::fs::read_to_string(&service.log).unwrap();
        assert!(
            log.contains("stopped"),
            "{} logs that it stopped:\n{log}",
            service.name
        );
    }
}

/// Ask every instance listening on a `$SRV` subject; the answers of `expected` instances.
async fn ask_all(
    client: &async_nats::Client,
    subject: &str,
    expected: usize,
) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_owned(), inbox, bytes::Bytes::new())
        .await
        .unwrap();
    let mut found = Vec::new();
    while found.len() < expected {
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{subject}: {} answers of {expected}: {found:?}",
                    found.len()
                )
            })
            .unwrap();
        found.push(serde_json::from_slice(&answer.payload).unwrap());
    }
    found
}

/// Every service that answers requests is a NATS micro service: `$SRV.PING` finds each (as
/// `nats micro ls` does), `$SRV.INFO` lists its endpoints on the subjects of the AsyncAPI
/// document, and `$SRV.STATS` counts the requests each answered and, in `data.refused`,
/// those it refused; an operator's credential may ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_service_is_listed_by_the_nats_micro_api() {
    let system = System::start().await;
    let operator_creds = system.nats.creds("ops", &hodei_auth::Role::Operator);
    let operator = system.nats.connect_as("ops", &operator_creds).await;
    let id = system.submit(&job("true", &[])).await.unwrap().job_id;
    system
        .wait_until_settled(&[id], Duration::from_secs(60))
        .await;
    system.wait_workers_gone().await;
    system
        .client
        .request(subjects::API_JOBS_SUBMIT, "{not json".into())
        .await
        .unwrap();

    let expected: [(&str, &[&str]); 4] = [
        (
            "hodei-scheduler",
            &[
                subjects::API_JOBS_SUBMIT,
                subjects::API_JOBS_GET,
                subjects::API_JOBS_LIST,
                subjects::API_JOBS_CANCEL,
                subjects::API_SCHEDULES_CREATE,
                subjects::API_SCHEDULES_LIST,
                subjects::API_SCHEDULES_GET,
                subjects::API_SCHEDULES_PAUSE,
                subjects::API_SCHEDULES_RESUME,
                subjects::API_SCHEDULES_DELETE,
            ],
        ),
        (
            "hodei-registry",
            &["hodei.agent.*.register", subjects::API_WORKERS_LIST],
        ),
        (
            "hodei-audit",
            &[
                subjects::API_AUDIT_QUERY,
                subjects::API_DLQ_LIST,
                subjects::API_DLQ_SHOW,
                subjects::API_DLQ_REPLAY,
                subjects::API_DLQ_DISCARD,
            ],
        ),
        ("hodei-provider-manager", &[subjects::API_PROVIDERS_LIST]),
    ];
    let pings = ask_all(&operator, "$SRV.PING", expected.len()).await;
    let mut names: Vec<&str> = pings.iter().map(|p| p["name"].as_str().unwrap()).collect();
    names.sort();
    let mut want: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
    want.sort();
    assert_eq!(names, want, "{pings:?}");

    for (name, endpoints) in expected {
        let info = &ask_all(&operator, &format!("$SRV.INFO.{name}"), 1).await[0];
        assert_eq!(info["type"], "io.nats.micro.v1.info_response");
        let mut subjects: Vec<&str> = info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["subject"].as_str().unwrap())
            .collect();
        subjects.sort();
        let mut want = endpoints.to_vec();
        want.sort();
        assert_eq!(subjects, want, "{name}: {info}");
        assert!(
            info["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["queue_group"] == name),
            "{name} answers in its queue group: {info}"
        );
    }

    let stats = &ask_all(&operator, "$SRV.STATS.hodei-scheduler", 1).await[0];
    let submit = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == subjects::API_JOBS_SUBMIT)
        .unwrap_or_else(|| panic!("jobs-submit in {stats}"));
    assert_eq!(submit["name"], "jobs-submit");
    assert_eq!(submit["num_requests"], 2, "{submit}");
    assert_eq!(submit["data"]["refused"], 1, "{submit}");
}

/// A durable consumer made by an earlier version, with the subjects it took then, takes the
/// service's subjects once the service starts again (the registry took every job event; it
/// now takes only those by which a job may leave its worker), and the service still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_with_other_subjects_takes_the_services_own_once_it_starts() {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let mut system = System::start().await;
    let stream = system.js.get_stream("HODEI_EVENTS").await.unwrap();
    let filters = || async {
        let info = stream.consumer_info("registry-job-events").await.unwrap();
        (info.config.filter_subject, info.config.filter_subjects)
    };
    let (_, now) = filters().await;
    assert_eq!(now.len(), 5, "the registry's own subjects: {now:?}");
    assert!(now.contains(&"hodei.events.job.*.JobCompleted".to_owned()));
    assert!(!now.iter().any(|s| s.ends_with(".JobQueued")));
    stream
        .update_consumer(pull::Config {
            durable_name: Some("registry-job-events".into()),
            filter_subject: "hodei.events.job.>".into(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(filters().await.0, "hodei.events.job.>");

    system.restart("registry");
    system
        .wait_for(
            "the registry's consumer to take its own subjects",
            Duration::from_secs(30),
            || async { filters().await == (String::new(), now.clone()) },
        )
        .await;
    assert!(system
        .log_of("registry")
        .contains("the consumer's subjects changed; updating it"));
    let accepted = system.submit(&job("true", &[])).await.unwrap();
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(60))
        .await;
}
