//! `hodei explain JOB` (and the job view's `waiting_reason`): each case is built for real and
//! its reason read back as an operator reads it.

use std::time::Duration;

use hodei_domain::{Concurrency, JobState};
use hodei_tests::{binary, job, System};
use uuid::Uuid;

/// The reason of `job_id` as `hodei explain` prints it (and as the API gives it).
fn explain(system: &System, job_id: Uuid) -> String {
    let out = system.hodei(&["explain", &job_id.to_string()]);
    assert!(
        out.status.success(),
        "hodei explain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait until the job's reason (from the API) contains `needle`; then `hodei explain` must
/// say the same.
async fn wait_reason(system: &System, job_id: Uuid, needle: &str) -> String {
    system
        .wait_for(
            &format!("the reason of {job_id} to say '{needle}'"),
            Duration::from_secs(60),
            || async {
                system
                    .get(job_id)
                    .await
                    .ok()
                    .and_then(|view| view.waiting_reason)
                    .is_some_and(|reason| reason.contains(needle))
            },
        )
        .await;
    let printed = explain(system, job_id);
    assert!(printed.contains(needle), "hodei explain printed: {printed}");
    printed
}

/// A script that runs the agent once `go` exists (the agent starts late) or, without write
/// permission, not at all (the provider fails to start it).
fn agent_wrapper(dir: &std::path::Path, runnable: bool) -> std::path::PathBuf {
    let body = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done\nexec {agent} \"$@\"",
        go = dir.join("go").display(),
        agent = binary("hodei-agent").display()
    );
    agent_script(dir, &body, runnable)
}

/// `dir/agent`, a shell script of `body`, executable if `runnable`.
fn agent_script(dir: &std::path::Path, body: &str, runnable: bool) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("agent");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mode = if runnable { 0o755 } else { 0o644 };
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(mode)).unwrap();
    script
}

/// With `agent_bin` as the agent, a job's provisioning fails once: the provider's circuit
/// opens and the job's reason says so (the job is then cancelled). That reason.
async fn open_circuit_reason(agent_bin: &std::path::Path) -> String {
    let agent_bin = agent_bin.display().to_string();
    let system = System::start_with(&[
        ("HODEI_AGENT_BIN", agent_bin.as_str()),
        ("HODEI_PROVIDER_CIRCUIT_THRESHOLD", "1"),
        ("HODEI_PROVIDER_CIRCUIT_OPEN_MS", "60000"),
    ])
    .await;
    let waiting = system.submit(&job("true", &[])).await.unwrap().job_id;
    let reason = wait_reason(
        &system,
        waiting,
        "waiting for the process provider: its circuit is open after 1 consecutive failures",
    )
    .await;
    system.cancel(waiting).await.unwrap();
    reason
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hodei-{what}-{}", Uuid::new_v4().simple()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_a_running_job_and_ended_jobs_are_explained() {
    let system = System::start_with(&[("HODEI_MAX_WORKERS", "1")]).await;
    let long = system.submit(&job("sleep", &["30"])).await.unwrap().job_id;
    system.wait_for_state(long, JobState::Running).await;
    let worker = system.get(long).await.unwrap().worker_id.unwrap();
    let running = wait_reason(&system, long, &format!("running on worker {worker} since")).await;
    assert!(running.contains("last heartbeat"), "{running}");

    let waiting = system.submit(&job("true", &[])).await.unwrap().job_id;
    wait_reason(
        &system,
        waiting,
        "waiting for capacity: 1 of 1 workers alive",
    )
    .await;

    system.cancel(long).await.unwrap();
    wait_reason(&system, long, "cancelled at").await;
    system.wait_for_state(waiting, JobState::Succeeded).await;
    wait_reason(&system, waiting, "succeeded at").await;
    assert!(explain(&system, waiting).contains("with exit code 0"));

    let failing = system
        .submit(&job("sh", &["-c", "exit 3"]))
        .await
        .unwrap()
        .job_id;
    system.wait_for_state(failing, JobState::Failed).await;
    wait_reason(&system, failing, "failed at").await;
    assert!(explain(&system, failing).contains("with exit code 3 (attempt 1 of 1)"));
    system.wait_all_settled(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_concurrency_key_and_a_retry_are_explained() {
    let system = System::start().await;
    let limited = |command: &str, args: &[&str]| {
        let mut request = job(command, args);
        request.concurrency = Some(Concurrency {
            key: "tenant-7".into(),
            max: 1,
        });
        request
    };
    let holder = system
        .submit(&limited("sleep", &["30"]))
        .await
        .unwrap()
        .job_id;
    system.wait_for_state(holder, JobState::Running).await;
    let blocked = system.submit(&limited("true", &[])).await.unwrap().job_id;
    wait_reason(
        &system,
        blocked,
        &format!("waiting for a slot of concurrency key 'tenant-7': 1 of 1 placed ({holder})"),
    )
    .await;

    let mut retried = job("false", &[]);
    retried.policy.retry = hodei_domain::RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 600_000,
        max_backoff_ms: 600_000,
        ..Default::default()
    };
    let retried = system.submit(&retried).await.unwrap().job_id;
    let reason = wait_reason(&system, retried, "waiting for its retry at").await;
    assert!(reason.contains("attempt 2 of 2"), "{reason}");

    for id in [holder, blocked, retried] {
        system.cancel(id).await.unwrap();
    }
    // The holder's worker ends; the others wait on no worker.
    system
        .wait_until_settled(&[holder], Duration::from_secs(60))
        .await;
    for id in [blocked, retried] {
        assert_eq!(system.get(id).await.unwrap().state, JobState::Cancelled);
    }
    system.wait_workers_gone().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_warm_pool_is_explained() {
    let system = System::start_with(&[("HODEI_WARM_POOL_SIZE", "1")]).await;
    let long = system.submit(&job("sleep", &["30"])).await.unwrap().job_id;
    system.wait_for_state(long, JobState::Running).await;
    let waiting = system.submit(&job("true", &[])).await.unwrap().job_id;
    wait_reason(
        &system,
        waiting,
        "waiting for a free pool worker: 1 of 1 pool workers are busy",
    )
    .await;
    system.cancel(long).await.unwrap();
    system.wait_for_state(waiting, JobState::Succeeded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_provider_circuit_is_explained() {
    let dir = temp_dir("circuit");
    let reason = open_circuit_reason(&agent_wrapper(&dir, false)).await;
    assert!(reason.contains("(last: "), "the failure is named: {reason}");
    assert!(reason.contains("next try in"), "{reason}");
    let _ = std::fs::remove_dir_all(dir);
}

/// An agent spawner that never answers (here a "spawner" that reads the requests and says
/// nothing; it ends when its socket closes) fails the provisioning within its time, and the
/// provider's circuit says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawner_that_does_not_answer_is_explained() {
    let dir = temp_dir("mute-spawner");
    let mute = agent_script(&dir, "exec cat <&3 >/dev/null", true);
    let reason = open_circuit_reason(&mute).await;
    assert!(
        reason.contains("the agent spawner did not answer within"),
        "the failure is named: {reason}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_has_not_registered_yet_is_explained() {
    let dir = temp_dir("late-agent");
    let wrapper = agent_wrapper(&dir, true).display().to_string();
    // Each agent exec'd through the wrapper (a spawner would wait in it once, not per agent).
    let system = System::start_with(&[
        ("HODEI_AGENT_BIN", wrapper.as_str()),
        ("HODEI_PROCESS_SPAWNER", "false"),
    ])
    .await;
    let late = system.submit(&job("true", &[])).await.unwrap().job_id;
    system.wait_for_state(late, JobState::Scheduled).await;
    let worker = system.get(late).await.unwrap().worker_id.unwrap();
    wait_reason(
        &system,
        late,
        &format!("waiting for its worker {worker} to register (started by the process provider at"),
    )
    .await;
    std::fs::write(dir.join("go"), "").unwrap();
    system.wait_for_state(late, JobState::Succeeded).await;
    system.wait_all_settled(Duration::from_secs(60)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_provider_matches_any_more_is_explained() {
    // No capacity: the job stays Pending; then its provider loses the label it selects.
    let mut system = System::start_with(&[
        ("HODEI_MAX_WORKERS", "0"),
        ("HODEI_PROCESS_LABELS", "provider=process,zone=a"),
    ])
    .await;
    let mut request = job("true", &[]);
    request.selector.insert("zone".into(), "a".into());
    let stranded = system.submit(&request).await.unwrap().job_id;
    wait_reason(
        &system,
        stranded,
        "waiting for capacity: 0 of 0 workers alive",
    )
    .await;
    system.restart_with(
        "provider-manager",
        &[("HODEI_PROCESS_LABELS", "provider=process")],
    );
    wait_reason(
        &system,
        stranded,
        "no provider can run it: process: no label zone=a",
    )
    .await;
    system.cancel(stranded).await.unwrap();
}
