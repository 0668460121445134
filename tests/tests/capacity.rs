//! Warm pools and provider capacity: jobs on reused pre-provisioned workers, and jobs that
//! wait for room and are then placed by priority and submission order.

use std::collections::HashMap;
use std::time::Duration;

use hodei_domain::JobState;
use hodei_protocol::api::{AuditQuery, JobView};
use hodei_tests::{alive, job, System};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

async fn workers_in(system: &System, states: &[&str]) -> i64 {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM workers WHERE state = ANY($1)")
        .bind(&states)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    n
}

async fn wait_for_ready_pool(system: &System, size: i64) {
    system
        .wait_for(&format!("{size} pool workers Ready"), SETTLE, || async {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM workers WHERE pooled AND state = 'Ready'")
                    .fetch_one(&system.pool)
                    .await
                    .unwrap();
            n == size
        })
        .await;
}

async fn wait_until_ended(system: &System, jobs: &[Uuid]) -> Vec<JobView> {
    system
        .wait_for("jobs to end", SETTLE, || async {
            let (open,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) \
                 AND state NOT IN ('Succeeded','Failed','Cancelled','Timeout')",
            )
            .bind(jobs)
            .fetch_one(&system.pool)
            .await
            .unwrap();
            open == 0
        })
        .await;
    let mut views = Vec::new();
    for id in jobs {
        views.push(system.get(*id).await.unwrap());
    }
    views
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_runs_jobs_on_reused_workers_and_replaces_spent_ones() {
    let mut system = System::start_with(&[
        ("HODEI_WARM_POOL_SIZE", "2"),
        ("HODEI_WARM_POOL_MAX_JOBS", "3"),
    ])
    .await;
    wait_for_ready_pool(&system, 2).await;
    let mut finished_reports = system
        .client
        .subscribe("hodei.agent.*.finished")
        .await
        .unwrap();
    system.client.flush().await.unwrap();
    let first_pool: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM workers WHERE pooled")
        .fetch_all(&system.pool)
        .await
        .unwrap();

    // Nine jobs, exit codes 0..8: each must end as its own command said. The first is
    // accepted while both pool workers wait; the others at once, so that they queue.
    let script = |code: i32| format!("echo job {code}; exit {code}");
    let first = system
        .submit(&job("sh", &["-c", &script(0)]))
        .await
        .unwrap();
    assert_eq!(
        first.state,
        JobState::Assigned,
        "a job accepted while a pool worker waits goes to it in the accepting transaction"
    );
    let mut ids = vec![first.job_id];
    let requests: Vec<_> = (1..9)
        .map(|code| job("sh", &["-c", &script(code)]))
        .collect();
    let rest =
        futures::future::join_all(requests.iter().map(|request| system.submit(request))).await;
    ids.extend(rest.into_iter().map(|accepted| accepted.unwrap().job_id));
    let views = wait_until_ended(&system, &ids).await;
    let mut jobs_per_worker: HashMap<Uuid, usize> = HashMap::new();
    for (code, view) in views.iter().enumerate() {
        let expected = if code == 0 {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        assert_eq!(view.state, expected, "job {code}: {view:?}");
        assert_eq!(view.exit_code, Some(code as i32), "job {code}");
        assert_eq!(
            system.logs_first_line(view.job_id).await.as_deref(),
            Some(format!("job {code}").as_str())
        );
        *jobs_per_worker
            .entry(view.worker_id.expect("a job that ran names its worker"))
            .or_default() += 1;
    }
    // Only pool workers ran them, none more than three, and workers were reused.
    let (ephemeral,): (i64,) = sqlx::query_as("SELECT count(*) FROM workers WHERE NOT pooled")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(ephemeral, 0, "with a warm pool no ephemeral worker is made");
    assert!(
        jobs_per_worker.values().all(|n| *n <= 3),
        "{jobs_per_worker:?}"
    );
    assert!(
        jobs_per_worker.len() < ids.len(),
        "workers were reused: {jobs_per_worker:?}"
    );
    assert!(
        first_pool
            .iter()
            .any(|(id,)| jobs_per_worker.contains_key(id)),
        "the pre-provisioned workers took jobs"
    );
    // Each agent says which job is its last (its third): only that report, so that the
    // scheduler gives the others their next jobs.
    let mut lasts: HashMap<Uuid, Vec<bool>> = HashMap::new();
    for _ in 0..ids.len() {
        use futures::StreamExt;
        let message = tokio::time::timeout(Duration::from_secs(10), finished_reports.next())
            .await
            .expect("every job's finished report was published")
            .unwrap();
        let report: hodei_protocol::agent::JobFinished =
            serde_json::from_slice(&message.payload).unwrap();
        lasts.entry(report.worker_id).or_default().push(report.last);
    }
    for (worker_id, lasts) in &lasts {
        let expected: Vec<bool> = (1..=lasts.len()).map(|n| n == 3).collect();
        assert_eq!(lasts, &expected, "worker {worker_id}");
    }
    for (worker_id, ran) in &jobs_per_worker {
        let (state, jobs_run): (String, i32) =
            sqlx::query_as("SELECT state, jobs_run FROM workers WHERE id = $1")
                .bind(worker_id)
                .fetch_one(&system.pool)
                .await
                .unwrap();
        assert_eq!(jobs_run as usize, *ran, "worker {worker_id}");
        if *ran == 3 {
            system
                .wait_for("a spent worker to end", SETTLE, || async {
                    let (state,): (String,) =
                        sqlx::query_as("SELECT state FROM workers WHERE id = $1")
                            .bind(worker_id)
                            .fetch_one(&system.pool)
                            .await
                            .unwrap();
                    state == "Terminated"
                })
                .await;
        } else {
            assert_ne!(state, "Terminated", "a worker with jobs left is kept");
        }
    }
    // A worker that reports its job's end while jobs wait is given the next one in the
    // answer to that report: no RunJob command is written for those jobs.
    assert!(
        system
            .log_of("scheduler")
            .contains("next job given with the report"),
        "no worker was given its next job with its report"
    );
    let (commands,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM outbox_events WHERE kind = 'command'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert!(
        commands < ids.len() as i64,
        "{commands} RunJob commands for {} jobs",
        ids.len()
    );
    // Jobs on a ready worker are Assigned, never Scheduled on a worker made for them.
    let assigned = || async {
        system
            .audit(AuditQuery {
                event_type: Some("JobAssigned".into()),
                limit: Some(100),
                ..Default::default()
            })
            .await
    };
    system
        .wait_for("every placement audited", SETTLE, || async {
            assigned().await.len() == ids.len()
        })
        .await;
    let placements = assigned().await;
    assert!(placements.iter().all(|e| e.payload["to"] == "Assigned"));

    // The pool is topped up to its size again, and only its agents are alive.
    wait_for_ready_pool(&system, 2).await;
    system
        .wait_for("only the pool's agents alive", SETTLE, || async {
            system.agent_pids().len() == 2
        })
        .await;

    // A cancelled job's pool worker is torn down (its process is killed), then replaced.
    let sleeper = system
        .submit(&job("sh", &["-c", "echo $$; exec sleep 60"]))
        .await
        .unwrap()
        .job_id;
    system
        .wait_for("the sleeper to run", SETTLE, || async {
            system
                .get(sleeper)
                .await
                .is_ok_and(|j| j.state == JobState::Running)
        })
        .await;
    let pid = system.printed_pid(sleeper).await;
    let cancelled = system.cancel(sleeper).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    let worker = cancelled.worker_id.unwrap();
    system
        .wait_for("the cancelled job's worker to end", SETTLE, || async {
            let (state,): (String,) = sqlx::query_as("SELECT state FROM workers WHERE id = $1")
                .bind(worker)
                .fetch_one(&system.pool)
                .await
                .unwrap();
            state == "Terminated"
        })
        .await;
    system
        .wait_for("the cancelled job's process to be gone", SETTLE, || async {
            !alive(pid)
        })
        .await;
    wait_for_ready_pool(&system, 2).await;

    // Turned off, the pool's idle workers are torn down and their agents end.
    system.restart_with("dispatcher", &[("HODEI_WARM_POOL_SIZE", "0")]);
    system
        .wait_for("the pool's workers to end", SETTLE, || async {
            workers_in(
                &system,
                &["Creating", "Connecting", "Ready", "Busy", "Terminating"],
            )
            .await
                == 0
                && system.agent_pids().is_empty()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_beyond_capacity_wait_and_run_by_priority_then_submission_order() {
    // No room at all: every job waits.
    let mut system = System::start_with(&[("HODEI_MAX_WORKERS", "0")]).await;
    let priorities = [0, 5, 0, 9, 5, 0, 9, 1];
    let mut ids = Vec::new();
    for priority in priorities {
        let mut request = job("true", &[]);
        request.policy.priority = priority;
        ids.push(system.submit(&request).await.unwrap().job_id);
    }
    system
        .wait_for("the dispatcher to have seen every job", SETTLE, || async {
            let queued = system
                .audit(AuditQuery {
                    event_type: Some("JobQueued".into()),
                    limit: Some(100),
                    ..Default::default()
                })
                .await;
            queued.len() == ids.len()
                && system
                    .consumer_caught_up("HODEI_EVENTS", "dispatcher-job-queued")
                    .await
        })
        .await;
    for id in &ids {
        assert_eq!(system.get(*id).await.unwrap().state, JobState::Pending);
    }
    assert_eq!(
        workers_in(&system, &["Creating", "Connecting", "Ready", "Busy"]).await,
        0
    );

    // One worker at a time: the backlog drains highest priority first, oldest first among
    // equals, and never with two workers alive.
    system.restart_with("dispatcher", &[("HODEI_MAX_WORKERS", "1")]);
    let views = wait_until_ended(&system, &ids).await;
    assert!(
        views.iter().all(|v| v.state == JobState::Succeeded),
        "{views:?}"
    );
    let placements = || async {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT aggregate_id FROM audit_log WHERE event_type = 'JobAssigned' \
             ORDER BY occurred_at, seq",
        )
        .fetch_all(&system.pool)
        .await
        .unwrap();
        rows.into_iter().map(|(id,)| id).collect::<Vec<Uuid>>()
    };
    system
        .wait_for("every placement audited", SETTLE, || async {
            placements().await.len() == ids.len()
        })
        .await;
    let placed = placements().await;
    let mut expected: Vec<(i32, usize)> = priorities
        .iter()
        .enumerate()
        .map(|(i, p)| (-p, i))
        .collect();
    expected.sort();
    let expected: Vec<Uuid> = expected.into_iter().map(|(_, i)| ids[i]).collect();
    assert_eq!(placed, expected, "placement order");

    system
        .wait_for("every worker ended and audited", SETTLE, || async {
            let (ended,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM audit_log WHERE event_type = 'WorkerTerminated'",
            )
            .fetch_one(&system.pool)
            .await
            .unwrap();
            ended == ids.len() as i64
        })
        .await;
    let worker_events: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT event_type, occurred_at FROM audit_log WHERE aggregate_type = 'worker' \
         ORDER BY occurred_at, seq",
    )
    .fetch_all(&system.pool)
    .await
    .unwrap();
    let mut alive = 0i32;
    for (event_type, occurred_at) in &worker_events {
        match event_type.as_str() {
            "WorkerProvisioningRequested" => alive += 1,
            "WorkerTerminated" => alive -= 1,
            _ => {}
        }
        assert!(alive <= 1, "two workers alive at {occurred_at}");
    }
    assert_eq!(alive, 0);
}
