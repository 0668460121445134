//! What every Hodei process does the same way: its common settings, logging, and graceful
//! shutdown on SIGTERM or SIGINT.

use std::future::Future;

use tokio::sync::watch;
use tracing_subscriber::{fmt, EnvFilter};

/// Settings every service shares. Each can be given as a flag or through its environment
/// variable; flags win.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// NATS server URL (JetStream enabled).
    #[arg(long, env = "HODEI_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// PostgreSQL URL. The password, if any, is never logged.
    #[arg(long, env = "HODEI_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/hodei")]
    pub database_url: String,

    /// Log format: `human` or `json`. Levels come from RUST_LOG (default `info`).
    #[arg(long, env = "HODEI_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Structured logs to stderr, filtered by RUST_LOG (default `info`).
pub fn init_tracing(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Human => builder.with_target(false).try_init(),
    };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
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

/// Tells every task that the process is stopping. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The side that triggers a [`Shutdown`].
#[derive(Clone)]
pub struct ShutdownTrigger {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx: std::sync::Arc::new(tx) }, Shutdown { rx })
    }

    /// A shutdown triggered by SIGTERM or SIGINT.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            trigger.trigger();
        });
        shutdown
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is triggered (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means every trigger is gone: nothing can stop us any more, so wait forever.
        if rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Run `work` until it ends or shutdown is triggered, whichever is first.
    pub async fn guard<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            output = work => Some(output),
            _ = self.wait() => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
