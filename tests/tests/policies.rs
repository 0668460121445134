//! Job policies: execution and schedule-to-start timeouts, retries with backoff, and
//! cancellation in each state.

use std::time::Duration;

use hodei_domain::{JobPolicy, JobState, RetryOn, RetryPolicy};
use hodei_protocol::api::{AuditQuery, SubmitJob};
use hodei_protocol::ErrorCode;
use hodei_tests::{alive, job, System};
use uuid::Uuid;

fn with_policy(mut request: SubmitJob, policy: JobPolicy) -> SubmitJob {
    request.policy = policy;
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_execution_timeout_ends_in_timeout_with_its_process_gone() {
    let system = System::start().await;
    let policy = JobPolicy {
        execution_timeout_ms: 800,
        ..Default::default()
    };
    let accepted = system
        .submit(&with_policy(
            job("sh", &["-c", "echo $$; exec sleep 60"]),
            policy,
        ))
        .await
        .unwrap();
    let pid = system.printed_pid(accepted.job_id).await;
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(30))
        .await;
    let job = system.get(accepted.job_id).await.unwrap();
    assert_eq!(job.state, JobState::Timeout);
    assert!(job.error.unwrap().contains("did not finish within 800 ms"));
    system
        .wait_for(
            "the job's process to die",
            Duration::from_secs(10),
            || async { !alive(pid) },
        )
        .await;
    system
        .wait_for("no agent left", Duration::from_secs(10), || async {
            system.live_agents().is_empty()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_after_its_backoff_until_the_attempts_run_out() {
    let system = System::start().await;
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 300,
        max_backoff_ms: 10_000,
        multiplier: 2.0,
        retry_on: vec![RetryOn::Failed],
    };
    let policy = JobPolicy {
        retry,
        ..Default::default()
    };
    let accepted = system
        .submit(&with_policy(job("sh", &["-c", "exit 3"]), policy))
        .await
        .unwrap();
    system
        .wait_for("three attempts", Duration::from_secs(60), || async {
            system
                .get(accepted.job_id)
                .await
                .is_ok_and(|j| j.state.is_terminal())
        })
        .await;
    let job = system.get(accepted.job_id).await.unwrap();
    assert_eq!(
        (job.state, job.exit_code, job.attempt),
        (JobState::Failed, Some(3), 3)
    );

    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(30))
        .await;
    let trail = system
        .audit(AuditQuery {
            aggregate_id: Some(accepted.job_id),
            ..Default::default()
        })
        .await;
    let retries: Vec<_> = trail
        .iter()
        .filter(|e| e.event_type == "JobRetrying")
        .collect();
    assert_eq!(retries.len(), 2, "two retries for three attempts");
    for (n, retrying) in retries.iter().enumerate() {
        // Equal jitter: between half and all of 300 ms * 2^n, and the next JobQueued not before it.
        let backoff = 300.0 * 2f64.powi(n as i32);
        let retry_at: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(retrying.payload["retry_at"].clone()).unwrap();
        let waited = (retry_at - retrying.occurred_at).num_milliseconds() as f64;
        assert!(
            waited >= backoff / 2.0 - 1.0 && waited <= backoff + 1.0,
            "retry {n}: backoff {waited} ms of {backoff}"
        );
        let queued = trail
            .iter()
            .find(|e| e.event_type == "JobQueued" && e.seq > retrying.seq)
            .expect("queued again after the backoff");
        assert!(
            queued.occurred_at >= retry_at,
            "queued at {} before {retry_at}",
            queued.occurred_at
        );
    }
    let workers: std::collections::HashSet<_> = trail
        .iter()
        .filter(|e| e.event_type == "JobAssigned")
        .map(|e| e.payload["worker_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(workers.len(), 3, "each attempt ran on a worker of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_start_in_time_times_out_and_cancellation_works_in_each_state() {
    let mut system = System::start().await;

    // Pending: nothing places jobs while the dispatcher is down.
    assert!(system
        .service("dispatcher")
        .stop(Duration::from_secs(10))
        .is_some());
    let late = system
        .submit(&with_policy(
            job("true", &[]),
            JobPolicy {
                schedule_to_start_timeout_ms: 500,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let pending = system.submit(&job("true", &[])).await.unwrap();
    assert_eq!(
        system.cancel(pending.job_id).await.unwrap().state,
        JobState::Cancelled
    );
    system.wait_for_state(late.job_id, JobState::Timeout).await;
    assert!(system
        .get(late.job_id)
        .await
        .unwrap()
        .error
        .unwrap()
        .contains("not started within 500 ms"));

    // Scheduled: the worker is asked for but the provider-manager is down.
    assert!(system
        .service("provider-manager")
        .stop(Duration::from_secs(10))
        .is_some());
    system.restart("dispatcher");
    let scheduled = system.submit(&job("true", &[])).await.unwrap();
    system
        .wait_for_state(scheduled.job_id, JobState::Scheduled)
        .await;
    assert_eq!(
        system.cancel(scheduled.job_id).await.unwrap().state,
        JobState::Cancelled
    );
    system.restart("provider-manager");

    // Running: the process and the worker go.
    let running = system
        .submit(&job("sh", &["-c", "echo $$; exec sleep 60"]))
        .await
        .unwrap();
    let pid = system.printed_pid(running.job_id).await;
    system
        .wait_for_state(running.job_id, JobState::Running)
        .await;
    assert_eq!(
        system.cancel(running.job_id).await.unwrap().state,
        JobState::Cancelled
    );
    system
        .wait_for(
            "the cancelled job's process to die",
            Duration::from_secs(10),
            || async { !alive(pid) },
        )
        .await;

    // Ended: refused, with a typed error.
    let refused = system.cancel(running.job_id).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidJobTransition);
    assert_eq!(
        system.cancel(Uuid::now_v7()).await.unwrap_err().code,
        ErrorCode::NotFound
    );

    system
        .wait_until_settled(&[scheduled.job_id, running.job_id], Duration::from_secs(30))
        .await;
    system
        .wait_for("no agent left", Duration::from_secs(10), || async {
            system.live_agents().is_empty()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_job_is_declared_lost_and_its_job_retried_on_a_new_worker() {
    let system = System::start_with(&[
        ("HODEI_HEARTBEAT_INTERVAL_MS", "200"),
        ("HODEI_WORKER_LOST_AFTER_MS", "1500"),
    ])
    .await;
    let marker = std::env::temp_dir().join(format!("hodei-attempt-{}", Uuid::new_v4().simple()));
    let script = format!(
        "if [ -e {m} ]; then echo second; exit 0; fi; touch {m}; echo $$; exec sleep 60",
        m = marker.display()
    );
    let retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 100,
        retry_on: vec![RetryOn::Lost],
        ..Default::default()
    };
    let accepted = system
        .submit(&with_policy(
            job("sh", &["-c", &script]),
            JobPolicy {
                retry,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let first_pid = system.printed_pid(accepted.job_id).await;
    system
        .wait_for_state(accepted.job_id, JobState::Running)
        .await;
    let agents = system.agent_pids();
    assert_eq!(agents.len(), 1);
    // SAFETY: kill(2) of the agent process this test's system started.
    unsafe { libc_kill(agents[0]) };

    system
        .wait_for(
            "the job to succeed on its second attempt",
            Duration::from_secs(60),
            || async {
                system
                    .get(accepted.job_id)
                    .await
                    .is_ok_and(|j| j.state == JobState::Succeeded)
            },
        )
        .await;
    let job = system.get(accepted.job_id).await.unwrap();
    assert_eq!(job.attempt, 2);
    system
        .wait_until_settled(&[accepted.job_id], Duration::from_secs(30))
        .await;
    system
        .wait_for(
            "the orphaned first attempt to be killed",
            Duration::from_secs(10),
            || async { !alive(first_pid) },
        )
        .await;
    let trail = system
        .audit(AuditQuery {
            correlation_id: Some(job.correlation_id.clone()),
            ..Default::default()
        })
        .await;
    let terminating: Vec<_> = trail
        .iter()
        .filter(|e| e.event_type == "WorkerTerminating")
        .collect();
    assert!(
        terminating
            .iter()
            .any(|e| e.payload["reason"].as_str().unwrap_or("").contains("lost")),
        "a worker was declared lost"
    );
    assert_eq!(
        trail
            .iter()
            .filter(|e| e.event_type == "JobRetrying")
            .count(),
        1
    );
    let _ = std::fs::remove_file(marker);
}

unsafe fn libc_kill(pid: u32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid as i32, 9);
}
