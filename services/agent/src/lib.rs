//! `hodei-agent`: the worker agent. It registers with its one-time bootstrap token, waits for
//! RunJob on its own command subject, runs the command, streams stdout and stderr to
//! `hodei.logs.<job_id>`, reports started and finished, and exits: one agent, one job — or,
//! for a warm-pool worker, as many jobs as the registry gave it at registration, one after
//! the other.

mod job;
mod reports;
mod spawn;
pub mod spawner;

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use hodei_messaging::{api, decode, encode, nats, streams};
use hodei_protocol::agent::{Heartbeat, RegisterWorker, Registered, WorkerCommand};
use hodei_protocol::subjects;
use hodei_runtime::telemetry::context;
use hodei_runtime::{LogFormat, Shutdown};
use tracing::Instrument;
use uuid::Uuid;

pub const SERVICE: &str = "agent";

/// hodei-agent: runs one job for Hodei. Started by a provider, which sets its environment.
#[derive(Clone, clap::Parser)]
#[command(
    name = "hodei-agent",
    version,
    about,
    long_about = None,
    after_help = "The process provider also runs `hodei-agent --spawner`: one process per \
provider-manager that forks each new agent into its cgroup, with the agent's environment \
(it serves the provider's socket only, and ends with it)."
)]
pub struct Config {
    /// This worker's id, given by the provider.
    #[arg(long, env = "HODEI_WORKER_ID")]
    pub worker_id: Uuid,

    /// One-time bootstrap token, given by the provider; spent at registration.
    #[arg(
        long,
        env = "HODEI_BOOTSTRAP_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    pub token: Option<String>,

    /// A file holding the bootstrap token (a container's mounted secrets), instead of
    /// HODEI_BOOTSTRAP_TOKEN.
    #[arg(long, env = "HODEI_BOOTSTRAP_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// NATS server URL.
    #[arg(long, env = "HODEI_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// This worker's own NATS credential (a `.creds` file the provider minted for it); read
    /// at start and then removed.
    #[arg(long, env = "HODEI_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// When the agent runs as root, jobs run as this user (its uid, gid and home); `root`
    /// keeps them as root.
    #[arg(long, env = "HODEI_JOB_USER", default_value = "hodei-job")]
    pub job_user: String,

    /// Limit on the open files of a job's processes (RLIMIT_NOFILE).
    #[arg(long, env = "HODEI_JOB_MAX_OPEN_FILES", default_value_t = 4096)]
    pub job_max_open_files: u64,

    /// Limit on the processes of the jobs' user (RLIMIT_NPROC; 0 leaves it as it is).
    #[arg(long, env = "HODEI_JOB_MAX_PROCESSES", default_value_t = 4096)]
    pub job_max_processes: u64,

    /// Seconds a stopping agent (SIGTERM, or its control plane gone) gives its job and its
    /// last reports before it kills everything it started and exits.
    #[arg(long, env = "HODEI_AGENT_STOP_GRACE_SECS", default_value_t = 3)]
    pub stop_grace_secs: u64,

    /// A job that ends within this many milliseconds of its start is reported once, when it
    /// ends: its start and its end in one report (one transaction, one message fewer). A
    /// longer job's start is reported this much later. 0 reports every start at once.
    #[arg(long, env = "HODEI_AGENT_REPORT_TOGETHER_MS", default_value_t = 10)]
    pub report_together_ms: u64,

    /// Seconds to wait for a job after registering before giving up and exiting.
    #[arg(long, env = "HODEI_AGENT_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,

    /// Log format: `human` or `json`.
    #[arg(long, env = "HODEI_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("worker_id", &self.worker_id)
            .field("nats_url", &self.nats_url)
            .finish()
    }
}

/// Run the agent until its jobs are done or it is stopped: SIGTERM, or its control plane out
/// of reach for its lost window. Stopping kills the job; whatever it still has not finished
/// `stop_grace_secs` later is abandoned, and nothing the job started outlives the agent.
pub async fn run(config: Config, signals: Shutdown) -> anyhow::Result<()> {
    job::become_subreaper();
    // Stopped by a signal (the parent) or by the agent itself (its watchdog).
    let shutdown = signals.child_token();
    let (connected_tx, connected) = tokio::sync::watch::channel(true);
    let grace = Duration::from_secs(config.stop_grace_secs);
    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = signals.cancelled() => tracing::info!("stopping: the job is killed"),
                _ = shutdown.cancelled() => {}
            }
            tokio::time::sleep(grace).await;
        }
    };
    let result = tokio::select! {
        result = agent(config, shutdown, connected_tx, connected) => result,
        () = stopping => Err(anyhow::anyhow!("stopped before the job's end was reported")),
    };
    job::kill_descendants();
    result
}

async fn agent(
    config: Config,
    shutdown: Shutdown,
    connected_tx: tokio::sync::watch::Sender<bool>,
    connected: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let worker_id = config.worker_id;
    let runner = job::Runner::new(&config)?;
    let token = match (&config.token, &config.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the bootstrap token {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("no bootstrap token (HODEI_BOOTSTRAP_TOKEN or _FILE)"),
    };
    let servers_list = hodei_messaging::servers(&config.nats_url)?;
    let servers = servers_list.len();
    let client = hodei_messaging::options(
        &format!("hodei-agent-{worker_id}"),
        config.nats_creds.as_deref(),
    )
    .await?
    .event_callback(move |event| {
        let connected_tx = connected_tx.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    connected_tx.send_replace(true);
                }
                async_nats::Event::Disconnected => {
                    connected_tx.send_replace(false);
                }
                _ => {}
            }
        }
    })
    .retry_on_initial_connect()
    .connect(servers_list)
    .await
    .map_err(nats(format!("connecting to NATS at {}", config.nats_url)))?;
    if let Some(creds) = &config.nats_creds {
        // Held in memory from here (reconnections use that copy); nobody needs the file.
        let _ = std::fs::remove_file(creds);
    }
    let js = jetstream::new(client.clone());
    // A partitioned NATS node answers pings but not JetStream (nor the registry): leave it.
    // The probe asks for the agent's own consumer, the one JetStream request its credential
    // allows without effect; "not found" (before it is made, or once it expired idle) is an
    // answer too.
    tokio::spawn({
        let (js, shutdown) = (js.clone(), shutdown.clone());
        let consumer = hodei_auth::worker_consumer(worker_id);
        let probe = move || {
            let (js, consumer) = (js.clone(), consumer.clone());
            async move {
                use jetstream::stream::ConsumerErrorKind as Kind;
                let asked = js
                    .get_consumer_from_stream::<pull::Config, _, _>(&consumer, streams::WORKER_CMDS)
                    .await;
                match asked {
                    Ok(_) => Ok(()),
                    Err(e) => match e.kind() {
                        Kind::JetStream(j) if !hodei_messaging::cluster_unavailable(&j) => Ok(()),
                        _ => Err(e.to_string()),
                    },
                }
            }
        };
        hodei_messaging::stay_on_a_serving_node(client.clone(), servers, probe, shutdown)
    });

    // The command consumer is made only when a command can come: a worker given its one job
    // in the registration's answer never reads the command stream. (Commands wait in their
    // stream, so making it after registering loses none.)
    let commands_consumer = || async {
        use backon::Retryable;
        // Retried while JetStream cannot answer yet (a cluster electing a new leader, say).
        let create = || async {
            js.create_consumer_on_stream(
                pull::Config {
                    // Named, so that its creation names the filter in the API subject, which
                    // is all a worker's credential allows.
                    name: Some(hodei_auth::worker_consumer(worker_id)),
                    filter_subject: subjects::worker_cmd(worker_id),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    inactive_threshold: Duration::from_secs(60),
                    ..Default::default()
                },
                streams::WORKER_CMDS,
            )
            .await
        };
        let consumer: jetstream::consumer::PullConsumer = create
            .retry(
                retrying(100, 2_000)
                    .with_total_delay(Some(Duration::from_secs(60)))
                    .without_max_times(),
            )
            .notify(|error, delay| {
                tracing::warn!(%error, ?delay, "command consumer not created yet; retrying")
            })
            .await
            .map_err(nats("creating the command consumer"))?;
        let messages = hodei_messaging::consumer::pull_stream(&consumer)
            .await
            .map_err(nats("reading commands"))?;
        Ok::<_, anyhow::Error>((consumer, messages))
    };

    let registration = RegisterWorker {
        schema_version: hodei_protocol::SCHEMA_VERSION,
        worker_id,
        token,
        instance: Some(format!(
            "{}{}",
            Uuid::new_v4().simple(),
            Uuid::new_v4().simple()
        )),
        pid: Some(std::process::id()),
        hostname: std::env::var("HOSTNAME").ok(),
    };
    // The provider hands over the trace of the provisioning: registering continues it.
    let span = tracing::info_span!("agent register", otel.kind = "client", %worker_id, trace_id = tracing::field::Empty);
    let inherited: Vec<(String, String)> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| {
            Some((
                name.to_owned(),
                std::env::var(name.to_ascii_uppercase()).ok()?,
            ))
        })
        .collect();
    context::adopt(&span, context::from_fields(&inherited));
    let registered_in = span.clone();
    let registering = async {
        register(&client, &registration)
            .instrument(span)
            .await
            .context("registering")
    };
    let registered = registering.await?;
    tracing::info!(%worker_id, "registered");
    if let Some(lost_after) = registered.lost_after_ms.map(Duration::from_millis) {
        tokio::spawn(watchdog(connected, lost_after, shutdown.clone()));
    }
    let heartbeats = tokio::spawn(heartbeat(
        client.clone(),
        worker_id,
        Duration::from_millis(registered.heartbeat_interval_ms),
    ));

    // An ephemeral worker gives up when its one job does not come; a warm-pool worker waits
    // for as long as it is kept (the registry and the provider end it).
    let idle = (registered.max_jobs <= 1).then(|| Duration::from_secs(config.idle_timeout_secs));
    let mut result = Ok(());
    let mut jobs_left = registered.max_jobs.max(1);
    // A job given in an answer (the registration's, for a worker provisioned for it; a
    // finished report's, for a warm-pool worker's next job) runs at once; one that comes
    // again on the command subject is skipped.
    let mut given = registered.run.map(|run| job::Next {
        run,
        parent: context::from_fields(
            &context::of_span(&registered_in)
                .into_iter()
                .collect::<Vec<_>>(),
        ),
    });
    let mut ran = Ran::default();
    let mut commands = None;
    // (A job given is run even past the agent's count: the control plane assigned it.)
    while (jobs_left > 0 || given.is_some()) && result.is_ok() && !shutdown.is_cancelled() {
        let (run, message, parent) = match given.take() {
            Some(job::Next { run, parent }) => (run, None, parent),
            None => {
                let messages = match &mut commands {
                    Some((_, messages)) => messages,
                    None => &mut commands.insert(commands_consumer().await?).1,
                };
                let message = match next_command(messages, idle, &shutdown).await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                };
                let command: WorkerCommand = match decode(&message.payload) {
                    Ok(command) => command,
                    Err(error) => {
                        let _ = message.ack_with(AckKind::Term).await;
                        result = Err(anyhow::anyhow!("unreadable command: {error}"));
                        break;
                    }
                };
                let WorkerCommand::RunJob(run) = command;
                if ran.contains(run.job_id, run.attempt) {
                    let _ = message.ack().await;
                    continue;
                }
                let parent = hodei_messaging::trace::parent_of(message.headers.as_ref());
                (run, Some(message), parent)
            }
        };
        ran.insert(run.job_id, run.attempt);
        result = runner
            .run(
                &client,
                &js,
                worker_id,
                run,
                message.as_ref(),
                parent,
                shutdown.clone(),
                jobs_left <= 1,
            )
            .await
            .map(|next| given = next);
        jobs_left = jobs_left.saturating_sub(1);
    }
    heartbeats.abort();
    if let Some((consumer, _)) = commands {
        let _ = js
            .delete_consumer_from_stream(&consumer.cached_info().name, streams::WORKER_CMDS)
            .await;
    }
    client.flush().await.ok();
    result
}

/// The jobs (and attempts) this agent ran last: a command that comes again (a redelivery
/// whose ack was lost, the stream copy of a job given in an answer) is skipped, even after
/// later jobs were given in answers. A few suffice: the agent runs one job at a time.
#[derive(Default)]
struct Ran(std::collections::VecDeque<(Uuid, u32)>);

impl Ran {
    const KEPT: usize = 16;

    fn contains(&self, job_id: Uuid, attempt: u32) -> bool {
        self.0.contains(&(job_id, attempt))
    }

    fn insert(&mut self, job_id: Uuid, attempt: u32) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back((job_id, attempt));
    }
}

/// The next command; `None` once shut down. Waiting longer than `idle` (when given) is an error.
async fn next_command(
    messages: &mut pull::Stream,
    idle: Option<Duration>,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<jetstream::Message>> {
    use jetstream::consumer::pull::MessagesErrorKind;
    // Missed heartbeats (a NATS node gone, its pull request with it) are waited out: the
    // stream pulls again once its request expires.
    let next = async {
        loop {
            match messages.next().await {
                Some(Err(error)) if error.kind() == MessagesErrorKind::MissingHeartbeat => {
                    tracing::warn!("no heartbeat from the command stream; pulling again");
                }
                other => return other,
            }
        }
    };
    let next = async {
        match idle {
            Some(idle) => tokio::time::timeout(idle, next)
                .await
                .map_err(|_| anyhow::anyhow!("no job arrived within {idle:?}")),
            None => Ok(next.await),
        }
    };
    match shutdown.run_until_cancelled(next).await {
        None => {
            tracing::info!("stopped while waiting for a job");
            Ok(None)
        }
        Some(Err(error)) => Err(error),
        Some(Ok(None)) => anyhow::bail!("the command stream ended"),
        Some(Ok(Some(Err(error)))) => anyhow::bail!("reading commands: {error}"),
        Some(Ok(Some(Ok(message)))) => Ok(Some(message)),
    }
}

/// Register, retrying with backoff while the registry cannot be reached (restarting, or the
/// connection is down) for up to two minutes; a refusal is final.
async fn register(
    client: &async_nats::Client,
    registration: &RegisterWorker,
) -> Result<Registered, hodei_protocol::ApiError> {
    use backon::Retryable;
    let subject = subjects::agent_register(registration.worker_id);
    let ask = || {
        api::request(
            client,
            &subject,
            None,
            registration,
            Duration::from_secs(10),
        )
    };
    ask.retry(
        retrying(50, 5_000)
            .with_total_delay(Some(Duration::from_secs(120)))
            .without_max_times(),
    )
    .when(|error| error.code.is_transient())
    .notify(|error, delay| {
        tracing::warn!(code = error.code.as_str(), message = %error.message, ?delay, "registration not answered; retrying")
    })
    .await
}

/// Exponential backoff with jitter from `min_ms` to `max_ms`: how the agent retries what the
/// control plane could not take yet (add a bound: times or total delay).
fn retrying(min_ms: u64, max_ms: u64) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(min_ms))
        .with_max_delay(Duration::from_millis(max_ms))
        .with_jitter()
}

/// Once NATS has been out of reach for `lost_after`, the registry has declared this worker
/// lost and its job may be retried elsewhere: stop, which kills the job.
async fn watchdog(
    mut connected: tokio::sync::watch::Receiver<bool>,
    lost_after: Duration,
    shutdown: Shutdown,
) {
    loop {
        if connected.wait_for(|up| !*up).await.is_err() {
            return;
        }
        tracing::warn!(?lost_after, "disconnected from NATS");
        if tokio::time::timeout(lost_after, connected.wait_for(|up| *up))
            .await
            .is_err()
        {
            tracing::error!(
                ?lost_after,
                "the control plane was out of reach for the lost window; killing the job and exiting"
            );
            shutdown.cancel();
            return;
        }
        tracing::info!("reconnected to NATS");
    }
}

/// Beat every `every`, the first one `every` after the registration: the registration is
/// recorded as the worker's first beat, so a beat at once would only cost the registry a
/// write (one per ephemeral job, whose worker often ends before its second).
async fn heartbeat(client: async_nats::Client, worker_id: Uuid, every: Duration) {
    let every = every.max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticker.tick().await;
        let beat = Heartbeat {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            worker_id,
            job_id: None,
        };
        if let Err(error) = client
            .publish(subjects::agent_heartbeat(worker_id), encode(&beat))
            .await
        {
            tracing::warn!(%error, "heartbeat not sent");
        }
    }
}
