//! Schedules: ticks make exactly one job each, with two schedulers and one killed mid-way;
//! pause stops the ticks and resume restarts them; every change is in the audit trail.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hodei_protocol::api::AuditQuery;
use hodei_protocol::schedules::ScheduleView;
use hodei_tests::System;
use uuid::Uuid;

fn hodei_json<T: serde::de::DeserializeOwned>(system: &System, args: &[&str]) -> T {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = system.hodei(&all);
    assert!(
        out.status.success(),
        "hodei {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("hodei --json prints JSON")
}

/// The ticks the schedule's jobs were made for (from their idempotency keys), sorted, and
/// how many jobs there are.
async fn ticks_of_jobs(system: &System, schedule: Uuid) -> (Vec<DateTime<Utc>>, usize) {
    let keys: Vec<(String,)> =
        sqlx::query_as("SELECT idempotency_key FROM jobs WHERE idempotency_key LIKE $1")
            .bind(format!("{schedule}:%"))
            .fetch_all(&system.pool)
            .await
            .unwrap();
    let mut ticks: Vec<DateTime<Utc>> = keys
        .iter()
        .map(|(key,)| {
            key.split_once(':')
                .and_then(|(_, at)| at.parse().ok())
                .unwrap_or_else(|| panic!("a schedule's job key is <id>:<tick>, not {key}"))
        })
        .collect();
    ticks.sort();
    (ticks, keys.len())
}

/// Ticks recorded by the schedule's ScheduleFired events (its audit trail).
async fn fired_ticks(system: &System, schedule: Uuid) -> Vec<DateTime<Utc>> {
    let mut ticks: Vec<DateTime<Utc>> = system
        .audit(AuditQuery {
            aggregate_id: Some(schedule),
            event_type: Some("ScheduleFired".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .iter()
        .map(|e| e.payload["tick_at"].as_str().unwrap().parse().unwrap())
        .collect();
    ticks.sort();
    ticks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tick_makes_one_job_with_two_schedulers_one_killed_and_pause_and_resume_hold() {
    let mut system = System::start().await;
    system.add_instance("scheduler");
    let created: ScheduleView = hodei_json(
        &system,
        &[
            "schedule",
            "create",
            "every-second",
            "--every",
            "1",
            "--overlap",
            "allow",
            "--",
            "true",
        ],
    );
    let id = created.schedule_id;
    let started = Instant::now();
    // Ten ticks with both, then the first is killed right after a tick (ticks count from
    // creation), then ten more with the second alone.
    system
        .wait_for("ten ticks", Duration::from_secs(30), || async {
            ticks_of_jobs(&system, id).await.1 >= 10
        })
        .await;
    system.service("scheduler").kill();
    system
        .wait_for("twenty ticks", Duration::from_secs(30), || async {
            ticks_of_jobs(&system, id).await.1 >= 20
        })
        .await;
    let paused: ScheduleView = hodei_json(&system, &["schedule", "pause", "every-second"]);
    assert_eq!(paused.state, hodei_domain::ScheduleState::Paused);
    assert_eq!(paused.next_tick_at, None);
    let paused_at = Utc::now();
    let ran_for = started.elapsed();

    // None missing, none twice: consecutive ticks one second apart, one job each.
    let (ticks, jobs) = ticks_of_jobs(&system, id).await;
    let mut unique = ticks.clone();
    unique.dedup();
    assert_eq!(unique.len(), jobs, "no tick has two jobs");
    let expected = ran_for.as_secs() as usize;
    assert!(
        ticks.len() + 1 >= expected && ticks.len() <= expected + 1,
        "{} ticks in {ran_for:?}",
        ticks.len()
    );
    assert_eq!(
        ticks[0],
        created.next_tick_at.unwrap(),
        "the first tick runs"
    );
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::TimeDelta::seconds(1),
            "no tick missing between {} and {}",
            pair[0],
            pair[1]
        );
    }
    let log = system.log_of("scheduler");
    assert!(
        system.log_of("scheduler-2").contains("schedule fired"),
        "the second scheduler ticks"
    );
    assert!(
        log.contains("schedule fired"),
        "the first ticked before it was killed"
    );

    // Paused: no tick for three seconds. (That nothing happens can only be watched for a
    // while: the window is the assertion's, not a wait for something.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after_pause, _) = ticks_of_jobs(&system, id).await;
    assert_eq!(
        after_pause.len(),
        ticks.len(),
        "a paused schedule does not tick"
    );
    assert!(after_pause.iter().all(|t| *t <= paused_at));

    // Resumed: ticks again, one second apart from the resumption.
    let resumed: ScheduleView = hodei_json(&system, &["schedule", "resume", &id.to_string()]);
    let first_after = resumed.next_tick_at.unwrap();
    system
        .wait_for(
            "ticks after the resumption",
            Duration::from_secs(20),
            || async { ticks_of_jobs(&system, id).await.0.len() >= ticks.len() + 2 },
        )
        .await;
    let deleted: ScheduleView = hodei_json(&system, &["schedule", "delete", "every-second"]);
    assert_eq!(deleted.state, hodei_domain::ScheduleState::Deleted);
    let (all, _) = ticks_of_jobs(&system, id).await;
    let resumed_ticks: Vec<_> = all.iter().filter(|t| **t > paused_at).collect();
    assert_eq!(*resumed_ticks[0], first_after);
    assert_eq!(
        *resumed_ticks[1] - *resumed_ticks[0],
        chrono::TimeDelta::seconds(1)
    );

    // The audit trail: created, one fired per job (and its tick), paused, resumed, deleted;
    // nothing missed or skipped.
    system.wait_audit_complete(Duration::from_secs(20)).await;
    assert_eq!(fired_ticks(&system, id).await, all);
    let trail = system
        .audit(AuditQuery {
            aggregate_id: Some(id),
            limit: Some(1000),
            ..Default::default()
        })
        .await;
    let kinds: Vec<&str> = trail
        .iter()
        .map(|e| e.event_type.as_str())
        .filter(|t| *t != "ScheduleFired")
        .collect();
    assert_eq!(
        kinds,
        [
            "ScheduleCreated",
            "SchedulePaused",
            "ScheduleResumed",
            "ScheduleDeleted"
        ]
    );
    system.wait_all_settled(Duration::from_secs(60)).await;
    let listed = system.hodei(&["schedule", "list"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("every-second"),
        "a deleted schedule is not listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_with_typed_errors_and_change_nothing() {
    let system = System::start().await;
    let refused = |args: &[&str]| {
        let out = system.hodei(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let no_fields = refused(&["schedule", "create", "a", "--cron", "* *", "--", "true"]);
    assert!(
        no_fields.contains("INVALID_SCHEDULE") && no_fields.contains("5 fields"),
        "{no_fields}"
    );
    let zone = refused(&[
        "schedule",
        "create",
        "a",
        "--cron",
        "0 3 * * *",
        "--time-zone",
        "Nowhere/City",
        "--",
        "true",
    ]);
    assert!(zone.contains("unknown time zone"), "{zone}");
    let fast = refused(&["schedule", "create", "a", "--every", "0.01", "--", "true"]);
    assert!(fast.contains("interval"), "{fast}");
    let keyed = refused(&[
        "schedule", "create", "a", "--every", "5", "--key", "k", "--", "true",
    ]);
    assert!(keyed.contains("idempotency_key"), "{keyed}");
    let missing = refused(&["schedule", "pause", "no-such-schedule"]);
    assert!(missing.contains("NOT_FOUND"), "{missing}");

    let nightly = [
        "schedule",
        "create",
        "nightly",
        "--cron",
        "30 2 * * *",
        "--time-zone",
        "Europe/Madrid",
        "-e",
        "TOKEN=s3cret",
        "--",
        "backup.sh",
    ];
    let out = system.hodei(&nightly);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains("cron '30 2 * * *' (Europe/Madrid)"),
        "{shown}"
    );
    assert!(
        shown.contains("TOKEN") && !shown.contains("s3cret"),
        "env by name only: {shown}"
    );
    let twice = refused(&nightly);
    assert!(twice.contains("CONFLICT"), "{twice}");
    let paused = system.hodei(&["schedule", "pause", "nightly"]);
    assert!(paused.status.success());
    let again = refused(&["schedule", "pause", "nightly"]);
    assert!(again.contains("INVALID_SCHEDULE_TRANSITION"), "{again}");
    let (schedules,): (i64,) = sqlx::query_as("SELECT count(*) FROM schedules")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(schedules, 1, "only the valid schedule was written");
}
