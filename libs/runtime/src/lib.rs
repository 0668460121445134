//! What every Hodei process does the same way: its common settings, logging, metrics and
//! health endpoint, and graceful shutdown on SIGTERM or SIGINT.

pub mod endpoint;
pub mod metrics;

use std::future::Future;
use std::pin::Pin;

pub use tokio_util::sync::CancellationToken;

pub mod breaker;
pub mod sweep;
pub mod telemetry;

/// Settings every service shares. Each can be given as a flag or through its environment
/// variable; flags win.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// NATS server URL (JetStream enabled).
    #[arg(long, env = "HODEI_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// NATS credentials of this service (a standard `.creds` file: its JWT and nkey seed).
    /// `scripts/up.sh` makes one per service under `.hodei/nats/creds/`. Use `tls://` in the
    /// URL for TLS; `HODEI_NATS_CA` names a CA file to trust.
    #[arg(long, env = "HODEI_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// Replicas of every stream (default: as `nats/*.json` says, 1); 3 on a three-node
    /// cluster. NATS URLs may list every node, comma-separated.
    #[arg(long, env = "HODEI_STREAM_REPLICAS")]
    pub stream_replicas: Option<usize>,

    /// PostgreSQL URL. The password, if any, is never logged.
    #[arg(
        long,
        env = "HODEI_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/hodei"
    )]
    pub database_url: String,

    /// Log format: `human` or `json`. Levels come from RUST_LOG (default `info`).
    #[arg(long, env = "HODEI_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,

    /// Schema migrations at start: `yes` (apply what is missing), `no` (the database's owner
    /// applies them; the service's role needs no DDL right), `only` (apply, then exit).
    #[arg(long, env = "HODEI_MIGRATE", default_value = "yes")]
    pub migrate: Migrate,

    /// Address of /metrics (Prometheus) and /healthz; each service has its own default port
    /// on 127.0.0.1 (relay 9610, scheduler 9611, dispatcher 9612, registry 9613,
    /// provider-manager 9614, audit 9615). Port 0 picks a free one (the log says which).
    #[arg(long, env = "HODEI_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl CommonArgs {
    /// Serve `metrics` on /metrics and `checks` on /healthz, at `metrics_addr` or
    /// 127.0.0.1:`default_port`, until shutdown ([`endpoint::start`]).
    pub async fn serve_metrics(
        &self,
        default_port: u16,
        metrics: metrics::Metrics,
        checks: Vec<endpoint::HealthCheck>,
        shutdown: Shutdown,
    ) -> anyhow::Result<std::net::SocketAddr> {
        use anyhow::Context;
        let addr = self
            .metrics_addr
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], default_port)));
        endpoint::start(addr, metrics, checks, shutdown)
            .await
            .with_context(|| format!("serving metrics on {addr}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Migrate {
    Yes,
    No,
    Only,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// The threads a process runs its tasks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// A worker thread per CPU: the services, which serve many requests at once.
    PerCpu,
    /// The calling thread alone: for a process that waits far more than it computes (the
    /// worker agent), where worker threads would only add wake-ups from one thread to
    /// another.
    One,
}

/// Run a process: logs and traces for `service`, a runtime on `threads`, `body` until it
/// ends (it gets the shutdown triggered by SIGTERM or SIGINT), then spans flushed within 5 s.
pub fn main<F, Fut>(
    threads: Threads,
    service: &'static str,
    format: LogFormat,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut builder = match threads {
        Threads::PerCpu => tokio::runtime::Builder::new_multi_thread(),
        Threads::One => tokio::runtime::Builder::new_current_thread(),
    };
    let telemetry = telemetry::init(service, format);
    let runtime = builder.enable_all().build()?;
    let result = runtime.block_on(async move { body(shutdown_on_signals()).await });
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "stopped with an error");
    }
    drop(runtime);
    telemetry.shutdown(std::time::Duration::from_secs(5));
    result
}

/// A URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A boxed, sendable future: the same type as `futures::future::BoxFuture`, so a closure
/// ending in `.boxed()` fits, without this crate depending on `futures`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Tells every task that the process is stopping: tokio-util's [`CancellationToken`], under
/// the name that says what it is for here. Cheap to clone; `cancel` stops every clone,
/// `cancelled` waits for it, `run_until_cancelled` runs work until it ends or shutdown.
pub type Shutdown = CancellationToken;

/// A shutdown cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> Shutdown {
    let shutdown = Shutdown::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    shutdown
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// A random number in [0, 1), for backoff jitter.
pub fn jitter() -> f64 {
    (uuid_like_random() >> 11) as f64 / (1u64 << 53) as f64
}

fn uuid_like_random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per instance: good enough for jitter, no extra crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
