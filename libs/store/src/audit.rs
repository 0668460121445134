//! The `audit_log` table: every domain event once, and the queries of the audit API.

use hodei_domain::DomainEvent;
use hodei_protocol::api::{AuditEntry, AuditQuery};
use sqlx::{PgPool, QueryBuilder};

use crate::Result;

pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 100;

/// Record events; ones already recorded (same event id) are skipped. Returns how many were new.
pub async fn record(pool: &PgPool, events: &[DomainEvent]) -> Result<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut insert = QueryBuilder::new(
        "INSERT INTO audit_log (event_id, occurred_at, event_type, aggregate_type, aggregate_id, \
                                correlation_id, actor, payload) ",
    );
    insert.push_values(events, |mut row, event| {
        row.push_bind(event.event_id)
            .push_bind(event.occurred_at)
            .push_bind(&event.event_type)
            .push_bind(event.aggregate_type.as_str())
            .push_bind(event.aggregate_id)
            .push_bind(&event.correlation_id)
            .push_bind(event.actor.as_str())
            .push_bind(sqlx::types::Json(&event.payload));
    });
    insert.push(" ON CONFLICT (event_id) DO NOTHING");
    let result = insert.build().execute(pool).await?;
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

/// Every criterion given must match; results in recording order, `limit` at a time. The
/// cursor is the `seq` of the last entry of the previous page.
pub async fn query(pool: &PgPool, q: &AuditQuery) -> Result<(Vec<AuditEntry>, Option<String>)> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let after: i64 = q.cursor.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut sql = QueryBuilder::new(
        "SELECT seq, event_id, occurred_at, recorded_at, event_type, aggregate_type, aggregate_id, \
                correlation_id, actor, payload FROM audit_log WHERE seq > ",
    );
    sql.push_bind(after);
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
    sql.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit) + 1);
    let rows: Vec<AuditRow> = sql.build_query_as().fetch_all(pool).await?;
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
