//! The `hodei` command line against the running system.

use std::process::Command;
use std::time::Duration;

use hodei_tests::{binary, System, EVENTS_OF_A_JOB};

fn hodei(system: &System, args: &[&str]) -> std::process::Output {
    system.hodei(args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hodei_run_streams_the_output_and_exits_with_the_jobs_code() {
    let system = System::start().await;
    let script = "echo first; echo problem >&2; echo \"$NAME in $(pwd)\"; exit 42";
    let out = tokio::task::spawn_blocking({
        let args = [
            "run", "-e", "NAME=cli", "-C", "/tmp", "--", "sh", "-c", script,
        ]
        .map(String::from);
        let url = system.nats.url.clone();
        let creds = system.operator_creds();
        move || {
            Command::new(binary("hodei"))
                .env("HODEI_NATS_CREDS", creds)
                .arg("--nats-url")
                .arg(url)
                .args(args)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(42), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "first\ncli in /tmp\n");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("problem"));
    assert!(stderr.contains("Failed, exit code 42"), "{stderr}");

    let run = hodei(&system, &["run", "--", "true"]);
    assert_eq!(run.status.code(), Some(0));
    let missing = hodei(&system, &["run", "--", "/no/such/program"]);
    assert_eq!(
        missing.status.code(),
        Some(1),
        "a job that cannot start fails without an exit code"
    );
    assert!(
        text(&missing.stderr).contains("cannot start"),
        "{}",
        text(&missing.stderr)
    );

    // submit, get, list, logs, workers and audit, as tables and as JSON.
    let submitted = hodei(
        &system,
        &[
            "--json", "submit", "--key", "k1", "--", "echo", "hello", "there",
        ],
    );
    assert!(submitted.status.success());
    let accepted: serde_json::Value = serde_json::from_slice(&submitted.stdout).unwrap();
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let correlation = accepted["correlation_id"].as_str().unwrap().to_owned();
    system
        .wait_until_settled(&[job_id.parse().unwrap()], Duration::from_secs(60))
        .await;
    // `trace` and `audit` below read the audit log, which records in batches.
    system.wait_audit_complete(Duration::from_secs(30)).await;

    let logs = hodei(&system, &["logs", &job_id]);
    assert_eq!(text(&logs.stdout), "hello there\n");
    let followed = hodei(&system, &["logs", "-f", &job_id]);
    assert_eq!(text(&followed.stdout), "hello there\n");

    let get = hodei(&system, &["get", &job_id]);
    let shown = text(&get.stdout);
    assert!(
        shown.contains("Succeeded") && shown.contains(&correlation),
        "{shown}"
    );
    let got: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "get", &job_id]).stdout).unwrap();
    assert_eq!(got["exit_code"], 0);

    let list = text(&hodei(&system, &["list", "--state", "succeeded"]).stdout);
    assert!(list.starts_with("JOB") && list.contains(&job_id), "{list}");
    let page: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "list", "--limit", "2"]).stdout)
            .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("more than two jobs")
        .to_owned();
    let rest: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "list", "--cursor", &cursor]).stdout)
            .unwrap();
    assert_eq!(
        rest["items"].as_array().unwrap().len(),
        2,
        "four jobs in all"
    );

    let workers = text(&hodei(&system, &["workers", "--state", "terminated"]).stdout);
    assert_eq!(
        workers.lines().count(),
        5,
        "a header and four ephemeral workers:\n{workers}"
    );

    let timeline = text(&hodei(&system, &["trace", &job_id]).stdout);
    let steps: Vec<&str> = timeline
        .lines()
        .filter(|l| l.contains("Job") || l.contains("Worker"))
        .collect();
    assert_eq!(
        steps.len(),
        EVENTS_OF_A_JOB.len(),
        "the job's timeline has a step per event:\n{timeline}"
    );
    assert!(
        steps[0].contains("JobCreated") && steps[steps.len() - 1].contains("WorkerTerminated"),
        "{timeline}"
    );
    let traced: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "trace", &job_id]).stdout).unwrap();
    let traced = traced.as_array().unwrap();
    assert_eq!(traced.len(), EVENTS_OF_A_JOB.len());
    assert!(
        traced
            .iter()
            .all(|s| s["since_previous_ms"].as_f64().unwrap() >= 0.0),
        "steps in time order"
    );
    let by_correlation = text(&hodei(&system, &["audit", "--correlation-id", &correlation]).stdout);
    assert_eq!(
        by_correlation.lines().count(),
        1 + EVENTS_OF_A_JOB.len(),
        "a header and a line per event:\n{by_correlation}"
    );
    let by_type: serde_json::Value = serde_json::from_slice(
        &hodei(
            &system,
            &["--json", "audit", "--event-type", "JobCompleted"],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(
        by_type["items"].as_array().unwrap().len(),
        3,
        "three jobs ran to an exit code"
    );
    let by_actor: serde_json::Value = serde_json::from_slice(
        &hodei(
            &system,
            &["--json", "audit", "--actor", "scheduler", "--limit", "3"],
        )
        .stdout,
    )
    .unwrap();
    assert!(by_actor["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] == "scheduler"));
    assert!(
        by_actor["next_cursor"].is_string(),
        "eight scheduler events, three a page"
    );
    let future = hodei(
        &system,
        &["--json", "audit", "--from", "2999-01-01T00:00:00Z"],
    );
    let none: serde_json::Value = serde_json::from_slice(&future.stdout).unwrap();
    assert_eq!(none["items"].as_array().unwrap().len(), 0);

    let unknown = hodei(&system, &["get", "01a221e8-43cc-70f0-a726-40f07e68a9f3"]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(text(&unknown.stderr).contains("NOT_FOUND"));

    // Like any filter, `hodei` ends quietly when its reader stops reading.
    let piped = tokio::task::spawn_blocking({
        let command = format!(
            "HODEI_NATS_CREDS={} {} --nats-url {} run -- seq 1 200000 | head -n 2",
            system.operator_creds().display(),
            binary("hodei").display(),
            system.nats.url
        );
        move || Command::new("sh").arg("-c").arg(command).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(text(&piped.stdout), "1\n2\n");
    assert!(
        !text(&piped.stderr).contains("panicked"),
        "{}",
        text(&piped.stderr)
    );
    // The job goes on without its reader; its agent ends with it.
    system.wait_all_settled(Duration::from_secs(60)).await;

    // A submitter's credential may not touch dead letters: the server refuses, hodei says so.
    let forbidden = tokio::task::spawn_blocking({
        let (url, creds) = (system.nats.url.clone(), system.submitter_creds());
        move || {
            Command::new(binary("hodei"))
                .env("HODEI_NATS_CREDS", creds)
                .args(["--nats-url", &url, "--timeout-secs", "2", "dlq", "list"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(forbidden.status.code(), Some(3));
    assert!(
        text(&forbidden.stderr).contains("FORBIDDEN"),
        "{}",
        text(&forbidden.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hodei_applies_policies_cancels_jobs_and_manages_dead_letters() {
    let system = System::start().await;
    let url = system.nats.url.clone();
    let creds = system.operator_creds();
    let run = |args: Vec<&'static str>| {
        let (url, creds) = (url.clone(), creds.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(binary("hodei"))
                .env("HODEI_NATS_CREDS", creds)
                .arg("--nats-url")
                .arg(url)
                .args(args)
                .output()
                .unwrap()
        })
    };

    let timed_out = run(vec!["run", "--run-timeout", "0.5", "--", "sleep", "30"])
        .await
        .unwrap();
    assert_eq!(
        timed_out.status.code(),
        Some(124),
        "{}",
        text(&timed_out.stderr)
    );
    assert!(text(&timed_out.stderr).contains("Timeout"));

    let retried = run(vec![
        "--json",
        "run",
        "--attempts",
        "2",
        "--backoff",
        "0.1",
        "--",
        "sh",
        "-c",
        "exit 5",
    ])
    .await
    .unwrap();
    assert_eq!(retried.status.code(), Some(5));
    let job: serde_json::Value = serde_json::from_slice(&retried.stdout).unwrap();
    assert_eq!(job["attempt"], 2, "retried once");

    let submitted = hodei(
        &system,
        &["submit", "--priority", "-5", "--", "sleep", "30"],
    );
    let job_id = text(&submitted.stdout).trim().to_owned();
    system
        .wait_for("the job to run", Duration::from_secs(30), || async {
            system
                .get(job_id.parse().unwrap())
                .await
                .is_ok_and(|j| j.state == hodei_domain::JobState::Running)
        })
        .await;
    let cancelled = hodei(&system, &["cancel", &job_id, "--reason", "changed my mind"]);
    assert!(
        text(&cancelled.stdout).contains("Cancelled"),
        "{}",
        text(&cancelled.stderr)
    );
    let again = hodei(&system, &["cancel", &job_id]);
    assert_eq!(again.status.code(), Some(3));
    assert!(text(&again.stderr).contains("INVALID_JOB_TRANSITION"));

    system
        .js
        .publish(
            format!("hodei.events.job.{}.JobQueued", uuid::Uuid::now_v7()),
            "not json".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Dead-lettered by the dispatcher and the audit service, which read JobQueued.
    system
        .wait_for("dead letters", Duration::from_secs(30), || async {
            text(&hodei(&system, &["dlq", "list"]).stdout)
                .lines()
                .count()
                == 3
        })
        .await;
    let list: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "dlq", "list"]).stdout).unwrap();
    let seq = list["items"][0]["seq"].as_u64().unwrap().to_string();
    let shown: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["dlq", "show", &seq]).stdout).unwrap();
    assert_eq!(shown["payload"], "not json");
    assert!(
        text(&hodei(&system, &["dlq", "discard", &seq, "--actor", "bob"]).stdout)
            .contains("discarded")
    );
    let seq2 = list["items"][1]["seq"].as_u64().unwrap().to_string();
    assert!(
        text(&hodei(&system, &["dlq", "replay", &seq2, "--actor", "bob"]).stdout)
            .contains("replayed")
    );
    let audited = text(&hodei(&system, &["audit", "--actor", "bob"]).stdout);
    assert!(
        audited.contains("DeadLetterDiscarded") && audited.contains("DeadLetterReplayed"),
        "{audited}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hodei_list_filters_by_concurrency_key_and_labels() {
    let system = System::start().await;
    let submit = |args: &[&str]| {
        let out = hodei(&system, args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    let a = submit(&[
        "submit",
        "-l",
        "team=a",
        "-l",
        "tier=gold",
        "--concurrency-key",
        "t1",
        "--max-concurrent",
        "5",
        "--",
        "true",
    ]);
    let b = submit(&[
        "submit",
        "-l",
        "team=b",
        "--concurrency-key",
        "t1",
        "--max-concurrent",
        "5",
        "--",
        "true",
    ]);
    let c = submit(&["submit", "-l", "team=a", "--", "true"]);
    let listed = |args: &[&str]| {
        let mut all = vec!["--json", "list"];
        all.extend_from_slice(args);
        let out = hodei(&system, &all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ids: Vec<String> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        listed(&["--concurrency-key", "t1"]),
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(
        listed(&["--label", "team=a"]),
        sorted(vec![a.clone(), c.clone()])
    );
    assert_eq!(
        listed(&["--label", "team=a", "--label", "tier=gold"]),
        vec![a.clone()]
    );
    assert_eq!(
        listed(&["--concurrency-key", "t1", "--label", "team=b"]),
        vec![b.clone()]
    );
    assert!(listed(&["--concurrency-key", "none-such"]).is_empty());
    system.wait_all_settled(Duration::from_secs(60)).await;
}
