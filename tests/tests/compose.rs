//! `docker-compose.yml` runs Hodei for real on this machine: `scripts/compose.sh up` (images
//! built here, keys made, services up), then the README's command prints a job's output,
//! for a process job and for a container job; `scripts/compose.sh down` leaves nothing.

use std::collections::HashSet;
use std::process::Command;

use uuid::Uuid;

fn compose(project: &str, args: &[&str]) -> std::process::Output {
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/compose.sh"
    ))
    .args(args)
    .env("COMPOSE_PROJECT_NAME", project)
    .output()
    .expect("run scripts/compose.sh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Brings the project down whatever happens.
struct Project(String);

impl Drop for Project {
    fn drop(&mut self) {
        let down = compose(&self.0, &["down"]);
        if !down.status.success() {
            eprintln!("compose down: {}", text(&down.stderr));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_compose_runs_hodei_and_the_documented_command_prints_a_jobs_output() {
    let project = Project(format!(
        "hodeitest{}",
        &Uuid::new_v4().simple().to_string()[..12]
    ));
    let name = project.0.clone();
    let up = tokio::task::spawn_blocking({
        let name = name.clone();
        move || compose(&name, &["up"])
    })
    .await
    .unwrap();
    assert!(
        up.status.success(),
        "compose up failed:\n{}",
        text(&up.stderr)
    );
    let run = |args: &'static [&'static str]| {
        let name = name.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = vec!["run", "--rm", "-T", "cli"];
            all.extend_from_slice(args);
            compose(&name, &all)
        })
    };
    let process = run(&["run", "--", "sh", "-c", "echo hello from compose"])
        .await
        .unwrap();
    assert_eq!(
        text(&process.stdout),
        "hello from compose\n",
        "{}",
        text(&process.stderr)
    );
    let container = run(&[
        "run",
        "--image",
        "hodei/job-base:latest",
        "--",
        "sh",
        "-c",
        "echo hello from a container as $(id -u)",
    ])
    .await
    .unwrap();
    assert_eq!(
        text(&container.stdout),
        "hello from a container as 65534\n",
        "{}",
        text(&container.stderr)
    );
    // The services and the agents export their spans to the compose file's trace receiver
    // (hodei-trace-sink, where no Jaeger image can be built): a job is one trace there, from
    // the scheduler's acceptance to the agent's run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let logs = compose(&name, &["logs", "--no-color", "traces"]);
        let mut services_by_trace: std::collections::HashMap<String, HashSet<String>> =
            Default::default();
        for line in text(&logs.stdout).lines() {
            let Some(json) = line.find('{').map(|i| &line[i..]) else {
                continue;
            };
            if let Ok(span) = serde_json::from_str::<serde_json::Value>(json) {
                services_by_trace
                    .entry(span["trace_id"].as_str().unwrap_or_default().to_owned())
                    .or_default()
                    .insert(span["service"].as_str().unwrap_or_default().to_owned());
            }
        }
        let one_trace = services_by_trace
            .values()
            .any(|s| s.contains("hodei-scheduler") && s.contains("hodei-agent"));
        if one_trace {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no trace from the scheduler to the agent in the receiver's log: {services_by_trace:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    drop(project);
    let left = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=hodei.owner={name}"),
        ])
        .output()
        .unwrap();
    assert!(text(&left.stdout).trim().is_empty(), "job containers left");
    let services = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={name}"),
        ])
        .output()
        .unwrap();
    assert!(
        text(&services.stdout).trim().is_empty(),
        "compose containers left"
    );
}
