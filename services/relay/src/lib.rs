//! Getting committed `outbox_events` rows into JetStream.
//!
//! Each writing service publishes its own rows right after its commit ([`direct`]); the
//! relay is the guarantee behind it: it sleeps until the oldest pending row's grace is over
//! (at most a sweep; a writer that could not publish wakes it by NOTIFY) and publishes, in
//! commit order, every row still pending after that grace, with
//! `Nats-Msg-Id` = event id (so a row published twice is dropped by the stream's duplicate
//! window), waits for the stream's acks, and marks the rows published.
//!
//! One relay is active at a time: it holds a Postgres advisory lock; others wait for it.

use std::time::Duration;

use hodei_messaging::JetStream;
use hodei_runtime::metrics::{Metrics, Sample};
use hodei_runtime::{CommonArgs, Shutdown};
use hodei_store::outbox;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sqlx::postgres::PgListener;
use sqlx::PgPool;

pub const SERVICE: &str = "relay";

/// Key of the advisory lock that elects the active relay.
const RELAY_LOCK: i64 = 0x6864_6569_7265_6c; // "hdeirel"

/// hodei-relay: publishes the transactional outbox to JetStream.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-relay", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Rows published per batch.
    #[arg(long, env = "HODEI_RELAY_BATCH", default_value_t = 500)]
    pub batch: i64,

    /// Attempts to publish a row before it is marked dead and copied to HODEI_DLQ.
    #[arg(long, env = "HODEI_RELAY_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: i32,

    /// Rows younger than this (ms) are left to the service that wrote them, which publishes
    /// right after its commit; the relay publishes what that did not (a crash between commit
    /// and publish, NATS unreachable). 0 makes the relay publish everything at once.
    #[arg(long, env = "HODEI_RELAY_GRACE_MS", default_value_t = 250)]
    pub grace_ms: u64,

    /// Seconds between sweeps when no notification arrives (a safety net, not the trigger).
    #[arg(long, env = "HODEI_RELAY_SWEEP_SECS", default_value_t = 5)]
    pub sweep_secs: u64,

    /// Seconds between housekeeping rounds of the active relay: published outbox rows past
    /// their retention are deleted and the tables every job churns through (outbox_events,
    /// jobs, workers) are vacuumed and analyzed, which keeps their queue indexes free of dead
    /// entries whether or not autovacuum runs. 0 turns it off (leave it to autovacuum).
    #[arg(long, env = "HODEI_MAINTENANCE_SECS", default_value_t = 30)]
    pub maintenance_secs: u64,

    /// How long published outbox rows are kept (seconds); they are in JetStream and the
    /// audit log.
    #[arg(long, env = "HODEI_OUTBOX_RETENTION_SECS", default_value_t = 600)]
    pub outbox_retention_secs: u64,
}

/// What the relay counts.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    published: Counter,
    publish_failures: Counter,
    /// `hodei_dead_letters_total{consumer="relay"}`.
    dead_lettered: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    consumer: &'static str,
}

impl RelayMetrics {
    pub fn register(metrics: &mut Metrics) -> RelayMetrics {
        let dead_letters: Family<ConsumerLabels, Counter> =
            metrics.counter_family("hodei_dead_letters_total", "Messages moved to HODEI_DLQ");
        RelayMetrics {
            published: metrics.counter(
                "hodei_outbox_published_total",
                "Outbox rows published to JetStream",
            ),
            publish_failures: metrics.counter(
                "hodei_outbox_publish_failures_total",
                "Failed attempts to publish an outbox row",
            ),
            dead_lettered: dead_letters.get_or_create_owned(&ConsumerLabels { consumer: "relay" }),
        }
    }
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    // Writes no state changes of its own: no publisher after commit.
    let connections = hodei_outbox::connect_only(&config.common, SERVICE, 4, &shutdown).await?;
    let mut metrics = Metrics::new();
    let relay_metrics = RelayMetrics::register(&mut metrics);
    register_outbox_gauges(&mut metrics, connections.store.pool());
    connections
        .serve_metrics(&config.common, 9610, metrics, &shutdown)
        .await?;
    let hodei_outbox::Connections { store, js, .. } = connections;
    let pool = store.pool().clone();
    // A term lasts as long as the connection holding the lock: after PostgreSQL restarts, the
    // lock is gone with it, and this relay stands for election again instead of publishing
    // beside a new leader.
    while let Some((mut leader, mut listener)) = become_leader(&pool, &shutdown).await {
        tracing::info!("this relay is now the active one");
        let housekeeping = (config.maintenance_secs > 0).then(|| {
            tokio::spawn(housekeep(
                pool.clone(),
                Duration::from_secs(config.maintenance_secs),
                Duration::from_secs(config.outbox_retention_secs),
            ))
        });
        let stopped = lead(
            &pool,
            &js,
            &config,
            &relay_metrics,
            &mut leader,
            &mut listener,
            &shutdown,
        )
        .await;
        if let Some(housekeeping) = housekeeping {
            housekeeping.abort();
        }
        if stopped {
            break;
        }
        tracing::warn!(
            "the connection holding the relay lock is gone; standing for election again"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// The active relay's housekeeping, every `every` (see `Config::maintenance_secs`).
async fn housekeep(pool: PgPool, every: Duration, retention: Duration) {
    use hodei_store::maintenance;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let started = std::time::Instant::now();
        let round = async {
            let deleted = maintenance::delete_published_outbox(&pool, retention, 10_000).await?;
            maintenance::vacuum_churning_tables(&pool).await?;
            Ok::<_, hodei_store::StoreError>(deleted)
        };
        match round.await {
            Ok(deleted) => tracing::info!(
                deleted_outbox_rows = deleted,
                took_ms = started.elapsed().as_millis() as u64,
                "housekeeping done"
            ),
            Err(error) => tracing::warn!(%error, "housekeeping failed; trying again next round"),
        }
    }
}

/// After a database error, the relay tries again this much later.
const PAUSE: Duration = Duration::from_secs(1);

/// Take the relay lock on a connection of its own (waiting while another relay holds it) and
/// listen for wake-ups (only the active relay listens: a standby would pile notifications
/// up), retrying while PostgreSQL cannot be reached; `None` once shut down.
async fn become_leader(
    pool: &PgPool,
    shutdown: &Shutdown,
) -> Option<(sqlx::PgConnection, PgListener)> {
    tracing::info!("waiting to become the active relay");
    loop {
        let attempt = async {
            let mut leader = pool.acquire().await?.detach();
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .execute(&mut leader)
                .await?;
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(outbox::NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>((leader, listener))
        };
        match shutdown.run_until_cancelled(attempt).await? {
            Ok(elected) => return Some(elected),
            Err(error) => {
                // A lock taken on a connection that is then dropped is released with it.
                tracing::warn!(%error, "cannot take the relay lock or listen; trying again");
                shutdown
                    .run_until_cancelled(tokio::time::sleep(PAUSE))
                    .await?;
            }
        }
    }
}

/// Publish while the lock holds. Returns true on shutdown, false when the lock was lost.
async fn lead(
    pool: &PgPool,
    js: &JetStream,
    config: &Config,
    metrics: &RelayMetrics,
    leader: &mut sqlx::PgConnection,
    listener: &mut PgListener,
    shutdown: &Shutdown,
) -> bool {
    let sweep = Duration::from_secs(config.sweep_secs);
    let grace = Duration::from_millis(config.grace_ms);
    loop {
        if sqlx::query("SELECT 1").execute(&mut *leader).await.is_err() {
            return false;
        }
        let mut failed = false;
        loop {
            match relay_batch(pool, js, metrics, config.batch, grace, config.max_attempts).await {
                Ok(0) => break,
                Ok(n) => tracing::debug!(published = n, "batch published"),
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "relaying failed; retrying after a pause"
                    );
                    failed = true;
                    break;
                }
            }
        }
        // Nothing is notified per commit (the writers publish their own rows): sleep until
        // the oldest pending row is due, at most a sweep; a writer that could not publish
        // wakes the relay at once.
        let wait = if failed {
            PAUSE
        } else {
            match pool.acquire().await {
                Ok(mut conn) => match outbox::next_due(&mut conn, grace).await {
                    // A due row the batch left (held back behind an earlier row of its
                    // aggregate that waits out a retry) must not make this loop spin.
                    Ok(Some(at)) => (at - chrono::Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        .clamp(Duration::from_millis(50), sweep),
                    Ok(None) => sweep,
                    Err(_) => PAUSE,
                },
                Err(_) => PAUSE,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return true,
            notified = listener.recv() => {
                if let Err(error) = notified {
                    tracing::warn!(%error, "notification listener failed; it reconnects");
                }
                while listener.next_buffered().is_some() {}
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

const DEPTH: &str = "hodei_outbox_depth";
const LAG: &str = "hodei_outbox_lag_seconds";

/// `hodei_outbox_depth` and `hodei_outbox_lag_seconds` (age of the oldest unpublished row),
/// computed when /metrics is scraped.
fn register_outbox_gauges(metrics: &mut Metrics, pool: &PgPool) {
    let pool = pool.clone();
    metrics.gauges_on_scrape(
        "outbox",
        &[
            (DEPTH, "Outbox rows waiting to be published"),
            (LAG, "Age of the oldest unpublished outbox row"),
        ],
        move || {
            let pool = pool.clone();
            Box::pin(async move {
                let (depth, lag): (i64, Option<f64>) = sqlx::query_as(
                    "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
                     FROM outbox_events WHERE status = 'pending'",
                )
                .fetch_one(&pool)
                .await
                .map_err(|e| format!("measuring the outbox: {e}"))?;
                Ok(vec![
                    Sample::new(DEPTH, vec![], depth as f64),
                    Sample::new(LAG, vec![], lag.unwrap_or(0.0)),
                ])
            })
        },
    );
}

/// The longest a batch may take to be sent and acknowledged.
const BATCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Publish one batch of pending rows; returns how many were published.
pub async fn relay_batch(
    pool: &PgPool,
    js: &JetStream,
    metrics: &RelayMetrics,
    batch: i64,
    grace: Duration,
    max_attempts: i32,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = outbox::lock_pending(&mut tx, batch, grace).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Send the whole batch, then collect the acks: one round trip per batch, order kept.
    // The batch holds its rows' locks (writers marking their own rows wait on them), so it
    // is bounded as a whole: a row without an answer by then has failed and is retried.
    let sent = async {
        let mut acks = Vec::with_capacity(rows.len());
        for row in &rows {
            acks.push(hodei_outbox::publish(js, &row.message, "relay publish").await);
        }
        hodei_outbox::acknowledged(acks).await
    };
    let results = match tokio::time::timeout(BATCH_TIMEOUT, sent).await {
        Ok(results) => results,
        Err(_) => {
            tracing::error!(rows = rows.len(), "the batch was not acknowledged in time");
            let error = format!("not acknowledged within {} s", BATCH_TIMEOUT.as_secs());
            rows.iter().map(|_| Err(error.clone())).collect()
        }
    };
    let mut published = Vec::with_capacity(rows.len());
    let mut failures = Vec::new();
    let mut held_back = std::collections::HashSet::new();
    for (row, result) in rows.iter().zip(results) {
        if held_back.contains(&row.aggregate_id) {
            // An earlier row of this aggregate failed: this one must not overtake it. If it
            // reached the stream anyway, its re-publish is dropped as a duplicate (same
            // Nats-Msg-Id) and consumers are idempotent.
            continue;
        }
        match result {
            Ok(()) => published.push(row.id),
            Err(error) => {
                held_back.insert(row.aggregate_id);
                failures.push((row, error));
            }
        }
    }
    outbox::mark_published(&mut tx, &published).await?;
    metrics.published.inc_by(published.len() as u64);
    for (row, error) in &failures {
        metrics.publish_failures.inc();
        if row.attempts + 1 >= max_attempts
            && hodei_outbox::dead_letter(js, &row.message, error).await
        {
            tracing::error!(event_id = %row.message.event_id, subject = %row.message.subject, attempts = row.attempts + 1, %error, "outbox row is dead; copied to HODEI_DLQ");
            metrics.dead_lettered.inc();
            outbox::mark_dead(&mut tx, row.id, error).await?;
        } else {
            let retry_in = backoff(row.attempts);
            tracing::error!(event_id = %row.message.event_id, subject = %row.message.subject, attempts = row.attempts + 1, %error, ?retry_in, "cannot publish outbox row; retrying");
            outbox::mark_failed(&mut tx, row.id, error, retry_in).await?;
        }
    }
    tx.commit().await?;
    if !failures.is_empty() && published.is_empty() {
        anyhow::bail!("no row of the batch could be published");
    }
    Ok(published.len())
}

/// Exponential backoff with equal jitter: 100 ms doubling, at most about a minute.
fn backoff(attempts: i32) -> Duration {
    let full = 100u64 << attempts.clamp(0, 10);
    Duration::from_millis(full / 2 + (full as f64 / 2.0 * hodei_runtime::jitter()) as u64)
}
