//! Faults against real processes, each with at least 100 jobs in flight: every job still
//! reaches a terminal state its policy allows, its audit trail is a valid path through the
//! state machine with each event once, no attempt ran twice, and nothing is left running.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use hodei_domain::JobState;
use hodei_protocol::api::{AuditEntry, AuditQuery};
use hodei_tests::{job, retried_when_lost, System};
use uuid::Uuid;

const JOBS: usize = 100;

async fn faulty_system() -> System {
    System::start_with(&[
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
        ("HODEI_WORKER_LOST_AFTER_MS", "5000"),
        ("HODEI_WORKER_CONNECT_TIMEOUT_MS", "15000"),
        ("HODEI_MONITOR_INTERVAL_MS", "200"),
    ])
    .await
}

/// Submit `JOBS` jobs that each take a little while, retried if their worker is lost.
async fn submit_batch(system: &System, tag: &str) -> Vec<Uuid> {
    submit_jobs_of(system, tag, "0.3").await
}

/// Submit `JOBS` jobs that each sleep `seconds`, retried if their worker is lost.
async fn submit_jobs_of(system: &System, tag: &str, seconds: &str) -> Vec<Uuid> {
    let policy = retried_when_lost();
    let requests: Vec<_> = (0..JOBS)
        .map(|i| {
            let mut request = job("sh", &["-c", &format!("sleep {seconds}; echo {tag}-{i}")]);
            request.policy = policy.clone();
            request
        })
        .collect();
    system.submit_all(&requests).await
}

/// Wait until some of `jobs` run, so that the fault that follows hits jobs in flight.
async fn until_in_flight(system: &System, jobs: &[Uuid]) {
    system
        .wait_for("jobs in flight", Duration::from_secs(60), || async {
            let (running,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state IN ('Scheduled', 'Running')",
            )
            .bind(jobs)
            .fetch_one(&system.pool)
            .await
            .unwrap_or((0,));
            running > 0
        })
        .await;
}

/// Replay a job's audit trail through the state machine, in the order the events occurred
/// (after a restart the audit service may record a redelivered event after a later one).
fn check_trail(job_id: Uuid, trail: &[AuditEntry]) -> JobState {
    let mut trail = trail.to_vec();
    trail.sort_by_key(|e| (e.occurred_at, e.seq));
    let ids: HashSet<_> = trail.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), trail.len(), "job {job_id}: every event once");
    let mut state = JobState::Pending;
    let mut running_attempts = HashSet::new();
    let mut attempt = 1;
    for event in trail.iter().filter(|e| e.aggregate_id == job_id) {
        let field = |name: &str| -> Option<JobState> {
            serde_json::from_value(event.payload.get(name)?.clone()).ok()
        };
        match event.event_type.as_str() {
            "JobCreated" | "JobQueued" => {}
            "JobRetrying" | "JobRequeued" => {
                assert_eq!(
                    field("from"),
                    Some(state),
                    "job {job_id}: {} from {state}",
                    event.event_type
                );
                assert!(
                    state.can_retry() || state.can_requeue(),
                    "job {job_id}: back to Pending from {state}"
                );
                state = JobState::Pending;
                attempt += 1;
            }
            "JobExecutionError" => {
                assert!(
                    state.can_transition_to(JobState::Failed),
                    "job {job_id}: {state} -> Failed"
                );
                state = JobState::Failed;
            }
            _ => {
                let (from, to) = (field("from").unwrap(), field("to").unwrap());
                assert_eq!(
                    from, state,
                    "job {job_id}: {} says from {from}, the trail says {state}",
                    event.event_type
                );
                assert!(
                    from.can_transition_to(to),
                    "job {job_id}: {from} -> {to} is not allowed"
                );
                if to == JobState::Running {
                    assert!(
                        running_attempts.insert(attempt),
                        "job {job_id}: attempt {attempt} ran twice"
                    );
                }
                state = to;
            }
        }
    }
    state
}

async fn check_invariants(system: &System, job_ids: &[Uuid], what: &str) {
    system
        .wait_until_settled(job_ids, Duration::from_secs(240))
        .await;
    system.wait_audit_complete(Duration::from_secs(60)).await;
    let mut succeeded = 0;
    for job_id in job_ids {
        let job = system.get(*job_id).await.unwrap();
        let trail = system
            .audit(AuditQuery {
                aggregate_id: Some(*job_id),
                ..Default::default()
            })
            .await;
        let replayed = check_trail(*job_id, &trail);
        assert_eq!(
            replayed, job.state,
            "job {job_id}: the trail ends where the job is"
        );
        assert!(
            matches!(job.state, JobState::Succeeded | JobState::Failed),
            "job {job_id} ended {} ({:?}), which its policy does not allow here",
            job.state,
            job.error
        );
        if job.state == JobState::Succeeded {
            succeeded += 1;
        }
    }
    system.wait_workers_gone().await;
    eprintln!(
        "{what}: {} jobs, {succeeded} succeeded, {} failed after exhausting their attempts",
        job_ids.len(),
        job_ids.len() - succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_each_service_in_turn_loses_no_job() {
    let mut system = faulty_system().await;
    let mut all = Vec::new();
    for service in hodei_tests::SERVICES {
        let jobs = submit_batch(&system, service).await;
        until_in_flight(&system, &jobs).await;
        let pid = system.service(service).pid();
        // SAFETY: kill(2) of a service process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        tokio::time::sleep(Duration::from_millis(500)).await;
        system.restart(service);
        check_invariants(&system, &jobs, &format!("kill -9 {service}")).await;
        all.extend(jobs);
    }
    let succeeded = join_all(all.iter().map(|id| system.get(*id)))
        .await
        .iter()
        .filter(|j| j.as_ref().is_ok_and(|j| j.state == JobState::Succeeded))
        .count();
    assert!(
        succeeded >= all.len() * 9 / 10,
        "{succeeded} of {} jobs succeeded",
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_while_jobs_run_loses_no_job() {
    let mut system = faulty_system().await;
    let jobs = submit_batch(&system, "nats").await;
    until_in_flight(&system, &jobs).await;
    system.nats.restart(Duration::from_millis(500));
    check_invariants(&system, &jobs, "nats-server restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_opens_its_circuit_jobs_wait_and_drain_when_it_recovers() {
    use std::os::unix::fs::PermissionsExt;
    // The provider starts agents through a wrapper that cannot be executed until we allow it.
    let dir = std::env::temp_dir().join(format!("hodei-provider-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("agent");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            hodei_tests::binary("hodei-agent").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o644)).unwrap();
    let wrapper_path = wrapper.display().to_string();
    let system = System::start_with(&[
        ("HODEI_AGENT_BIN", wrapper_path.as_str()),
        ("HODEI_PROVIDER_CIRCUIT_THRESHOLD", "3"),
        ("HODEI_PROVIDER_CIRCUIT_OPEN_MS", "500"),
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
        ("HODEI_WORKER_LOST_AFTER_MS", "3000"),
    ])
    .await;
    let jobs = submit_batch(&system, "provider").await;
    let providers = || async {
        hodei_messaging::api::request::<_, Vec<serde_json::Value>>(
            &system.client,
            hodei_protocol::subjects::API_PROVIDERS_LIST,
            None,
            &serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    };
    system
        .wait_for("the circuit to open", Duration::from_secs(30), || async {
            providers().await[0]["circuit"] == "Open"
        })
        .await;
    // Past a probe that failed (the circuit opened again) rather than a fixed pause.
    system
        .wait_for(
            "a failed probe to reopen the circuit",
            Duration::from_secs(30),
            || async {
                system
                    .log_of("provider-manager")
                    .matches("circuit open: work waits")
                    .count()
                    >= 2
            },
        )
        .await;
    for id in &jobs {
        let state = system.get(*id).await.unwrap().state;
        assert!(
            !state.is_terminal(),
            "jobs wait while the circuit is open, not fail: {id} is {state}"
        );
    }
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    check_invariants(&system, &jobs, "failing provider, then recovered").await;
    for id in &jobs {
        assert_eq!(system.get(*id).await.unwrap().state, JobState::Succeeded);
    }
    assert_eq!(providers().await[0]["circuit"], "Closed");
    assert!(system.log_of("provider-manager").contains("circuit open"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_every_service_share_the_work_and_handle_no_job_twice() {
    let mut system = faulty_system().await;
    for service in hodei_tests::SERVICES {
        system.add_instance(service);
    }
    system
        .wait_for(
            "the second instances to be up",
            Duration::from_secs(30),
            || async {
                hodei_tests::SERVICES.iter().all(|name| {
                    std::fs::read_to_string(system.log_dir.join(format!("{name}-2.err")))
                        .is_ok_and(|log| log.contains("metrics on http://"))
                })
            },
        )
        .await;
    let jobs = submit_batch(&system, "twins").await;
    check_invariants(&system, &jobs, "two instances of every service").await;
    for id in &jobs {
        assert_eq!(system.get(*id).await.unwrap().state, JobState::Succeeded);
    }
    let logs = |name: &str| {
        (
            system.log_of(name),
            std::fs::read_to_string(system.log_dir.join(format!("{name}-2.err")))
                .unwrap_or_default(),
        )
    };
    let (relay_1, relay_2) = logs("relay");
    assert_eq!(
        [&relay_1, &relay_2]
            .iter()
            .filter(|l| l.contains("now the active one"))
            .count(),
        1,
        "exactly one relay is active; the other stands by"
    );
    for service in ["dispatcher", "provider-manager"] {
        let (one, two) = logs(service);
        let worked = |log: &str| {
            log.contains("no free worker; one requested") || log.contains("agent started")
        };
        assert!(
            worked(&one) && worked(&two),
            "both {service} instances took a share of the work"
        );
    }

    // Fail-over: the active relay dies; the standby takes the lock and the outbox moves on.
    let active = if relay_1.contains("now the active one") {
        0
    } else {
        1
    };
    let relay_pid = system
        .services
        .iter()
        .filter(|s| s.name == "relay")
        .nth(active)
        .unwrap()
        .pid();
    // SAFETY: kill(2) of a relay process this test started.
    unsafe { libc::kill(relay_pid as i32, libc::SIGKILL) };
    let after = submit_batch(&system, "failover").await;
    check_invariants(&system, &after, "after the active relay died").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agents_in_the_middle_of_their_jobs_loses_no_job() {
    let system = faulty_system().await;
    let jobs = submit_jobs_of(&system, "agent", "1.5").await;
    system
        .wait_for(
            "agents to be running jobs",
            Duration::from_secs(60),
            || async { system.agent_pids().len() >= 10 },
        )
        .await;
    let victims: Vec<u32> = system.agent_pids().into_iter().step_by(2).collect();
    for pid in &victims {
        // SAFETY: kill(2) of agent processes this test's system started.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    check_invariants(
        &system,
        &jobs,
        &format!("kill -9 of {} agents", victims.len()),
    )
    .await;
    for id in &jobs {
        assert_eq!(
            system.get(*id).await.unwrap().state,
            JobState::Succeeded,
            "lost attempts are retried"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_while_jobs_run_loses_no_job() {
    let system = System::start_with_own_postgres(&[
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
        ("HODEI_WORKER_LOST_AFTER_MS", "5000"),
        ("HODEI_WORKER_CONNECT_TIMEOUT_MS", "15000"),
    ])
    .await;
    let jobs = submit_batch(&system, "postgres").await;
    until_in_flight(&system, &jobs).await;
    system
        .pg
        .as_ref()
        .unwrap()
        .restart(Duration::from_millis(500));
    check_invariants(&system, &jobs, "PostgreSQL restart").await;
    // The relay lock went with the old connection: the relay stood for election again
    // rather than go on as if it still held it.
    system
        .wait_for(
            "the relay to take its lock again",
            Duration::from_secs(30),
            || async {
                let log = system.log_of("relay");
                log.contains("standing for election again")
                    && log.matches("this relay is now the active one").count() == 2
            },
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_consumers_are_recreated_and_lose_no_job() {
    let system = faulty_system().await;
    let jobs = submit_batch(&system, "deleted").await;
    until_in_flight(&system, &jobs).await;
    for (stream, consumer) in [
        ("HODEI_EVENTS", "dispatcher-job-queued"),
        ("HODEI_EVENTS", "dispatcher-worker-ready"),
        ("HODEI_EVENTS", "audit"),
        ("HODEI_AGENT", "scheduler-reports"),
    ] {
        let stream = system.js.get_stream(stream).await.unwrap();
        // nats-server 2.9 can fail to remove a busy consumer's directory ("directory not
        // empty", code 500) and succeed when asked again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match stream.delete_consumer(consumer).await {
                Ok(deleted) => {
                    assert!(deleted.success, "deleted {consumer}");
                    break;
                }
                Err(error) if attempts < 5 => {
                    eprintln!("deleting {consumer} failed ({error}); asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot delete {consumer}: {error}"),
            }
        }
    }
    check_invariants(&system, &jobs, "durable consumers deleted").await;
    for id in &jobs {
        assert_eq!(system.get(*id).await.unwrap().state, JobState::Succeeded);
    }
    assert!(
        system.log_of("dispatcher").contains("reopening"),
        "the consumer loop noticed and reopened"
    );
}

/// One run of a job as its own process recorded it: when it started and when it was last
/// seen alive (it writes a line every second, so a run killed -9 ends there).
#[derive(Debug)]
struct Run {
    start: u128,
    last: u128,
    finished: bool,
}

fn runs_of(dir: &std::path::Path, job_id: Uuid) -> Vec<Run> {
    let mut runs: Vec<Run> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&job_id.to_string())
        })
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let stamps: Vec<(String, u128)> = text
                .lines()
                .filter_map(|l| {
                    let (what, at) = l.split_once(' ')?;
                    Some((what.to_owned(), at.trim().parse().ok()?))
                })
                .collect();
            Run {
                start: stamps.first().map(|s| s.1).unwrap_or(0),
                last: stamps.last().map(|s| s.1).unwrap_or(0),
                finished: stamps.iter().any(|s| s.0 == "end"),
            }
        })
        .collect();
    runs.sort_by_key(|r| r.start);
    runs
}

/// 200 jobs of 20–30 s whose processes record their own runs; agents are killed -9 (their
/// jobs' processes left running), agents are frozen past the lost window, and the
/// provider-manager is killed -9 and restarted while they run. A lost worker's job runs
/// again only once that worker is gone: no two runs of one job overlap, every job succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_runs_of_one_job_overlap_when_workers_are_lost() {
    let mut system = System::start_with(&[
        ("HODEI_HEARTBEAT_INTERVAL_MS", "500"),
        ("HODEI_WORKER_LOST_AFTER_MS", "3000"),
        ("HODEI_WORKER_CONNECT_TIMEOUT_MS", "30000"),
        ("HODEI_MONITOR_INTERVAL_MS", "200"),
        ("HODEI_MAX_WORKERS", "250"),
        // A frozen agent holds its teardown for this long before its cgroup is killed:
        // without the fence, its job would run again meanwhile.
        ("HODEI_AGENT_STOP_GRACE_SECS", "10"),
    ])
    .await;
    let dir = std::env::temp_dir().join(format!("hodei-runs-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // The jobs run as an unprivileged user: they may write here, and only add their own files.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let policy = retried_when_lost();
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let seconds = 20 + i % 11;
            let script = format!(
                "f={}/$HODEI_JOB_ID.$HODEI_ATTEMPT.$$; echo \"start $(date +%s%N)\" >> $f; \
                 i=0; while [ $i -lt {seconds} ]; do echo \"alive $(date +%s%N)\" >> $f; \
                 sleep 1; i=$((i+1)); done; echo \"end $(date +%s%N)\" >> $f",
                dir.display()
            );
            let mut request = job("sh", &["-c", &script]);
            request.policy = policy.clone();
            request
        })
        .collect();
    let jobs: Vec<Uuid> = system.submit_all(&requests).await;
    system
        .wait_for("most jobs running", Duration::from_secs(120), || async {
            system.agent_pids().len() >= 150
        })
        .await;
    let agents = system.agent_pids();
    let (killed, frozen) = (&agents[..5], &agents[5..10]);
    for pid in killed {
        // SAFETY: kill(2) of agents this test's system started; their jobs run on.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    for pid in frozen {
        // SAFETY: as above; frozen, they send no heartbeat and do nothing for their jobs.
        unsafe { libc::kill(*pid as i32, libc::SIGSTOP) };
    }
    let frozen_workers: Vec<Uuid> = frozen
        .iter()
        .filter_map(|pid| hodei_tests::worker_of_agent(*pid))
        .collect();
    assert_eq!(frozen_workers.len(), frozen.len());
    // Past the lost window, while the provider-manager waits for the frozen agents to stop,
    // it is killed -9 (it held the only record of their processes in memory) and restarted.
    system.wait_workers_in(&frozen_workers, "Terminating").await;
    system.service("provider-manager").kill();
    system.restart("provider-manager");
    // Thaw whatever of the frozen agents is still there, once the new instance tore them down.
    system.wait_workers_in(&frozen_workers, "Terminated").await;
    for pid in frozen {
        // SAFETY: as above.
        unsafe { libc::kill(*pid as i32, libc::SIGCONT) };
    }

    system
        .wait_until_settled(&jobs, Duration::from_secs(240))
        .await;
    let mut retried = 0;
    for job_id in &jobs {
        let job = system.get(*job_id).await.unwrap();
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "job {job_id}: {:?}",
            job.error
        );
        let runs = runs_of(&dir, *job_id);
        assert!(
            runs.last().is_some_and(|r| r.finished),
            "job {job_id}: {runs:?}"
        );
        for pair in runs.windows(2) {
            assert!(
                pair[1].start > pair[0].last,
                "job {job_id} ran twice at once: {runs:?}"
            );
        }
        retried += usize::from(runs.len() > 1);
    }
    assert!(retried >= 5, "the lost workers' jobs ran again ({retried})");
    // Only those: 200 agents heartbeating every 500 ms are not taken for lost.
    assert!(
        retried <= killed.len() + frozen.len(),
        "{retried} jobs ran again, but only {} agents were killed or frozen",
        killed.len() + frozen.len()
    );
    system.wait_workers_gone().await;
    eprintln!("200 jobs, {retried} ran more than once, never two runs at once");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A three-node NATS cluster in containers (two private networks: the nodes' routes, and
/// the clients'), every stream replicated three times.
async fn start_on_a_nats_cluster() -> System {
    let system = System::start_with_nats_cluster(&[
        ("HODEI_STREAM_REPLICAS", "3"),
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
        ("HODEI_WORKER_LOST_AFTER_MS", "40000"),
        ("HODEI_WORKER_CONNECT_TIMEOUT_MS", "40000"),
        ("HODEI_MONITOR_INTERVAL_MS", "200"),
    ])
    .await;
    let mut stream = system.js.get_stream("HODEI_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);
    system
}

/// Hodei's services keep running jobs on a three-node NATS cluster while one node is
/// killed, and lose none: every job succeeds, each audit event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_loses_no_job_when_a_node_is_killed() {
    let system = start_on_a_nats_cluster().await;
    let nodes = system.nats.cluster.as_ref().expect("a cluster");
    let killed = submit_batch(&system, "node-killed").await;
    until_in_flight(&system, &killed).await;
    let out = std::process::Command::new("docker")
        .args(["kill", &nodes.containers[1]])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_invariants(&system, &killed, "a NATS node killed").await;
    for id in &killed {
        assert_eq!(system.get(*id).await.unwrap().state, JobState::Succeeded);
    }
}

/// The same cluster while a node is partitioned from the other two (its routes' packets
/// dropped, no error) but not from its clients: the clients leave it when JetStream stops
/// serving there (a service's probe is a publish a quorum must store; an agent's, its own
/// consumer), and no job is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_loses_no_job_when_a_node_is_partitioned() {
    let system = start_on_a_nats_cluster().await;
    let nodes = system.nats.cluster.as_ref().expect("a cluster");
    let cut_off = submit_batch(&system, "node-cut-off").await;
    until_in_flight(&system, &cut_off).await;
    nodes.partition(2);
    check_invariants(&system, &cut_off, "a NATS node cut off").await;
    nodes.heal(2);
    for id in &cut_off {
        assert_eq!(system.get(*id).await.unwrap().state, JobState::Succeeded);
    }
}
