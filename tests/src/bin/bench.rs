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
//! 4. warm latency: the dispatcher restarted with a warm pool (`HODEI_WARM_POOL_SIZE`), the
//!    same one-at-a-time jobs as the cold run, each ending when every pool worker is Ready
//!    again (pool workers stay; nothing is torn down);
//! 5. warm throughput: the throughput run again, on a (bigger) warm pool;
//! 6. backlog: with no capacity (`HODEI_MAX_WORKERS=0`), a big backlog of jobs of three
//!    priorities is queued; once the dispatcher has seen every one, the plans of the hot
//!    queries (`hodei_store::plans`) must not read `jobs` or `outbox_events` whole. Then a
//!    warm pool drains it: jobs/s, the services' RSS each second, and whether jobs were
//!    placed by priority, then submission order;
//! 7. peak RSS (VmHWM) of each service and of the agents, and CPU seconds per job of the
//!    control plane (utime + stime of the six service processes), with the agents, the
//!    nats-server and the PostgreSQL backends beside it for context.
//!
//! Each phase after the floor can be skipped with a count of 0 (`--cold 0`, `--backlog 0`, ...).
//!
//! Then it profiles the cold and the warm jobs from the audit log: every event's `occurred_at`
//! is stamped by the process that made the change, so the median gap between consecutive
//! events is where the time goes; the outbox rows' `created_at` (the writer's transaction
//! began) and `published_at` (the transaction that marked the row published began) take each
//! published hop apart. Every wait has a deadline; a phase that runs out of time reports what
//! it measured and says so.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/hodei-bench --out bench-results.md --json bench-results.json
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
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

/// Measure Hodei against the machine's own floor: latency of cold and warm jobs, throughput
/// on ephemeral workers and on a warm pool, a backlog drained, memory and CPU per job.
///
/// A count of 0 skips its phase (--cold, --throughput, --warm, --warm-throughput, --backlog).
/// The service binaries are taken from $HODEI_BIN_DIR, else from beside this executable.
#[derive(clap::Parser)]
#[command(name = "hodei-bench")]
struct Options {
    /// Cold jobs, one at a time.
    #[arg(long, value_name = "N", default_value = "500", value_parser = count)]
    cold: usize,
    /// Trivial jobs for the throughput run on ephemeral workers.
    #[arg(long, value_name = "N", default_value = "5000", value_parser = count)]
    throughput: usize,
    /// Submissions in flight at once in the throughput and backlog runs.
    #[arg(long, value_name = "N", default_value = "256", value_parser = at_least_one)]
    in_flight: usize,
    /// Samples of each network/database floor measurement.
    #[arg(long, value_name = "N", default_value = "1000", value_parser = at_least_one)]
    floor: usize,
    /// Samples of the process-spawn floor.
    #[arg(long, value_name = "N", default_value = "200", value_parser = at_least_one)]
    spawn: usize,
    /// Jobs one at a time on a warm pool.
    #[arg(long, value_name = "N", default_value = "500", value_parser = count)]
    warm: usize,
    /// Warm pool of the warm latency run.
    #[arg(long, value_name = "N", default_value = "2", value_parser = pool)]
    pool: u32,
    /// Trivial jobs for the throughput run on a warm pool.
    #[arg(long, value_name = "N", default_value = "5000", value_parser = count)]
    warm_throughput: usize,
    /// Warm pool of the warm throughput run.
    #[arg(long, value_name = "N", default_value = "8", value_parser = pool)]
    pool_throughput: u32,
    /// Jobs queued with no capacity, then drained by a warm pool.
    #[arg(long, value_name = "N", default_value = "50000", value_parser = count)]
    backlog: usize,
    /// Warm pool that drains the backlog.
    #[arg(long, value_name = "N", default_value = "8", value_parser = pool)]
    backlog_pool: u32,
    /// Jobs run first and not counted in the cold and warm runs.
    #[arg(long, value_name = "N", default_value = "5", value_parser = count)]
    warmup: usize,
    /// Longest time each phase may take, in seconds.
    #[arg(long, value_name = "SECS", default_value = "900", value_parser = seconds)]
    deadline: Duration,
    /// Also write the report (markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Also write the run's figures as JSON to FILE (cold_p50_ms, warm_jobs_per_s,
    /// cpu_ms_per_job_warm, all_succeeded, floor_nats_rtt_ms, ...).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Copy the services' (and agents') logs to DIR before shutting down (the dispatcher's
    /// before each restart as dispatcher.<n>.err).
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
}

/// A count, with `_` or `,` allowed between digits (`50_000`).
fn count(value: &str) -> Result<usize, String> {
    hodei_tests::parse_number(value)
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match count(value)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

fn pool(value: &str) -> Result<u32, String> {
    u32::try_from(at_least_one(value)?).map_err(|_| format!("too big: {value}"))
}

fn seconds(value: &str) -> Result<Duration, String> {
    Ok(Duration::from_secs(count(value)? as u64))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = <Options as clap::Parser>::parse();
    eprintln!(
        "starting nats-server, a database and the six services from {}",
        hodei_tests::bin_dir().display()
    );
    // The harness keeps services' pools small for parallel tests; measure the services as
    // they ship (their default pool of 10 connections).
    let mut system = System::start_with(&[("HODEI_DB_POOL_SIZE", "10")]).await;
    let outcome = bench(&mut system, &options).await;
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
        Ok((report, figures)) => {
            println!("{report}");
            if let Some(path) = &options.json {
                let text = serde_json::to_string_pretty(&figures).expect("figures serialize");
                if let Err(error) = std::fs::write(path, text + "\n") {
                    eprintln!("hodei-bench: cannot write {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("figures written to {}", path.display());
            }
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

/// Who runs the jobs of a phase: an ephemeral worker each (the dispatcher as the harness starts
/// it), or a warm pool of that many workers.
#[derive(Clone, Copy, PartialEq)]
enum Workers {
    Ephemeral,
    Pool(u32),
}

impl Workers {
    fn phase(self) -> &'static str {
        match self {
            Workers::Ephemeral => "cold",
            Workers::Pool(_) => "warm",
        }
    }
}

/// A latency phase: the jobs, where their time went, what the agents and processes used.
struct LatencyPhase {
    run: Latency,
    profile: Profile,
    agents: AgentMemory,
    cpu: CpuSnapshot,
    /// From the dispatcher's restart to every pool worker Ready (warm runs).
    pool_ready_secs: Option<f64>,
}

/// A throughput phase.
struct ThroughputPhase {
    run: Throughput,
    agents: AgentMemory,
    cpu: CpuSnapshot,
    pool_ready_secs: Option<f64>,
}

struct Results {
    machine: Machine,
    floor: Floor,
    cold: Option<LatencyPhase>,
    throughput: Option<ThroughputPhase>,
    warm: Option<LatencyPhase>,
    warm_throughput: Option<ThroughputPhase>,
    backlog: Option<Backlog>,
    memory: Memory,
}

async fn bench(
    system: &mut System,
    options: &Options,
) -> anyhow::Result<(String, serde_json::Value)> {
    let machine = Machine::describe(system).await?;
    let mut services = service_pids(system);
    let provider_manager = services
        .iter()
        .find(|(n, _)| n == "provider-manager")
        .map(|(_, p)| *p)
        .expect("six services");
    let nats_pid = system.nats.pid();
    let mut memory = Memory::default();
    memory.snapshot("at start", &services);

    eprintln!(
        "floor: {} NATS round trips, JetStream publishes and PostgreSQL commits, {} spawns",
        options.floor, options.spawn
    );
    let floor = measure_floor(system, options).await?;

    let mut cold = None;
    if options.cold > 0 {
        eprintln!(
            "cold: {} jobs one at a time (+{} not counted)",
            options.cold, options.warmup
        );
        let cpu_before = CpuSnapshot::take(system, &services, nats_pid).await;
        let sampler =
            AgentSampler::start(system, provider_manager, Duration::from_millis(5)).await?;
        let run = latency_run(system, options, Workers::Ephemeral, options.cold).await?;
        let agents = sampler.finish();
        let cpu = CpuSnapshot::take(system, &services, nats_pid)
            .await
            .since(&cpu_before);
        memory.snapshot("after cold", &services);
        eprintln!("cold: profiling {} jobs from the audit log", run.jobs.len());
        let profile = profile_jobs(system, &run).await?;
        cold = Some(LatencyPhase {
            run,
            profile,
            agents,
            cpu,
            pool_ready_secs: None,
        });
    }

    let mut throughput = None;
    if options.throughput > 0 {
        eprintln!(
            "throughput: {} jobs on ephemeral workers, {} submissions in flight",
            options.throughput, options.in_flight
        );
        let cpu_before = CpuSnapshot::take(system, &services, nats_pid).await;
        // Many agents live at once here: read them less often, and watch the machine's memory.
        let sampler =
            AgentSampler::start(system, provider_manager, Duration::from_millis(50)).await?;
        let run = throughput_run(
            system,
            options,
            options.throughput,
            Workers::Ephemeral,
            &sampler.low_memory,
        )
        .await?;
        let agents = sampler.finish();
        let cpu = CpuSnapshot::take(system, &services, nats_pid)
            .await
            .since(&cpu_before);
        memory.snapshot("after throughput", &services);
        throughput = Some(ThroughputPhase {
            run,
            agents,
            cpu,
            pool_ready_secs: None,
        });
    }

    let mut warm = None;
    if options.warm > 0 {
        let size = options.pool;
        eprintln!(
            "warm: restarting the dispatcher with a pool of {size}; {} jobs one at a time (+{} not counted)",
            options.warm, options.warmup
        );
        // The sampler learns of agents as they register: start it before the pool exists.
        let sampler =
            AgentSampler::start(system, provider_manager, Duration::from_millis(20)).await?;
        memory.note_peaks(&services);
        let size_text = size.to_string();
        let ready = restart_dispatcher(
            system,
            &[
                ("HODEI_WARM_POOL_SIZE", &size_text),
                // No worker is replaced during the run: each job finds a Ready worker.
                ("HODEI_WARM_POOL_MAX_JOBS", "1000000"),
            ],
            size,
            options.deadline,
        )
        .await?;
        services = service_pids(system);
        let cpu_before = CpuSnapshot::take(system, &services, nats_pid).await;
        let run = match ready {
            Some(_) => latency_run(system, options, Workers::Pool(size), options.warm).await?,
            None => Latency::not_run(
                Workers::Pool(size),
                options.warm,
                format!(
                    "the pool of {size} was not Ready within the phase deadline ({} s)",
                    options.deadline.as_secs()
                ),
            ),
        };
        let agents = sampler.finish();
        let cpu = CpuSnapshot::take(system, &services, nats_pid)
            .await
            .since(&cpu_before);
        memory.snapshot("after warm", &services);
        eprintln!("warm: profiling {} jobs from the audit log", run.jobs.len());
        let profile = profile_jobs(system, &run).await?;
        warm = Some(LatencyPhase {
            run,
            profile,
            agents,
            cpu,
            pool_ready_secs: ready,
        });
    }

    let mut warm_throughput = None;
    if options.warm_throughput > 0 {
        let size = options.pool_throughput;
        eprintln!(
            "warm throughput: restarting the dispatcher with a pool of {size}; {} jobs, {} submissions in flight",
            options.warm_throughput, options.in_flight
        );
        let sampler =
            AgentSampler::start(system, provider_manager, Duration::from_millis(50)).await?;
        memory.note_peaks(&services);
        // From no pool at all, so that every pool worker is as the dispatcher makes it by
        // default (a pool of the warm run would keep its workers and their job allowance).
        restart_dispatcher(
            system,
            &[("HODEI_WARM_POOL_SIZE", "0")],
            0,
            options.deadline,
        )
        .await?;
        memory.note_peaks(&service_pids(system));
        let size_text = size.to_string();
        let ready = restart_dispatcher(
            system,
            &[("HODEI_WARM_POOL_SIZE", &size_text)],
            size,
            options.deadline,
        )
        .await?;
        services = service_pids(system);
        let cpu_before = CpuSnapshot::take(system, &services, nats_pid).await;
        let run = match ready {
            Some(_) => {
                throughput_run(
                    system,
                    options,
                    options.warm_throughput,
                    Workers::Pool(size),
                    &sampler.low_memory,
                )
                .await?
            }
            None => Throughput::not_run(
                Workers::Pool(size),
                options,
                options.warm_throughput,
                format!(
                    "the pool of {size} was not Ready within the phase deadline ({} s)",
                    options.deadline.as_secs()
                ),
            ),
        };
        let agents = sampler.finish();
        let cpu = CpuSnapshot::take(system, &services, nats_pid)
            .await
            .since(&cpu_before);
        memory.snapshot("after warm throughput", &services);
        warm_throughput = Some(ThroughputPhase {
            run,
            agents,
            cpu,
            pool_ready_secs: ready,
        });
    }

    let mut backlog = None;
    if options.backlog > 0 {
        let result = backlog_run(system, options, &mut memory, &mut services, nats_pid).await?;
        memory.snapshot("after backlog drain", &services);
        backlog = Some(result);
    }
    memory.note_peaks(&services);

    let results = Results {
        machine,
        floor,
        cold,
        throughput,
        warm,
        warm_throughput,
        backlog,
        memory,
    };
    let mut s = String::new();
    report(&mut s, options, &results)?;
    Ok((s, figures(options, &results)))
}

/// The run's figures, machine-readable (`--json`): latency of submit → process start, jobs/s
/// of the throughput runs, CPU ms per job of every process together in those runs, whether
/// every job of every phase succeeded, and the floor. A phase not run gives nulls.
fn figures(options: &Options, r: &Results) -> serde_json::Value {
    let start = |p: &Option<LatencyPhase>| {
        p.as_ref()
            .and_then(|p| Summary::of(&p.profile.to_process_start))
    };
    let (cold, warm) = (start(&r.cold), start(&r.warm));
    let rate = |p: &Option<ThroughputPhase>| {
        let t = &p.as_ref()?.run;
        t.all_terminal_secs.map(|secs| t.accepted as f64 / secs)
    };
    let cpu_per_job = |p: &Option<ThroughputPhase>| {
        let p = p.as_ref()?;
        let c = &p.cpu;
        let all = c.control_plane() + c.agents + c.nats + c.postgres.values().sum::<f64>();
        (p.run.accepted > 0).then(|| all * 1000.0 / p.run.accepted as f64)
    };
    // The targets leave the job's own process aside: its `/bin/true`, measured in the floor.
    let cpu_per_job_without_job =
        |p: &Option<ThroughputPhase>| Some(cpu_per_job(p)? - r.floor.true_cpu_ms?);
    let latency_ok = |p: &Option<LatencyPhase>| {
        p.as_ref().is_none_or(|p| {
            p.run.incomplete.is_none()
                && p.run.timed_out == 0
                && p.run.jobs.len() == p.run.requested
        })
    };
    let throughput_ok = |p: &Option<ThroughputPhase>| {
        p.as_ref().is_none_or(|p| {
            let t = &p.run;
            t.incomplete.is_none() && t.accepted == t.jobs && t.succeeded == t.accepted
        })
    };
    let backlog_ok = r.backlog.as_ref().is_none_or(|b| {
        b.incomplete.is_none()
            && b.accepted == b.requested
            && b.drain
                .as_ref()
                .is_some_and(|d| d.incomplete.is_none() && d.succeeded == b.accepted)
    });
    let floor = |x: &Option<Summary>| x.map(|x| x.p50);
    let audit_p99 = |p: &Option<ThroughputPhase>| p.as_ref()?.run.audit.as_ref().map(|a| a.p99_ms);
    let audit_keeps_up = [&r.throughput, &r.warm_throughput].into_iter().all(|p| {
        p.as_ref()
            .is_none_or(|p| p.run.audit.as_ref().is_some_and(AuditLag::keeps_up))
    });
    serde_json::json!({
        "cold_p50_ms": cold.map(|x| x.p50),
        "cold_p99_ms": cold.map(|x| x.p99),
        "warm_p50_ms": warm.map(|x| x.p50),
        "warm_p99_ms": warm.map(|x| x.p99),
        "ephemeral_jobs_per_s": rate(&r.throughput),
        "warm_jobs_per_s": rate(&r.warm_throughput),
        "cpu_ms_per_job_ephemeral": cpu_per_job(&r.throughput),
        "cpu_ms_per_job_warm": cpu_per_job(&r.warm_throughput),
        "cpu_ms_per_job_ephemeral_without_job": cpu_per_job_without_job(&r.throughput),
        "cpu_ms_per_job_warm_without_job": cpu_per_job_without_job(&r.warm_throughput),
        "floor_job_cpu_ms": r.floor.true_cpu_ms,
        "all_succeeded": latency_ok(&r.cold)
            && latency_ok(&r.warm)
            && throughput_ok(&r.throughput)
            && throughput_ok(&r.warm_throughput)
            && backlog_ok,
        "audit_lag_p99_ms_ephemeral": audit_p99(&r.throughput),
        "audit_lag_p99_ms_warm": audit_p99(&r.warm_throughput),
        "audit_keeps_up": audit_keeps_up,
        "floor_nats_rtt_ms": floor(&r.floor.nats_round_trip),
        "floor_js_publish_ms": floor(&r.floor.jetstream_publish),
        "floor_pg_commit_ms": floor(&r.floor.postgres_commit),
        "floor_spawn_ms": floor(&r.floor.spawn_true),
        "jobs": {
            "cold": options.cold,
            "warm": options.warm,
            "throughput": options.throughput,
            "warm_throughput": options.warm_throughput,
            "backlog": options.backlog,
        },
    })
}

/// The services' names and pids, in the harness' order (a restarted service has a new pid).
fn service_pids(system: &System) -> Vec<(String, u32)> {
    let mut services: Vec<(String, u32)> = system
        .services
        .iter()
        .map(|s| (s.name.clone(), s.pid()))
        .collect();
    services.sort_by_key(|(name, _)| {
        hodei_tests::SERVICES
            .iter()
            .position(|s| s == name)
            .unwrap_or(usize::MAX)
    });
    services
}

/// Live pool workers, and how many of them are Ready.
async fn pool_workers(system: &System) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'Ready') FROM workers \
         WHERE pooled AND state <> 'Terminated'",
    )
    .fetch_one(&system.pool)
    .await?)
}

/// Whether exactly `size` pool workers are alive and every one is Ready (no pool worker alive
/// for 0), checked until the deadline.
async fn wait_pool(system: &System, size: u32, deadline: Instant) -> bool {
    loop {
        if let Ok((live, ready)) = pool_workers(system).await {
            if live == size as i64 && ready == size as i64 {
                return true;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Restart the dispatcher with `overrides` and wait until its pool is `size` Ready workers
/// (none alive for 0). The seconds that took, or None if not within `limit`.
async fn restart_dispatcher(
    system: &mut System,
    overrides: &[(&str, &str)],
    size: u32,
    limit: Duration,
) -> anyhow::Result<Option<f64>> {
    let t = Instant::now();
    keep_dispatcher_log(system);
    system.restart_with("dispatcher", overrides);
    let ready = wait_pool(system, size, t + limit).await;
    let (live, ready_now) = pool_workers(system).await?;
    if ready {
        eprintln!(
            "dispatcher restarted ({}): {} after {:.1} s",
            overrides
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            if size == 0 {
                "no pool worker alive".to_owned()
            } else {
                format!("{size} pool workers Ready")
            },
            t.elapsed().as_secs_f64()
        );
        Ok(Some(t.elapsed().as_secs_f64()))
    } else {
        eprintln!(
            "dispatcher restarted: the pool is {live} workers ({ready_now} Ready), not {size} Ready, after {:.0} s",
            t.elapsed().as_secs_f64()
        );
        Ok(None)
    }
}

/// Before the dispatcher is restarted: its log becomes `dispatcher.<n>.err` (the process
/// writes its last lines there as it stops), so the restarted one does not overwrite it.
fn keep_dispatcher_log(system: &System) {
    let log = system.log_dir.join("dispatcher.err");
    let kept = (1..)
        .map(|n| system.log_dir.join(format!("dispatcher.{n}.err")))
        .find(|path| !path.exists())
        .expect("a free name");
    if let Err(error) = std::fs::rename(&log, &kept) {
        eprintln!("hodei-bench: cannot keep {}: {error}", log.display());
    }
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
    /// CPU (user + system) of one `/bin/true` process, the throughput runs' job, from its exec
    /// to its exit, in ms: what "the job's own process" costs in the CPU per job.
    true_cpu_ms: Option<f64>,
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
    let responder = system.nats.connect().await;
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
    let children_before = reaped_children_cpu_seconds();
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
    // Only the `/bin/true` children end (and are reaped) in that loop.
    let true_cpu_ms = Some(
        (reaped_children_cpu_seconds() - children_before) * 1000.0 / (options.spawn + 5) as f64,
    );

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
        let client = hodei_messaging::connect(
            &system.nats.url,
            "hodei-bench",
            Some(&system.nats.harness_creds()),
        )
        .await?;
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
        true_cpu_ms,
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

// ----- latency, one job at a time -----

struct LatencyJob {
    job_id: Uuid,
    correlation_id: String,
    /// The client's clock just before the submit request was sent.
    submitted_at: DateTime<Utc>,
    /// The submit request's round trip (accepted).
    submit_ms: f64,
    /// When the client received the job's terminal event from NATS.
    seen_terminal_at: Option<DateTime<Utc>>,
    /// Until the job's worker was Terminated (cold) or every pool worker was Ready again
    /// (warm): the next job waits for this.
    settled_ms: Option<f64>,
    /// The client's clock when it saw that.
    settled_at: DateTime<Utc>,
}

struct Latency {
    workers: Workers,
    jobs: Vec<LatencyJob>,
    requested: usize,
    timed_out: usize,
    incomplete: Option<String>,
    elapsed: Duration,
}

impl Latency {
    fn not_run(workers: Workers, requested: usize, why: String) -> Latency {
        Latency {
            workers,
            jobs: Vec::new(),
            requested,
            timed_out: 0,
            incomplete: Some(why),
            elapsed: Duration::ZERO,
        }
    }
}

/// `count` jobs (`date +%s%N`) after `--warmup` more, each submitted when the one before has
/// ended and its worker is Terminated (ephemeral) or every pool worker is Ready again (pool).
async fn latency_run(
    system: &System,
    options: &Options,
    workers: Workers,
    count: usize,
) -> anyhow::Result<Latency> {
    let phase = workers.phase();
    // Every job event, as any client could watch them; the job's terminal event ends its wait.
    let mut events = system.client.subscribe("hodei.events.job.>").await?;
    system.client.flush().await?;
    let phase_deadline = Instant::now() + options.deadline;
    let started = Instant::now();
    let mut jobs = Vec::with_capacity(count);
    let mut timed_out = 0;
    let mut incomplete = None;
    for i in 0..options.warmup + count {
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
                eprintln!("{phase} job {i}: submit failed: {error:?}");
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
        let settled = match workers {
            Workers::Ephemeral => {
                wait_worker_terminated(system, accepted.job_id, job_deadline).await
            }
            Workers::Pool(size) => wait_pool(system, size, job_deadline).await,
        };
        let settled_ms = elapsed_ms(t);
        let settled_at = Utc::now();
        if seen_terminal_at.is_none() || !settled {
            eprintln!("{phase} job {}: not settled within 60 s", accepted.job_id);
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
        jobs.push(LatencyJob {
            job_id: accepted.job_id,
            correlation_id: accepted.correlation_id,
            submitted_at,
            submit_ms,
            seen_terminal_at,
            settled_ms: Some(settled_ms),
            settled_at,
        });
        if jobs.len() % 50 == 0 {
            eprintln!("{phase}: {} of {count}", jobs.len());
        }
    }
    Ok(Latency {
        workers,
        jobs,
        requested: count,
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

// ----- profile of the jobs from the audit log -----

/// One step of a job's timeline. For a step written through the outbox, `begun` is when its
/// transaction began (the outbox row's `created_at`, PostgreSQL's `now()`) and `relayed` when
/// the transaction that marked it published began (`published_at`, also `now()`: the relay's,
/// or the writer's own publisher's after JetStream acked the row).
#[derive(Clone)]
struct Step {
    label: String,
    actor: String,
    at: DateTime<Utc>,
    /// The audit log's order, for steps stamped at the same instant (the client's and the
    /// job's own clocks come last).
    seq: i64,
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
    /// Submit → worker Terminated (cold) or every pool worker Ready again (warm).
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
/// command): the cause is the latest step before it of one of these labels. The others are
/// caused by a request or an agent's report, not by the outbox.
const CAUSED_BY: [(&str, &[&str]); 8] = [
    ("WorkerProvisioningRequested", &["JobQueued"]),
    ("WorkerProvisioned", &["WorkerProvisioningRequested"]),
    // On a pool worker, its WorkerReadyForJob or the JobQueued; an ephemeral worker is made
    // Busy by its registration (a request: see ASSIGNED_BY_REQUEST).
    (
        "WorkerStatusChanged → Busy",
        &["WorkerReadyForJob", "JobQueued"],
    ),
    (
        "JobAssigned → Assigned",
        &["WorkerReadyForJob", "JobQueued"],
    ),
    (PROCESS_START, &["RunJob"]),
    ("WorkerTerminating", &["JobCompleted → Succeeded"]),
    ("WorkerTerminated", &["WorkerTerminating"]),
    // A pool worker released for the next job.
    ("WorkerReady", &["JobCompleted → Succeeded"]),
];

/// A step after which what follows was caused by a request, not by the outbox: the
/// registration that gave an ephemeral worker its job.
const ASSIGNED_BY_REQUEST: &str = "WorkerRegistered";

type AuditRow = (
    String,
    DateTime<Utc>,
    String,
    String,
    serde_json::Value,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i64,
);

async fn profile_jobs(system: &System, run: &Latency) -> anyhow::Result<Profile> {
    let correlations: Vec<String> = run.jobs.iter().map(|j| j.correlation_id.clone()).collect();
    // The audit service records events as it consumes them: wait until it has everything.
    if !system
        .audit_caught_up(Utc::now(), Duration::from_secs(60))
        .await
    {
        eprintln!("profile: the audit log was not complete after 60 s; profiling what it has");
    }
    // The job's own events, and (an ephemeral worker's events share the job's correlation
    // id) its worker's.
    let mut rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT a.correlation_id, a.occurred_at, a.event_type, a.actor, a.payload, o.created_at, o.published_at, a.seq \
         FROM audit_log a LEFT JOIN outbox_events o ON o.event_id = a.event_id \
         WHERE a.correlation_id = ANY($1)",
    )
    .bind(&correlations)
    .fetch_all(&system.pool)
    .await?;
    // A pool worker has a correlation id of its own: take its events between the job's
    // submission and the moment the client saw the pool Ready again (jobs run one at a time).
    let ids: Vec<Uuid> = run.jobs.iter().map(|j| j.job_id).collect();
    let from: Vec<DateTime<Utc>> = run.jobs.iter().map(|j| j.submitted_at).collect();
    let to: Vec<DateTime<Utc>> = run.jobs.iter().map(|j| j.settled_at).collect();
    let worker_rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT t.correlation_id, a.occurred_at, a.event_type, a.actor, a.payload, o.created_at, o.published_at, a.seq \
         FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS t(job_id, correlation_id, from_at, to_at) \
         JOIN jobs j ON j.id = t.job_id \
         JOIN audit_log a ON a.aggregate_id = j.worker_id AND a.correlation_id <> t.correlation_id \
                         AND a.occurred_at BETWEEN t.from_at AND t.to_at \
         LEFT JOIN outbox_events o ON o.event_id = a.event_id",
    )
    .bind(&ids)
    .bind(&correlations)
    .bind(&from)
    .bind(&to)
    .fetch_all(&system.pool)
    .await?;
    rows.extend(worker_rows);
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
    for (correlation, at, event_type, actor, payload, begun, relayed, seq) in rows {
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
            seq,
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
    for job in &run.jobs {
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
        trail.sort_by_key(|step| (step.at, step.seq));
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
            seq: i64::MAX,
            begun: None,
            relayed: None,
        };
        trail.push(step(SUBMIT, "client", job.submitted_at));
        trail.push(step(PROCESS_START, "job", process_start));
        // Stable: events stamped at the same instant keep their recording order.
        trail.sort_by_key(|step| (step.at, step.seq));
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
            let causes = CAUSED_BY
                .iter()
                .find(|(effect, _)| *effect == step.label)
                .map(|(_, causes)| *causes)
                .unwrap_or(&[]);
            let cause_relayed = if causes == ["RunJob"] {
                *run_job
            } else {
                t[..i]
                    .iter()
                    .rev()
                    .find(|s| causes.contains(&s.label.as_str()) || s.label == ASSIGNED_BY_REQUEST)
                    .filter(|s| s.label != ASSIGNED_BY_REQUEST)
                    .and_then(|s| s.relayed)
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
    workers: Workers,
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
    /// From the first submission until every worker was Terminated (ephemeral workers; pool
    /// workers stay).
    settled_secs: Option<f64>,
    /// How far behind the phase's events the audit service recorded them.
    audit: Option<AuditLag>,
    incomplete: Option<String>,
}

/// The audit service's lag over a throughput phase: each event's `recorded_at` (the audit
/// row's insert) minus its `occurred_at` (the producing transaction's clock), for every event
/// that occurred between the first submission and the last job's end. A service that keeps up
/// has a lag that stays flat from the phase's first fifth to its last; one that falls behind
/// has a lag that grows with the queue.
struct AuditLag {
    events: i64,
    /// Events a second over the phase (first to last occurrence).
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    first_fifth_p99_ms: f64,
    last_fifth_p99_ms: f64,
    /// From the last job's end until every event of the phase was recorded.
    caught_up_after_ms: Option<f64>,
}

/// The audit lag of the events that occurred between `from` and `to` (None if none did).
async fn audit_lag(
    system: &System,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Option<AuditLag>> {
    // Polled every 50 ms: this bounds, to that step, how long recording trailed the work.
    let caught_up_after_ms = system
        .audit_caught_up(to, Duration::from_secs(120))
        .await
        .then(|| ((Utc::now() - to).num_milliseconds().max(0)) as f64);
    type Row = (
        i64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let (events, span_s, p50, p99, max, first, last): Row = sqlx::query_as(
        "WITH e AS ( \
           SELECT occurred_at, extract(epoch FROM recorded_at - occurred_at) * 1000 AS lag, \
                  ntile(5) OVER (ORDER BY occurred_at) AS fifth \
           FROM audit_log WHERE occurred_at BETWEEN $1 AND $2) \
         SELECT count(*), extract(epoch FROM max(occurred_at) - min(occurred_at))::float8, \
                (percentile_cont(0.5) WITHIN GROUP (ORDER BY lag))::float8, \
                (percentile_cont(0.99) WITHIN GROUP (ORDER BY lag))::float8, max(lag)::float8, \
                (percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FILTER (WHERE fifth = 1))::float8, \
                (percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FILTER (WHERE fifth = 5))::float8 \
         FROM e",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&system.pool)
    .await?;
    Ok(match (p50, p99, max, first, last) {
        (Some(p50_ms), Some(p99_ms), Some(max_ms), Some(first), Some(last)) if events > 0 => {
            Some(AuditLag {
                events,
                rate: events as f64 / span_s.unwrap_or(0.0).max(1e-3),
                p50_ms,
                p99_ms,
                max_ms,
                first_fifth_p99_ms: first,
                last_fifth_p99_ms: last,
                caught_up_after_ms,
            })
        }
        _ => None,
    })
}

impl Throughput {
    fn not_run(workers: Workers, options: &Options, jobs: usize, why: String) -> Throughput {
        Throughput {
            workers,
            jobs,
            accepted: 0,
            refused: 0,
            in_flight: options.in_flight,
            submit_secs: 0.0,
            all_terminal_secs: None,
            succeeded: 0,
            states: Vec::new(),
            settled_secs: None,
            audit: None,
            incomplete: Some(why),
        }
    }
}

/// Jobs submitted as fast as the client can with `in_flight` requests at once.
struct Submitted {
    ids: Vec<Uuid>,
    /// The client's clock at the first submission.
    first_submit: DateTime<Utc>,
    started: Instant,
    secs: f64,
}

/// Submit `n` jobs (`request(i)` for the i-th), at most `in_flight` at once, until the deadline
/// passes or `low_memory` is raised.
async fn submit_many(
    system: &System,
    n: usize,
    in_flight: usize,
    deadline: Instant,
    low_memory: &AtomicBool,
    request: impl Fn(usize) -> hodei_protocol::api::SubmitJob,
) -> Submitted {
    let first_submit = Utc::now();
    let started = Instant::now();
    let results: Vec<Option<Uuid>> = futures::stream::iter(0..n)
        .map(|i| {
            let body = request(i);
            async move {
                // Stop adding load when the machine runs short of memory; the jobs already
                // accepted are still measured.
                if low_memory.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return None;
                }
                system.submit(&body).await.ok().map(|a| a.job_id)
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    Submitted {
        ids: results.into_iter().flatten().collect(),
        first_submit,
        started,
        secs: started.elapsed().as_secs_f64(),
    }
}

async fn throughput_run(
    system: &System,
    options: &Options,
    n: usize,
    workers: Workers,
    low_memory: &AtomicBool,
) -> anyhow::Result<Throughput> {
    let phase = match workers {
        Workers::Ephemeral => "throughput",
        Workers::Pool(_) => "warm throughput",
    };
    let phase_deadline = Instant::now() + options.deadline;
    let Submitted {
        ids,
        first_submit,
        started: t,
        secs: submit_secs,
    } = submit_many(
        system,
        n,
        options.in_flight,
        phase_deadline,
        low_memory,
        |_| job("true", &[]),
    )
    .await;
    let mut incomplete = low_memory
        .load(Ordering::Relaxed)
        .then(|| "submissions stopped: the machine had under 1 GiB of memory available".to_owned());
    eprintln!(
        "{phase}: {} accepted in {submit_secs:.1} s; waiting for them to end",
        ids.len()
    );

    let terminal = wait_jobs_closed(
        system,
        phase,
        first_submit,
        ids.len(),
        phase_deadline,
        || {},
    )
    .await?;
    let states = job_states(system, &ids).await?;
    let succeeded = states
        .iter()
        .find(|(state, _)| state == "Succeeded")
        .map_or(0, |(_, n)| *n as usize);
    let last_change = last_terminal_change(system, &ids).await?;
    let audit = match last_change {
        Some(to) => audit_lag(system, first_submit, to).await?,
        None => None,
    };
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

    // The workers' teardown is part of each job's cost (and of the CPU per job). Pool workers
    // stay: the run is over when no job is open.
    let mut settled_secs = None;
    if workers == Workers::Ephemeral {
        let settle_deadline = Instant::now() + Duration::from_secs(300).min(options.deadline);
        while Instant::now() < settle_deadline {
            let (open,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM workers WHERE state = ANY($1)")
                    .bind(&OPEN_WORKER[..])
                    .fetch_one(&system.pool)
                    .await?;
            if open == 0 {
                settled_secs = Some(t.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(Throughput {
        workers,
        jobs: n,
        accepted: ids.len(),
        refused: n - ids.len(),
        in_flight: options.in_flight,
        submit_secs,
        all_terminal_secs,
        succeeded,
        states,
        settled_secs,
        audit,
        incomplete,
    })
}

/// Wait until none of the jobs created since `since` is open, or the deadline; `tick` runs
/// at each check (every 500 ms). Returns how many of the `total` jobs are terminal.
async fn wait_jobs_closed(
    system: &System,
    phase: &str,
    since: DateTime<Utc>,
    total: usize,
    deadline: Instant,
    mut tick: impl FnMut(),
) -> anyhow::Result<usize> {
    // Poll what is still open (an index range on (state, created_at), cheap while most jobs
    // are done) rather than the whole set: the polling must not be a load of its own.
    let t = Instant::now();
    let mut last_report = Instant::now();
    loop {
        tick();
        let (open,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE state = ANY($1) AND created_at >= $2")
                .bind(&OPEN_JOB[..])
                .bind(since)
                .fetch_one(&system.pool)
                .await?;
        let terminal = total.saturating_sub(open as usize);
        if open == 0 || Instant::now() > deadline {
            return Ok(terminal);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{phase}: {terminal} of {total} terminal after {:.0} s",
                t.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many of the jobs are in each state, most first.
async fn job_states(system: &System, ids: &[Uuid]) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT state, count(*) FROM jobs WHERE id = ANY($1) GROUP BY state ORDER BY 2 DESC",
    )
    .bind(ids)
    .fetch_all(&system.pool)
    .await?)
}

/// The last terminal change (`updated_at`) of the jobs.
async fn last_terminal_change(
    system: &System,
    ids: &[Uuid],
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let (last,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT max(updated_at) FROM jobs WHERE id = ANY($1) AND state = ANY($2)")
            .bind(ids)
            .bind(&TERMINAL[..])
            .fetch_one(&system.pool)
            .await?;
    Ok(last)
}

// ----- backlog -----

struct Backlog {
    requested: usize,
    accepted: usize,
    submit_secs: f64,
    /// From the first submission until the dispatcher had consumed every JobQueued and every
    /// job was Pending.
    queued_secs: Option<f64>,
    /// The backlog's jobs by state once queued (all Pending, if nothing went wrong).
    states_queued: Vec<(String, i64)>,
    /// Workers alive once queued (none with no capacity).
    live_workers: i64,
    /// What PostgreSQL knew of the big tables when the plans were made: (table, live rows,
    /// last analyzed).
    table_stats: Vec<(String, i64, Option<DateTime<Utc>>)>,
    /// Each hot query's plan, and the tables it reads whole.
    plans: Vec<(String, String, Vec<String>)>,
    /// RSS (kB) of each service with the backlog queued.
    rss_queued: Vec<(String, u64)>,
    drain: Option<Drain>,
    incomplete: Option<String>,
}

impl Backlog {
    /// Whether no plan reads `jobs` or `outbox_events` whole.
    fn no_big_scan(&self) -> bool {
        !self.plans.is_empty()
            && self.plans.iter().all(|(_, _, scans)| {
                !scans
                    .iter()
                    .any(|table| table == "jobs" || table == "outbox_events")
            })
    }
}

struct Drain {
    pool: u32,
    /// From the dispatcher's restart to the last job's terminal change.
    all_terminal_secs: Option<f64>,
    /// From the restart to the first job placed.
    first_placed_secs: Option<f64>,
    succeeded: usize,
    states: Vec<(String, i64)>,
    /// Each service's RSS (kB) sampled each second of the drain: (name, first, max, last).
    rss: Vec<(String, u64, u64, u64)>,
    rss_samples: usize,
    cpu: CpuSnapshot,
    order: Option<PlacementOrder>,
    incomplete: Option<String>,
}

/// A job as the placement order sees it: (priority, created_at, id).
type JobKey = (i32, DateTime<Utc>, Uuid);

/// The backlog's jobs in the order they were placed (their first `JobAssigned`), against
/// priority, then submission order.
struct PlacementOrder {
    placed: usize,
    /// Pairs of jobs where the one placed first should have come second.
    inversions: u64,
    /// Places where a job was placed right after one that should have come after it.
    descents: usize,
    /// The first such place: (position, the job placed before, the job placed after).
    first_descent: Option<(usize, JobKey, JobKey)>,
}

/// Queue `--backlog` jobs with no capacity, plan the hot queries over it, then drain it with
/// a warm pool.
async fn backlog_run(
    system: &mut System,
    options: &Options,
    memory: &mut Memory,
    services: &mut Vec<(String, u32)>,
    nats_pid: Option<u32>,
) -> anyhow::Result<Backlog> {
    let n = options.backlog;
    eprintln!("backlog: restarting the dispatcher with no capacity and no pool");
    memory.note_peaks(services);
    let stopped = restart_dispatcher(
        system,
        &[("HODEI_WARM_POOL_SIZE", "0"), ("HODEI_MAX_WORKERS", "0")],
        0,
        options.deadline,
    )
    .await?;
    *services = service_pids(system);
    let mut result = Backlog {
        requested: n,
        accepted: 0,
        submit_secs: 0.0,
        queued_secs: None,
        states_queued: Vec::new(),
        live_workers: 0,
        table_stats: Vec::new(),
        plans: Vec::new(),
        rss_queued: Vec::new(),
        drain: None,
        incomplete: None,
    };
    if stopped.is_none() {
        result.incomplete = Some(format!(
            "the pool's workers were not all Terminated within the phase deadline ({} s)",
            options.deadline.as_secs()
        ));
        return Ok(result);
    }

    eprintln!(
        "backlog: {n} jobs, {} submissions in flight",
        options.in_flight
    );
    let phase_deadline = Instant::now() + options.deadline;
    let no_low_memory = AtomicBool::new(false);
    let submitted = submit_many(
        system,
        n,
        options.in_flight,
        phase_deadline,
        &no_low_memory,
        |i| {
            let mut request = job("true", &[]);
            request.policy.priority = (i % 3) as i32;
            // The backlog waits for placement by design: it must not time out meanwhile.
            request.policy.schedule_to_start_timeout_ms = 24 * 3600 * 1000;
            request
        },
    )
    .await;
    let ids = submitted.ids;
    result.accepted = ids.len();
    result.submit_secs = submitted.secs;
    eprintln!(
        "backlog: {} accepted in {:.1} s; waiting for the dispatcher to see every one",
        ids.len(),
        submitted.secs
    );

    // Every JobQueued published (the outbox is empty) and consumed by the dispatcher, and
    // every job Pending.
    let mut last_report = Instant::now();
    loop {
        let (pending,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE state = 'Pending' AND created_at >= $1",
        )
        .bind(submitted.first_submit)
        .fetch_one(&system.pool)
        .await?;
        let (unpublished,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM outbox_events WHERE status = 'pending'")
                .fetch_one(&system.pool)
                .await?;
        if pending as usize == ids.len()
            && unpublished == 0
            && system
                .consumer_caught_up("HODEI_EVENTS", "dispatcher-job-queued")
                .await
        {
            result.queued_secs = Some(submitted.started.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() > phase_deadline {
            result.incomplete = Some(format!(
                "{pending} of {} jobs Pending, {unpublished} outbox rows unpublished, the dispatcher's \
                 JobQueued consumer not caught up when the phase deadline ({} s) passed",
                ids.len(),
                options.deadline.as_secs()
            ));
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "backlog: {pending} of {} Pending, {unpublished} outbox rows unpublished after {:.0} s",
                ids.len(),
                submitted.started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    result.states_queued = job_states(system, &ids).await?;
    (result.live_workers,) =
        sqlx::query_as("SELECT count(*) FROM workers WHERE state <> 'Terminated'")
            .fetch_one(&system.pool)
            .await?;

    // The plans PostgreSQL picks now, with the statistics it has (autovacuum's).
    result.table_stats = sqlx::query_as(
        "SELECT relname::text, n_live_tup, greatest(last_analyze, last_autoanalyze) \
         FROM pg_stat_user_tables WHERE relname IN ('jobs', 'outbox_events', 'workers', 'audit_log') \
         ORDER BY relname",
    )
    .fetch_all(&system.pool)
    .await?;
    let mut conn = system.pool.acquire().await?;
    let plans = hodei_store::plans::explain_hot_queries(&mut conn).await?;
    drop(conn);
    result.plans = plans
        .into_iter()
        .map(|(name, plan)| {
            let scans = hodei_store::plans::sequential_scans(&plan);
            (name.to_owned(), plan, scans)
        })
        .collect();
    result.rss_queued = services
        .iter()
        .map(|(name, pid)| (name.clone(), status_kb(*pid, "VmRSS:").unwrap_or(0)))
        .collect();

    // The drain: a warm pool, the default capacity.
    let size = options.backlog_pool;
    eprintln!("backlog: draining {} jobs with a pool of {size}", ids.len());
    memory.note_peaks(services);
    let drain_deadline = Instant::now() + options.deadline;
    let restarted_at = Utc::now();
    keep_dispatcher_log(system);
    system.restart_with("dispatcher", &[("HODEI_WARM_POOL_SIZE", &size.to_string())]);
    *services = service_pids(system);
    let cpu_before = CpuSnapshot::take(system, services, nats_pid).await;
    let mut rss: Vec<(String, u64, u64, u64)> = Vec::new();
    let mut rss_samples = 0;
    let mut last_sample: Option<Instant> = None;
    let terminal = wait_jobs_closed(
        system,
        "backlog",
        submitted.first_submit,
        ids.len(),
        drain_deadline,
        || {
            if last_sample.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            last_sample = Some(Instant::now());
            rss_samples += 1;
            for (name, pid) in services.iter() {
                let kb = status_kb(*pid, "VmRSS:").unwrap_or(0);
                match rss.iter_mut().find(|(n, ..)| n == name) {
                    Some((_, _, max, last)) => {
                        *max = (*max).max(kb);
                        *last = kb;
                    }
                    None => rss.push((name.clone(), kb, kb, kb)),
                }
            }
        },
    )
    .await?;
    // The last sample is the end.
    for (name, pid) in services.iter() {
        if let (Some((_, _, max, last)), Some(kb)) = (
            rss.iter_mut().find(|(n, ..)| n == name),
            status_kb(*pid, "VmRSS:"),
        ) {
            *max = (*max).max(kb);
            *last = kb;
        }
    }
    let cpu = CpuSnapshot::take(system, services, nats_pid)
        .await
        .since(&cpu_before);
    let states = job_states(system, &ids).await?;
    let succeeded = states
        .iter()
        .find(|(state, _)| state == "Succeeded")
        .map_or(0, |(_, n)| *n as usize);
    let mut incomplete = None;
    let all_terminal_secs = if terminal == ids.len() {
        last_terminal_change(system, &ids)
            .await?
            .map(|at| between_ms(at, restarted_at) / 1000.0)
    } else {
        incomplete = Some(format!(
            "{terminal} of {} jobs terminal when the phase deadline ({} s) passed",
            ids.len(),
            options.deadline.as_secs()
        ));
        None
    };
    eprintln!("backlog: checking the placement order in the audit log");
    if !system
        .audit_caught_up(Utc::now(), Duration::from_secs(120))
        .await
    {
        eprintln!("backlog: the audit log was not complete after 120 s; checking what it has");
    }
    let placed: Vec<(Uuid, i32, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT j.id, j.priority, j.created_at, a.occurred_at FROM audit_log a \
         JOIN jobs j ON j.id = (a.payload->>'job_id')::uuid \
         WHERE a.event_type = 'JobAssigned' AND a.occurred_at >= $1 AND j.id = ANY($2) \
         ORDER BY a.occurred_at, a.seq",
    )
    .bind(submitted.first_submit)
    .bind(&ids)
    .fetch_all(&system.pool)
    .await?;
    let first_placed_secs = placed
        .first()
        .map(|(.., at)| between_ms(*at, restarted_at) / 1000.0);
    let mut seen = std::collections::HashSet::new();
    let order: Vec<JobKey> = placed
        .into_iter()
        .filter(|(id, ..)| seen.insert(*id))
        .map(|(id, priority, created_at, _)| (priority, created_at, id))
        .collect();
    result.drain = Some(Drain {
        pool: size,
        all_terminal_secs,
        first_placed_secs,
        succeeded,
        states,
        rss,
        rss_samples,
        cpu,
        order: (!order.is_empty()).then(|| placement_order(&order)),
        incomplete,
    });
    Ok(result)
}

/// Inversions of the placement order against priority (highest first), then submission order
/// (created_at, id).
fn placement_order(placed: &[JobKey]) -> PlacementOrder {
    let key = |job: &JobKey| (std::cmp::Reverse(job.0), job.1, job.2);
    let mut expected: Vec<usize> = (0..placed.len()).collect();
    expected.sort_by_key(|i| key(&placed[*i]));
    let mut rank = vec![0usize; placed.len()];
    for (r, i) in expected.into_iter().enumerate() {
        rank[i] = r;
    }
    // Pairs (i < j, rank i > rank j), counted with a Fenwick tree of the ranks seen so far.
    let mut tree = vec![0u64; placed.len() + 1];
    let mut inversions = 0u64;
    for (seen, r) in rank.iter().enumerate() {
        let mut below = 0u64;
        let mut k = *r + 1;
        while k > 0 {
            below += tree[k];
            k &= k - 1;
        }
        inversions += seen as u64 - below;
        let mut k = *r + 1;
        while k < tree.len() {
            tree[k] += 1;
            k += k & k.wrapping_neg();
        }
    }
    let descents: Vec<usize> = (1..rank.len()).filter(|i| rank[i - 1] > rank[*i]).collect();
    PlacementOrder {
        placed: placed.len(),
        inversions,
        descents: descents.len(),
        first_descent: descents.first().map(|i| (*i, placed[i - 1], placed[*i])),
    }
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

/// user + system time of this process's children that ended and were waited for, in seconds.
fn reaped_children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
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

/// What the provider-manager's agents have used so far, with their jobs: its reaped children
/// (cutime + cstime) and its live `hodei-agent` children (their own time and their reaped
/// jobs'). The agent spawner (`hodei-agent --spawner`, such a child) reaps the agents it
/// forks, so its live children count too. Between two snapshots an agent that ended moves
/// from the live term to its parent's reaped one, so the difference counts each agent's
/// time once, pool agents that stay included.
fn agents_cpu_seconds(provider_manager: u32) -> f64 {
    let agents = agent_processes(provider_manager);
    let live: f64 = agents
        .iter()
        .map(|pid| cpu_seconds(*pid).unwrap_or(0.0) + children_cpu_seconds(*pid).unwrap_or(0.0))
        .sum();
    children_cpu_seconds(provider_manager).unwrap_or(0.0) + live
}

/// The live `hodei-agent` processes of the provider-manager: its children, and theirs (the
/// agents the spawner forked).
fn agent_processes(provider_manager: u32) -> Vec<u32> {
    let with_parents: Vec<(u32, u32)> = pids()
        .filter_map(|pid| Some((pid, agent_parent(pid)?)))
        .collect();
    let children: HashSet<u32> = with_parents
        .iter()
        .filter(|(_, parent)| *parent == provider_manager)
        .map(|(pid, _)| *pid)
        .collect();
    with_parents
        .into_iter()
        .filter(|(_, parent)| *parent == provider_manager || children.contains(parent))
        .map(|(pid, _)| pid)
        .collect()
}

/// Whether `pid` is a `hodei-agent` of the provider-manager (see [`agent_processes`]).
fn is_agent_of(pid: u32, provider_manager: u32) -> bool {
    agent_parent(pid)
        .is_some_and(|p| p == provider_manager || agent_parent(p) == Some(provider_manager))
}

/// The parent of `pid` if it is a live `hodei-agent`.
fn agent_parent(pid: u32) -> Option<u32> {
    let parent = stat_fields(pid)?.get(1)?.parse().ok()?;
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim() == "hodei-agent")
        .then_some(parent)
}

/// CPU seconds consumed so far by the services, the agents (and their jobs, see
/// [`agents_cpu_seconds`]), the nats-server and this database's PostgreSQL backends, and the
/// work done so far ([`Work`]).
#[derive(Default)]
struct CpuSnapshot {
    services: BTreeMap<String, f64>,
    agents: f64,
    nats: f64,
    postgres: HashMap<u32, f64>,
    work: Work,
}

/// Counts of the work done, which do not vary with the machine's speed as CPU time does:
/// what a change removes shows here exactly, where CPU per job moves within the noise.
/// PostgreSQL's write transactions (transaction ids assigned) and WAL bytes are the cluster's
/// (the benchmark's database is the only one in use); messages stored are per stream (the
/// last sequence), deliveries per durable consumer (its consumer sequence, redeliveries
/// included; the agents' consumers on HODEI_WORKER_CMDS come and go and are not counted).
/// The two PostgreSQL figures are `None` when they could not be read (no figure rather than
/// a wrong one).
#[derive(Default)]
struct Work {
    write_transactions: Option<f64>,
    wal_bytes: Option<f64>,
    stored: BTreeMap<String, f64>,
    delivered: BTreeMap<String, f64>,
}

impl Work {
    const STREAMS: [&'static str; 5] = [
        hodei_messaging::streams::SUBMISSIONS,
        hodei_messaging::streams::EVENTS,
        hodei_messaging::streams::WORKER_CMDS,
        hodei_messaging::streams::AGENT,
        hodei_messaging::streams::LOGS,
    ];

    async fn take(system: &System) -> Work {
        let (xid, wal): (Option<i64>, Option<f64>) = sqlx::query_as(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8",
        )
        .fetch_one(&system.pool)
        .await
        .unwrap_or_else(|error| {
            eprintln!(
                "hodei-bench: cannot read PostgreSQL's transaction id and WAL position: {error}"
            );
            (None, None)
        });
        let mut work = Work {
            write_transactions: xid.map(|xid| xid as f64),
            wal_bytes: wal,
            ..Work::default()
        };
        for name in Work::STREAMS {
            let Ok(mut stream) = system.js.get_stream(name).await else {
                continue;
            };
            if let Ok(info) = stream.info().await {
                work.stored
                    .insert(name.to_owned(), info.state.last_sequence as f64);
            }
            if name == hodei_messaging::streams::WORKER_CMDS {
                continue;
            }
            let mut consumers = stream.consumers();
            while let Some(Ok(info)) = consumers.next().await {
                if info.config.durable_name.is_some() {
                    work.delivered
                        .insert(info.name.clone(), info.delivered.consumer_sequence as f64);
                }
            }
        }
        work
    }

    /// What was done since `before` (a consumer or stream first seen after it counts from 0).
    fn since(&self, before: &Work) -> Work {
        let minus = |now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).unwrap_or(&0.0)))
                .collect()
        };
        let minus_figure = |now: Option<f64>, then: Option<f64>| Some(now? - then?);
        Work {
            write_transactions: minus_figure(self.write_transactions, before.write_transactions),
            wal_bytes: minus_figure(self.wal_bytes, before.wal_bytes),
            stored: minus(&self.stored, &before.stored),
            delivered: minus(&self.delivered, &before.delivered),
        }
    }
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
                .map(|(_, pid)| agents_cpu_seconds(*pid))
                .unwrap_or(0.0),
            nats: nats.and_then(cpu_seconds).unwrap_or(0.0),
            postgres: backends
                .iter()
                .filter_map(|(pid,)| Some((*pid as u32, cpu_seconds(*pid as u32)?)))
                .collect(),
            work: Work::take(system).await,
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
            work: self.work.since(&before.work),
        }
    }

    fn control_plane(&self) -> f64 {
        self.services.values().sum()
    }
}

/// The services' RSS after each phase, and their peaks.
#[derive(Default)]
struct Memory {
    /// (after which phase, RSS in kB by service), in run order.
    rss: Vec<(&'static str, BTreeMap<String, u64>)>,
    /// Peak RSS (VmHWM) by service, over every process that ran it (the dispatcher is
    /// restarted for the warm and backlog phases).
    peak_kb: BTreeMap<String, u64>,
    /// Processes seen per service.
    processes: BTreeMap<String, std::collections::BTreeSet<u32>>,
}

impl Memory {
    fn snapshot(&mut self, phase: &'static str, services: &[(String, u32)]) {
        let rss = services
            .iter()
            .map(|(name, pid)| (name.clone(), status_kb(*pid, "VmRSS:").unwrap_or(0)))
            .collect();
        self.rss.push((phase, rss));
        self.note_peaks(services);
    }

    /// Read the peaks of the processes now (before a service is restarted).
    fn note_peaks(&mut self, services: &[(String, u32)]) {
        for (name, pid) in services {
            let hwm = status_kb(*pid, "VmHWM:").unwrap_or(0);
            let peak = self.peak_kb.entry(name.clone()).or_default();
            *peak = (*peak).max(hwm);
            self.processes.entry(name.clone()).or_default().insert(*pid);
        }
    }
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
/// pid is taken if it is a `hodei-agent` of the provider-manager ([`is_agent_of`]). Scanning all of /proc
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
                    if is_agent_of(pid, provider_manager) && live.insert(pid, 0).is_none() {
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
        let nats = system
            .nats
            .pid()
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

fn report(s: &mut String, options: &Options, r: &Results) -> std::fmt::Result {
    let (machine, floor) = (&r.machine, &r.floor);
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
    if let Some(true_ms) = floor.true_cpu_ms {
        writeln!(
            s,
            "CPU of one `/bin/true` process (user + system, exec to exit; the throughput runs' job): {true_ms:.3} ms.\n"
        )?;
    }
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
    let incomplete = |run: &Latency| {
        format!(
            "{}{}",
            if run.timed_out > 0 {
                format!(
                    ", {} failed to be submitted or to settle in 60 s",
                    run.timed_out
                )
            } else {
                String::new()
            },
            run.incomplete
                .as_ref()
                .map(|r| format!("; **incomplete: {r}**"))
                .unwrap_or_default()
        )
    };
    if let Some(cold) = &r.cold {
        writeln!(
            s,
            "Cold: each job (`date +%s%N`) is submitted with no worker ready, through `hodei.api.jobs.submit`; the next \
             is submitted once this one's worker is Terminated. \"Process start\" is the clock the job's own process \
             prints as it starts (client and job read the same clock; the floor's `date` row is the part of it that is \
             `date` starting up). {} jobs measured of {} requested ({} not counted first), in {:.0} s{}.\n",
            cold.run.jobs.len(),
            cold.run.requested,
            options.warmup,
            cold.run.elapsed.as_secs_f64(),
            incomplete(&cold.run),
        )?;
    }
    if let Some(warm) = &r.warm {
        writeln!(
            s,
            "Warm: the dispatcher restarted with a warm pool of {} (`HODEI_WARM_POOL_SIZE={}`, \
             `HODEI_WARM_POOL_MAX_JOBS=1000000`: no pool worker is replaced during the run){}. Each job \
             (`date +%s%N`) finds a Ready pool worker; the next is submitted once every pool worker is Ready \
             again. {} jobs measured of {} requested ({} not counted first), in {:.0} s{}.\n",
            options.pool,
            options.pool,
            warm.pool_ready_secs
                .map(|x| format!(", every pool worker Ready {x:.1} s after the restart"))
                .unwrap_or_default(),
            warm.run.jobs.len(),
            warm.run.requested,
            options.warmup,
            warm.run.elapsed.as_secs_f64(),
            incomplete(&warm.run),
        )?;
    }
    writeln!(
        s,
        "| measurement | n | p50 | p90 | p99 | max | target | met |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---|---|")?;
    latency_rows(s, "cold", r.cold.as_ref(), (10.0, 25.0))?;
    latency_rows(s, "warm", r.warm.as_ref(), (3.0, 10.0))?;
    writeln!(s)?;

    writeln!(s, "### Throughput\n")?;
    writeln!(s, "| workers | jobs accepted | in flight | all submitted after s | all terminal after s | jobs/s | succeeded | all workers Terminated after s | target | met |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|---|")?;
    throughput_row(
        s,
        "ephemeral (process provider)",
        "throughput",
        r.throughput.as_ref(),
        300.0,
    )?;
    throughput_row(
        s,
        &format!("warm pool ({} workers)", options.pool_throughput),
        "warm-throughput",
        r.warm_throughput.as_ref(),
        1000.0,
    )?;
    writeln!(s)?;
    for (label, phase) in [
        ("Ephemeral run", r.throughput.as_ref()),
        ("Warm run", r.warm_throughput.as_ref()),
    ] {
        let Some(phase) = phase else { continue };
        let run = &phase.run;
        let states: Vec<String> = run
            .states
            .iter()
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        let pool = match run.workers {
            Workers::Ephemeral => String::new(),
            Workers::Pool(size) => format!(
                " The dispatcher was restarted with a pool of {size} (`HODEI_WARM_POOL_MAX_JOBS` at its default, \
                 100: each pool worker is replaced after 100 jobs){}; the run ends when no job is open (pool \
                 workers stay).",
                phase
                    .pool_ready_secs
                    .map(|x| format!(", every pool worker Ready {x:.1} s after the restart"))
                    .unwrap_or_default()
            ),
        };
        writeln!(
            s,
            "{label}: {} submissions not accepted; the accepted jobs ended {}{}.{pool}",
            run.refused,
            if states.is_empty() {
                "–".to_owned()
            } else {
                states.join(", ")
            },
            run.incomplete
                .as_ref()
                .map(|r| format!("; **incomplete: {r}**"))
                .unwrap_or_default()
        )?;
    }
    writeln!(
        s,
        "{}jobs/s counts every terminal job; the target is met only if every job succeeded.\n",
        if r.throughput.is_some() || r.warm_throughput.is_some() {
            "\n"
        } else {
            ""
        }
    )?;

    audit_lag_section(s, r)?;
    memory_and_cpu(s, options, r)?;
    if let Some(backlog) = &r.backlog {
        backlog_section(s, options, backlog)?;
    }

    let mut explained = false;
    for (title, phase) in [("cold", r.cold.as_ref()), ("warm", r.warm.as_ref())] {
        if let Some(phase) = phase {
            profile_section(s, title, phase, !explained)?;
            explained = true;
        }
    }
    Ok(())
}

/// The latency rows of a cold or warm run (`target`: p50 and p99 of submit → process start).
fn latency_rows(
    s: &mut String,
    phase: &str,
    run: Option<&LatencyPhase>,
    (p50, p99): (f64, f64),
) -> std::fmt::Result {
    let target = format!("p50 ≤ {p50}, p99 ≤ {p99}");
    let Some(run) = run else {
        return writeln!(
            s,
            "| {phase}: submit → process start | not measured (`--{phase} 0`) | | | | | {target} | not measured |"
        );
    };
    let profile = &run.profile;
    let start = Summary::of(&profile.to_process_start);
    let met = start.is_some_and(|x| x.p50 <= p50 && x.p99 <= p99);
    writeln!(
        s,
        "| {phase}: submit → process start (job's clock) | {} | {target} | {} |",
        Summary::cells(start),
        verdict(met)
    )?;
    writeln!(
        s,
        "| {phase}: submit → `JobStatusChanged → Running` recorded | {} | | |",
        Summary::cells(Summary::of(&profile.to_running_recorded))
    )?;
    writeln!(
        s,
        "| {phase}: submit → result recorded (`JobCompleted` occurred_at) | {} | | |",
        Summary::cells(Summary::of(&profile.to_result_recorded))
    )?;
    writeln!(
        s,
        "| {phase}: submit → client receives `JobCompleted` from NATS | {} | | |",
        Summary::cells(Summary::of(&profile.to_result_seen))
    )?;
    writeln!(
        s,
        "| {phase}: submit request → accepted reply | {} | | |",
        Summary::cells(Summary::of(&profile.submit_round_trip))
    )?;
    let settled = match run.run.workers {
        Workers::Ephemeral => "worker Terminated",
        Workers::Pool(_) => "every pool worker Ready again",
    };
    writeln!(
        s,
        "| {phase}: submit → {settled} | {} | | |",
        Summary::cells(Summary::of(&profile.settled))
    )
}

fn throughput_row(
    s: &mut String,
    label: &str,
    flag: &str,
    phase: Option<&ThroughputPhase>,
    target: f64,
) -> std::fmt::Result {
    let Some(phase) = phase else {
        return writeln!(
            s,
            "| {label} | not measured (`--{flag} 0`) | | | | | | | ≥ {target} jobs/s | not measured |"
        );
    };
    let t = &phase.run;
    let rate = t.all_terminal_secs.map(|secs| t.accepted as f64 / secs);
    let settled = match t.workers {
        Workers::Ephemeral => t
            .settled_secs
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "not within 300 s".into()),
        Workers::Pool(_) => "– (the pool stays)".into(),
    };
    writeln!(
        s,
        "| {label} | {} of {} | {} | {:.1} | {} | {} | {} | {settled} | ≥ {target} jobs/s | {} |",
        t.accepted,
        t.jobs,
        t.in_flight,
        t.submit_secs,
        t.all_terminal_secs
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "–".into()),
        rate.map(|r| format!("{r:.1}"))
            .unwrap_or_else(|| "–".into()),
        t.succeeded,
        verdict(rate.is_some_and(|r| r >= target) && t.accepted > 0 && t.succeeded == t.accepted),
    )
}

/// Whether the audit service kept up with each throughput phase.
fn audit_lag_section(s: &mut String, r: &Results) -> std::fmt::Result {
    let phases: Vec<(&str, &AuditLag)> = [
        ("ephemeral", r.throughput.as_ref()),
        ("warm pool", r.warm_throughput.as_ref()),
    ]
    .into_iter()
    .filter_map(|(label, p)| Some((label, p?.run.audit.as_ref()?)))
    .collect();
    if phases.is_empty() {
        return Ok(());
    }
    writeln!(
        s,
        "### The audit service during the throughput phases
"
    )?;
    writeln!(
        s,
        "Lag: an event's `recorded_at` in the audit log minus its `occurred_at` (the transaction that raised it), \
         over every event between the phase's first submission and its last job's end. Keeping up means the lag \
         of the phase's last fifth is no larger than that of its first fifth.\n"
    )?;
    writeln!(s, "| phase | events | events/s | lag p50 ms | lag p99 ms | max ms | p99 first fifth | p99 last fifth | all recorded after the last job's end | keeps up |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
    for (label, a) in phases {
        writeln!(
            s,
            "| {label} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            a.events,
            a.rate,
            ms(a.p50_ms),
            ms(a.p99_ms),
            ms(a.max_ms),
            ms(a.first_fifth_p99_ms),
            ms(a.last_fifth_p99_ms),
            a.caught_up_after_ms
                .map(|x| format!("≤ {} ms", ms(x)))
                .unwrap_or_else(|| "not within 120 s".into()),
            verdict(a.keeps_up()),
        )?;
    }
    writeln!(s)
}

impl AuditLag {
    /// The lag did not grow over the phase (within 50 ms or a factor of 2 of the first fifth's)
    /// and the audit log was complete soon after the last job ended.
    fn keeps_up(&self) -> bool {
        self.last_fifth_p99_ms
            <= (self.first_fifth_p99_ms * 2.0).max(self.first_fifth_p99_ms + 50.0)
            && self.caught_up_after_ms.is_some_and(|x| x < 1000.0)
    }
}

fn memory_and_cpu(s: &mut String, options: &Options, r: &Results) -> std::fmt::Result {
    writeln!(s, "### Memory and CPU\n")?;
    let memory = &r.memory;
    writeln!(
        s,
        "RSS in MiB from /proc/<pid>/status after each phase; peak = VmHWM over the whole run (over every \
         process of a service: the dispatcher is restarted for the warm and backlog phases).\n"
    )?;
    let mut header = "| process |".to_owned();
    let mut rule = "|---|".to_owned();
    for (phase, _) in &memory.rss {
        header += &format!(" RSS {phase} |");
        rule += "---:|";
    }
    writeln!(s, "{header} peak RSS | target | met |")?;
    writeln!(s, "{rule}---:|---|---|")?;
    for name in hodei_tests::SERVICES {
        let processes = memory.processes.get(name).map_or(0, |p| p.len());
        let mut row = if processes > 1 {
            format!("| {name} ({processes} processes) |")
        } else {
            format!("| {name} |")
        };
        for (_, rss) in &memory.rss {
            row += &format!(
                " {} |",
                rss.get(name).map(|kb| mib(*kb)).unwrap_or_default()
            );
        }
        let peak = memory.peak_kb.get(name).copied().unwrap_or(0);
        writeln!(
            s,
            "{row} {} | ≤ 30 MB | {} |",
            mib(peak),
            verdict(peak as f64 * 1024.0 <= 30e6)
        )?;
    }
    let blanks = " |".repeat(memory.rss.len());
    let agent_phases = [
        ("cold", r.cold.as_ref().map(|p| &p.agents)),
        ("throughput", r.throughput.as_ref().map(|p| &p.agents)),
        ("warm", r.warm.as_ref().map(|p| &p.agents)),
        (
            "warm throughput",
            r.warm_throughput.as_ref().map(|p| &p.agents),
        ),
    ];
    for (phase, agents) in agent_phases {
        let Some(agents) = agents else { continue };
        let peaks: Vec<f64> = agents.hwm_kb.iter().map(|kb| *kb as f64).collect();
        let summary = Summary::of(&peaks);
        let max_hwm = summary.map(|x| x.max as u64).unwrap_or(0);
        writeln!(
            s,
            "| agent ({phase} run: {} sampled, at most {} alive at once; peak RSS p50 {} MiB) |{blanks} {} (max) | ≤ 10 MB | {} |",
            agents.agents,
            agents.peak_alive,
            summary.map(|x| mib(x.p50 as u64)).unwrap_or_else(|| "–".into()),
            mib(max_hwm),
            if agents.agents == 0 { "not measured" } else { verdict(max_hwm as f64 * 1024.0 <= 10e6) },
        )?;
    }

    // CPU, per phase that ran: (label, what it used, jobs it ran).
    let latency_jobs = |p: &LatencyPhase| {
        if p.run.jobs.is_empty() {
            0
        } else {
            p.run.jobs.len() + options.warmup
        }
    };
    // (label, what it used, jobs it ran); the throughput and backlog runs' jobs are
    // `/bin/true`, whose own CPU the floor measured.
    let mut phases: Vec<(&str, &CpuSnapshot, usize)> = Vec::new();
    if let Some(p) = &r.cold {
        phases.push(("cold", &p.cpu, latency_jobs(p)));
    }
    if let Some(p) = &r.throughput {
        phases.push(("throughput", &p.cpu, p.run.accepted));
    }
    if let Some(p) = &r.warm {
        phases.push(("warm", &p.cpu, latency_jobs(p)));
    }
    if let Some(p) = &r.warm_throughput {
        phases.push(("warm throughput", &p.cpu, p.run.accepted));
    }
    if let Some(drain) = r
        .backlog
        .as_ref()
        .and_then(|b| b.drain.as_ref().map(|d| (b, d)))
    {
        phases.push(("backlog drain", &drain.1.cpu, drain.0.accepted));
    }
    if phases.is_empty() {
        return Ok(());
    }
    writeln!(
        s,
        "\nCPU = utime + stime of the process itself, in seconds, over each phase: {}.\n",
        phases
            .iter()
            .map(|(phase, _, jobs)| format!("{phase} ({jobs} jobs)"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let header: String = phases.iter().map(|(p, ..)| format!(" {p} |")).collect();
    let rule = "---:|".repeat(phases.len());
    writeln!(s, "| CPU s |{header}")?;
    writeln!(s, "|---|{rule}")?;
    for name in hodei_tests::SERVICES {
        let cells: String = phases
            .iter()
            .map(|(_, cpu, _)| format!(" {:.2} |", cpu.services.get(name).unwrap_or(&0.0)))
            .collect();
        writeln!(s, "| {name} |{cells}")?;
    }
    let per_job = |cpu: f64, jobs: usize| {
        if jobs == 0 {
            "–".to_owned()
        } else {
            format!("{:.2}", cpu * 1000.0 / jobs as f64)
        }
    };
    let pg = |c: &CpuSnapshot| c.postgres.values().sum::<f64>();
    let all = |c: &CpuSnapshot| c.control_plane() + c.agents + c.nats + pg(c);
    let row = |label: &str, f: &dyn Fn(&CpuSnapshot) -> f64| -> String {
        let cells: String = phases
            .iter()
            .map(|(_, cpu, jobs)| format!(" {} |", per_job(f(cpu), *jobs)))
            .collect();
        format!("| {label} |{cells}")
    };
    writeln!(s)?;
    writeln!(s, "| CPU ms per job |{header}")?;
    writeln!(s, "|---|{rule}")?;
    writeln!(
        s,
        "{}",
        row("control plane (the six services)", &|c| c.control_plane())
    )?;
    writeln!(
        s,
        "{}",
        row(
            "agents and their jobs (the provider-manager's agents, its spawner's included: reaped and live; context)",
            &|c| c.agents
        )
    )?;
    writeln!(s, "{}", row("nats-server (context)", &|c| c.nats))?;
    writeln!(
        s,
        "{}",
        row(
            "PostgreSQL backends of this database (context; includes the benchmark's own polling)",
            &|c| pg(c)
        )
    )?;
    writeln!(s, "{}", row("all of the above", &|c| all(c)))?;
    if let Some(true_ms) = r.floor.true_cpu_ms {
        let cells: String = phases
            .iter()
            .map(|(phase, cpu, jobs)| match *phase {
                "cold" | "warm" => " – |".to_owned(),
                _ if *jobs == 0 => " – |".to_owned(),
                _ => format!(" {:.2} |", all(cpu) * 1000.0 / *jobs as f64 - true_ms),
            })
            .collect();
        writeln!(
            s,
            "| all of the above but the job's own process (`/bin/true`, {true_ms:.2} ms each in the floor; what the targets count) |{cells}"
        )?;
    }
    let ceilings: Vec<String> = phases
        .iter()
        .filter(|(phase, ..)| *phase != "cold" && *phase != "warm")
        .filter(|(_, cpu, jobs)| *jobs > 0 && all(cpu) > 0.0)
        .map(|(phase, cpu, jobs)| {
            format!(
                "{:.0} jobs/s at the cost of the {phase} run",
                machine_cpus(r) * *jobs as f64 / all(cpu)
            )
        })
        .collect();
    if !ceilings.is_empty() {
        writeln!(
            s,
            "\nAt those CPU costs per job, {} CPUs can run at most (CPUs × 1000 / CPU ms per job): {}.",
            r.machine.nproc,
            ceilings.join("; ")
        )?;
    }
    write_work(s, &phases, &header, &rule)?;
    for (phase, agents) in [
        ("throughput", r.throughput.as_ref().map(|p| &p.agents)),
        (
            "warm throughput",
            r.warm_throughput.as_ref().map(|p| &p.agents),
        ),
    ] {
        if let Some(kb) = agents.and_then(|a| a.min_available_kb) {
            writeln!(
                s,
                "\nLeast memory available on the machine during the {phase} run: {} MiB.",
                kb / 1024
            )?;
        }
    }
    writeln!(s)
}

fn machine_cpus(r: &Results) -> f64 {
    r.machine.nproc as f64
}

/// The work per job of each phase ([`Work`]): PostgreSQL's write transactions and WAL,
/// the messages each stream stored and what each durable consumer was delivered.
fn write_work(
    s: &mut String,
    phases: &[(&str, &CpuSnapshot, usize)],
    header: &str,
    rule: &str,
) -> std::fmt::Result {
    let per_job = |value: Option<f64>, jobs: usize| match (value, jobs) {
        (None, _) | (_, 0) => "–".to_owned(),
        (Some(value), _) => format!("{:.2}", value / jobs as f64),
    };
    let row = |s: &mut String, label: &str, f: &dyn Fn(&Work) -> Option<f64>| {
        let cells: String = phases
            .iter()
            .map(|(_, cpu, jobs)| format!(" {} |", per_job(f(&cpu.work), *jobs)))
            .collect();
        writeln!(s, "| {label} |{cells}")
    };
    writeln!(
        s,
        "\nWork per job over the same phases: counts that do not vary with the machine's speed \
         (PostgreSQL's write transactions and WAL are the cluster's; deliveries count redeliveries; \
         the agents' own consumers of HODEI_WORKER_CMDS are not listed).\n"
    )?;
    writeln!(s, "| per job |{header}")?;
    writeln!(s, "|---|{rule}")?;
    row(s, "PostgreSQL write transactions", &|w| {
        w.write_transactions
    })?;
    row(s, "PostgreSQL WAL (KiB)", &|w| {
        w.wal_bytes.map(|b| b / 1024.0)
    })?;
    fn stored(w: &Work) -> &BTreeMap<String, f64> {
        &w.stored
    }
    fn delivered(w: &Work) -> &BTreeMap<String, f64> {
        &w.delivered
    }
    let names = |of: fn(&Work) -> &BTreeMap<String, f64>| {
        let mut names: Vec<String> = phases
            .iter()
            .flat_map(|(_, cpu, _)| of(&cpu.work).keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    };
    for stream in names(stored) {
        row(s, &format!("messages stored in {stream}"), &|w| {
            Some(w.stored.get(&stream).copied().unwrap_or(0.0))
        })?;
    }
    for consumer in names(delivered) {
        row(s, &format!("delivered to `{consumer}`"), &|w| {
            Some(w.delivered.get(&consumer).copied().unwrap_or(0.0))
        })?;
    }
    Ok(())
}

fn backlog_section(s: &mut String, options: &Options, b: &Backlog) -> std::fmt::Result {
    writeln!(s, "### Backlog\n")?;
    let states = |states: &[(String, i64)]| {
        if states.is_empty() {
            "–".to_owned()
        } else {
            states
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    writeln!(
        s,
        "{} jobs (`true`, priority i % 3, a 24 h schedule-to-start timeout so that none times out while it waits) \
         submitted with {} in flight to a dispatcher restarted with no capacity (`HODEI_MAX_WORKERS=0`, no pool): \
         {} accepted in {:.1} s ({:.0} submissions/s). {} Jobs then: {}; workers alive: {}.{}\n",
        b.requested,
        options.in_flight,
        b.accepted,
        b.submit_secs,
        if b.submit_secs > 0.0 { b.accepted as f64 / b.submit_secs } else { 0.0 },
        match b.queued_secs {
            Some(secs) => format!(
                "The dispatcher had consumed every JobQueued (`dispatcher-job-queued` caught up, the outbox \
                 published) and every job was Pending {secs:.1} s after the first submission."
            ),
            None => "The dispatcher had not seen every job when the wait ended.".to_owned(),
        },
        states(&b.states_queued),
        b.live_workers,
        b.incomplete
            .as_ref()
            .map(|r| format!(" **Incomplete: {r}.**"))
            .unwrap_or_default()
    )?;
    writeln!(s, "| check | result | target | met |")?;
    writeln!(s, "|---|---|---|---|")?;
    let scanning: Vec<String> = b
        .plans
        .iter()
        .filter_map(|(name, _, scans)| {
            let big: Vec<&str> = scans
                .iter()
                .map(String::as_str)
                .filter(|t| *t == "jobs" || *t == "outbox_events")
                .collect();
            (!big.is_empty()).then(|| format!("{name}: `{}`", big.join("`, `")))
        })
        .collect();
    writeln!(
        s,
        "| hot queries reading `jobs` or `outbox_events` whole, with the backlog queued ({} planned) | {} | none | {} |",
        b.plans.len(),
        if b.plans.is_empty() {
            "not planned".to_owned()
        } else if scanning.is_empty() {
            "none".to_owned()
        } else {
            scanning.join("; ")
        },
        if b.plans.is_empty() { "not measured" } else if b.no_big_scan() { verdict(true) } else { "no (missed)" },
    )?;
    if let Some(d) = &b.drain {
        let rate = d.all_terminal_secs.map(|secs| b.accepted as f64 / secs);
        writeln!(
            s,
            "| drain with a pool of {}: every job terminal, from the dispatcher's restart | {} | | |",
            d.pool,
            d.all_terminal_secs
                .map(|x| format!("{x:.1} s"))
                .unwrap_or_else(|| "not within the phase deadline".into())
        )?;
        writeln!(
            s,
            "| drain: jobs/s ({} succeeded of {}) | {} | | |",
            d.succeeded,
            b.accepted,
            rate.map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "–".into())
        )?;
        match &d.order {
            Some(o) => writeln!(
                s,
                "| placed in priority then submission order ({} of {} jobs placed) | {} ({} inversions) | yes | {} |",
                o.placed,
                b.accepted,
                if o.inversions == 0 { "yes" } else { "no" },
                o.inversions,
                if o.placed == b.accepted && o.inversions == 0 { verdict(true) } else { "no (missed)" },
            )?,
            None => writeln!(
                s,
                "| placed in priority then submission order | no job placed | yes | not measured |"
            )?,
        }
    }
    writeln!(s)?;
    if let Some(d) = &b.drain {
        writeln!(
            s,
            "Drain: the dispatcher restarted with a pool of {} (`HODEI_WARM_POOL_SIZE={}`, the default capacity and \
             `HODEI_WARM_POOL_MAX_JOBS`); the first job was placed {} after the restart; the jobs ended {}{}.",
            d.pool,
            d.pool,
            d.first_placed_secs
                .map(|x| format!("{x:.1} s"))
                .unwrap_or_else(|| "never".into()),
            states(&d.states),
            d.incomplete
                .as_ref()
                .map(|r| format!("; **incomplete: {r}**"))
                .unwrap_or_default()
        )?;
        if let Some(o) = &d.order {
            let show = |job: &JobKey| {
                format!(
                    "priority {}, created {}, `{}`",
                    job.0,
                    job.1.format("%H:%M:%S%.6f"),
                    job.2
                )
            };
            writeln!(
                s,
                "Placement order: each job's first `JobAssigned` in the audit log's order (occurred_at, seq), against \
                 priority (highest first), then (created_at, id). {} inversions (pairs of jobs placed the wrong way \
                 round), at {} places{}.",
                o.inversions,
                o.descents,
                o.first_descent
                    .as_ref()
                    .map(|(at, before, after)| format!(
                        "; the first at position {at}: {} placed before {}",
                        show(before),
                        show(after)
                    ))
                    .unwrap_or_default()
            )?;
        }
        writeln!(
            s,
            "\nRSS in MiB: with the backlog queued, then sampled each second of the drain ({} samples; the \
             dispatcher's is the process started for the drain).\n",
            d.rss_samples
        )?;
        writeln!(
            s,
            "| service | backlog queued | drain start | drain max | drain end | end − start |"
        )?;
        writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
        for (name, first, max, last) in &d.rss {
            let queued = b
                .rss_queued
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, kb)| mib(*kb))
                .unwrap_or_default();
            writeln!(
                s,
                "| {name} | {queued} | {} | {} | {} | {:+.1} |",
                mib(*first),
                mib(*max),
                mib(*last),
                (*last as f64 - *first as f64) / 1024.0
            )?;
        }
        writeln!(s)?;
    }
    if !b.plans.is_empty() {
        let stats: Vec<String> = b
            .table_stats
            .iter()
            .map(|(table, rows, analyzed)| {
                format!(
                    "`{table}` {rows} live rows, {}",
                    analyzed
                        .map(|at| format!("analyzed {}", at.format("%H:%M:%S")))
                        .unwrap_or_else(|| "never analyzed".into())
                )
            })
            .collect();
        writeln!(
            s,
            "The hot queries' plans (`hodei_store::plans`, EXPLAIN of the prepared statements) with the backlog \
             queued, on the statistics autovacuum had then ({}):\n",
            stats.join("; ")
        )?;
        writeln!(s, "| hot query | reads whole |")?;
        writeln!(s, "|---|---|")?;
        for (name, _, scans) in &b.plans {
            writeln!(
                s,
                "| {name} | {} |",
                if scans.is_empty() {
                    "–".to_owned()
                } else {
                    format!("`{}`", scans.join("`, `"))
                }
            )?;
        }
        writeln!(
            s,
            "\n<details><summary>EXPLAIN of each hot query</summary>\n"
        )?;
        for (name, plan, _) in &b.plans {
            writeln!(s, "{name}:\n\n```\n{plan}\n```\n")?;
        }
        writeln!(s, "</details>\n")?;
    }
    Ok(())
}

fn profile_section(
    s: &mut String,
    phase: &str,
    run: &LatencyPhase,
    explain: bool,
) -> std::fmt::Result {
    let profile = &run.profile;
    writeln!(s, "### Where the {phase} latency goes\n")?;
    let trail = match run.run.workers {
        Workers::Ephemeral => "Each cold job's audit trail (every event under its correlation id, its worker's included)",
        Workers::Pool(_) => "Each warm job's audit trail (every event under its correlation id, and its pool worker's events from its submission until the pool was Ready again)",
    };
    writeln!(
        s,
        "{trail}, `occurred_at` stamped by the process that made the change, before its commit, with the client's \
         submit time and the job's own start time, in time order. The most common order of steps, followed by {} \
         of {} jobs, is profiled: the gap from the step before, and the time since submit.{}\n",
        profile.following,
        run.run.jobs.len(),
        if profile.unprofiled > 0 {
            format!(" {} jobs had no complete trail or clock.", profile.unprofiled)
        } else {
            String::new()
        }
    )?;
    if explain {
        writeln!(
            s,
            "The last three columns take a gap apart where the outbox carries it (p50 each), with the outbox row's \
             `published_at`: the `now()` of the transaction that marked it published, i.e. the relay's batch, or, \
             where the writing service publishes its rows itself right after its commit, its marking after \
             JetStream acked them. **published → begin** is from the event that caused this step being marked \
             published (for the process start, the RunJob command) to this step's transaction beginning \
             (`created_at` of its outbox rows): the delivery and the consumer's decoding, after the relay's read \
             and publish (negative: the consumer began before the row was marked, as it can when the writer \
             publishes before it marks); **begin → stamp** is the handler's reads and decision inside its \
             transaction (negative: the event was made before its transaction began); **stamp → published** is \
             the rest of its transaction, the commit and the publishing up to the mark. Steps caused by a request \
             or an agent's report rather than by a published event have no published → begin.\n"
        )?;
    }
    writeln!(s, "| # | step | actor | gap p50 | gap p90 | gap max | since submit p50 | published → begin | begin → stamp | stamp → published |")?;
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
    writeln!(s)
}
