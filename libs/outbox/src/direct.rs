//! The publisher in each writing service: the outbox rows of every transaction this process
//! commits go to JetStream right after the commit, without waiting for the relay to be
//! notified and to read them back. Rows are published in commit order, their acks awaited
//! together, and marked published in one UPDATE per batch.
//!
//! Nothing depends on it for correctness: a row it cannot publish (NATS unreachable, the
//! process dies after the commit, its queue is full) stays pending, and the relay publishes
//! it after its grace. A row both publish is stored once (same `Nats-Msg-Id`).

use hodei_messaging::JetStream;
use hodei_runtime::Shutdown;
use hodei_store::outbox::{self, Outgoing};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Committed transactions waiting to be published; beyond it the relay takes over.
const QUEUE: usize = 4096;
/// Most rows published and marked in one round.
const BATCH: usize = 512;

/// Install the publisher for this process's commits (see [`hodei_store::on_commit`]).
pub fn install(js: JetStream, pool: PgPool, shutdown: Shutdown) {
    let (sender, receiver) = mpsc::channel::<Vec<Outgoing>>(QUEUE);
    hodei_store::on_commit(move |rows| {
        if sender.try_send(rows).is_err() {
            hodei_runtime::metrics::counter(
                "hodei_outbox_direct_skipped_total",
                "Committed transactions whose rows were left to the relay (publisher busy or stopped)",
                &[],
            )
            .inc();
        }
    });
    tokio::spawn(run(js, pool, receiver, shutdown));
}

async fn run(
    js: JetStream,
    pool: PgPool,
    mut receiver: mpsc::Receiver<Vec<Outgoing>>,
    shutdown: Shutdown,
) {
    while let Some(Some(first)) = shutdown.guard(receiver.recv()).await {
        let mut rows = first;
        while rows.len() < BATCH {
            match receiver.try_recv() {
                Ok(more) => rows.extend(more),
                Err(_) => break,
            }
        }
        publish_batch(&js, &pool, &rows).await;
    }
}

async fn publish_batch(js: &JetStream, pool: &PgPool, rows: &[Outgoing]) {
    let mut acks = Vec::with_capacity(rows.len());
    for row in rows {
        acks.push(crate::publish(js, row, "publish").await);
    }
    let mut published: Vec<Uuid> = Vec::with_capacity(rows.len());
    let mut failed = 0usize;
    for (row, ack) in rows.iter().zip(acks) {
        let result = match ack {
            Ok(future) => future.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => published.push(row.event_id),
            Err(error) => {
                failed += 1;
                tracing::warn!(event_id = %row.event_id, subject = %row.subject, %error, "not published after commit; the relay will");
            }
        }
    }
    hodei_runtime::metrics::counter(
        "hodei_outbox_published_total",
        "Outbox rows published to JetStream",
        &[],
    )
    .add(published.len() as u64);
    let marked = async {
        let mut conn = pool.acquire().await?;
        outbox::mark_published_events(&mut conn, &published).await?;
        if failed > 0 {
            outbox::notify_relay(&mut conn).await?;
        }
        Ok::<_, hodei_store::StoreError>(())
    };
    if let Err(error) = marked.await {
        // The rows stay pending: the relay publishes them again, and the stream drops the
        // copies as duplicates.
        tracing::warn!(%error, rows = published.len(), "published rows not marked; the relay will repeat them");
    }
}
