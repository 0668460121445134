//! `hodei-bench`: how much time and memory Hodei adds to a job, against the floor of the same
//! machine measured in the same run.
//!
//! It starts the whole system the way the system tests do (its own nats-server on a free port,
//! its own database on the PostgreSQL server, the six service binaries as processes, see
//! `hodei_tests::System`) and measures, in this order:
//!
//! 1. the floor: a NATS request/reply round trip to an echo responder, a JetStream publish with
//!    its ack (file storage, like Hodei's streams), a PostgreSQL single-row `INSERT` commit, and
//!    spawning a process and waiting for it; and, alone, the pieces of an agent's start-up
//!    (exec of `hodei-agent`, a new NATS connection, its command consumer);
//! 2. cold latency: jobs submitted one at a time with no worker ready, so each gets an
//!    ephemeral worker from the process provider. The job is `date +%s%N`: the process prints
//!    its own clock as it starts, which is the most truthful "process started" there is (the
//!    agent's `started` report and the `Running` record come after it). Each job, and its
//!    worker's teardown, ends before the next is submitted;
//! 3. throughput: many trivial jobs (`true`) submitted with a bounded number of requests in
//!    flight, jobs/s from the first submission until every job is terminal;
//! 4. peak RSS (VmHWM) of each service and of the agents, and CPU seconds per job of the
//!    control plane (utime + stime of the six service processes), with the agents, the
//!    nats-server and the PostgreSQL backends beside it for context.
//!
//! Then it profiles the cold jobs from the audit log: every event's `occurred_at` is stamped by
//! the process that made the change, so the median gap between consecutive events is where the
//! time goes; the outbox rows' `created_at` (the writer's transaction began) and `published_at`
//! (the relay's transaction began) take each relayed hop apart. Every wait has a deadline; a
//! phase that runs out of time reports what it measured and says so.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/hodei-bench --out bench-results.md
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use hodei_domain::DomainEvent;
use hodei_tests::{job, System};
use uuid::Uuid;

const USAGE: &str = "\
usage: hodei-bench [--cold N] [--throughput N] [--in-flight N] [--floor N] [--spawn N]
                   [--warmup N] [--deadline SECS] [--out FILE] [--keep-logs DIR]

  --cold N         cold jobs, one at a time (default 500)
  --throughput N   trivial jobs for the throughput run (default 5000)
  --in-flight N    submissions in flight at once in the throughput run (default 256)
  --floor N        samples of each network/database floor measurement (default 1000)
  --spawn N        samples of the process-spawn floor (default 200)
  --warmup N       cold jobs run first and not counted (default 5)
  --deadline SECS  longest time each phase may take (default 900)
  --out FILE       also write the report (markdown) to FILE
  --keep-logs DIR  copy the services' (and agents') logs to DIR before shutting down

The service binaries are taken from $HODEI_BIN_DIR, else from beside this executable.";

const TERMINAL: [&str; 4] = ["Succeeded", "Failed", "Cancelled", "Timeout"];
const OPEN_JOB: [&str; 4] = ["Pending", "Assigned", "Scheduled", "Running"];
const OPEN_WORKER: [&str; 6] = [
    "Creating",
    "Connecting",
    "Ready",
    "Busy",
    "Draining",
    "Terminating",
];

struct Options {
    cold: usize,
    throughput: usize,
    in_flight: usize,
    floor: usize,
    spawn: usize,
    warmup: usize,
    deadline: Duration,
    out: Option<PathBuf>,
    keep_logs: Option<PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut o = Options {
            cold: 500,
            throughput: 5000,
            in_flight: 256,
            floor: 1000,
            spawn: 200,
            warmup: 5,
            deadline: Duration::from_secs(900),
            out: None,
            keep_logs: None,
        };
        fn number(flag: &str, value: Option<String>) -> Result<usize, String> {
            let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
            value
                .replace(['_', ','], "")
                .parse()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        }
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--cold" => o.cold = number("--cold", args.next())?,
                "--throughput" => o.throughput = number("--throughput", args.next())?,
                "--in-flight" => o.in_flight = number("--in-flight", args.next())?,
                "--floor" => o.floor = number("--floor", args.next())?,
                "--spawn" => o.spawn = number("--spawn", args.next())?,
                "--warmup" => o.warmup = number("--warmup", args.next())?,
                "--deadline" => {
                    o.deadline = Duration::from_secs(number("--deadline", args.next())? as u64)
                }
                "--out" => o.out = Some(args.next().ok_or("--out needs a file")?.into()),
                "--keep-logs" => {
                    o.keep_logs = Some(args.next().ok_or("--keep-logs needs a folder")?.into())
                }
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument: {other}")),
            }
        }
        if o.in_flight == 0 || o.floor == 0 || o.spawn == 0 {
            return Err("--in-flight, --floor and --spawn must be at least 1".into());
        }
        Ok(o)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("hodei-bench: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "starting nats-server, a database and the six services from {}",
        hodei_tests::bin_dir().display()
    );
    // The harness keeps services' pools small for parallel tests; measure the services as
    // they ship (their default pool of 10 connections).
    let system = System::start_with(&[("HODEI_DB_POOL_SIZE", "10")]).await;
    let outcome = bench(&system, &options).await;
    // Agents still alive (a phase that ran out of time) were started by this run: end them,
    // each by its process group (the process provider makes every agent a group leader).
    for pid in system.live_agents() {
        // SAFETY: kill(2) of a process group this run started; no memory effects.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
    // The harness removes its logs when the system stops.
    if let Some(dir) = &options.keep_logs {
        let copied = std::fs::create_dir_all(dir).and_then(|()| {
            for entry in std::fs::read_dir(&system.log_dir)? {
                let entry = entry?;
                std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
            }
            Ok(())
        });
        match copied {
            Ok(()) => eprintln!("logs copied to {}", dir.display()),
            Err(error) => eprintln!(
                "hodei-bench: cannot copy the logs to {}: {error}",
                dir.display()
            ),
        }
    }
    drop(system);
    match outcome {
        Ok(report) => {
            println!("{report}");
            if let Some(out) = &options.out {
                if let Err(error) = std::fs::write(out, &report) {
                    eprintln!("hodei-bench: cannot write {}: {error}", out.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("written to {}", out.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("hodei-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(system: &System, options: &Options) -> anyhow::Result<String> {
    let machine = Machine::describe(system).await?;
    let services: Vec<(String, u32)> = system
        .services
        .iter()
        .map(|s| (s.name.clone(), s.pid()))
        .collect();
    let provider_manager = services
        .iter()
        .find(|(n, _)| n == "provider-manager")
        .map(|(_, p)| *p)
        .expect("six services");
    let nats_pid = nats_server_pid(system.nats.port);
    let rss_at_start: Vec<u64> = services
        .iter()
        .map(|(_, pid)| status_kb(*pid, "VmRSS:").unwrap_or(0))
        .collect();

    eprintln!(
        "floor: {} NATS round trips, JetStream publishes and PostgreSQL commits, {} spawns",
        options.floor, options.spawn
    );
    let floor = measure_floor(system, options).await?;

    eprintln!(
        "cold: {} jobs one at a time (+{} not counted)",
        options.cold, options.warmup
    );
    let cpu_before = CpuSnapshot::take(system, &services, nats_pid).await;
    let sampler = AgentSampler::start(system, provider_manager, Duration::from_millis(5)).await?;
    let cold = cold_run(system, options).await?;
    let cold_agents = sampler.finish();
    let cpu_cold = CpuSnapshot::take(system, &services, nats_pid)
        .await
        .since(&cpu_before);
    let rss_after_cold: Vec<u64> = services
        .iter()
        .map(|(_, pid)| status_kb(*pid, "VmRSS:").unwrap_or(0))
        .collect();
    eprintln!(
        "cold: profiling {} jobs from the audit log",
        cold.jobs.len()
    );
    let profile = profile_cold(system, &cold).await?;

    eprintln!(
        "throughput: {} jobs, {} submissions in flight",
        options.throughput, options.in_flight
    );
    let cpu_before = CpuSnapshot::take(system, &services, nats_pid).await;
    // Many agents live at once here: read them less often, and watch the machine's memory.
    let sampler = AgentSampler::start(system, provider_manager, Duration::from_millis(50)).await?;
    let throughput = throughput_run(system, options, &sampler.low_memory).await?;
    let throughput_agents = sampler.finish();
    let cpu_throughput = CpuSnapshot::take(system, &services, nats_pid)
        .await
        .since(&cpu_before);

    let memory: Vec<ServiceMemory> = services
        .iter()
        .zip(rss_at_start.iter().zip(&rss_after_cold))
        .map(|((name, pid), (start, after_cold))| ServiceMemory {
            name: name.clone(),
            rss_start_kb: *start,
            rss_after_cold_kb: *after_cold,
            rss_end_kb: status_kb(*pid, "VmRSS:").unwrap_or(0),
            hwm_kb: status_kb(*pid, "VmHWM:").unwrap_or(0),
        })
        .collect();

    let mut s = String::new();
    report(
        &mut s,
        options,
        &machine,
        &floor,
        &cold,
        &profile,
        &throughput,
        &memory,
        (&cold_agents, &throughput_agents),
        (&cpu_cold, &cpu_throughput),
    )?;
    Ok(s)
}

// ----- statistics -----

/// Percentiles of a sample, in milliseconds (nearest rank).
#[derive(Clone, Copy)]
struct Summary {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Summary {
            n: v.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: v[v.len() - 1],
        })
    }

    fn cells(summary: Option<Summary>) -> String {
        match summary {
            Some(s) => format!(
                "{} | {} | {} | {} | {}",
                s.n,
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.max)
            ),
            None => "0 | – | – | – | –".to_owned(),
        }
    }
}

fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.3}")
    } else if value < 1000.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn between_ms(later: DateTime<Utc>, earlier: DateTime<Utc>) -> f64 {
    (later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

// ----- the floor -----

struct Floor {
    nats_round_trip: Option<Summary>,
    jetstream_publish: Option<Summary>,
    postgres_commit: Option<Summary>,
    spawn_true: Option<Summary>,
    /// The parent's clock before spawning `date +%s%N` to the clock the child prints: how late
    /// the cold runs' "process start" can be read, at best.
    spawn_date_start: Option<Summary>,
    synchronous_commit: String,
    /// The pieces of an agent's start-up, measured alone: exec of the agent binary (to its
    /// `--help`), a new NATS connection, and the agent's command consumer.
    spawn_agent_help: Option<Summary>,
    nats_connect: Option<Summary>,
    create_consumer: Option<Summary>,
}

async fn measure_floor(system: &System, options: &Options) -> anyhow::Result<Floor> {
    const WARMUP: usize = 20;
    let payload = bytes::Bytes::from(vec![b'x'; 256]);

    // NATS: an echo responder on a connection of its own, as a service would be.
    let responder = async_nats::connect(&system.nats.url)
        .await
        .context("connect the echo responder")?;
    let mut echo = responder.subscribe("hodei-bench.echo").await?;
    responder.flush().await?;
    let echo_task = tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    // The subscription travels on the responder's connection, the requests on another: the
    // server may see a request first. Ask until the responder answers.
    let ready_by = Instant::now() + Duration::from_secs(5);
    while system
        .client
        .request("hodei-bench.echo", payload.clone())
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < ready_by,
            "the echo responder never answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::with_capacity(options.floor);
    for i in 0..options.floor + WARMUP {
        let t = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            system.client.request("hodei-bench.echo", payload.clone()),
        )
        .await
        .context("echo request timed out")?
        .context("echo request")?;
        if i >= WARMUP {
            samples.push(elapsed_ms(t));
        }
    }
    echo_task.abort();
    let nats_round_trip = Summary::of(&samples);

    // JetStream: a file-backed stream like Hodei's own, one publish awaited to its ack at a time.
    use async_nats::jetstream::stream;
    system
        .js
        .create_stream(stream::Config {
            name: "HODEI_BENCH_FLOOR".into(),
            subjects: vec!["hodei-bench.js.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("create the floor stream")?;
    let mut samples = Vec::with_capacity(options.floor);
    for i in 0..options.floor + WARMUP {
        let t = Instant::now();
        let ack = system
            .js
            .publish(format!("hodei-bench.js.{i}"), payload.clone())
            .await
            .context("publish")?;
        tokio::time::timeout(Duration::from_secs(5), ack)
            .await
            .context("publish ack timed out")?
            .context("publish ack")?;
        if i >= WARMUP {
            samples.push(elapsed_ms(t));
        }
    }
    let _ = system.js.delete_stream("HODEI_BENCH_FLOOR").await;
    let jetstream_publish = Summary::of(&samples);

    // PostgreSQL: one autocommit INSERT of a small row, on one connection: each is a commit.
    let mut conn = system.pool.acquire().await?;
    sqlx::query("CREATE TABLE hodei_bench_floor (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), payload jsonb NOT NULL)")
        .execute(&mut *conn)
        .await?;
    let row = serde_json::json!({ "job_id": Uuid::now_v7(), "state": "Running", "note": "x".repeat(128) });
    let mut samples = Vec::with_capacity(options.floor);
    for i in 0..options.floor + WARMUP {
        let t = Instant::now();
        sqlx::query("INSERT INTO hodei_bench_floor (payload) VALUES ($1)")
            .bind(&row)
            .execute(&mut *conn)
            .await?;
        if i >= WARMUP {
            samples.push(elapsed_ms(t));
        }
    }
    sqlx::query("DROP TABLE hodei_bench_floor")
        .execute(&mut *conn)
        .await?;
    let (synchronous_commit,): (String,) = sqlx::query_as("SHOW synchronous_commit")
        .fetch_one(&mut *conn)
        .await?;
    drop(conn);
    let postgres_commit = Summary::of(&samples);

    // Processes: tokio's spawn and wait, the calls the agent and the process provider make.
    let mut samples = Vec::with_capacity(options.spawn);
    for i in 0..options.spawn + 5 {
        let t = Instant::now();
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new("/bin/true").status(),
        )
        .await
        .context("/bin/true timed out")??;
        anyhow::ensure!(status.success(), "/bin/true failed: {status}");
        if i >= 5 {
            samples.push(elapsed_ms(t));
        }
    }
    let spawn_true = Summary::of(&samples);

    let mut samples = Vec::with_capacity(options.spawn);
    for i in 0..options.spawn + 5 {
        let before = Utc::now();
        let output = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new("date").arg("+%s%N").output(),
        )
        .await
        .context("date timed out")??;
        let printed = parse_clock(&String::from_utf8_lossy(&output.stdout))
            .context("date printed no clock")?;
        if i >= 5 {
            samples.push(between_ms(printed, before));
        }
    }
    let spawn_date_start = Summary::of(&samples);

    // What every agent does before it can register, one piece at a time.
    let agent_bin = hodei_tests::binary("hodei-agent");
    let mut samples = Vec::with_capacity(options.spawn);
    for i in 0..options.spawn + 5 {
        let t = Instant::now();
        let output = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new(&agent_bin)
                .arg("--help")
                .output(),
        )
        .await
        .context("hodei-agent --help timed out")??;
        anyhow::ensure!(
            output.status.success(),
            "hodei-agent --help failed: {}",
            output.status
        );
        if i >= 5 {
            samples.push(elapsed_ms(t));
        }
    }
    let spawn_agent_help = Summary::of(&samples);
    let mut connect = Vec::with_capacity(options.spawn);
    let mut consumer = Vec::with_capacity(options.spawn);
    for i in 0..options.spawn + 5 {
        use async_nats::jetstream::consumer::{pull, AckPolicy};
        // `connect` returns before the connection is up (it retries the first connect in
        // the background): the first request carries the handshake, as it does in the agent.
        let t = Instant::now();
        let client = hodei_messaging::connect(&system.nats.url, "hodei-bench").await?;
        let js = async_nats::jetstream::new(client.clone());
        let stream =
            tokio::time::timeout(Duration::from_secs(5), js.get_stream("HODEI_WORKER_CMDS"))
                .await
                .context("get_stream timed out")??;
        let connected = elapsed_ms(t);
        let t = Instant::now();
        let config = pull::Config {
            filter_subject: format!("hodei.worker.{}.cmd", Uuid::new_v4()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        };
        let made = tokio::time::timeout(Duration::from_secs(5), stream.create_consumer(config))
            .await
            .context("consumer creation timed out")??;
        let created = elapsed_ms(t);
        let _ = stream.delete_consumer(&made.cached_info().name).await;
        drop(client);
        if i >= 5 {
            connect.push(connected);
            consumer.push(created);
        }
    }

    Ok(Floor {
        nats_round_trip,
        jetstream_publish,
        postgres_commit,
        spawn_true,
        spawn_date_start,
        synchronous_commit,
        spawn_agent_help,
        nats_connect: Summary::of(&connect),
        create_consumer: Summary::of(&consumer),
    })
}

/// `date +%s%N` output: nanoseconds since the epoch.
fn parse_clock(text: &str) -> Option<DateTime<Utc>> {
    let nanos: i64 = text.trim().parse().ok()?;
    Some(DateTime::from_timestamp_nanos(nanos))
}

// ----- cold latency -----

struct ColdJob {
    job_id: Uuid,
    correlation_id: String,
    /// The client's clock just before the submit request was sent.
    submitted_at: DateTime<Utc>,
    /// The submit request's round trip (accepted).
    submit_ms: f64,
    /// When the client received the job's terminal event from NATS.
    seen_terminal_at: Option<DateTime<Utc>>,
    /// Until the worker was Terminated (the next job waits for this).
    settled_ms: Option<f64>,
}

struct Cold {
    jobs: Vec<ColdJob>,
    requested: usize,
    timed_out: usize,
    incomplete: Option<String>,
    elapsed: Duration,
}

async fn cold_run(system: &System, options: &Options) -> anyhow::Result<Cold> {
    // Every job event, as any client could watch them; the job's terminal event ends its wait.
    let mut events = system.client.subscribe("hodei.events.job.>").await?;
    system.client.flush().await?;
    let phase_deadline = Instant::now() + options.deadline;
    let started = Instant::now();
    let mut jobs = Vec::with_capacity(options.cold);
    let mut timed_out = 0;
    let mut incomplete = None;
    for i in 0..options.warmup + options.cold {
        if Instant::now() > phase_deadline {
            incomplete = Some(format!(
                "stopped after {} jobs: the phase deadline ({} s) passed",
                jobs.len(),
                options.deadline.as_secs()
            ));
            break;
        }
        let submitted_at = Utc::now();
        let t = Instant::now();
        let accepted = match system.submit(&job("date", &["+%s%N"])).await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("cold job {i}: submit failed: {error:?}");
                timed_out += 1;
                if timed_out >= 3 {
                    incomplete = Some(format!(
                        "stopped after {timed_out} jobs failed to be submitted or to settle"
                    ));
                    break;
                }
                continue;
            }
        };
        let submit_ms = elapsed_ms(t);
        let job_deadline = Instant::now() + Duration::from_secs(60);
        let seen_terminal_at =
            wait_terminal(system, &mut events, accepted.job_id, job_deadline).await;
        let settled = wait_worker_terminated(system, accepted.job_id, job_deadline).await;
        if seen_terminal_at.is_none() || !settled {
            eprintln!("cold job {}: not settled within 60 s", accepted.job_id);
            timed_out += 1;
            if timed_out >= 3 {
                incomplete = Some(format!(
                    "stopped after {timed_out} jobs failed to be submitted or to settle"
                ));
                break;
            }
            continue;
        }
        if i < options.warmup {
            continue;
        }
        jobs.push(ColdJob {
            job_id: accepted.job_id,
            correlation_id: accepted.correlation_id,
            submitted_at,
            submit_ms,
            seen_terminal_at,
            settled_ms: Some(elapsed_ms(t)),
        });
        if jobs.len() % 50 == 0 {
            eprintln!("cold: {} of {}", jobs.len(), options.cold);
        }
    }
    Ok(Cold {
        jobs,
        requested: options.cold,
        timed_out,
        incomplete,
        elapsed: started.elapsed(),
    })
}

/// The time the job's terminal event reached us, or None at the deadline. Events of other
/// (earlier) jobs are skipped. A lost event is covered by asking the database each second.
async fn wait_terminal(
    system: &System,
    events: &mut async_nats::Subscriber,
    job_id: Uuid,
    deadline: Instant,
) -> Option<DateTime<Utc>> {
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
            Ok(Some(message)) => {
                let received = Utc::now();
                let Ok(event) = serde_json::from_slice::<DomainEvent>(&message.payload) else {
                    continue;
                };
                if event.aggregate_id == job_id && ends_job(&event) {
                    return Some(received);
                }
            }
            Ok(None) => return None,
            Err(_) => {
                if let Ok(view) = system.get(job_id).await {
                    if view.state.is_terminal() {
                        return Some(Utc::now());
                    }
                }
            }
        }
    }
    None
}

fn ends_job(event: &DomainEvent) -> bool {
    match event.event_type.as_str() {
        "JobCompleted" | "JobExecutionError" => true,
        "JobStatusChanged" => event
            .payload
            .get("to")
            .and_then(|t| t.as_str())
            .is_some_and(|to| TERMINAL.contains(&to)),
        _ => false,
    }
}

/// Whether the job's worker reached Terminated before the deadline.
async fn wait_worker_terminated(system: &System, job_id: Uuid, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        let state: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT w.state FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id WHERE j.id = $1",
        )
        .bind(job_id)
        .fetch_optional(&system.pool)
        .await
        .ok()
        .flatten();
        if matches!(state, Some((Some(ref s),)) if s == "Terminated") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

// ----- profile of the cold jobs from the audit log -----

/// One step of a job's timeline. For a step written through the outbox, `begun` is when its
/// transaction began (the outbox row's `created_at`, PostgreSQL's `now()`) and `relayed` when
/// the relay's transaction that published it began (`published_at`, also `now()`).
#[derive(Clone)]
struct Step {
    label: String,
    actor: String,
    at: DateTime<Utc>,
    begun: Option<DateTime<Utc>>,
    relayed: Option<DateTime<Utc>>,
}

/// A sample per step of the profiled order.
type PerStep = Vec<Vec<f64>>;

struct Profile {
    /// Submit → the job's process printed its clock.
    to_process_start: Vec<f64>,
    /// Submit → JobStatusChanged to Running (the scheduler applied the agent's `started`).
    to_running_recorded: Vec<f64>,
    /// Submit → JobCompleted (the scheduler applied the agent's `finished`; commit follows).
    to_result_recorded: Vec<f64>,
    /// Submit → the client received JobCompleted from NATS.
    to_result_seen: Vec<f64>,
    submit_round_trip: Vec<f64>,
    settled: Vec<f64>,
    /// The most common order of steps, and how many jobs followed it.
    sequence: Vec<String>,
    actors: Vec<String>,
    following: usize,
    /// The gap from the step before, and the time since submit.
    gaps: PerStep,
    offsets: PerStep,
    /// A gap taken apart: the step before relayed → this step's transaction begins (publish,
    /// delivery, decoding); begins → stamped (its reads and decision); stamped → relayed (the
    /// rest of its transaction, commit, NOTIFY, the relay waking up).
    relay_to_begin: PerStep,
    begin_to_stamp: PerStep,
    stamp_to_relay: PerStep,
    /// Jobs whose audit trail or process clock was missing.
    unprofiled: usize,
}

const SUBMIT: &str = "submit (client's clock)";
const PROCESS_START: &str = "process start (job's clock)";

/// The steps a service takes because the relay published an earlier one (or the RunJob
/// command). The others are caused by a request or an agent's report, not by the outbox.
const CAUSED_BY: [(&str, &str); 6] = [
    ("WorkerProvisioningRequested", "JobQueued"),
    ("WorkerProvisioned", "WorkerProvisioningRequested"),
    ("WorkerStatusChanged → Busy", "WorkerReadyForJob"),
    (PROCESS_START, "RunJob"),
    ("WorkerTerminating", "JobCompleted → Succeeded"),
    ("WorkerTerminated", "WorkerTerminating"),
];

async fn profile_cold(system: &System, cold: &Cold) -> anyhow::Result<Profile> {
    let correlations: Vec<String> = cold.jobs.iter().map(|j| j.correlation_id.clone()).collect();
    // The audit service records events as it consumes them: wait until each job's trail ends
    // with its worker's WorkerTerminated (the last event of an ephemeral job).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (complete,): (i64,) = sqlx::query_as(
            "SELECT count(DISTINCT correlation_id) FROM audit_log \
             WHERE correlation_id = ANY($1) AND event_type = 'WorkerTerminated'",
        )
        .bind(&correlations)
        .fetch_one(&system.pool)
        .await?;
        if complete as usize >= correlations.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    type Row = (
        String,
        DateTime<Utc>,
        String,
        String,
        serde_json::Value,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.correlation_id, a.occurred_at, a.event_type, a.actor, a.payload, o.created_at, o.published_at \
         FROM audit_log a LEFT JOIN outbox_events o ON o.event_id = a.event_id \
         WHERE a.correlation_id = ANY($1) ORDER BY a.occurred_at, a.seq",
    )
    .bind(&correlations)
    .fetch_all(&system.pool)
    .await?;
    // The RunJob command is not an event (not audited); it travels in the outbox with the
    // assignment, and the job's process start is what it causes.
    let commands: Vec<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT metadata->>'correlation_id', published_at FROM outbox_events \
         WHERE event_type = 'RunJob' AND metadata->>'correlation_id' = ANY($1)",
    )
    .bind(&correlations)
    .fetch_all(&system.pool)
    .await?;
    let run_job_relayed: HashMap<String, DateTime<Utc>> = commands
        .into_iter()
        .filter_map(|(c, at)| Some((c, at?)))
        .collect();
    let mut trails: HashMap<String, Vec<Step>> = HashMap::new();
    for (correlation, at, event_type, actor, payload, begun, relayed) in rows {
        // A status change is named by the state it goes to: a job changes more than once.
        let label = match payload.get("to").and_then(|t| t.as_str()) {
            Some(to) => format!("{event_type} → {to}"),
            None => event_type,
        };
        let actor = if actor.starts_with("worker:") {
            "agent".to_owned()
        } else {
            actor
        };
        trails.entry(correlation).or_default().push(Step {
            label,
            actor,
            at,
            begun,
            relayed,
        });
    }

    let mut p = Profile {
        to_process_start: vec![],
        to_running_recorded: vec![],
        to_result_recorded: vec![],
        to_result_seen: vec![],
        submit_round_trip: vec![],
        settled: vec![],
        sequence: vec![],
        actors: vec![],
        following: 0,
        gaps: vec![],
        offsets: vec![],
        relay_to_begin: vec![],
        begin_to_stamp: vec![],
        stamp_to_relay: vec![],
        unprofiled: 0,
    };
    let mut timelines: Vec<(Vec<Step>, Option<DateTime<Utc>>)> = Vec::new();
    for job in &cold.jobs {
        p.submit_round_trip.push(job.submit_ms);
        p.settled.extend(job.settled_ms);
        if let Some(seen) = job.seen_terminal_at {
            p.to_result_seen.push(between_ms(seen, job.submitted_at));
        }
        let process_start = system
            .logs_first_line(job.job_id)
            .await
            .as_deref()
            .and_then(parse_clock);
        let Some(mut trail) = trails.remove(&job.correlation_id) else {
            p.unprofiled += 1;
            continue;
        };
        let find = |label: &str| {
            trail
                .iter()
                .find(|step| step.label == label)
                .map(|step| step.at)
        };
        if let Some(at) = find("JobStatusChanged → Running") {
            p.to_running_recorded.push(between_ms(at, job.submitted_at));
        }
        if let Some(at) = find("JobCompleted → Succeeded").or_else(|| find("JobCompleted → Failed"))
        {
            p.to_result_recorded.push(between_ms(at, job.submitted_at));
        }
        let Some(process_start) = process_start else {
            p.unprofiled += 1;
            continue;
        };
        p.to_process_start
            .push(between_ms(process_start, job.submitted_at));
        let step = |label: &str, actor: &str, at| Step {
            label: label.into(),
            actor: actor.into(),
            at,
            begun: None,
            relayed: None,
        };
        trail.push(step(SUBMIT, "client", job.submitted_at));
        trail.push(step(PROCESS_START, "job", process_start));
        // Stable: events stamped at the same instant keep their recording order.
        trail.sort_by_key(|step| step.at);
        timelines.push((trail, run_job_relayed.get(&job.correlation_id).copied()));
    }

    // The order of steps can differ between jobs where two services act at once; profile the
    // most common order, over the jobs that followed it.
    let mut orders: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for (t, _) in &timelines {
        *orders
            .entry(t.iter().map(|step| step.label.clone()).collect())
            .or_default() += 1;
    }
    let Some((sequence, _)) = orders.into_iter().max_by_key(|(_, n)| *n) else {
        return Ok(p);
    };
    let empty = || vec![Vec::new(); sequence.len()];
    (
        p.gaps,
        p.offsets,
        p.relay_to_begin,
        p.begin_to_stamp,
        p.stamp_to_relay,
    ) = (empty(), empty(), empty(), empty(), empty());
    for (t, run_job) in timelines
        .iter()
        .filter(|(t, _)| t.iter().map(|step| &step.label).eq(sequence.iter()))
    {
        p.following += 1;
        if p.actors.is_empty() {
            p.actors = t.iter().map(|step| step.actor.clone()).collect();
        }
        for (i, step) in t.iter().enumerate() {
            let previous = if i == 0 { step } else { &t[i - 1] };
            p.gaps[i].push(between_ms(step.at, previous.at));
            p.offsets[i].push(between_ms(step.at, t[0].at));
            let cause = CAUSED_BY
                .iter()
                .find(|(effect, _)| *effect == step.label)
                .map(|(_, cause)| *cause);
            let cause_relayed = match cause {
                Some("RunJob") => *run_job,
                Some(cause) => t.iter().find(|s| s.label == cause).and_then(|s| s.relayed),
                None => None,
            };
            // The process start has no transaction: its "begin" is the start itself.
            let begun = if step.label == PROCESS_START {
                Some(step.at)
            } else {
                step.begun
            };
            if let (Some(relayed), Some(begun)) = (cause_relayed, begun) {
                p.relay_to_begin[i].push(between_ms(begun, relayed));
            }
            if let Some(begun) = step.begun {
                p.begin_to_stamp[i].push(between_ms(step.at, begun));
            }
            if let Some(relayed) = step.relayed {
                p.stamp_to_relay[i].push(between_ms(relayed, step.at));
            }
        }
    }
    p.sequence = sequence;
    Ok(p)
}

// ----- throughput -----

struct Throughput {
    jobs: usize,
    accepted: usize,
    refused: usize,
    in_flight: usize,
    submit_secs: f64,
    /// From the first submission to the last job's terminal change (its `updated_at`).
    all_terminal_secs: Option<f64>,
    succeeded: usize,
    /// How the accepted jobs ended (or where they were at the deadline).
    states: Vec<(String, i64)>,
    /// From the first submission until every worker was Terminated.
    settled_secs: Option<f64>,
    incomplete: Option<String>,
}

async fn throughput_run(
    system: &System,
    options: &Options,
    low_memory: &AtomicBool,
) -> anyhow::Result<Throughput> {
    let n = options.throughput;
    let phase_deadline = Instant::now() + options.deadline;
    let first_submit = Utc::now();
    let t = Instant::now();
    let results: Vec<Option<Uuid>> = futures::stream::iter(0..n)
        .map(|_| async move {
            // Stop adding load when the machine runs short of memory; the jobs already
            // accepted are still measured.
            if low_memory.load(Ordering::Relaxed) || Instant::now() > phase_deadline {
                return None;
            }
            system
                .submit(&job("true", &[]))
                .await
                .ok()
                .map(|a| a.job_id)
        })
        .buffer_unordered(options.in_flight)
        .collect()
        .await;
    let submit_secs = t.elapsed().as_secs_f64();
    let ids: Vec<Uuid> = results.iter().flatten().copied().collect();
    let mut incomplete = low_memory
        .load(Ordering::Relaxed)
        .then(|| "submissions stopped: the machine had under 1 GiB of memory available".to_owned());
    eprintln!(
        "throughput: {} accepted in {submit_secs:.1} s; waiting for them to end",
        ids.len()
    );

    // Poll what is still open (an index range on (state, created_at), cheap while most jobs
    // are done) rather than the whole set: the polling must not be a load of its own.
    let mut last_report = Instant::now();
    let mut terminal = 0usize;
    while Instant::now() < phase_deadline {
        let (open,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE state = ANY($1) AND created_at >= $2")
                .bind(&OPEN_JOB[..])
                .bind(first_submit)
                .fetch_one(&system.pool)
                .await?;
        terminal = ids.len().saturating_sub(open as usize);
        if open == 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "throughput: {terminal} of {} terminal after {:.0} s",
                ids.len(),
                t.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM jobs WHERE id = ANY($1) GROUP BY state ORDER BY 2 DESC",
    )
    .bind(&ids)
    .fetch_all(&system.pool)
    .await?;
    let succeeded = states
        .iter()
        .find(|(state, _)| state == "Succeeded")
        .map_or(0, |(_, n)| *n as usize);
    let (last_change,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT max(updated_at) FROM jobs WHERE id = ANY($1) AND state = ANY($2)")
            .bind(&ids)
            .bind(&TERMINAL[..])
            .fetch_one(&system.pool)
            .await?;
    let all_terminal_secs = if terminal == ids.len() {
        last_change.map(|at| between_ms(at, first_submit) / 1000.0)
    } else {
        incomplete.get_or_insert_with(|| {
            format!(
                "{terminal} of {} jobs terminal when the phase deadline ({} s) passed",
                ids.len(),
                options.deadline.as_secs()
            )
        });
        None
    };

    // The workers' teardown is part of each job's cost (and of the CPU per job).
    let settle_deadline = Instant::now() + Duration::from_secs(300).min(options.deadline);
    let mut settled_secs = None;
    while Instant::now() < settle_deadline {
        let (open,): (i64,) = sqlx::query_as("SELECT count(*) FROM workers WHERE state = ANY($1)")
            .bind(&OPEN_WORKER[..])
            .fetch_one(&system.pool)
            .await?;
        if open == 0 {
            settled_secs = Some(t.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Throughput {
        jobs: n,
        accepted: ids.len(),
        refused: n - ids.len(),
        in_flight: options.in_flight,
        submit_secs,
        all_terminal_secs,
        succeeded,
        states,
        settled_secs,
        incomplete,
    })
}

// ----- processes: memory and CPU from /proc -----

/// A `Vm*:` line of /proc/<pid>/status, in kB.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The fields of /proc/<pid>/stat after the command name: [0] is the state (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// utime + stime of the process itself (not of its reaped children), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_seconds(pid, 11, 12)
}

/// cutime + cstime: what the process' children that it has waited for used, in seconds.
fn children_cpu_seconds(pid: u32) -> Option<f64> {
    stat_seconds(pid, 13, 14)
}

fn stat_seconds(pid: u32, user: usize, system: usize) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(user)?.parse::<u64>().ok()? + f.get(system)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / per_second)
}

fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

fn nats_server_pid(port: u16) -> Option<u32> {
    let port = port.to_string();
    pids().find(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.first().is_some_and(|a| a.ends_with(b"nats-server"))
            && args
                .windows(2)
                .any(|w| w[0] == b"-p" && w[1] == port.as_bytes())
    })
}

/// CPU seconds consumed so far by the services, the agents (and their jobs: the children the
/// provider-manager has reaped), the nats-server and this database's PostgreSQL backends.
#[derive(Default)]
struct CpuSnapshot {
    services: BTreeMap<String, f64>,
    agents: f64,
    nats: f64,
    postgres: HashMap<u32, f64>,
}

impl CpuSnapshot {
    async fn take(system: &System, services: &[(String, u32)], nats: Option<u32>) -> CpuSnapshot {
        let backends: Vec<(i32,)> =
            sqlx::query_as("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
                .fetch_all(&system.pool)
                .await
                .unwrap_or_default();
        CpuSnapshot {
            services: services
                .iter()
                .map(|(name, pid)| (name.clone(), cpu_seconds(*pid).unwrap_or(0.0)))
                .collect(),
            agents: services
                .iter()
                .find(|(name, _)| name == "provider-manager")
                .and_then(|(_, pid)| children_cpu_seconds(*pid))
                .unwrap_or(0.0),
            nats: nats.and_then(cpu_seconds).unwrap_or(0.0),
            postgres: backends
                .iter()
                .filter_map(|(pid,)| Some((*pid as u32, cpu_seconds(*pid as u32)?)))
                .collect(),
        }
    }

    /// What was consumed between `before` and this snapshot. A backend that exited in between
    /// is not counted (the services keep their pools' connections open).
    fn since(&self, before: &CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            services: self
                .services
                .iter()
                .map(|(n, s)| (n.clone(), s - before.services.get(n).unwrap_or(&0.0)))
                .collect(),
            agents: self.agents - before.agents,
            nats: self.nats - before.nats,
            postgres: self
                .postgres
                .iter()
                .map(|(pid, s)| (*pid, s - before.postgres.get(pid).unwrap_or(&0.0)))
                .collect(),
        }
    }

    fn control_plane(&self) -> f64 {
        self.services.values().sum()
    }
}

struct ServiceMemory {
    name: String,
    rss_start_kb: u64,
    rss_after_cold_kb: u64,
    rss_end_kb: u64,
    hwm_kb: u64,
}

/// What a sampler saw of the agents.
#[derive(Default)]
struct AgentMemory {
    agents: usize,
    /// Each agent's last VmHWM read before it went away.
    hwm_kb: Vec<u64>,
    max_rss_kb: u64,
    peak_alive: usize,
    min_available_kb: Option<u64>,
}

/// A thread that reads the agents' memory from /proc while a phase runs, and a task that tells
/// it of each new agent. An agent reports its pid when it registers (`WorkerRegistered`); the
/// pid is taken if it is a `hodei-agent` child of the provider-manager. Scanning all of /proc
/// often enough to catch agents that live 40 ms would itself load the 2 CPUs; VmHWM is a
/// high-water mark, so finding an agent late loses nothing as long as it is read again up to
/// a tick before it exits. The thread also raises `low_memory` when the machine has under
/// 1 GiB available.
struct AgentSampler {
    stop: Arc<AtomicBool>,
    low_memory: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<AgentMemory>,
    announcer: tokio::task::JoinHandle<()>,
}

impl AgentSampler {
    async fn start(
        system: &System,
        provider_manager: u32,
        tick: Duration,
    ) -> anyhow::Result<AgentSampler> {
        let mut registered = system
            .client
            .subscribe("hodei.events.worker.*.WorkerRegistered")
            .await?;
        system.client.flush().await?;
        let (pid_tx, pid_rx) = std::sync::mpsc::channel::<u32>();
        let announcer = tokio::spawn(async move {
            while let Some(message) = registered.next().await {
                let pid = serde_json::from_slice::<DomainEvent>(&message.payload)
                    .ok()
                    .and_then(|e| e.payload.get("pid").and_then(|p| p.as_u64()));
                if let Some(pid) = pid {
                    let _ = pid_tx.send(pid as u32);
                }
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let low_memory = Arc::new(AtomicBool::new(false));
        let (stop_flag, low_flag) = (stop.clone(), low_memory.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = AgentMemory::default();
            let mut live: HashMap<u32, u64> = HashMap::new();
            while !stop_flag.load(Ordering::Relaxed) {
                while let Ok(pid) = pid_rx.try_recv() {
                    let Some(f) = stat_fields(pid) else { continue };
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    let ours = f
                        .get(1)
                        .is_some_and(|ppid| *ppid == provider_manager.to_string());
                    if ours && comm.trim() == "hodei-agent" && live.insert(pid, 0).is_none() {
                        seen.agents += 1;
                    }
                }
                seen.peak_alive = seen.peak_alive.max(live.len());
                live.retain(|pid, hwm| {
                    match (status_kb(*pid, "VmHWM:"), status_kb(*pid, "VmRSS:")) {
                        (Some(h), Some(r)) => {
                            *hwm = h;
                            seen.max_rss_kb = seen.max_rss_kb.max(r);
                            true
                        }
                        // Gone, or a zombie (no memory left to read).
                        _ => {
                            if *hwm > 0 {
                                seen.hwm_kb.push(*hwm);
                            }
                            false
                        }
                    }
                });
                let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("MemAvailable:"))?
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                });
                if let Some(kb) = available {
                    seen.min_available_kb = Some(seen.min_available_kb.map_or(kb, |m| m.min(kb)));
                    if kb < 1024 * 1024 {
                        low_flag.store(true, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(tick);
            }
            seen.hwm_kb.extend(live.values().filter(|h| **h > 0));
            seen
        });
        Ok(AgentSampler {
            stop,
            low_memory,
            thread,
            announcer,
        })
    }

    fn finish(self) -> AgentMemory {
        self.announcer.abort();
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

// ----- the machine -----

struct Machine {
    nproc: usize,
    cpu: String,
    memory: String,
    kernel: String,
    postgres: String,
    nats: String,
    bench_profile: &'static str,
    bin_dir: String,
}

impl Machine {
    async fn describe(system: &System) -> anyhow::Result<Machine> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let (version, sync, fsync): (String, String, String) =
            sqlx::query_as("SELECT current_setting('server_version'), current_setting('synchronous_commit'), current_setting('fsync')")
                .fetch_one(&system.pool)
                .await?;
        let postgres = format!("{version} (synchronous_commit={sync}, fsync={fsync})");
        let nats = nats_server_pid(system.nats.port)
            .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
            .and_then(|exe| {
                std::process::Command::new(exe)
                    .arg("--version")
                    .output()
                    .ok()
            })
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Ok(Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu,
            memory,
            kernel,
            postgres,
            nats,
            bench_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            bin_dir: hodei_tests::bin_dir().display().to_string(),
        })
    }
}

// ----- the report -----

/// "yes" or "no" against a target, with the measurement that decides it.
fn verdict(met: bool) -> &'static str {
    if met {
        "**yes**"
    } else {
        "no"
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    s: &mut String,
    options: &Options,
    machine: &Machine,
    floor: &Floor,
    cold: &Cold,
    profile: &Profile,
    throughput: &Throughput,
    memory: &[ServiceMemory],
    (cold_agents, throughput_agents): (&AgentMemory, &AgentMemory),
    (cpu_cold, cpu_throughput): (&CpuSnapshot, &CpuSnapshot),
) -> std::fmt::Result {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    writeln!(s, "## Job latency, throughput and memory\n")?;
    writeln!(
        s,
        "Measured {} with:\n\n```sh\n{command}\n```\n",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    )?;
    writeln!(
        s,
        "- machine: {} CPUs ({}), {} of memory, Linux {}",
        machine.nproc, machine.cpu, machine.memory, machine.kernel
    )?;
    writeln!(
        s,
        "- PostgreSQL {}; {} (its own server on a free port, JetStream on file storage)",
        machine.postgres, machine.nats
    )?;
    writeln!(
        s,
        "- `hodei-bench` {} build; services from `{}`; services and agents log at `RUST_LOG=info` to files",
        machine.bench_profile, machine.bin_dir
    )?;
    writeln!(
        s,
        "- times in ms; p50/p90/p99 are nearest-rank percentiles\n"
    )?;

    writeln!(s, "### The floor (same machine, same run)\n")?;
    writeln!(s, "| operation | n | p50 | p90 | p99 | max |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
    writeln!(
        s,
        "| NATS request/reply round trip (echo responder, 256 B) | {} |",
        Summary::cells(floor.nats_round_trip)
    )?;
    writeln!(
        s,
        "| JetStream publish, awaited to its ack (file storage, 256 B) | {} |",
        Summary::cells(floor.jetstream_publish)
    )?;
    writeln!(
        s,
        "| PostgreSQL single-row INSERT commit (synchronous_commit={}) | {} |",
        floor.synchronous_commit,
        Summary::cells(floor.postgres_commit)
    )?;
    writeln!(
        s,
        "| spawn `/bin/true` and wait for it | {} |",
        Summary::cells(floor.spawn_true)
    )?;
    writeln!(
        s,
        "| spawn `date +%s%N`: parent's clock before spawn → clock the child prints | {} |\n",
        Summary::cells(floor.spawn_date_start)
    )?;
    writeln!(s, "What an agent does before it can register, each piece measured alone on the same system:\n")?;
    writeln!(s, "| operation | n | p50 | p90 | p99 | max |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
    writeln!(
        s,
        "| spawn `hodei-agent --help` and wait (exec, load, argument parsing) | {} |",
        Summary::cells(floor.spawn_agent_help)
    )?;
    writeln!(s, "| new NATS connection and its first JetStream request (`get_stream` HODEI_WORKER_CMDS) | {} |", Summary::cells(floor.nats_connect))?;
    writeln!(
        s,
        "| `create_consumer` on HODEI_WORKER_CMDS, like the agent's command consumer (file storage) | {} |\n",
        Summary::cells(floor.create_consumer)
    )?;

    writeln!(s, "### Latency per job\n")?;
    writeln!(
        s,
        "Cold: each job (`date +%s%N`) is submitted with no worker ready, through `hodei.api.jobs.submit`; the next \
         is submitted once this one's worker is Terminated. \"Process start\" is the clock the job's own process \
         prints as it starts (client and job read the same clock; the floor's `date` row is the part of it that is \
         `date` starting up). {} jobs measured of {} requested ({} not counted first), in {:.0} s{}{}.\n",
        cold.jobs.len(),
        cold.requested,
        options.warmup,
        cold.elapsed.as_secs_f64(),
        if cold.timed_out > 0 { format!(", {} failed to be submitted or to settle in 60 s", cold.timed_out) } else { String::new() },
        cold.incomplete.as_ref().map(|r| format!("; **incomplete: {r}**")).unwrap_or_default(),
    )?;
    writeln!(
        s,
        "| measurement | n | p50 | p90 | p99 | max | target | met |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---|---|")?;
    let start = Summary::of(&profile.to_process_start);
    let met = start.is_some_and(|x| x.p50 <= 15.0 && x.p99 <= 50.0);
    writeln!(
        s,
        "| cold: submit → process start (job's clock) | {} | p50 ≤ 15, p99 ≤ 50 | {} |",
        Summary::cells(start),
        verdict(met)
    )?;
    writeln!(
        s,
        "| cold: submit → `JobStatusChanged → Running` recorded | {} | | |",
        Summary::cells(Summary::of(&profile.to_running_recorded))
    )?;
    writeln!(
        s,
        "| cold: submit → result recorded (`JobCompleted` occurred_at) | {} | | |",
        Summary::cells(Summary::of(&profile.to_result_recorded))
    )?;
    writeln!(
        s,
        "| cold: submit → client receives `JobCompleted` from NATS | {} | | |",
        Summary::cells(Summary::of(&profile.to_result_seen))
    )?;
    writeln!(
        s,
        "| cold: submit request → accepted reply | {} | | |",
        Summary::cells(Summary::of(&profile.submit_round_trip))
    )?;
    writeln!(
        s,
        "| cold: submit → worker Terminated | {} | | |",
        Summary::cells(Summary::of(&profile.settled))
    )?;
    writeln!(s, "| warm: submit → process start | warm pool: not implemented | | | | | p50 ≤ 3, p99 ≤ 10 | not measured |\n")?;

    writeln!(s, "### Throughput\n")?;
    writeln!(s, "| workers | jobs accepted | in flight | all submitted after s | all terminal after s | jobs/s | succeeded | all workers Terminated after s | target | met |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|---|")?;
    let rate = throughput
        .all_terminal_secs
        .map(|secs| throughput.accepted as f64 / secs);
    writeln!(
        s,
        "| ephemeral (process provider) | {} of {} | {} | {:.1} | {} | {} | {} | {} | ≥ 300 jobs/s | {} |",
        throughput.accepted,
        throughput.jobs,
        throughput.in_flight,
        throughput.submit_secs,
        throughput.all_terminal_secs.map(|x| format!("{x:.1}")).unwrap_or_else(|| "–".into()),
        rate.map(|r| format!("{r:.1}")).unwrap_or_else(|| "–".into()),
        throughput.succeeded,
        throughput.settled_secs.map(|x| format!("{x:.1}")).unwrap_or_else(|| "not within 300 s".into()),
        verdict(rate.is_some_and(|r| r >= 300.0) && throughput.succeeded == throughput.accepted),
    )?;
    writeln!(
        s,
        "| warm pool | warm pool: not implemented | | | | | | | ≥ 1000 jobs/s | not measured |\n"
    )?;
    let states: Vec<String> = throughput
        .states
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    writeln!(
        s,
        "Throughput run: {} submissions not accepted; the accepted jobs ended {}{}. jobs/s counts every terminal \
         job; the target is met only if every job succeeded.\n",
        throughput.refused,
        if states.is_empty() { "–".to_owned() } else { states.join(", ") },
        throughput.incomplete.as_ref().map(|r| format!("; **incomplete: {r}**")).unwrap_or_default()
    )?;

    writeln!(s, "### Memory and CPU\n")?;
    writeln!(
        s,
        "RSS in MiB from /proc/<pid>/status (peak = VmHWM over the whole run). CPU = utime + stime of the process \
         itself, in seconds, over the cold run ({} jobs) and the throughput run ({} jobs, until every worker was \
         Terminated).\n",
        cold.jobs.len() + options.warmup,
        throughput.accepted
    )?;
    writeln!(s, "| process | RSS at start | RSS after cold | RSS at end | peak RSS | CPU s cold | CPU s throughput | target | met |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|---|")?;
    for m in memory {
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | ≤ 30 MB | {} |",
            m.name,
            mib(m.rss_start_kb),
            mib(m.rss_after_cold_kb),
            mib(m.rss_end_kb),
            mib(m.hwm_kb),
            cpu_cold.services.get(&m.name).unwrap_or(&0.0),
            cpu_throughput.services.get(&m.name).unwrap_or(&0.0),
            verdict(m.hwm_kb as f64 * 1024.0 <= 30e6),
        )?;
    }
    for (phase, agents) in [("cold", cold_agents), ("throughput", throughput_agents)] {
        let peaks: Vec<f64> = agents.hwm_kb.iter().map(|kb| *kb as f64).collect();
        let summary = Summary::of(&peaks);
        let max_hwm = summary.map(|x| x.max as u64).unwrap_or(0);
        writeln!(
            s,
            "| agent ({phase} run: {} sampled, at most {} alive at once; peak RSS p50 {} MiB) | | | | {} (max) | | | ≤ 10 MB | {} |",
            agents.agents,
            agents.peak_alive,
            summary.map(|x| mib(x.p50 as u64)).unwrap_or_else(|| "–".into()),
            mib(max_hwm),
            if agents.agents == 0 { "not measured" } else { verdict(max_hwm as f64 * 1024.0 <= 10e6) },
        )?;
    }
    let per_job = |cpu: f64, jobs: usize| {
        if jobs == 0 {
            "–".to_owned()
        } else {
            format!("{:.2}", cpu * 1000.0 / jobs as f64)
        }
    };
    let cold_jobs = cold.jobs.len() + options.warmup;
    let pg = |c: &CpuSnapshot| c.postgres.values().sum::<f64>();
    writeln!(s)?;
    writeln!(s, "| CPU ms per job | cold | throughput |")?;
    writeln!(s, "|---|---:|---:|")?;
    writeln!(
        s,
        "| control plane (the six services) | {} | {} |",
        per_job(cpu_cold.control_plane(), cold_jobs),
        per_job(cpu_throughput.control_plane(), throughput.accepted)
    )?;
    writeln!(
        s,
        "| agents and their jobs (the provider-manager's reaped children; context) | {} | {} |",
        per_job(cpu_cold.agents, cold_jobs),
        per_job(cpu_throughput.agents, throughput.accepted)
    )?;
    writeln!(
        s,
        "| nats-server (context) | {} | {} |",
        per_job(cpu_cold.nats, cold_jobs),
        per_job(cpu_throughput.nats, throughput.accepted)
    )?;
    writeln!(
        s,
        "| PostgreSQL backends of this database (context; includes the benchmark's own polling) | {} | {} |",
        per_job(pg(cpu_cold), cold_jobs),
        per_job(pg(cpu_throughput), throughput.accepted)
    )?;
    let all = |c: &CpuSnapshot| c.control_plane() + c.agents + c.nats + pg(c);
    writeln!(
        s,
        "| all of the above | {} | {} |",
        per_job(all(cpu_cold), cold_jobs),
        per_job(all(cpu_throughput), throughput.accepted)
    )?;
    if throughput.accepted > 0 && all(cpu_throughput) > 0.0 {
        let ceiling = machine.nproc as f64 * throughput.accepted as f64 / all(cpu_throughput);
        writeln!(
            s,
            "\nAt that CPU cost per job, {} CPUs can run at most {ceiling:.0} jobs/s (CPUs × 1000 / CPU ms per job).",
            machine.nproc
        )?;
    }
    if let Some(kb) = throughput_agents.min_available_kb {
        writeln!(
            s,
            "\nLeast memory available on the machine during the throughput run: {} MiB.",
            kb / 1024
        )?;
    }
    writeln!(s)?;

    writeln!(s, "### Where the cold latency goes\n")?;
    writeln!(
        s,
        "Each cold job's audit trail (every event under its correlation id, `occurred_at` stamped by the process \
         that made the change, before its commit) with the client's submit time and the job's own start time, in \
         time order. The most common order of steps, followed by {} of {} jobs, is profiled: the gap from the step \
         before, and the time since submit.{}\n",
        profile.following,
        cold.jobs.len(),
        if profile.unprofiled > 0 { format!(" {} jobs had no complete trail or clock.", profile.unprofiled) } else { String::new() }
    )?;
    writeln!(
        s,
        "The last three columns take a gap apart where the outbox carries it (p50 each): **relay → begin** is from \
         the relay starting the batch that published the event that caused this step (`published_at`; for the \
         process start, the RunJob command's) to this step's transaction beginning (`created_at` of its outbox rows), i.e. the relay's \
         read and publish, JetStream's delivery and the consumer's decoding; **begin → stamp** is the handler's reads \
         and decision inside its transaction; **stamp → relayed** is the rest of its transaction, the commit, the \
         NOTIFY and the relay waking up (a negative begin → stamp: the event was made before its transaction began). Steps caused by a request or an agent's report rather than by a relayed \
         event have no relay → begin.\n"
    )?;
    writeln!(s, "| # | step | actor | gap p50 | gap p90 | gap max | since submit p50 | relay → begin | begin → stamp | stamp → relayed |")?;
    writeln!(s, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let p50 = |values: &[f64]| Summary::of(values).map(|x| ms(x.p50)).unwrap_or_default();
    for (i, label) in profile.sequence.iter().enumerate() {
        let gap = Summary::of(&profile.gaps[i]);
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i,
            label,
            profile.actors.get(i).map(String::as_str).unwrap_or(""),
            gap.map(|g| ms(g.p50)).unwrap_or_default(),
            gap.map(|g| ms(g.p90)).unwrap_or_default(),
            gap.map(|g| ms(g.max)).unwrap_or_default(),
            p50(&profile.offsets[i]),
            p50(&profile.relay_to_begin[i]),
            p50(&profile.begin_to_stamp[i]),
            p50(&profile.stamp_to_relay[i]),
        )?;
    }
    Ok(())
}
