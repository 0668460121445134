//! The audit service records every domain event of HODEI_EVENTS exactly once (the event id
//! is unique) and answers `hodei.api.audit.query` by correlation id, event type, aggregate,
//! actor and time range, combined and paged.

mod handlers;

use hodei_messaging::consumer::{self, ConsumerConfig};
use hodei_messaging::{api, streams};
use hodei_protocol::subjects;
use hodei_runtime::{CommonArgs, Shutdown};
use sqlx::PgPool;

pub const SERVICE: &str = "audit";

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
    pub pool: PgPool,
    pub js: hodei_messaging::JetStream,
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    use anyhow::Context;
    let pool = hodei_store::connect_and_migrate(&config.common.database_url, config.db_pool_size)
        .await
        .context("connecting to PostgreSQL")?;
    let (client, js) =
        hodei_messaging::connect_and_ensure_streams(&config.common.nats_url, SERVICE)
            .await
            .context("connecting to NATS")?;
    config
        .common
        .serve_metrics(
            9615,
            vec![hodei_store::health(&pool), hodei_messaging::health(&client)],
            shutdown.clone(),
        )
        .await?;
    let state = State {
        pool,
        js: js.clone(),
    };
    let query = {
        let state = state.clone();
        api::serve(
            client.clone(),
            subjects::API_AUDIT_QUERY,
            "hodei-audit",
            shutdown.clone(),
            move |req, _| handlers::query::handle(state.clone(), req),
        )
    };
    let dlq = {
        let serve = |subject: &'static str| {
            (
                client.clone(),
                subject,
                "hodei-audit",
                shutdown.clone(),
                state.clone(),
            )
        };
        let (c, s, q, d, st) = serve(subjects::API_DLQ_LIST);
        let list = api::serve(c, s, q, d, move |req, _| {
            handlers::dlq::list(st.clone(), req)
        });
        let (c, s, q, d, st) = serve(subjects::API_DLQ_SHOW);
        let show = api::serve(c, s, q, d, move |req, _| {
            handlers::dlq::show(st.clone(), req)
        });
        let (c, s, q, d, st) = serve(subjects::API_DLQ_REPLAY);
        let replay = api::serve(c, s, q, d, move |req, _| {
            handlers::dlq::replay(st.clone(), req)
        });
        let (c, s, q, d, st) = serve(subjects::API_DLQ_DISCARD);
        let discard = api::serve(c, s, q, d, move |req, _| {
            handlers::dlq::discard(st.clone(), req)
        });
        async move {
            let (a, b, c, d) = tokio::join!(list, show, replay, discard);
            a.and(b).and(c).and(d)
        }
    };
    let record = consumer::run_batched(
        js.clone(),
        ConsumerConfig::new(streams::EVENTS, "audit", None),
        handlers::record::MAX_BATCH,
        shutdown.clone(),
        |batch| handlers::record::handle(state.clone(), batch),
    );
    let (query, dlq, ()) = tokio::join!(query, dlq, record);
    query?;
    dlq?;
    tracing::info!("stopped");
    Ok(())
}
