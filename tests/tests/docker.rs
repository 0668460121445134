//! Jobs in containers on the real Docker Engine (the Docker provider): each job in a
//! container of its own, with its labels and resources, removed at teardown; images come
//! from scripts/images.sh (no registry here).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use hodei_domain::JobState;
use hodei_protocol::api::AuditQuery;
use hodei_protocol::logs::LogStream;
use hodei_tests::{job, System};
use uuid::Uuid;

const IMAGE: &str = "hodei/job-base:latest";

fn in_container(command: &str, args: &[&str]) -> hodei_protocol::api::SubmitJob {
    let mut request = job(command, args);
    request.image = Some(IMAGE.to_owned());
    request
}

/// The event types of a job's audit trail, in order.
async fn trail(system: &System, job_id: Uuid) -> Vec<String> {
    let job = system.get(job_id).await.unwrap();
    system
        .audit(AuditQuery {
            correlation_id: Some(job.correlation_id),
            ..Default::default()
        })
        .await
        .into_iter()
        .filter(|entry| entry.aggregate_id == job_id)
        .map(|entry| entry.event_type)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_in_containers_end_right_with_their_logs_and_leave_no_container() {
    let system = System::start_with_docker(&[]).await;
    let requests: Vec<_> = (0..50)
        .map(|i| match i % 3 {
            0 => in_container(
                "sh",
                &["-c", &format!("echo job {i}; echo line two of {i}")],
            ),
            1 => in_container(
                "sh",
                &["-c", &format!("echo failing {i} >&2; exit {}", 1 + i % 100)],
            ),
            _ => {
                let mut request = in_container(
                    "sh",
                    &[
                        "-c",
                        "echo \"$WHO in $(cat /etc/debian_version | cut -c1-2) as $(id -u)\"",
                    ],
                );
                request.env = BTreeMap::from([("WHO".to_owned(), format!("container {i}"))]);
                request
            }
        })
        .collect();
    let ids: Vec<Uuid> = system.submit_all(&requests).await;
    system
        .wait_until_settled(&ids, Duration::from_secs(300))
        .await;
    system.wait_audit_complete(Duration::from_secs(60)).await;

    let mut workers = HashSet::new();
    for (i, job_id) in ids.iter().enumerate() {
        let job = system.get(*job_id).await.unwrap();
        let batches = system.logs_of(*job_id).await;
        let lines = |stream: LogStream| hodei_tests::lines_of(&batches, stream);
        match i % 3 {
            0 => {
                assert_eq!(job.state, JobState::Succeeded, "{job:?}");
                assert_eq!(
                    lines(LogStream::Stdout),
                    [format!("job {i}"), format!("line two of {i}")]
                );
            }
            1 => {
                assert_eq!(job.state, JobState::Failed, "{job:?}");
                assert_eq!(job.exit_code, Some(1 + (i % 100) as i32));
                assert_eq!(lines(LogStream::Stderr), [format!("failing {i}")]);
            }
            _ => {
                assert_eq!(job.state, JobState::Succeeded, "{job:?}");
                assert_eq!(
                    lines(LogStream::Stdout),
                    [format!("container {i} in 12 as 65534")],
                    "the job ran in the image (Debian 12), unprivileged"
                );
            }
        }
        assert_eq!(job.image.as_deref(), Some(IMAGE));
        // The same trail as a process job.
        let types = trail(&system, *job_id).await;
        assert_eq!(types.first().map(String::as_str), Some("JobCreated"));
        assert!(types.contains(&"JobAssigned".to_owned()), "{types:?}");
        assert!(
            types
                .iter()
                .any(|t| t == "JobCompleted" || t == "JobExecutionError"),
            "{types:?}"
        );
        workers.insert(job.worker_id.expect("a worker ran it"));
    }
    assert_eq!(workers.len(), 50, "each job in a container of its own");
    let (docker_resources,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM workers WHERE id = ANY($1) AND state = 'Terminated'")
            .bind(workers.iter().copied().collect::<Vec<_>>())
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(docker_resources, 50);
    let net = system.docker.as_ref().unwrap();
    system
        .wait_for(
            "every container removed",
            Duration::from_secs(30),
            || async { net.containers().is_empty() },
        )
        .await;
}

/// A process job and a container job side by side; a job over its memory limit fails and
/// says so; an image the engine lacks fails its job at once with IMAGE_NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limits_missing_images_and_process_jobs_beside_container_jobs() {
    let system = System::start_with_docker(&[]).await;
    let process = system
        .submit(&job("sh", &["-c", "echo on the host"]))
        .await
        .unwrap()
        .job_id;
    let container = system
        .submit(&in_container("sh", &["-c", "echo in a container"]))
        .await
        .unwrap()
        .job_id;
    let mut hungry = in_container("sh", &["-c", "head -c 400000000 /dev/zero | tail"]);
    hungry.resources.memory_mb = Some(32);
    let hungry = system.submit(&hungry).await.unwrap().job_id;
    let mut missing = in_container("true", &[]);
    missing.image = Some(format!("hodei/no-such-image:{}", Uuid::new_v4().simple()));
    let missing = system.submit(&missing).await.unwrap().job_id;
    let all = [process, container, hungry, missing];
    system
        .wait_until_settled(&all, Duration::from_secs(120))
        .await;

    for (job_id, line) in [(process, "on the host"), (container, "in a container")] {
        let job = system.get(job_id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(system.logs_first_line(job_id).await.as_deref(), Some(line));
    }
    let (provider,): (String,) = sqlx::query_as(
        "SELECT w.provider FROM jobs j JOIN workers w ON w.id = j.worker_id WHERE j.id = $1",
    )
    .bind(process)
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(provider, "process");

    let hungry = system.get(hungry).await.unwrap();
    assert_eq!(hungry.state, JobState::Failed, "{hungry:?}");
    assert!(
        hungry
            .error
            .as_deref()
            .is_some_and(|e| e.contains("memory limit")),
        "the reason says so: {hungry:?}"
    );
    let missing = system.get(missing).await.unwrap();
    assert_eq!(missing.state, JobState::Failed, "{missing:?}");
    assert!(
        missing
            .error
            .as_deref()
            .is_some_and(|e| e.contains("IMAGE_NOT_FOUND")),
        "{missing:?}"
    );
    assert_eq!(missing.attempt, 1, "not retried");
}

/// `hodei cancel` of a job in a container removes the container; kill -9 of the
/// provider-manager with jobs in containers, then its restart, loses no job and leaves no
/// container behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_a_killed_provider_manager_leave_no_container() {
    let mut system = System::start_with_docker(&[
        ("HODEI_RECONCILE_SECS", "2"),
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
        ("HODEI_WORKER_LOST_AFTER_MS", "5000"),
    ])
    .await;
    let net_name = system.docker.as_ref().unwrap().name.clone();
    let running = || {
        let listed = std::process::Command::new("docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=hodei.owner={net_name}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&listed.stdout)
            .split_whitespace()
            .count()
    };
    let long = system
        .submit(&in_container("sleep", &["300"]))
        .await
        .unwrap()
        .job_id;
    system
        .wait_for("the job to run", Duration::from_secs(60), || async {
            system
                .get(long)
                .await
                .is_ok_and(|j| j.state == JobState::Running)
        })
        .await;
    assert_eq!(running(), 1);
    system.cancel(long).await.unwrap();
    system
        .wait_until_settled(&[long], Duration::from_secs(60))
        .await;
    assert_eq!(system.get(long).await.unwrap().state, JobState::Cancelled);
    let net = system.docker.as_ref().unwrap();
    system
        .wait_for(
            "the cancelled job's container gone",
            Duration::from_secs(30),
            || async { net.containers().is_empty() },
        )
        .await;

    let requests: Vec<_> = (0..6)
        .map(|i| in_container("sh", &["-c", &format!("sleep 3; echo done {i}")]))
        .collect();
    let jobs: Vec<Uuid> = system.submit_all(&requests).await;
    system
        .wait_for("containers running", Duration::from_secs(60), || async {
            running() >= 3
        })
        .await;
    system.service("provider-manager").kill();
    system.restart("provider-manager");
    system
        .wait_until_settled(&jobs, Duration::from_secs(120))
        .await;
    for (i, job_id) in jobs.iter().enumerate() {
        let job = system.get(*job_id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        let lines: Vec<String> = system
            .logs_of(*job_id)
            .await
            .into_iter()
            .flat_map(|b| b.lines)
            .map(|l| l.line)
            .collect();
        assert_eq!(lines, [format!("done {i}")]);
    }
    let net = system.docker.as_ref().unwrap();
    system
        .wait_for("no container left", Duration::from_secs(30), || async {
            net.containers().is_empty()
        })
        .await;
}

/// A unix-socket proxy in front of the engine that the test can take down: the engine "does
/// not answer" for the provider while the real engine goes on for everyone else.
struct EngineProxy {
    path: std::path::PathBuf,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl EngineProxy {
    fn start() -> EngineProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let path =
            std::env::temp_dir().join(format!("hodei-engine-{}.sock", Uuid::new_v4().simple()));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let up = std::sync::Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let up = up.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(async move {
                        if let Ok(mut engine) =
                            tokio::net::UnixStream::connect("/var/run/docker.sock").await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                        }
                    });
                }
            }
        });
        EngineProxy { path, up, task }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An engine that does not answer opens the docker provider's circuit: its jobs wait (they
/// do not fail), process jobs go on, and once the engine answers again the jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_does_not_answer_opens_the_circuit_and_jobs_wait() {
    let proxy = EngineProxy::start();
    let socket = format!("unix://{}", proxy.path.display());
    let system = System::start_with_docker(&[
        ("HODEI_DOCKER_SOCKET", &socket),
        ("HODEI_PROVIDER_CIRCUIT_THRESHOLD", "2"),
        ("HODEI_PROVIDER_CIRCUIT_OPEN_MS", "500"),
    ])
    .await;
    proxy.set_up(false);
    let requests: Vec<_> = (0..3)
        .map(|i| in_container("sh", &["-c", &format!("echo back {i}")]))
        .collect();
    let waiting: Vec<Uuid> = system.submit_all(&requests).await;
    let circuit = || async {
        let views: Vec<serde_json::Value> = hodei_messaging::api::request(
            &system.client,
            hodei_protocol::subjects::API_PROVIDERS_LIST,
            None,
            &serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        views
            .into_iter()
            .find(|v| v["provider"] == "docker")
            .map(|v| v["circuit"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    system
        .wait_for(
            "the docker circuit to open",
            Duration::from_secs(60),
            || async { circuit().await == "Open" },
        )
        .await;
    let meanwhile = system.submit(&job("true", &[])).await.unwrap().job_id;
    system
        .wait_until_settled(&[meanwhile], Duration::from_secs(30))
        .await;
    assert_eq!(
        system.get(meanwhile).await.unwrap().state,
        JobState::Succeeded
    );
    for job_id in &waiting {
        assert!(
            !system.get(*job_id).await.unwrap().state.is_terminal(),
            "a job waits while its provider's circuit is open"
        );
    }
    proxy.set_up(true);
    system
        .wait_until_settled(&waiting, Duration::from_secs(120))
        .await;
    for (i, job_id) in waiting.iter().enumerate() {
        let job = system.get(*job_id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(
            system.logs_first_line(*job_id).await,
            Some(format!("back {i}"))
        );
    }
    drop(system);
    drop(proxy);
}

/// Placement by labels and resources: a job whose selector no provider has is refused at
/// submission; a container job whose memory is taken waits Pending (and `get` says why),
/// then runs once the job holding it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_by_selector_and_resources() {
    let system = System::start_with_docker(&[
        ("HODEI_DOCKER_MEMORY_MB", "600"),
        ("HODEI_PROCESS_LABELS", "provider=process,zone=here"),
    ])
    .await;
    // The provider-manager records its offers at start; the scheduler reads them.
    system
        .wait_for("the providers' offers", Duration::from_secs(30), || async {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM provider_offers")
                .fetch_one(&system.pool)
                .await
                .unwrap();
            n == 2
        })
        .await;
    let mut nowhere = job("true", &[]);
    nowhere.selector = BTreeMap::from([("gpu".to_owned(), "a100".to_owned())]);
    let refused = system.submit(&nowhere).await.unwrap_err();
    assert_eq!(
        refused.code,
        hodei_protocol::ErrorCode::NoProvider,
        "{refused:?}"
    );
    assert!(refused.message.contains("gpu=a100"), "{refused:?}");
    let mut too_big = in_container("true", &[]);
    too_big.resources.memory_mb = Some(4096);
    assert_eq!(
        system.submit(&too_big).await.unwrap_err().code,
        hodei_protocol::ErrorCode::NoProvider
    );
    let mut here = job("true", &[]);
    here.selector = BTreeMap::from([("zone".to_owned(), "here".to_owned())]);
    let here = system.submit(&here).await.unwrap().job_id;

    let mut first = in_container("sh", &["-c", "sleep 6; echo first"]);
    first.resources.memory_mb = Some(400);
    let first = system.submit(&first).await.unwrap().job_id;
    system
        .wait_for("the first to run", Duration::from_secs(60), || async {
            system
                .get(first)
                .await
                .is_ok_and(|j| j.state == JobState::Running)
        })
        .await;
    let mut second = in_container("sh", &["-c", "echo second"]);
    second.resources.memory_mb = Some(400);
    let second = system.submit(&second).await.unwrap().job_id;
    // Once the dispatcher has handled everything queued, the job is still not placed.
    system
        .wait_for(
            "the dispatcher to catch up",
            Duration::from_secs(30),
            || async {
                system
                    .consumer_caught_up("HODEI_EVENTS", "dispatcher-job-queued")
                    .await
            },
        )
        .await;
    let waiting = system.get(second).await.unwrap();
    assert_eq!(
        waiting.state,
        JobState::Pending,
        "it waits for memory: {waiting:?}"
    );
    assert!(
        waiting
            .waiting_reason
            .as_deref()
            .is_some_and(|r| r.contains("capacity")),
        "{waiting:?}"
    );
    // A process job submitted after it is not held up by it: it runs while the container
    // job still waits.
    let process = system.submit(&job("true", &[])).await.unwrap().job_id;
    system
        .wait_until_settled(&[process], Duration::from_secs(10))
        .await;
    assert_eq!(
        system.get(process).await.unwrap().state,
        JobState::Succeeded
    );
    assert_eq!(system.get(second).await.unwrap().state, JobState::Pending);
    // A container job behind it waits behind it (placement takes container jobs in order),
    // and says so.
    let mut behind = in_container("sh", &["-c", "echo behind"]);
    behind.resources.memory_mb = Some(64);
    let behind = system.submit(&behind).await.unwrap().job_id;
    system
        .wait_for(
            "the container job behind to say so",
            Duration::from_secs(5),
            || async {
                let view = system.get(behind).await.unwrap();
                view.waiting_reason.as_deref().is_some_and(|r| {
                    r.starts_with(&format!("waiting behind job {second}, the next to place"))
                })
            },
        )
        .await;
    system
        .wait_until_settled(&[here, first, second, behind], Duration::from_secs(60))
        .await;
    for job_id in [here, first, second, process, behind] {
        assert_eq!(system.get(job_id).await.unwrap().state, JobState::Succeeded);
    }
    assert_eq!(
        system.logs_first_line(second).await.as_deref(),
        Some("second")
    );
}
