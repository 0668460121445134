//! The publisher in each writing service: the outbox rows of every transaction this process
//! commits go to JetStream right after the commit, without waiting for the relay to be
//! notified and to read them back. Rows are published in commit order, their acks awaited
//! together, and marked published in one UPDATE for everything acked within a short window.
//!
//! Nothing depends on it for correctness: a row it cannot publish (NATS unreachable, the
//! process dies after the commit, its queue is full) stays pending, and the relay publishes
//! it after its grace. A row both publish is stored once (same `Nats-Msg-Id`).

use hodei_messaging::JetStream;
use hodei_runtime::Shutdown;
use hodei_store::outbox::{self, Outgoing};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

use uuid::Uuid;

/// Committed transactions waiting to be published; beyond it the relay takes over.
const QUEUE: usize = 4096;
/// Most rows published in one round.
const BATCH: usize = 512;
/// Published rows are marked in one UPDATE for everything acked within this window: few
/// statements however many commits there are. Each is a write transaction, so the window
/// bounds them at ten a second per service, however busy it is. It stays well inside the
/// relay's grace (250 ms by default): a row marked later is published again by the relay,
/// and stored once.
const MARK_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
/// Most rows marked in one UPDATE.
const MARK_BATCH: usize = 2048;

/// What the publisher hands its marker: rows acked by the stream, and whether some rows of
/// the round could not be published (the relay is then woken).
struct Acked {
    event_ids: Vec<Uuid>,
    failed: bool,
}

/// What the publisher counts.
#[derive(Debug, Clone)]
struct Metrics {
    events: Family<EventLabels, Counter>,
    skipped: Counter,
    publish_delay: Histogram,
    published: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event_type: String,
}

impl Metrics {
    fn register(metrics: &mut hodei_runtime::metrics::Metrics) -> Metrics {
        Metrics {
            events: metrics.counter_family(
                "hodei_events_total",
                "Domain events (state transitions) written to the outbox, by type",
            ),
            skipped: metrics.counter(
                "hodei_outbox_direct_skipped_total",
                "Committed transactions whose rows were left to the relay (publisher busy or stopped)",
            ),
            publish_delay: metrics.latency_histogram(
                "hodei_outbox_publish_delay_seconds",
                "From a commit to the stream's ack of its outbox rows, published by the committing service",
            ),
            published: metrics.counter(
                "hodei_outbox_published_total",
                "Outbox rows published to JetStream",
            ),
        }
    }
}

/// Start the publisher of this process's commits and give what a [`hodei_store::Store`]
/// hands each commit's rows to ([`hodei_store::Store::publishing_to`]), its metrics
/// registered in `metrics`. It also counts the domain events each commit made durable
/// (`hodei_events_total`).
pub fn start(
    js: JetStream,
    pool: PgPool,
    metrics: &mut hodei_runtime::metrics::Metrics,
    shutdown: Shutdown,
) -> hodei_store::AfterCommit {
    let metrics = Metrics::register(metrics);
    let (sender, receiver) = mpsc::channel::<(Instant, Vec<Outgoing>)>(QUEUE);
    let skipped = Arc::new(AtomicBool::new(false));
    let skipping = skipped.clone();
    let (events, skipped_total) = (metrics.events.clone(), metrics.skipped.clone());
    let publisher: hodei_store::AfterCommit = Arc::new(move |rows| {
        for row in rows.iter().filter(|row| row.is_event()) {
            events
                .get_or_create(&EventLabels {
                    event_type: row.event_type.clone(),
                })
                .inc();
        }
        if sender.try_send((Instant::now(), rows)).is_err() {
            // The relay is woken once the publisher is free again.
            skipping.store(true, Ordering::Relaxed);
            skipped_total.inc();
        }
    });
    let (marks, marker) = mpsc::channel::<Acked>(64);
    tokio::spawn(run(js, metrics, marks, receiver, skipped, shutdown));
    tokio::spawn(mark(pool, marker));
    publisher
}

/// Mark what was published, in batches; ends when the publisher has ended.
async fn mark(pool: PgPool, mut acked: mpsc::Receiver<Acked>) {
    while let Some(first) = acked.recv().await {
        let mut event_ids = first.event_ids;
        let mut failed = first.failed;
        let window = tokio::time::sleep(MARK_WINDOW);
        tokio::pin!(window);
        while event_ids.len() < MARK_BATCH {
            tokio::select! {
                more = acked.recv() => match more {
                    Some(more) => {
                        event_ids.extend(more.event_ids);
                        failed |= more.failed;
                    }
                    None => break,
                },
                _ = &mut window => break,
            }
        }
        let marked = async {
            let mut conn = pool.acquire().await?;
            outbox::mark_published_events(&mut conn, &event_ids).await?;
            if failed {
                outbox::notify_relay(&mut conn).await?;
            }
            Ok::<_, hodei_store::StoreError>(())
        };
        if let Err(error) = marked.await {
            // The rows stay pending: the relay publishes them again, and the stream drops
            // the copies as duplicates.
            tracing::warn!(%error, rows = event_ids.len(), "published rows not marked; the relay will repeat them");
        }
    }
}

async fn run(
    js: JetStream,
    metrics: Metrics,
    marks: mpsc::Sender<Acked>,
    mut receiver: mpsc::Receiver<(Instant, Vec<Outgoing>)>,
    skipped: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    while let Some(Some((committed, first))) = shutdown.run_until_cancelled(receiver.recv()).await {
        let mut rows = first;
        while rows.len() < BATCH {
            match receiver.try_recv() {
                Ok((_, more)) => rows.extend(more),
                Err(_) => break,
            }
        }
        let mut acked = publish_batch(&js, &metrics, &rows, committed).await;
        acked.failed |= skipped.swap(false, Ordering::Relaxed);
        if marks.send(acked).await.is_err() {
            break;
        }
    }
}

/// `committed`: when the oldest transaction of the batch committed.
async fn publish_batch(
    js: &JetStream,
    metrics: &Metrics,
    rows: &[Outgoing],
    committed: Instant,
) -> Acked {
    let started = Instant::now();
    let mut acks = Vec::with_capacity(rows.len());
    for row in rows {
        acks.push(crate::publish(js, row, "publish").await);
    }
    let results = crate::acknowledged(acks).await;
    let mut published: Vec<Uuid> = Vec::with_capacity(rows.len());
    let mut failed = 0usize;
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => published.push(row.event_id),
            Err(error) => {
                failed += 1;
                tracing::warn!(event_id = %row.event_id, subject = %row.subject, %error, "not published after commit; the relay will");
            }
        }
    }
    let acked = Instant::now();
    metrics
        .publish_delay
        .observe((acked - committed).as_secs_f64());
    tracing::debug!(
        rows = rows.len(),
        queued_us = (started - committed).as_micros() as u64,
        publish_us = (acked - started).as_micros() as u64,
        "published after commit"
    );
    metrics.published.inc_by(published.len() as u64);
    Acked {
        event_ids: published,
        failed: failed > 0,
    }
}
