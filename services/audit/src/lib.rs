//! The audit service records every domain event of HODEI_EVENTS exactly once (the event id
//! is unique) and answers `hodei.api.audit.query` by correlation id, event type, aggregate,
//! actor and time range, combined and paged.

mod handlers;

use hodei_messaging::consumer::{self, ConsumerConfig};
use hodei_messaging::{api, streams};
use hodei_protocol::subjects;
use hodei_runtime::{CommonArgs, Shutdown};

pub const SERVICE: &str = "audit";

/// How long a batch of events waits for more before it is recorded. Events come a few at a
/// time (a job's are raised by several services, one step after the other): a trickle is
/// then written in at most fifty INSERTs a second rather than one per few events, each
/// recorded at most this much later. A full batch is written at once.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// hodei-audit: the audit log of every domain event and its query API.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-audit", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Largest number of database connections.
    #[arg(long, env = "HODEI_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
}

#[derive(Clone)]
pub(crate) struct State {
    pub store: hodei_store::Store,
    pub js: hodei_messaging::JetStream,
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    // Writes no state changes of its own: no publisher after commit.
    let connections =
        hodei_outbox::connect_only(&config.common, SERVICE, config.db_pool_size, &shutdown).await?;
    let mut metrics = hodei_runtime::metrics::Metrics::new();
    let messaging = hodei_messaging::Metrics::register(&mut metrics);
    connections
        .serve_metrics(&config.common, 9615, metrics, &shutdown)
        .await?;
    let hodei_outbox::Connections { store, client, js } = connections;
    let state = State {
        store,
        js: js.clone(),
    };
    let service = api::Service::start(
        client.clone(),
        "hodei-audit",
        "Answers the audit log and the dead letters",
        "hodei-audit",
        &messaging,
    )
    .await?;
    // Each API: its subject, answered by a handler taking the state and the request.
    macro_rules! serve {
        ($subject:expr, $handler:path) => {{
            let state = state.clone();
            service.serve($subject, shutdown.clone(), move |req, _| {
                $handler(state.clone(), req)
            })
        }};
    }
    let apis = async {
        let (query, list, show, replay, discard) = tokio::join!(
            serve!(subjects::API_AUDIT_QUERY, handlers::query::handle),
            serve!(subjects::API_DLQ_LIST, handlers::dlq::list),
            serve!(subjects::API_DLQ_SHOW, handlers::dlq::show),
            serve!(subjects::API_DLQ_REPLAY, handlers::dlq::replay),
            serve!(subjects::API_DLQ_DISCARD, handlers::dlq::discard),
        );
        query.and(list).and(show).and(replay).and(discard)
    };
    let record = consumer::run_batched(
        js.clone(),
        // Recording is off every job's path: a batch gathers for a moment, so that a stream
        // of events a few at a time is written in a few statements a second, not one each.
        ConsumerConfig::new(streams::EVENTS, "audit", None).gathering(GATHER),
        handlers::record::MAX_BATCH,
        &messaging,
        shutdown.clone(),
        |batch| handlers::record::handle(state.clone(), batch),
    );
    let (apis, ()) = tokio::join!(apis, record);
    apis?;
    service.stop().await;
    tracing::info!("stopped");
    Ok(())
}
