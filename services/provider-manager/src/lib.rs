//! The provider-manager turns worker requests into real resources through a [`Provider`]
//! (here the process provider, which starts `hodei-agent` as a child process), hands each
//! worker its one-time bootstrap token, and destroys the resource on WorkerTerminating.

mod handlers;
pub mod providers;

use std::path::PathBuf;
use std::sync::Arc;

use hodei_domain::Actor;
use hodei_messaging::consumer::{self, ConsumerConfig};
use hodei_messaging::streams;
use hodei_protocol::subjects;
use hodei_runtime::{CommonArgs, Shutdown};
use sqlx::PgPool;

pub use providers::{process::ProcessProvider, Provider};

pub const SERVICE: &str = "provider-manager";

/// hodei-provider-manager: creates and destroys workers through providers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-provider-manager", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// The agent binary the process provider starts; by default `hodei-agent` beside this one.
    #[arg(long, env = "HODEI_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,

    /// NATS URL given to agents; by default the one this service uses.
    #[arg(long, env = "HODEI_AGENT_NATS_URL")]
    pub agent_nats_url: Option<String>,

    /// Seconds an agent gets to stop after SIGTERM before it (and its job) is killed.
    #[arg(long, env = "HODEI_AGENT_STOP_GRACE_SECS", default_value_t = 5)]
    pub stop_grace_secs: u64,

    /// Consecutive failures to create workers that open a provider's circuit.
    #[arg(long, env = "HODEI_PROVIDER_CIRCUIT_THRESHOLD", default_value_t = 5)]
    pub circuit_threshold: u32,

    /// How long an open circuit waits before probing the provider again (ms; doubles while it
    /// keeps failing, up to a minute).
    #[arg(long, env = "HODEI_PROVIDER_CIRCUIT_OPEN_MS", default_value_t = 2000)]
    pub circuit_open_ms: u64,

    /// The account signing key that mints each worker's own NATS credential (`signer.json`
    /// of `hodei auth init`). Without it agents connect without credentials, which only an
    /// unauthenticated nats-server accepts.
    #[arg(long, env = "HODEI_WORKER_SIGNER")]
    pub worker_signer: Option<PathBuf>,

    /// Where workers' credential files are written (owner-only, removed by the agent once
    /// read and at teardown).
    #[arg(long, env = "HODEI_WORKER_CREDS_DIR")]
    pub worker_creds_dir: Option<PathBuf>,

    /// How long a warm-pool worker's credential is valid (seconds); an ephemeral worker's is
    /// valid for its job's schedule-to-start and execution timeouts plus five minutes.
    #[arg(long, env = "HODEI_POOL_CREDENTIAL_TTL_SECS", default_value_t = 6 * 3600)]
    pub pool_credential_ttl_secs: u64,

    /// cgroup v2 directory under which each worker gets a cgroup of its own (`off`: none).
    /// By default `hodei` in the unified hierarchy, when the machine has one.
    #[arg(long, env = "HODEI_CGROUP_ROOT")]
    pub cgroup_root: Option<String>,

    /// Largest number of database connections.
    #[arg(long, env = "HODEI_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
}

pub(crate) struct State<P> {
    pub pool: PgPool,
    pub actor: Actor,
    pub provider: P,
    pub breaker: hodei_runtime::breaker::Breaker,
    /// Mints each worker's credential; None on an unauthenticated server.
    pub signer: Option<hodei_auth::Signer>,
    pub pool_credential_ttl: std::time::Duration,
    pub js: hodei_messaging::JetStream,
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    use anyhow::Context;
    let agent_bin = match config.agent_bin {
        Some(path) => path,
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("hodei-agent"),
    };
    anyhow::ensure!(
        agent_bin.is_file(),
        "the agent binary {} does not exist (set HODEI_AGENT_BIN)",
        agent_bin.display()
    );
    let hodei_outbox::Connections { pool, client, js } = hodei_outbox::connect(
        &config.common,
        SERVICE,
        config.db_pool_size,
        9614,
        &shutdown,
    )
    .await?;
    let signer = match &config.worker_signer {
        Some(path) => Some(
            hodei_auth::Signer::load(path)
                .with_context(|| format!("loading the worker signer {}", path.display()))?,
        ),
        None => {
            tracing::warn!("no HODEI_WORKER_SIGNER: agents connect without credentials");
            None
        }
    };
    let provider = ProcessProvider::new(
        agent_bin,
        config.agent_nats_url.unwrap_or(config.common.nats_url),
        std::time::Duration::from_secs(config.stop_grace_secs),
        config
            .worker_creds_dir
            .unwrap_or_else(|| std::env::temp_dir().join("hodei-worker-creds")),
        providers::process::cgroup_root(config.cgroup_root.as_deref()),
    )?;
    let breaker = hodei_runtime::breaker::Breaker::new(
        &format!("provider:{}", provider.name()),
        config.circuit_threshold,
        std::time::Duration::from_millis(config.circuit_open_ms),
    );
    let state = Arc::new(State {
        pool,
        actor: Actor::service(SERVICE),
        provider,
        breaker,
        signer,
        pool_credential_ttl: std::time::Duration::from_secs(config.pool_credential_ttl_secs),
        js: js.clone(),
    });
    handlers::destroy::reconcile(&state).await;
    let providers = {
        let state = state.clone();
        hodei_messaging::api::serve(
            client.clone(),
            hodei_protocol::subjects::API_PROVIDERS_LIST,
            "hodei-provider-manager",
            shutdown.clone(),
            move |_: serde_json::Value, _| {
                let view = state.breaker.view();
                let provider = state.provider.name();
                async move {
                    let mut view = serde_json::to_value(view).expect("serializable");
                    view["provider"] = provider.into();
                    Ok::<_, hodei_protocol::ApiError>(vec![view])
                }
            },
        )
    };
    // Requests wait as long as the provider's circuit is open: no delivery limit.
    let mut provisioning = ConsumerConfig::new(
        streams::EVENTS,
        "provider-manager-provisioning",
        Some(subjects::events_of_type(
            "worker",
            "WorkerProvisioningRequested",
        )),
    );
    provisioning.max_deliver = -1;
    let requests = consumer::run(js.clone(), provisioning, shutdown.clone(), |delivery| {
        handlers::provision::handle(state.clone(), delivery)
    });
    let terminations = consumer::run(
        js.clone(),
        ConsumerConfig::new(
            streams::EVENTS,
            "provider-manager-termination",
            Some(subjects::events_of_type("worker", "WorkerTerminating")),
        ),
        shutdown.clone(),
        |delivery| handlers::destroy::handle(state.clone(), delivery),
    );
    let (providers, (), ()) = tokio::join!(providers, requests, terminations);
    providers?;
    tracing::info!("stopped");
    Ok(())
}
