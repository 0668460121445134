//! Concurrency keys: at most `max` jobs of a key are placed (Assigned, Scheduled or Running)
//! at once, across dispatcher instances and through lost workers and a dispatcher killed -9;
//! keys of equal priority take turns; a slot is free again when its job leaves the placed
//! states (here by ending and by being cancelled), so none leaks. Checked from the audit
//! trail's occurrence times, not from timings.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_domain::{Concurrency, JobState};
use hodei_protocol::api::SubmitJob;
use hodei_tests::{job, retried_when_lost, System};
use uuid::Uuid;

const PLACED: [&str; 3] = ["Assigned", "Scheduled", "Running"];

fn keyed(key: &str, max: u32, command: &str, args: &[&str]) -> SubmitJob {
    let mut request = job(command, args);
    request.concurrency = Some(Concurrency {
        key: key.into(),
        max,
    });
    // A job whose worker is lost runs again.
    request.policy = retried_when_lost();
    request
}

/// One job entering (`true`) or leaving the placed states, at its event's occurrence.
struct Step {
    at: DateTime<Utc>,
    seq: i64,
    job: Uuid,
    enters: bool,
}

/// Every entry into and exit from the placed states of `jobs`, from their audit trails, in
/// the order they occurred (an exit before an entry at the same instant). An entry is a
/// `JobAssigned`; an exit is any later event that leaves a placed state for one that is not.
async fn placements(system: &System, jobs: &[Uuid]) -> Vec<Step> {
    let rows: Vec<(Uuid, DateTime<Utc>, i64, String, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_id, occurred_at, seq, event_type, payload FROM audit_log \
         WHERE aggregate_id = ANY($1) ORDER BY occurred_at, seq",
    )
    .bind(jobs)
    .fetch_all(&system.pool)
    .await
    .unwrap();
    let mut placed: HashMap<Uuid, bool> = HashMap::new();
    let mut steps = Vec::new();
    for (job, at, seq, event_type, payload) in rows {
        let is_placed = |field: &str| {
            payload[field]
                .as_str()
                .is_some_and(|state| PLACED.contains(&state))
        };
        let was = placed.get(&job).copied().unwrap_or(false);
        let now = if event_type == "JobAssigned" {
            true
        } else if is_placed("from") {
            is_placed("to")
        } else {
            was
        };
        if now != was {
            steps.push(Step {
                at,
                seq,
                job,
                enters: now,
            });
            placed.insert(job, now);
        }
    }
    steps.sort_by_key(|s| (s.at, s.enters, s.seq));
    steps
}

/// The most jobs of `key` placed at any moment.
fn most_placed_at_once(steps: &[Step], of_key: &HashMap<Uuid, &str>, key: &str) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for step in steps.iter().filter(|s| of_key[&s.job] == key) {
        if step.enters {
            now += 1;
            most = most.max(now);
        } else {
            now = now.checked_sub(1).expect("an exit follows an entry");
        }
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_at_their_limits_take_turns_through_a_killed_dispatcher_and_lost_workers() {
    let mut system = System::start_with(&[
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
        ("HODEI_WORKER_LOST_AFTER_MS", "2000"),
        ("HODEI_MONITOR_INTERVAL_MS", "200"),
    ])
    .await;
    system.add_instance("dispatcher");
    // Key A's 200 jobs are submitted before key B's 20: B must not wait behind all of A.
    let requests: Vec<SubmitJob> = (0..200)
        .map(|_| keyed("A", 2, "sh", &["-c", "sleep 0.05"]))
        .chain((0..20).map(|_| keyed("B", 2, "sh", &["-c", "sleep 0.05"])))
        .collect();
    let ids = system.submit_all(&requests).await;
    assert_eq!(ids.len(), 220, "every job accepted");
    let of_key: HashMap<Uuid, &str> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, if i < 200 { "A" } else { "B" }))
        .collect();

    // Mid-run: one dispatcher killed -9, and two agents killed -9 (their workers are lost
    // and their jobs run again).
    let ended = |system: &System, ids: Vec<Uuid>| {
        let pool = system.pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'Succeeded'",
            )
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap_or((0,));
            n
        }
    };
    system
        .wait_for("30 jobs to end", Duration::from_secs(120), || {
            let done = ended(&system, ids.clone());
            async move { done.await >= 30 }
        })
        .await;
    system.service("dispatcher").kill();
    let agents = system.agent_pids();
    for pid in agents.iter().take(2) {
        // SAFETY: kill(2) of agents this test's system started.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    system
        .wait_until_settled(&ids, Duration::from_secs(300))
        .await;
    for id in &ids {
        let view = system.get(*id).await.unwrap();
        assert_eq!(view.state, JobState::Succeeded, "{view:?}");
    }

    system.wait_audit_complete(Duration::from_secs(60)).await;
    let steps = placements(&system, &ids).await;
    for key in ["A", "B"] {
        assert_eq!(
            most_placed_at_once(&steps, &of_key, key),
            2,
            "key {key} had more than its 2 (or never 2) jobs placed at once"
        );
    }
    // Fairness: B's jobs were placed among A's, not after them (both keys wait with equal
    // priority; the key with fewer jobs placed goes first). Each job's first placement
    // counts: a lost worker's job is placed again after its backoff, whatever its key.
    let mut seen = std::collections::HashSet::new();
    let entries: Vec<&Step> = steps
        .iter()
        .filter(|s| s.enters && seen.insert(s.job))
        .collect();
    let last_b = entries
        .iter()
        .rposition(|s| of_key[&s.job] == "B")
        .expect("B's jobs were placed");
    let a_before_last_b = entries[..last_b]
        .iter()
        .filter(|s| of_key[&s.job] == "A")
        .count();
    assert!(
        a_before_last_b <= 60,
        "{a_before_last_b} of A's placements came before B's last one: B waited behind A"
    );
    // No slot leaked: nothing of either key is placed, and a new job of A runs at once.
    let held: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE concurrency_key IN ('A', 'B') AND state = ANY($1)",
    )
    .bind(&PLACED[..])
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(held.0, 0, "slots still held after every job ended");
    let after = system
        .submit(&keyed("A", 2, "true", &[]))
        .await
        .unwrap()
        .job_id;
    system
        .wait_until_settled(&[after], Duration::from_secs(60))
        .await;
    assert_eq!(system.get(after).await.unwrap().state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_at_its_keys_limit_says_who_holds_the_slot_and_runs_once_it_is_cancelled() {
    let system = System::start().await;
    let holder = system
        .submit(&keyed("C", 1, "sleep", &["300"]))
        .await
        .unwrap()
        .job_id;
    system
        .wait_for("the holder to run", Duration::from_secs(60), || async {
            system
                .get(holder)
                .await
                .is_ok_and(|view| view.state == JobState::Running)
        })
        .await;
    let waiting = system
        .submit(&keyed("C", 1, "true", &[]))
        .await
        .unwrap()
        .job_id;
    // Another key is not held up by C's limit.
    let other = system
        .submit(&keyed("D", 1, "true", &[]))
        .await
        .unwrap()
        .job_id;
    system
        .wait_until_settled(&[other], Duration::from_secs(60))
        .await;
    assert_eq!(system.get(other).await.unwrap().state, JobState::Succeeded);
    let view = system.get(waiting).await.unwrap();
    assert_eq!(view.state, JobState::Pending);
    assert_eq!(
        view.waiting_reason.as_deref(),
        Some(
            format!("waiting for a slot of concurrency key 'C': 1 of 1 placed ({holder})").as_str()
        ),
    );
    assert_eq!(
        view.concurrency,
        Some(Concurrency {
            key: "C".into(),
            max: 1
        })
    );
    // Cancelling the holder frees its slot.
    system.cancel(holder).await.unwrap();
    system
        .wait_until_settled(&[holder, waiting], Duration::from_secs(60))
        .await;
    assert_eq!(system.get(holder).await.unwrap().state, JobState::Cancelled);
    assert_eq!(
        system.get(waiting).await.unwrap().state,
        JobState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_concurrency_limit_is_refused_and_changes_nothing() {
    let system = System::start().await;
    for (key, max) in [("", 2), ("tenant", 0)] {
        let error = system
            .submit(&keyed(key, max, "true", &[]))
            .await
            .unwrap_err();
        assert_eq!(error.code.as_str(), "INVALID_JOB_SPEC", "{error:?}");
    }
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
}
