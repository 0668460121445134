//! Jobs in containers on the real Docker Engine (the Docker provider): each job in a
//! container of its own, with its labels and resources, removed at teardown; images come
//! from scripts/images.sh (no registry here).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
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
    let ids: Vec<Uuid> = join_all(requests.iter().map(|r| system.submit(r)))
        .await
        .into_iter()
        .map(|a| a.expect("accepted").job_id)
        .collect();
    system
        .wait_until_settled(&ids, Duration::from_secs(300))
        .await;

    let mut workers = HashSet::new();
    for (i, job_id) in ids.iter().enumerate() {
        let job = system.get(*job_id).await.unwrap();
        let batches = system.logs_of(*job_id).await;
        let lines = |stream: LogStream| -> Vec<String> {
            batches
                .iter()
                .flat_map(|b| &b.lines)
                .filter(|l| l.stream == stream)
                .map(|l| l.line.clone())
                .collect()
        };
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
