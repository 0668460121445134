//! The `audit_log` table: every domain event once, and the queries of the audit API.

use hodei_domain::DomainEvent;
use hodei_protocol::api::{AuditEntry, AuditQuery};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};

use crate::Result;

pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 100;

/// Record events; ones already recorded (same event id) are skipped. Returns how many were new.
pub async fn record(pool: &PgPool, events: &[DomainEvent]) -> Result<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        "INSERT INTO audit_log (event_id, occurred_at, event_type, aggregate_type, aggregate_id, \
                                correlation_id, actor, payload) \
         SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::uuid[], \
                              $6::text[], $7::text[], $8::jsonb[]) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(crate::column(events, |e| e.event_id))
    .bind(crate::column(events, |e| e.occurred_at))
    .bind(crate::column(events, |e| e.event_type.as_str()))
    .bind(crate::column(events, |e| e.aggregate_type.as_str()))
    .bind(crate::column(events, |e| e.aggregate_id))
    .bind(crate::column(events, |e| e.correlation_id.as_str()))
    .bind(crate::column(events, |e| e.actor.as_str()))
    .bind(crate::column(events, |e| sqlx::types::Json(&e.payload)))
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    seq: i64,
    event_id: uuid::Uuid,
    occurred_at: chrono::DateTime<chrono::Utc>,
    recorded_at: chrono::DateTime<chrono::Utc>,
    event_type: String,
    aggregate_type: String,
    aggregate_id: uuid::Uuid,
    correlation_id: String,
    actor: String,
    payload: sqlx::types::Json<serde_json::Value>,
}

/// Every criterion given must match; `limit` at a time. Results are in recording order (`seq`),
/// or, when the query is bounded in time (`from` or `to`), in occurrence order (`occurred_at`,
/// then `seq`): an index gives a time range in that order, so a page costs the same at any depth
/// and however wide the range (in recording order it would cost the whole range, sorted). The
/// cursor is the `seq` of the last entry of the previous page either way.
pub async fn query(pool: &PgPool, q: &AuditQuery) -> Result<(Vec<AuditEntry>, Option<String>)> {
    let limit = page_size(q);
    let mut sql = select(q, "");
    // Planned for the values at hand every time: a cached generic plan cannot tell an hour from
    // a month, nor a service's actor from one worker's, and walks the whole log for some.
    let rows: Vec<AuditRow> = sql
        .build_query_as()
        .persistent(false)
        .fetch_all(pool)
        .await?;
    let mut entries: Vec<AuditEntry> = rows
        .into_iter()
        .map(|r| AuditEntry {
            seq: r.seq,
            event_id: r.event_id,
            occurred_at: r.occurred_at,
            recorded_at: r.recorded_at,
            event_type: r.event_type,
            aggregate_type: r.aggregate_type,
            aggregate_id: r.aggregate_id,
            correlation_id: r.correlation_id,
            actor: r.actor,
            payload: r.payload.0,
        })
        .collect();
    let next = (entries.len() > limit as usize).then(|| {
        entries.truncate(limit as usize);
        entries.last().expect("limit is at least 1").seq.to_string()
    });
    Ok((entries, next))
}

/// The plan PostgreSQL runs for `q` (`EXPLAIN (ANALYZE, BUFFERS)` of the very statement
/// [`query`] sends, with the same values bound), one line per plan line; for benchmarks.
pub async fn explain(pool: &PgPool, q: &AuditQuery) -> Result<String> {
    let rows = select(q, "EXPLAIN (ANALYZE, BUFFERS) ")
        .build()
        .persistent(false)
        .fetch_all(pool)
        .await?;
    let lines = rows
        .iter()
        .map(|row| row.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(lines.join("\n"))
}

fn page_size(q: &AuditQuery) -> u32 {
    q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
}

/// The one SELECT of [`query`], after `head` (empty, or an EXPLAIN).
fn select<'q>(q: &'q AuditQuery, head: &str) -> QueryBuilder<'q, Postgres> {
    // An unreadable cursor starts from the first page (the audit service refuses those first).
    let after: Option<i64> = q.cursor.as_deref().and_then(|c| c.parse().ok());
    // A time range, and the trail of one job or aggregate, come in occurrence order: the
    // services publish their own events, so recording order across services can differ from
    // the order in which the changes happened (`occurred_at` is stamped inside the change's
    // transaction; a change caused by another is stamped after it). A correlation id or an
    // aggregate matches few rows, sorted in memory.
    let by_time = q.from.is_some()
        || q.to.is_some()
        || q.correlation_id.is_some()
        || q.aggregate_id.is_some();
    let mut sql = QueryBuilder::new(head);
    sql.push(
        "SELECT seq, event_id, occurred_at, recorded_at, event_type, aggregate_type, aggregate_id, \
                correlation_id, actor, payload FROM audit_log WHERE true",
    );
    if let Some(correlation_id) = &q.correlation_id {
        sql.push(" AND correlation_id = ").push_bind(correlation_id);
    }
    if let Some(event_type) = &q.event_type {
        sql.push(" AND event_type = ").push_bind(event_type);
    }
    if let Some(aggregate_id) = q.aggregate_id {
        sql.push(" AND aggregate_id = ").push_bind(aggregate_id);
    }
    if let Some(actor) = &q.actor {
        sql.push(" AND actor = ").push_bind(actor);
    }
    if let Some(from) = q.from {
        sql.push(" AND occurred_at >= ").push_bind(from);
    }
    if let Some(to) = q.to {
        sql.push(" AND occurred_at < ").push_bind(to);
    }
    match (after, by_time) {
        (None, _) => {}
        (Some(after), false) => {
            sql.push(" AND seq > ").push_bind(after);
        }
        // The cursor's own row says where it stands in time (rows never change); as two
        // scalars, not a row subquery, so that the comparison is an index condition.
        (Some(after), true) => {
            sql.push(" AND (occurred_at, seq) > ((SELECT occurred_at FROM audit_log WHERE seq = ")
                .push_bind(after)
                .push("), ")
                .push_bind(after)
                .push(")");
        }
    }
    sql.push(if by_time {
        " ORDER BY occurred_at, seq"
    } else {
        " ORDER BY seq"
    });
    sql.push(" LIMIT ").push_bind(i64::from(page_size(q)) + 1);
    sql
}
