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

    /// With cgroups, fork each agent from one `hodei-agent --spawner` (`true`), or exec each
    /// agent anew and move it into its cgroup (`false`: slower; for a wrapper around the agent
    /// such as a debugger, or a new agent binary taking effect at the next worker).
    #[arg(long, env = "HODEI_PROCESS_SPAWNER", default_value_t = true, action = clap::ArgAction::Set)]
    pub process_spawner: bool,

    /// The Docker Engine's socket (`unix:///var/run/docker.sock`): jobs that name an image
    /// run in containers there. Without it, such jobs fail (no provider can run them).
    #[arg(long, env = "HODEI_DOCKER_SOCKET")]
    pub docker_socket: Option<String>,

    /// The statically linked agent bind-mounted into containers (scripts/static-agent.sh).
    #[arg(
        long,
        env = "HODEI_DOCKER_AGENT_BIN",
        default_value = "target/static/hodei-agent"
    )]
    pub docker_agent_bin: PathBuf,

    /// NATS URL as containers reach it; by default the agents' URL.
    #[arg(long, env = "HODEI_DOCKER_NATS_URL")]
    pub docker_nats_url: Option<String>,

    /// Docker network containers join.
    #[arg(long, env = "HODEI_DOCKER_NETWORK", default_value = "bridge")]
    pub docker_network: String,

    /// uid:gid a container's processes run as (never root).
    #[arg(long, env = "HODEI_DOCKER_USER", default_value = "65534:65534")]
    pub docker_user: String,

    /// CPU of a container whose job asks for none (thousandths of a CPU).
    #[arg(long, env = "HODEI_DOCKER_DEFAULT_CPU_MILLIS", default_value_t = 1000)]
    pub docker_default_cpu_millis: u32,

    /// Memory limit of a container whose job asks for none (MiB).
    #[arg(long, env = "HODEI_DOCKER_DEFAULT_MEMORY_MB", default_value_t = hodei_domain::offer::DEFAULT_CONTAINER_MEMORY_MB)]
    pub docker_default_memory_mb: u32,

    /// Memory (MiB) the Docker provider offers in all (default: the engine's): container
    /// jobs wait while what they ask for is taken.
    #[arg(long, env = "HODEI_DOCKER_MEMORY_MB")]
    pub docker_memory_mb: Option<u32>,

    /// Label value (`hodei.owner`) on this installation's containers; reconciling removes
    /// only containers that carry it.
    #[arg(long, env = "HODEI_DOCKER_OWNER", default_value = "hodei")]
    pub docker_owner: String,

    /// Labels of the process provider (`key=value,key=value`); jobs select providers by them.
    #[arg(long, env = "HODEI_PROCESS_LABELS", default_value = "provider=process")]
    pub process_labels: String,

    /// Labels of the Docker provider.
    #[arg(long, env = "HODEI_DOCKER_LABELS", default_value = "provider=docker")]
    pub docker_labels: String,

    /// Seconds between two reconciliations of what the providers hold with the workers.
    #[arg(long, env = "HODEI_RECONCILE_SECS", default_value_t = 30)]
    pub reconcile_secs: u64,

    /// Largest number of database connections.
    #[arg(long, env = "HODEI_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
}

/// Workers torn down at once, at most.
const TEARDOWNS_AT_ONCE: usize = 32;

pub(crate) struct State {
    pub store: hodei_store::Store,
    pub actor: Actor,
    pub providers: providers::Providers,
    /// Mints each worker's credential; None on an unauthenticated server.
    pub signer: Option<hodei_auth::Signer>,
    pub pool_credential_ttl: std::time::Duration,
    pub js: hodei_messaging::JetStream,
}

/// `key=value,key=value` as labels.
fn labels_of(text: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| anyhow::anyhow!("label {pair:?} is not key=value"))
        })
        .collect()
}

/// This machine's CPUs (thousandths) and memory (MiB).
fn host_capacity() -> (u32, u32) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let memory_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(1024 * 1024);
    (cpus * 1000, (memory_kb / 1024) as u32)
}

/// Record what each provider offers (labels and capacity), so that the scheduler refuses
/// jobs none can run and the dispatcher keeps jobs waiting while capacity is taken.
async fn advertise(state: &State, config: &Config) -> anyhow::Result<()> {
    let (cpu_millis, memory_mb) = host_capacity();
    let mut offers = vec![hodei_domain::ProviderOffer {
        provider: "process".into(),
        labels: labels_of(&config.process_labels)?,
        cpu_millis,
        memory_mb,
    }];
    if let Some((docker, _)) = &state.providers.docker {
        let (cpu_millis, engine_mb) = docker.capacity().await.unwrap_or((cpu_millis, memory_mb));
        let memory_mb = config.docker_memory_mb.unwrap_or(engine_mb);
        offers.push(hodei_domain::ProviderOffer {
            provider: "docker".into(),
            labels: labels_of(&config.docker_labels)?,
            cpu_millis,
            memory_mb,
        });
    }
    let mut conn = state.store.acquire().await?;
    for offer in &offers {
        hodei_store::offers::advertise(&mut conn, offer).await?;
        tracing::info!(provider = offer.provider, labels = ?offer.labels, offer.cpu_millis, offer.memory_mb, "provider offered");
    }
    let names: Vec<&str> = offers.iter().map(|o| o.provider.as_str()).collect();
    hodei_store::offers::keep_only(&mut conn, &names).await?;
    Ok(())
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    use anyhow::Context;
    let agent_bin = match config.agent_bin.clone() {
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
    let mut metrics = hodei_runtime::metrics::Metrics::new();
    let messaging = hodei_messaging::Metrics::register(&mut metrics);
    let circuits = hodei_runtime::breaker::CircuitGauges::register(&mut metrics);
    let connections = hodei_outbox::connect(
        &config.common,
        SERVICE,
        config.db_pool_size,
        &mut metrics,
        &shutdown,
    )
    .await?;
    connections
        .serve_metrics(&config.common, 9614, metrics, &shutdown)
        .await?;
    let hodei_outbox::Connections { store, client, js } = connections;
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
    let process = ProcessProvider::new(
        agent_bin,
        config
            .agent_nats_url
            .clone()
            .unwrap_or_else(|| config.common.nats_url.clone()),
        std::time::Duration::from_secs(config.stop_grace_secs),
        config
            .worker_creds_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("hodei-worker-creds")),
        providers::process::cgroup_root(config.cgroup_root.as_deref()),
        config.process_spawner,
    )?;
    let breaker = |name: &str| {
        hodei_runtime::breaker::Breaker::new(
            &format!("provider:{name}"),
            config.circuit_threshold,
            std::time::Duration::from_millis(config.circuit_open_ms),
            &circuits,
        )
    };
    let docker = match &config.docker_socket {
        Some(socket) => {
            let agent_bin = std::path::absolute(&config.docker_agent_bin)?;
            anyhow::ensure!(
                agent_bin.is_file(),
                "the static agent {} does not exist (scripts/static-agent.sh builds it)",
                agent_bin.display()
            );
            let settings = providers::docker::DockerSettings {
                socket: socket.clone(),
                agent_bin,
                nats_url: config
                    .docker_nats_url
                    .clone()
                    .or_else(|| config.agent_nats_url.clone())
                    .unwrap_or_else(|| config.common.nats_url.clone()),
                network: config.docker_network.clone(),
                secrets_dir: config
                    .worker_creds_dir
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join("hodei-worker-creds"))
                    .join("containers"),
                user: config.docker_user.clone(),
                default_cpu_millis: config.docker_default_cpu_millis,
                default_memory_mb: config.docker_default_memory_mb,
                owner: config.docker_owner.clone(),
            };
            let docker = providers::docker::DockerProvider::connect(settings).await?;
            tracing::info!(socket, "docker provider ready");
            Some((docker, breaker("docker")))
        }
        None => None,
    };
    let state = Arc::new(State {
        store,
        actor: Actor::service(SERVICE),
        providers: providers::Providers {
            process,
            process_breaker: breaker("process"),
            docker,
        },
        signer,
        pool_credential_ttl: std::time::Duration::from_secs(config.pool_credential_ttl_secs),
        js: js.clone(),
    });
    advertise(&state, &config).await?;
    let reconciling = {
        let state = state.clone();
        let every = std::time::Duration::from_secs(config.reconcile_secs.max(1));
        let shutdown = shutdown.clone();
        async move {
            loop {
                handlers::destroy::reconcile(&state).await;
                if shutdown
                    .run_until_cancelled(tokio::time::sleep(every))
                    .await
                    .is_none()
                {
                    return;
                }
            }
        }
    };
    let service = hodei_messaging::api::Service::start(
        client.clone(),
        "hodei-provider-manager",
        "Provisions and tears down workers; lists its providers",
        "hodei-provider-manager",
        &messaging,
    )
    .await?;
    let providers = {
        let state = state.clone();
        service.serve(
            hodei_protocol::subjects::API_PROVIDERS_LIST,
            shutdown.clone(),
            move |_: serde_json::Value, _| {
                let views = state.providers.views();
                async move { Ok::<_, hodei_protocol::ApiError>(views) }
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
    let requests = consumer::run(
        js.clone(),
        provisioning,
        &messaging,
        shutdown.clone(),
        |delivery| handlers::provision::handle(state.clone(), delivery),
    );
    // A teardown is never given up (what the worker runs must end): no delivery limit.
    let mut termination = ConsumerConfig::new(
        streams::EVENTS,
        "provider-manager-termination",
        Some(subjects::events_of_type("worker", "WorkerTerminating")),
    );
    termination.max_deliver = -1;
    // Each teardown may wait for its agent to stop (up to its grace): many at once, so that
    // agents slow to stop (their NATS node gone) do not hold up the others.
    let terminations = consumer::run_concurrently(
        js.clone(),
        termination,
        TEARDOWNS_AT_ONCE,
        &messaging,
        shutdown.clone(),
        |delivery| handlers::destroy::handle(state.clone(), delivery),
    );
    let (providers, (), (), ()) = tokio::join!(providers, requests, terminations, reconciling);
    providers?;
    service.stop().await;
    tracing::info!("stopped");
    Ok(())
}
