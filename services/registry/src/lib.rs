//! The registry owns the worker lifecycle after provisioning: agents register with their
//! one-time bootstrap token (checked, then spent), send heartbeats, and are torn down once
//! the job they ran has ended (ephemeral workers). It also answers `hodei workers`.

mod handlers;
mod monitor;

use hodei_domain::Actor;
use hodei_messaging::consumer::{self, ConsumerConfig};
use hodei_messaging::{api, streams};
use hodei_protocol::subjects;
use hodei_runtime::{CommonArgs, Shutdown};

pub const SERVICE: &str = "registry";

/// hodei-registry: registers agents, records heartbeats, tears down ephemeral workers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-registry", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// How often agents are told to send a heartbeat, in milliseconds.
    #[arg(long, env = "HODEI_HEARTBEAT_INTERVAL_MS", default_value_t = 5000)]
    pub heartbeat_interval_ms: u64,

    /// A worker without a heartbeat for this long is declared lost (ms).
    #[arg(long, env = "HODEI_WORKER_LOST_AFTER_MS", default_value_t = 15_000)]
    pub worker_lost_after_ms: u64,

    /// Longest pause of the worker timeout monitor between looks at the deadlines (ms).
    #[arg(long, env = "HODEI_MONITOR_INTERVAL_MS", default_value_t = 1000)]
    pub monitor_interval_ms: u64,

    /// Largest number of database connections.
    #[arg(long, env = "HODEI_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
}

#[derive(Clone)]
pub(crate) struct State {
    pub store: hodei_store::Store,
    pub actor: Actor,
    pub heartbeat_interval_ms: u64,
    pub lost_after: std::time::Duration,
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut metrics = hodei_runtime::metrics::Metrics::new();
    let messaging = hodei_messaging::Metrics::register(&mut metrics);
    let connections = hodei_outbox::connect(
        &config.common,
        SERVICE,
        config.db_pool_size,
        &mut metrics,
        &shutdown,
    )
    .await?;
    hodei_store::register_state_gauges(
        &mut metrics,
        connections.store.pool(),
        "workers",
        "hodei_workers",
        "Workers by state",
        hodei_domain::WorkerState::ALL
            .iter()
            .map(|s| s.as_str())
            .collect(),
    );
    connections
        .serve_metrics(&config.common, 9613, metrics, &shutdown)
        .await?;
    let hodei_outbox::Connections { store, client, js } = connections;
    let state = State {
        store,
        actor: Actor::service(SERVICE),
        heartbeat_interval_ms: config.heartbeat_interval_ms,
        lost_after: std::time::Duration::from_millis(config.worker_lost_after_ms),
    };
    let monitor = tokio::spawn(monitor::run(
        state.store.clone(),
        std::time::Duration::from_millis(config.monitor_interval_ms),
        shutdown.clone(),
    ));
    let service = api::Service::start(
        client.clone(),
        "hodei-registry",
        "Registers workers, takes their heartbeats, lists them",
        "hodei-registry",
        &messaging,
    )
    .await?;
    let register = {
        let state = state.clone();
        service.serve(
            "hodei.agent.*.register",
            shutdown.clone(),
            move |req, ctx| handlers::register::handle(state.clone(), req, ctx),
        )
    };
    let workers = {
        let state = state.clone();
        service.serve(
            subjects::API_WORKERS_LIST,
            shutdown.clone(),
            move |req, _| handlers::list::handle(state.clone(), req),
        )
    };
    let heartbeats = handlers::heartbeat::run(state.clone(), client.clone(), shutdown.clone());
    let teardown = consumer::run_batched(
        js.clone(),
        ConsumerConfig::new(
            streams::EVENTS,
            "registry-job-events",
            handlers::job_ended::LEAVING.map(|event| subjects::events_of_type("job", event)),
        )
        .gathering(handlers::job_ended::GATHER),
        handlers::job_ended::MAX_BATCH,
        &messaging,
        shutdown.clone(),
        |batch| handlers::job_ended::handle(state.clone(), batch),
    );
    let (register, workers, heartbeats, ()) = tokio::join!(register, workers, heartbeats, teardown);
    let _ = monitor.await;
    register?;
    workers?;
    heartbeats?;
    service.stop().await;
    tracing::info!("stopped");
    Ok(())
}
