//! The `hodei` command line against the running system.

use std::process::Command;
use std::time::Duration;

use hodei_tests::{binary, System};

fn hodei(system: &System, args: &[&str]) -> std::process::Output {
    Command::new(binary("hodei")).arg("--nats-url").arg(&system.nats.url).args(args).output().expect("run hodei")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hodei_run_streams_the_output_and_exits_with_the_jobs_code() {
    let system = System::start().await;
    let script = "echo first; echo problem >&2; echo \"$NAME in $(pwd)\"; exit 42";
    let out = tokio::task::spawn_blocking({
        let args = ["run", "-e", "NAME=cli", "-C", "/tmp", "--", "sh", "-c", script].map(String::from);
        let url = system.nats.url.clone();
        move || Command::new(binary("hodei")).arg("--nats-url").arg(url).args(args).output().unwrap()
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
    assert_eq!(missing.status.code(), Some(1), "a job that cannot start fails without an exit code");
    assert!(text(&missing.stderr).contains("cannot start"), "{}", text(&missing.stderr));

    // submit, get, list, logs, workers and audit, as tables and as JSON.
    let submitted = hodei(&system, &["--json", "submit", "--key", "k1", "--", "echo", "hello", "there"]);
    assert!(submitted.status.success());
    let accepted: serde_json::Value = serde_json::from_slice(&submitted.stdout).unwrap();
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let correlation = accepted["correlation_id"].as_str().unwrap().to_owned();
    system.wait_until_settled(&[job_id.parse().unwrap()], Duration::from_secs(60)).await;

    let logs = hodei(&system, &["logs", &job_id]);
    assert_eq!(text(&logs.stdout), "hello there\n");
    let followed = hodei(&system, &["logs", "-f", &job_id]);
    assert_eq!(text(&followed.stdout), "hello there\n");

    let get = hodei(&system, &["get", &job_id]);
    let shown = text(&get.stdout);
    assert!(shown.contains("Succeeded") && shown.contains(&correlation), "{shown}");
    let got: serde_json::Value = serde_json::from_slice(&hodei(&system, &["--json", "get", &job_id]).stdout).unwrap();
    assert_eq!(got["exit_code"], 0);

    let list = text(&hodei(&system, &["list", "--state", "succeeded"]).stdout);
    assert!(list.starts_with("JOB") && list.contains(&job_id), "{list}");
    let page: serde_json::Value = serde_json::from_slice(&hodei(&system, &["--json", "list", "--limit", "2"]).stdout).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().expect("more than two jobs").to_owned();
    let rest: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "list", "--cursor", &cursor]).stdout).unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 2, "four jobs in all");

    let workers = text(&hodei(&system, &["workers", "--state", "terminated"]).stdout);
    assert_eq!(workers.lines().count(), 5, "a header and four ephemeral workers:\n{workers}");

    let by_correlation = text(&hodei(&system, &["audit", "--correlation-id", &correlation]).stdout);
    assert_eq!(by_correlation.lines().count(), 14, "a header and thirteen events:\n{by_correlation}");
    let by_type: serde_json::Value = serde_json::from_slice(
        &hodei(&system, &["--json", "audit", "--event-type", "JobCompleted"]).stdout,
    )
    .unwrap();
    assert_eq!(by_type["items"].as_array().unwrap().len(), 3, "three jobs ran to an exit code");
    let by_actor: serde_json::Value =
        serde_json::from_slice(&hodei(&system, &["--json", "audit", "--actor", "scheduler", "--limit", "3"]).stdout).unwrap();
    assert!(by_actor["items"].as_array().unwrap().iter().all(|e| e["actor"] == "scheduler"));
    assert!(by_actor["next_cursor"].is_string(), "eight scheduler events, three a page");
    let future = hodei(&system, &["--json", "audit", "--from", "2999-01-01T00:00:00Z"]);
    let none: serde_json::Value = serde_json::from_slice(&future.stdout).unwrap();
    assert_eq!(none["items"].as_array().unwrap().len(), 0);

    let unknown = hodei(&system, &["get", "01a221e8-43cc-70f0-a726-40f07e68a9f3"]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(text(&unknown.stderr).contains("NOT_FOUND"));
}
