//! Jobs hold no keys of the control plane and cannot outlive their worker: the environment
//! is an allow-list, the process runs unprivileged, whatever it starts (`setsid`, double
//! forks) ends with it, and an agent without its control plane kills its job and exits.

use std::process::Command;
use std::time::{Duration, Instant};

use hodei_domain::JobState;
use hodei_tests::{alive, binary, job, System};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether this test runs as root (the provider then starts jobs as `hodei-job`).
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sees_only_its_allowed_environment_and_runs_unprivileged() {
    let system = System::start_with(&[("HODEI_SENTINEL_SECRET", "do-not-leak-me")]).await;
    let url = system.nats.url.clone();
    let creds = system.submitter_creds();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(binary("hodei"))
            .env("HODEI_NATS_CREDS", &creds)
            .args(["--nats-url", &url, "run", "-e", "MINE=kept", "--", "env"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "TZ",
        "MINE",
        "HODEI_JOB_ID",
        "HODEI_ATTEMPT",
        "HODEI_CORRELATION_ID",
        "TRACEPARENT",
        "TRACESTATE",
    ];
    for name in &names {
        assert!(allowed.contains(name), "the job got {name}:\n{stdout}");
    }
    for needed in [
        "PATH",
        "HOME",
        "MINE",
        "HODEI_JOB_ID",
        "HODEI_ATTEMPT",
        "HODEI_CORRELATION_ID",
    ] {
        assert!(names.contains(&needed), "the job lacks {needed}:\n{stdout}");
    }
    assert!(!stdout.contains("do-not-leak-me"));
    assert!(!stdout.contains("BEGIN NATS USER JWT") && !stdout.contains("postgres://"));

    let who = system.submit(&job("id", &["-u"])).await.unwrap().job_id;
    system
        .wait_until_settled(&[who], Duration::from_secs(30))
        .await;
    let uid: u32 = system
        .logs_first_line(who)
        .await
        .expect("id printed its uid")
        .trim()
        .parse()
        .unwrap();
    if root() {
        assert_ne!(
            uid, 0,
            "a job started by a root provider does not run as root"
        );
    }

    // Over a memory limit, the kernel kills the job (and what it started), not its agent.
    let score = job(
        "sh",
        &[
            "-c",
            "echo $(cat /proc/self/oom_score_adj) $(cat /proc/$PPID/oom_score_adj)",
        ],
    );
    let score = system.submit(&score).await.unwrap().job_id;
    system
        .wait_until_settled(&[score], Duration::from_secs(30))
        .await;
    assert_eq!(
        system.logs_first_line(score).await.as_deref(),
        Some("1000 0"),
        "the job's OOM score adjustment, then its agent's"
    );

    // The job's process leads a process group of its own, has the agent's limits for jobs
    // and no core dumps, none of the agent's supplementary groups, and no signal blocked or
    // ignored (the agent, a Rust program, ignores SIGPIPE; its job must not). `grep` reads
    // its own status as it starts, as the agent started it (a shell blocks every signal
    // for a moment each time it starts a child).
    let group = job("sh", &["-c", "echo $(cut -d' ' -f5 /proc/$$/stat) $$"]);
    let status = job(
        "grep",
        &[
            "-h",
            "-E",
            "^(Max open files|Max processes|Max core file size|SigBlk|SigIgn|Groups)",
            "/proc/self/limits",
            "/proc/self/status",
        ],
    );
    let (group, status) = (
        system.submit(&group).await.unwrap().job_id,
        system.submit(&status).await.unwrap().job_id,
    );
    system
        .wait_until_settled(&[group, status], Duration::from_secs(30))
        .await;
    let group = system.logs_first_line(group).await.expect("pgid and pid");
    let (pgid, pid) = group.split_once(' ').expect("pgid and pid");
    assert_eq!(pgid, pid, "a process group of its own: {group}");
    let lines = hodei_tests::lines_of(
        &system.logs_of(status).await,
        hodei_protocol::logs::LogStream::Stdout,
    );
    let words = |prefix: &str| -> Vec<String> {
        let line = lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {lines:?}"));
        line[prefix.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(words("Max open files")[..2], ["4096", "4096"], "{lines:?}");
    assert_eq!(words("Max processes")[..2], ["4096", "4096"], "{lines:?}");
    assert_eq!(words("Max core file size")[..2], ["0", "0"], "{lines:?}");
    assert_eq!(words("SigBlk:"), ["0000000000000000"], "{lines:?}");
    assert_eq!(words("SigIgn:"), ["0000000000000000"], "{lines:?}");
    if root() {
        assert!(
            words("Groups:").is_empty(),
            "no supplementary group: {lines:?}"
        );
    }
}

/// The pids a job printed, one per line, once it has printed `count` of them.
async fn printed_pids(system: &System, job_id: uuid::Uuid, count: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stream = system.js.get_stream("HODEI_LOGS").await.unwrap();
        let mut pids = Vec::new();
        let mut seq = 1;
        while let Ok(message) = stream
            .get_first_raw_message_by_subject(hodei_protocol::subjects::logs(job_id), seq)
            .await
        {
            seq = message.sequence + 1;
            let batch: hodei_protocol::logs::LogBatch =
                serde_json::from_slice(&message.payload).unwrap();
            pids.extend(
                batch
                    .lines
                    .iter()
                    .filter_map(|l| l.line.trim().parse::<u32>().ok()),
            );
        }
        if pids.len() >= count {
            return pids;
        }
        assert!(Instant::now() < deadline, "job {job_id} printed {pids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn gone(pids: &[u32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pids.iter().all(|pid| !alive(*pid)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Processes a job moved out of its process group and session (`setsid`, a double fork)
/// end when the job is cancelled. Without cgroups (as here) only the agent, a child
/// subreaper, can find them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_job_hides_with_setsid_and_double_forks_ends_at_cancel() {
    let system = System::start_with(&[("HODEI_CGROUP_ROOT", "off")]).await;
    let script = "setsid sh -c 'echo $$; exec sleep 300' & \
                  (setsid sh -c 'echo $$; exec sleep 301' &) ; \
                  echo $$; sleep 302";
    let job_id = system
        .submit(&job("sh", &["-c", script]))
        .await
        .unwrap()
        .job_id;
    let pids = printed_pids(&system, job_id, 3).await;
    assert!(pids.iter().all(|pid| alive(*pid)), "{pids:?} run");
    system.cancel(job_id).await.unwrap();
    system
        .wait_until_settled(&[job_id], Duration::from_secs(30))
        .await;
    assert_eq!(system.get(job_id).await.unwrap().state, JobState::Cancelled);
    assert!(
        gone(&pids, Duration::from_secs(10)).await,
        "processes of a cancelled job outlived it: {:?}",
        pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
}

/// With its nats-server gone, an agent kills its job and exits within its lost window and
/// its grace, instead of running on for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_its_control_plane_kills_its_job_and_exits() {
    let mut system = System::start_with(&[
        ("HODEI_WORKER_LOST_AFTER_MS", "2000"),
        ("HODEI_HEARTBEAT_INTERVAL_MS", "300"),
    ])
    .await;
    let job_id = system
        .submit(&job("sh", &["-c", "echo $$; exec sleep 300"]))
        .await
        .unwrap()
        .job_id;
    let job_pid = printed_pids(&system, job_id, 1).await[0];
    let agents = system.agent_pids();
    assert_eq!(agents.len(), 1, "one agent runs the job");
    // The services go first, so that nobody tears the worker down: only the agent itself
    // can end the job now.
    for service in &mut system.services {
        service.stop(Duration::from_secs(10));
    }
    assert!(alive(job_pid) && alive(agents[0]));
    let lost_at = Instant::now();
    system.nats.kill();
    // Lost window 2 s, grace 3 s, and room for a loaded machine.
    assert!(
        gone(&[job_pid, agents[0]], Duration::from_secs(15)).await,
        "the agent and its job still run {:?} after NATS went away",
        lost_at.elapsed()
    );
}

/// With cgroups, an agent is born in its worker's own cgroup (`clone3` into it), and so is
/// everything it starts: the job's process sees the worker's cgroup as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_and_its_job_run_in_the_workers_own_cgroup() {
    let system = System::start().await;
    let (view, line) = system
        .run_to_end(&job("sh", &["-c", "grep '^0::' /proc/self/cgroup"]))
        .await;
    assert_eq!(view.state, JobState::Succeeded, "{view:?}");
    let worker_id = view.worker_id.expect("a worker ran it");
    let line = line.expect("the job printed its cgroup");
    assert!(
        line.starts_with("0::/hodei-test-") && line.ends_with(&format!("/{worker_id}")),
        "the job ran in {line}, not in its worker's cgroup"
    );
}

/// A job's shell line that prints its agent's pid (`$PPID`) and that agent's parent's (from
/// /proc/<agent>/stat).
const PRINT_AGENT_AND_PARENT: &str =
    "read -r _ _ _ parent _ < /proc/$PPID/stat; echo $PPID $parent";

fn agent_and_parent_of(line: &str) -> (u32, u32) {
    let pids: Vec<u32> = line.split(' ').filter_map(|p| p.parse().ok()).collect();
    assert_eq!(pids.len(), 2, "the job printed {line:?}");
    (pids[0], pids[1])
}

/// Run a job to its end: its agent, and that agent's parent.
async fn agent_and_parent(system: &System) -> (u32, u32) {
    let (view, line) = system
        .run_to_end(&job("sh", &["-c", PRINT_AGENT_AND_PARENT]))
        .await;
    assert_eq!(view.state, JobState::Succeeded, "{view:?}");
    agent_and_parent_of(&line.expect("the job printed its agent's pid"))
}

/// With cgroups, agents are forked by one spawner (`hodei-agent --spawner`, a child of the
/// provider-manager), not exec'd one by one. The spawner was given no secret of the service
/// or of a worker, and it ends with the provider-manager; the next instance starts another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_forked_by_a_spawner_that_holds_no_secret_and_ends_with_its_service() {
    let mut system = System::start().await;
    assert!(system.cgroup.is_some(), "this test needs cgroups (v2)");
    let (first_agent, spawner) = agent_and_parent(&system).await;
    let (second_agent, second_parent) = agent_and_parent(&system).await;
    assert_ne!(first_agent, second_agent);
    assert_eq!(spawner, second_parent, "both agents come from one spawner");

    let cmdline = std::fs::read(format!("/proc/{spawner}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(text)
        .collect();
    assert!(
        args.len() == 2 && args[0].ends_with("hodei-agent") && args[1] == "--spawner",
        "the agents' parent is {args:?}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{spawner}/stat")).unwrap();
    let parent: u32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    let provider_manager = system.service("provider-manager").pid();
    assert_eq!(
        parent, provider_manager,
        "the spawner is the provider-manager's child"
    );
    let environ = text(&std::fs::read(format!("/proc/{spawner}/environ")).unwrap());
    for secret in [
        "HODEI_BOOTSTRAP_TOKEN",
        "HODEI_WORKER_ID",
        "HODEI_NATS_CREDS",
        "HODEI_DATABASE_URL",
    ] {
        assert!(
            !environ.contains(secret),
            "the spawner's environment holds {secret}"
        );
    }

    system.service("provider-manager").kill();
    system
        .wait_for(
            "the spawner to end with its provider-manager",
            Duration::from_secs(10),
            || {
                let ended = !alive(spawner);
                async move { ended }
            },
        )
        .await;
    system.restart("provider-manager");
    let (_, new_spawner) = agent_and_parent(&system).await;
    assert_ne!(
        new_spawner, spawner,
        "the new instance forks from a spawner of its own"
    );
}

/// A spawner killed -9 takes no agent with it: the agent it forked runs its job to the end
/// (and is torn down as ever), and the next agent's request starts another spawner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_spawner_loses_no_job_and_the_next_agent_starts_another() {
    let system = System::start().await;
    let script = format!("{PRINT_AGENT_AND_PARENT}; sleep 1");
    let running = system
        .submit(&job("sh", &["-c", &script]))
        .await
        .unwrap()
        .job_id;
    system
        .wait_for("the job to print", Duration::from_secs(30), || async {
            system.logs_first_line(running).await.is_some()
        })
        .await;
    let line = system.logs_first_line(running).await.unwrap();
    let (agent, spawner) = agent_and_parent_of(&line);
    // SAFETY: kill(2) of the spawner this test's provider-manager started.
    unsafe { libc::kill(spawner as i32, libc::SIGKILL) };
    system.wait_for_state(running, JobState::Succeeded).await;
    let (_, new_spawner) = agent_and_parent(&system).await;
    assert_ne!(new_spawner, spawner, "a new spawner forks the next agent");
    system.wait_all_settled(Duration::from_secs(30)).await;
    assert!(!alive(agent), "the first agent is gone with its worker");
    // The provider-manager saw that agent end through its pidfd, its spawner gone.
    let seen = format!("pid={agent} status=ended (after its spawner");
    system
        .wait_for(
            "the agent's end to be logged",
            Duration::from_secs(10),
            || {
                let found = system
                    .log_of("provider-manager")
                    .lines()
                    .any(|l| l.contains("agent exited") && l.contains(&seen));
                async move { found }
            },
        )
        .await;
}
