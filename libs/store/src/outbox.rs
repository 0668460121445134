//! The `outbox_events` table: events and worker commands written in the transaction of the
//! change that causes them, then published by the relay in commit order.

use hodei_domain::DomainEvent;
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

/// The Postgres channel that wakes the relay ([`notify_relay`]).
pub const NOTIFY_CHANNEL: &str = "hodei_outbox";

/// A command to one worker, e.g. RunJob on `hodei.worker.<id>.cmd`.
pub struct OutboxCommand<'a, P: Serialize> {
    pub command_id: Uuid,
    pub subject: String,
    pub worker_id: Uuid,
    pub command_type: &'static str,
    pub correlation_id: &'a str,
    pub payload: &'a P,
}

/// Append domain events (in the order given) to the outbox of `tx`; they are written with
/// the other rows not written yet, by the statement of the transaction's next save
/// ([`crate::Tx::save_all`]) or in one INSERT as it commits ([`crate::commit`]), and then
/// published at once (see [`crate::Tx`]), the relay being the fallback.
pub async fn append_events(tx: &mut crate::Tx, events: &[DomainEvent]) -> Result<()> {
    for event in events {
        tx.outgoing.push(Outgoing::new(
            event.event_id,
            event.subject(),
            &event.event_type,
            serde_json::to_string(event).expect("an event serializes"),
            &event.correlation_id,
        ));
        tx.unwritten.push(RowOf {
            kind: "event",
            aggregate_type: event.aggregate_type.as_str(),
            aggregate_id: event.aggregate_id,
        });
        // Each state change shows in the job's trace. Not a log line at `info`: six of a
        // job's nine scheduler lines were this one, repeating what the audit log keeps.
        hodei_runtime::telemetry::context::trace_event(
            "event recorded",
            &[
                ("event_type", event.event_type.clone()),
                ("aggregate_id", event.aggregate_id.to_string()),
            ],
        );
        tracing::debug!(event_type = %event.event_type, aggregate_id = %event.aggregate_id, "event recorded");
    }
    Ok(())
}

/// Append a command to one worker to the outbox of `tx` (written as [`append_events`]).
pub async fn append_command<P: Serialize>(
    tx: &mut crate::Tx,
    command: OutboxCommand<'_, P>,
) -> Result<()> {
    tx.outgoing.push(Outgoing::new(
        command.command_id,
        command.subject,
        command.command_type,
        serde_json::to_string(command.payload).expect("a command serializes"),
        command.correlation_id,
    ));
    tx.unwritten.push(RowOf {
        kind: "command",
        aggregate_type: "worker",
        aggregate_id: command.worker_id,
    });
    Ok(())
}

/// What an appended row is about, beside what [`Outgoing`] carries.
pub(crate) struct RowOf {
    kind: &'static str,
    aggregate_type: &'static str,
    aggregate_id: Uuid,
}

/// Write the rows appended to `tx` and not written yet, in the order appended, in one INSERT.
pub(crate) async fn flush(tx: &mut crate::Tx) -> Result<()> {
    let crate::Tx {
        inner,
        outgoing,
        unwritten,
        ..
    } = tx;
    if unwritten.is_empty() {
        return Ok(());
    }
    let mut insert = sqlx::QueryBuilder::new("");
    push_insert(&mut insert, outgoing, unwritten);
    insert.build().execute(&mut **inner).await?;
    unwritten.clear();
    Ok(())
}

/// The rows of `outgoing` not written yet (the last `unwritten.len()`), as a `WITH` clause
/// that inserts them, for the statement that follows it to write them too: the write of an
/// aggregate ([`crate::Tx::save`]) carries the rows appended before it, one round trip for
/// both. `None` when every row is written.
pub(crate) fn insert_before<'a>(
    outgoing: &'a [Outgoing],
    unwritten: &'a [RowOf],
) -> Option<sqlx::QueryBuilder<'a, sqlx::Postgres>> {
    if unwritten.is_empty() {
        return None;
    }
    let mut with = sqlx::QueryBuilder::new("WITH outbox_rows AS (");
    push_insert(&mut with, outgoing, unwritten);
    with.push(") ");
    Some(with)
}

/// The INSERT of the rows of `outgoing` not written yet, one array per column (see
/// [`crate::column`]); rows get their ids in the order appended.
fn push_insert<'a>(
    query: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>,
    outgoing: &'a [Outgoing],
    unwritten: &'a [RowOf],
) {
    let rows = &outgoing[outgoing.len() - unwritten.len()..];
    query
        .push(
            "INSERT INTO outbox_events (event_id, kind, subject, aggregate_type, aggregate_id, \
                                        event_type, payload, metadata) \
             SELECT event_id, kind, subject, aggregate_type, aggregate_id, event_type, payload::jsonb, metadata \
             FROM unnest(",
        )
        .push_bind(crate::column(rows, |out| out.event_id))
        .push("::uuid[], ")
        .push_bind(crate::column(unwritten, |of| of.kind))
        .push("::text[], ")
        .push_bind(crate::column(rows, |out| out.subject.as_str()))
        .push("::text[], ")
        .push_bind(crate::column(unwritten, |of| of.aggregate_type))
        .push("::text[], ")
        .push_bind(crate::column(unwritten, |of| of.aggregate_id))
        .push("::uuid[], ")
        .push_bind(crate::column(rows, |out| out.event_type.as_str()))
        .push("::text[], ")
        .push_bind(crate::column(rows, |out| out.payload.as_str()))
        .push("::text[], ")
        .push_bind(crate::column(rows, |out| sqlx::types::Json(out.metadata())))
        .push(
            "::jsonb[]) WITH ORDINALITY AS r(event_id, kind, subject, aggregate_type, aggregate_id, \
                                             event_type, payload, metadata, n) \
             ORDER BY n",
        );
}

/// One outbox row as it goes to JetStream: `Nats-Msg-Id` = `event_id`, the correlation id and
/// the trace context of the transaction that wrote it in headers.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Outgoing {
    pub event_id: Uuid,
    pub subject: String,
    pub event_type: String,
    pub payload: String,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Outgoing {
    /// Whether the row is a domain event (published under `hodei.events.>`, as
    /// `DomainEvent::subject` says) rather than a command to a worker.
    pub fn is_event(&self) -> bool {
        self.subject.starts_with("hodei.events.")
    }

    /// A row written now: the trace context is the current span's.
    fn new(
        event_id: Uuid,
        subject: String,
        event_type: &str,
        payload: String,
        correlation_id: &str,
    ) -> Outgoing {
        let mut context = hodei_runtime::telemetry::context::current();
        Outgoing {
            event_id,
            subject,
            event_type: event_type.to_owned(),
            payload,
            correlation_id: Some(correlation_id.to_owned()),
            traceparent: context.remove("traceparent"),
            tracestate: context.remove("tracestate"),
        }
    }

    /// The correlation id, and the trace context of the transaction's span, which the
    /// publisher restores so that a trace does not break at the database.
    fn metadata(&self) -> serde_json::Value {
        let mut metadata = serde_json::Map::new();
        if let Some(correlation_id) = &self.correlation_id {
            metadata.insert("correlation_id".into(), correlation_id.as_str().into());
        }
        for (name, value) in [
            ("traceparent", &self.traceparent),
            ("tracestate", &self.tracestate),
        ] {
            if let Some(value) = value {
                metadata.insert(name.into(), value.as_str().into());
            }
        }
        serde_json::Value::Object(metadata)
    }
}

/// What marking a row published also does: a command's job environment (its values may be
/// secrets) is no longer needed once the command is in its stream, and is blanked (the
/// names stay).
macro_rules! published {
    () => {
        "status = 'published', published_at = now(), attempts = attempts + 1, last_error = NULL, \
         payload = CASE WHEN kind = 'command' AND payload->'env' <> '{}'::jsonb \
                        THEN jsonb_set(payload, '{env}', (SELECT coalesce(jsonb_object_agg(key, ''), '{}'::jsonb) \
                                                          FROM jsonb_object_keys(payload->'env') AS key)) \
                        ELSE payload END"
    };
}

/// Mark rows published by event id, unless the relay (or another publisher) did first.
pub async fn mark_published_events(conn: &mut PgConnection, event_ids: &[Uuid]) -> Result<u64> {
    if event_ids.is_empty() {
        return Ok(0);
    }
    // The ids a list of parameters ([`crate::push_id_list`]).
    let mut update = sqlx::QueryBuilder::new(concat!(
        "UPDATE outbox_events SET ",
        published!(),
        " WHERE event_id IN "
    ));
    crate::push_id_list(&mut update, event_ids);
    update.push(" AND status = 'pending'");
    let result = update.build().execute(conn).await?;
    Ok(result.rows_affected())
}

/// When the relay should look next: the earliest moment a pending row is due (its grace over,
/// or its retry's backoff), or None when nothing is pending.
pub async fn next_due(
    conn: &mut PgConnection,
    grace: std::time::Duration,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let (at,): (Option<chrono::DateTime<chrono::Utc>>,) = sqlx::query_as(
        "SELECT min(greatest(created_at + $1 * interval '1 millisecond', \
                             coalesce(next_attempt_at, created_at))) \
         FROM outbox_events WHERE status = 'pending'",
    )
    .bind(grace.as_millis() as f64)
    .fetch_one(conn)
    .await?;
    Ok(at)
}

/// Wake the relay (a publisher that could not publish leaves the rows to it).
pub async fn notify_relay(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// A committed row waiting to be published.
#[derive(Debug, sqlx::FromRow)]
pub struct PendingRow {
    pub id: i64,
    pub aggregate_id: Uuid,
    pub attempts: i32,
    #[sqlx(flatten)]
    pub message: Outgoing,
}

/// The relay's batch ([`lock_pending`]).
pub const LOCK_PENDING_SQL: &str = "WITH batch AS ( \
             SELECT id FROM outbox_events \
             WHERE status = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
               AND created_at <= now() - $2 * interval '1 millisecond' \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         SELECT o.id, o.event_id, o.aggregate_id, o.subject, o.event_type, o.payload::text AS payload, \
                o.metadata->>'correlation_id' AS correlation_id, o.metadata->>'traceparent' AS traceparent, \
                o.metadata->>'tracestate' AS tracestate, o.attempts \
         FROM outbox_events o JOIN batch b ON b.id = o.id \
         WHERE NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.status = 'pending' \
                           AND e.aggregate_id = o.aggregate_id AND e.id < o.id AND e.next_attempt_at > now()) \
         ORDER BY o.id";

/// Committed, unpublished rows in insertion order, locked so that no other relay takes them.
/// A row waiting out a retry holds back the later rows of its aggregate, and only those.
///
/// The batch's ids come first from the ordered partial index (no sort, however long the
/// backlog); the hold-back check and the payloads are read for those rows only.
///
/// Rows younger than `grace` are left to the publisher of the service that wrote them (it
/// publishes right after its commit); the relay takes what that did not publish.
pub async fn lock_pending(
    conn: &mut PgConnection,
    limit: i64,
    grace: std::time::Duration,
) -> Result<Vec<PendingRow>> {
    let rows = sqlx::query_as(LOCK_PENDING_SQL)
        .bind(limit)
        .bind(grace.as_millis() as f64)
        .fetch_all(conn)
        .await?;
    Ok(rows)
}

pub async fn mark_published(conn: &mut PgConnection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(concat!(
        "UPDATE outbox_events SET ",
        published!(),
        " WHERE id = ANY($1)"
    ))
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Record a failed publish; the row is tried again after `retry_in`.
pub async fn mark_failed(
    conn: &mut PgConnection,
    id: i64,
    error: &str,
    retry_in: std::time::Duration,
) -> Result<()> {
    sqlx::query(
        "UPDATE outbox_events SET attempts = attempts + 1, last_error = $2, \
                next_attempt_at = now() + $3 * interval '1 millisecond' \
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_in.as_millis() as f64)
    .execute(conn)
    .await?;
    Ok(())
}

/// Give up on a row: it stays in the table, marked dead, with the reason.
pub async fn mark_dead(conn: &mut PgConnection, id: i64, error: &str) -> Result<()> {
    sqlx::query("UPDATE outbox_events SET status = 'dead', attempts = attempts + 1, last_error = $2 WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many rows wait to be published (for logs and tests).
pub async fn pending_count(conn: &mut PgConnection) -> Result<i64> {
    let (count,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM outbox_events WHERE status = 'pending'")
            .fetch_one(conn)
            .await?;
    Ok(count)
}
