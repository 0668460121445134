//! The dispatcher places jobs on workers. On JobQueued it assigns the next pending job to a
//! free ready worker, or, when none is free and the capacity allows, schedules it on a new
//! worker it asks a provider for. On WorkerReadyForJob it sends the worker the job it was
//! provisioned for (a warm-pool worker: the next pending job). On WorkerTerminated it tops the
//! warm pool up and places jobs that waited for capacity. The job, the worker and the RunJob
//! command change in one transaction.

mod handlers;

use hodei_domain::Actor;
use hodei_messaging::consumer::{self, ConsumerConfig};
use hodei_messaging::streams;
use hodei_protocol::subjects;
use hodei_runtime::{CommonArgs, Shutdown};

pub const SERVICE: &str = "dispatcher";

/// hodei-dispatcher: assigns queued jobs to workers and asks for workers when none is free.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-dispatcher", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Provider asked for new workers (`process` starts `hodei-agent` as a local process).
    #[arg(long, env = "HODEI_PROVIDER", default_value = "process")]
    pub provider: String,

    /// A requested worker that has not registered after this long is torn down and its job
    /// requeued (ms).
    #[arg(
        long,
        env = "HODEI_WORKER_CONNECT_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub worker_connect_timeout_ms: u64,

    /// Consecutive failures to place jobs that open the dispatch circuit.
    #[arg(long, env = "HODEI_DISPATCH_CIRCUIT_THRESHOLD", default_value_t = 5)]
    pub circuit_threshold: u32,

    /// How long the open dispatch circuit waits before a probe (ms; doubles up to a minute).
    #[arg(long, env = "HODEI_DISPATCH_CIRCUIT_OPEN_MS", default_value_t = 1000)]
    pub circuit_open_ms: u64,

    /// Most workers alive at once (every state but Terminated, warm pool included). Jobs
    /// beyond it stay Pending and are placed, highest priority first, as workers end. 0
    /// pauses placement on new workers.
    #[arg(long, env = "HODEI_MAX_WORKERS", default_value_t = 64)]
    pub max_workers: u32,

    /// Workers kept provisioned and Ready ahead of demand, each reused for several jobs. 0
    /// (the default) turns the warm pool off: every job gets its own ephemeral worker. With a
    /// pool, jobs run only on pool workers and wait for one when all are busy.
    #[arg(long, env = "HODEI_WARM_POOL_SIZE", default_value_t = 0)]
    pub warm_pool_size: u32,

    /// Jobs a warm-pool worker runs before it is replaced by a fresh one.
    #[arg(long, env = "HODEI_WARM_POOL_MAX_JOBS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub warm_pool_max_jobs: u32,

    /// Largest number of database connections.
    #[arg(long, env = "HODEI_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
}

#[derive(Clone)]
pub(crate) struct State {
    pub store: hodei_store::Store,
    pub actor: Actor,
    pub provider: String,
    pub connect_timeout: std::time::Duration,
    /// Opens after consecutive failures to place jobs (the database unreachable, ...): jobs
    /// then wait, their messages redelivered after the open window, instead of failing.
    pub breaker: std::sync::Arc<hodei_runtime::breaker::Breaker>,
    /// `hodei_dispatch_latency_seconds`: from a job becoming Pending to the job placed.
    pub dispatch_latency: prometheus_client::metrics::histogram::Histogram,
    pub max_workers: u32,
    pub warm_pool: Option<WarmPool>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct WarmPool {
    pub size: u32,
    pub max_jobs_per_worker: u32,
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut metrics = hodei_runtime::metrics::Metrics::new();
    let messaging = hodei_messaging::Metrics::register(&mut metrics);
    let circuits = hodei_runtime::breaker::CircuitGauges::register(&mut metrics);
    let dispatch_latency = metrics.latency_histogram(
        "hodei_dispatch_latency_seconds",
        "From a job becoming Pending to the job placed on a worker",
    );
    let connections = hodei_outbox::connect(
        &config.common,
        SERVICE,
        config.db_pool_size,
        &mut metrics,
        &shutdown,
    )
    .await?;
    connections
        .serve_metrics(&config.common, 9612, metrics, &shutdown)
        .await?;
    let hodei_outbox::Connections { store, js, .. } = connections;
    let state = State {
        store,
        actor: Actor::service(SERVICE),
        provider: config.provider,
        connect_timeout: std::time::Duration::from_millis(config.worker_connect_timeout_ms),
        breaker: std::sync::Arc::new(hodei_runtime::breaker::Breaker::new(
            "dispatch",
            config.circuit_threshold,
            std::time::Duration::from_millis(config.circuit_open_ms),
            &circuits,
        )),
        dispatch_latency,
        max_workers: config.max_workers,
        warm_pool: (config.warm_pool_size > 0).then_some(WarmPool {
            size: config.warm_pool_size,
            max_jobs_per_worker: config.warm_pool_max_jobs,
        }),
    };
    if config.warm_pool_size > config.max_workers {
        tracing::warn!(
            warm_pool_size = config.warm_pool_size,
            max_workers = config.max_workers,
            "the warm pool is larger than the capacity; it holds at most max-workers workers"
        );
    }
    // What `hodei explain` compares the workers alive with.
    hodei_store::capacity::record(
        &mut *state
            .store
            .acquire()
            .await
            .context("recording the capacity")?,
        hodei_store::capacity::DispatchSettings {
            max_workers: state.max_workers,
            warm_pool_size: config.warm_pool_size,
        },
    )
    .await
    .context("recording the capacity")?;
    tracing::info!(max_workers = state.max_workers, warm_pool = ?state.warm_pool, provider = %state.provider, "placing jobs");
    // Whatever waited while no dispatcher ran (or with a smaller capacity) is placed now;
    // afterwards events drive placement.
    handlers::replenish_pool(&state)
        .await
        .context("provisioning the warm pool")?;
    let placed = handlers::place_pending(&state, usize::MAX)
        .await
        .context("placing waiting jobs")?;
    if placed > 0 {
        tracing::info!(placed, "jobs that waited placed at start");
    }
    // Jobs wait while the dispatch circuit is open: no delivery limit.
    let unlimited = |mut config: ConsumerConfig| {
        config.max_deliver = -1;
        config
    };
    let queued = consumer::run_batched(
        js.clone(),
        unlimited(ConsumerConfig::new(
            streams::EVENTS,
            "dispatcher-job-queued",
            Some(subjects::events_of_type("job", "JobQueued")),
        )),
        handlers::job_queued::MAX_BATCH,
        &messaging,
        shutdown.clone(),
        |batch| handlers::job_queued::handle(state.clone(), batch),
    );
    let ready = consumer::run(
        js.clone(),
        unlimited(ConsumerConfig::new(
            streams::EVENTS,
            "dispatcher-worker-ready",
            Some(subjects::events_of_type("worker", "WorkerReadyForJob")),
        )),
        &messaging,
        shutdown.clone(),
        |delivery| handlers::worker_ready::handle(state.clone(), delivery),
    );
    let terminated = consumer::run(
        js.clone(),
        unlimited(ConsumerConfig::new(
            streams::EVENTS,
            "dispatcher-worker-terminated",
            Some(subjects::events_of_type("worker", "WorkerTerminated")),
        )),
        &messaging,
        shutdown.clone(),
        |delivery| handlers::worker_terminated::handle(state.clone(), delivery),
    );
    tokio::join!(queued, ready, terminated);
    tracing::info!("stopped");
    Ok(())
}
