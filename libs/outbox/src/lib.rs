//! Publishing the transactional outbox to JetStream. Every row goes out with
//! `Nats-Msg-Id` = its event id (a row published twice is stored once), its correlation id,
//! its event type and the trace context of the transaction that wrote it, in a span of its
//! own. Two paths use it: [`direct`], in each writing service right after its commit, and
//! the relay (`hodei-relay`), which publishes whatever is still pending after a grace.

pub mod direct;

use bytes::Bytes;
use hodei_messaging::{message_headers, JetStream};
use hodei_protocol::headers;
use hodei_store::outbox::Outgoing;
use tracing::Instrument;

/// Copy a row that cannot be published to `hodei.dlq.outbox.<EventType>`; false if even that fails.
pub async fn dead_letter(js: &JetStream, row: &Outgoing, error: &str) -> bool {
    let mut map = message_headers(
        &format!("dlq-outbox-{}", row.event_id),
        row.correlation_id.as_deref(),
    );
    map.insert(headers::EVENT_TYPE, row.event_type.as_str());
    map.insert(
        "Hodei-Dlq-Reason",
        error.chars().take(1024).collect::<String>().as_str(),
    );
    map.insert("Hodei-Dlq-Subject", row.subject.as_str());
    map.insert("Hodei-Dlq-Stream", "outbox");
    map.insert("Hodei-Dlq-Consumer", "relay");
    map.insert("Hodei-Event-Id", row.event_id.to_string().as_str());
    let subject = format!("hodei.dlq.outbox.{}", row.event_type);
    match hodei_messaging::publish_durable(js, subject, map, Bytes::from(row.payload.clone())).await
    {
        Ok(()) => true,
        Err(dlq_error) => {
            tracing::error!(event_id = %row.event_id, %dlq_error, "cannot copy the row to HODEI_DLQ either; it stays pending");
            false
        }
    }
}

/// Publish one row in a span of its own (`what`: "relay publish" or "publish"), child of the
/// transaction that wrote the row, and hand that span's context on in the message's headers.
/// Without an exporter there is no span: the row's trace context goes on as it was stored.
pub async fn publish(
    js: &JetStream,
    row: &Outgoing,
    what: &'static str,
) -> Result<async_nats::jetstream::context::PublishAckFuture, String> {
    use hodei_runtime::telemetry::context;
    let stored: Vec<(String, String)> = [
        ("traceparent", &row.traceparent),
        ("tracestate", &row.tracestate),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((name.to_owned(), value.clone()?)))
    .collect();
    let mut map = message_headers(&row.event_id.to_string(), row.correlation_id.as_deref());
    map.insert(headers::EVENT_TYPE, row.event_type.as_str());
    if !context::exporting() {
        for (name, value) in &stored {
            map.insert(name.as_str(), value.as_str());
        }
        return send(js, row, map).await;
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("{what} {}", row.event_type),
        otel.kind = "producer",
        event_type = %row.event_type,
        event_id = %row.event_id,
        correlation_id = row.correlation_id.as_deref().unwrap_or(""),
        trace_id = tracing::field::Empty,
    );
    context::adopt(&span, context::from_fields(&stored));
    hodei_messaging::trace::inject(&mut map, context::of_span(&span));
    send(js, row, map).instrument(span).await
}

async fn send(
    js: &JetStream,
    row: &Outgoing,
    headers: async_nats::HeaderMap,
) -> Result<async_nats::jetstream::context::PublishAckFuture, String> {
    js.publish_with_headers(
        row.subject.clone(),
        headers,
        Bytes::from(row.payload.clone()),
    )
    .await
    .map_err(|e| e.to_string())
}

/// The stream's answers to rows published one after the other, awaited together: each
/// ack's timeout runs from when it is awaited, so awaited in turn, a batch whose acks were
/// lost (NATS restarting under it) would take its length times the timeout to fail.
pub async fn acknowledged(
    acks: Vec<Result<async_nats::jetstream::context::PublishAckFuture, String>>,
) -> Vec<Result<(), String>> {
    futures::future::join_all(acks.into_iter().map(|ack| async move {
        match ack {
            Ok(future) => future.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error),
        }
    }))
    .await
}

/// What a service that writes state changes holds once it has started.
pub struct Connections {
    pub store: hodei_store::Store,
    pub client: hodei_messaging::Client,
    pub js: JetStream,
}

/// Start-up of every service that writes state changes: [`connect_only`], and the
/// publisher of its commits ([`direct`]), which registers its metrics in `metrics`.
pub async fn connect(
    common: &hodei_runtime::CommonArgs,
    service: &str,
    db_pool_size: u32,
    metrics: &mut hodei_runtime::metrics::Metrics,
    shutdown: &hodei_runtime::Shutdown,
) -> anyhow::Result<Connections> {
    let connections = connect_only(common, service, db_pool_size, shutdown).await?;
    let publisher = direct::start(
        connections.js.clone(),
        connections.store.pool().clone(),
        metrics,
        shutdown.clone(),
    );
    Ok(Connections {
        store: connections.store.publishing_to(publisher),
        ..connections
    })
}

/// Start-up of every service: PostgreSQL (schema brought up to date) and NATS (streams
/// ensured; a node that cannot serve JetStream is left until shutdown). Then
/// [`Connections::serve_metrics`], once the service has registered its metrics.
pub async fn connect_only(
    common: &hodei_runtime::CommonArgs,
    service: &str,
    db_pool_size: u32,
    shutdown: &hodei_runtime::Shutdown,
) -> anyhow::Result<Connections> {
    use anyhow::Context;
    use hodei_runtime::Migrate;
    let pool = match common.migrate {
        Migrate::No => hodei_store::connect(&common.database_url, db_pool_size).await,
        Migrate::Yes | Migrate::Only => {
            hodei_store::connect_and_migrate(&common.database_url, db_pool_size).await
        }
    }
    .context("connecting to PostgreSQL")?;
    if common.migrate == Migrate::Only {
        tracing::info!("migrations applied; exiting (HODEI_MIGRATE=only)");
        pool.close().await;
        std::process::exit(0);
    }
    let (client, js) = hodei_messaging::connect_and_ensure_streams(
        &common.nats_url,
        service,
        common.nats_creds.as_deref(),
        common.stream_replicas,
    )
    .await
    .context("connecting to NATS")?;
    let servers = hodei_messaging::servers(&common.nats_url)?.len();
    tokio::spawn(hodei_messaging::keep_jetstream_reachable(
        js.clone(),
        service,
        servers,
        shutdown.clone(),
    ));
    Ok(Connections {
        store: hodei_store::Store::new(pool),
        client,
        js,
    })
}

impl Connections {
    /// Serve `metrics` on `/metrics`, and `/healthz` (PostgreSQL answers, NATS is
    /// connected), on `metrics_port` unless configured, until shutdown.
    pub async fn serve_metrics(
        &self,
        common: &hodei_runtime::CommonArgs,
        metrics_port: u16,
        metrics: hodei_runtime::metrics::Metrics,
        shutdown: &hodei_runtime::Shutdown,
    ) -> anyhow::Result<std::net::SocketAddr> {
        common
            .serve_metrics(
                metrics_port,
                metrics,
                vec![
                    hodei_store::health(self.store.pool()),
                    hodei_messaging::health(&self.client),
                ],
                shutdown.clone(),
            )
            .await
    }
}
