//! The `schedules` table.

use chrono::{DateTime, Utc};
use hodei_domain::schedule::Definition;
use hodei_domain::{Schedule, ScheduleState};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{corrupt, Result, StoreError};

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    id: Uuid,
    name: String,
    state: String,
    definition: sqlx::types::Json<Definition>,
    next_tick_at: Option<DateTime<Utc>>,
    anchor_at: DateTime<Utc>,
    last_tick_at: Option<DateTime<Utc>>,
    last_job_id: Option<Uuid>,
    correlation_id: String,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ScheduleRow> for Schedule {
    type Error = StoreError;
    fn try_from(row: ScheduleRow) -> Result<Schedule> {
        Ok(Schedule {
            id: row.id,
            name: row.name,
            state: row.state.parse().map_err(corrupt("schedule state"))?,
            definition: row.definition.0,
            next_tick_at: row.next_tick_at,
            anchor_at: row.anchor_at,
            last_tick_at: row.last_tick_at,
            last_job_id: row.last_job_id,
            correlation_id: row.correlation_id,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

const COLUMNS: &str = "id, name, state, definition, next_tick_at, anchor_at, last_tick_at, \
                       last_job_id, correlation_id, version, created_at, updated_at";

/// Insert a new schedule. Returns false (and writes nothing) when a live schedule has its name.
pub async fn insert(conn: &mut PgConnection, schedule: &Schedule) -> Result<bool> {
    let result = sqlx::query(
        "INSERT INTO schedules (id, name, state, definition, next_tick_at, anchor_at, \
                                last_tick_at, last_job_id, correlation_id, version, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (name) WHERE state <> 'Deleted' DO NOTHING",
    )
    .bind(schedule.id)
    .bind(&schedule.name)
    .bind(schedule.state.as_str())
    .bind(sqlx::types::Json(&schedule.definition))
    .bind(schedule.next_tick_at)
    .bind(schedule.anchor_at)
    .bind(schedule.last_tick_at)
    .bind(schedule.last_job_id)
    .bind(&schedule.correlation_id)
    .bind(schedule.version)
    .bind(schedule.created_at)
    .bind(schedule.updated_at)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Write a changed schedule if nobody changed it since it was loaded; bumps its version.
pub async fn update(conn: &mut PgConnection, schedule: &mut Schedule) -> Result<()> {
    let result = sqlx::query(
        "UPDATE schedules SET state = $2, next_tick_at = $3, anchor_at = $4, last_tick_at = $5, \
                              last_job_id = $6, updated_at = $7, version = version + 1 \
         WHERE id = $1 AND version = $8",
    )
    .bind(schedule.id)
    .bind(schedule.state.as_str())
    .bind(schedule.next_tick_at)
    .bind(schedule.anchor_at)
    .bind(schedule.last_tick_at)
    .bind(schedule.last_job_id)
    .bind(schedule.updated_at)
    .bind(schedule.version)
    .execute(conn)
    .await?;
    if result.rows_affected() != 1 {
        return Err(StoreError::VersionConflict {
            aggregate: "schedule",
            id: schedule.id,
            expected: schedule.version,
        });
    }
    schedule.version += 1;
    Ok(())
}

/// Load a schedule and lock its row until the transaction ends.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Schedule>> {
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = $1 FOR UPDATE");
    let row: Option<ScheduleRow> = sqlx::query_as(&sql).bind(id).fetch_optional(conn).await?;
    row.map(Schedule::try_from).transpose()
}

/// Load the schedules of `ids` that exist and lock their rows, in id order, in one statement.
pub async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Schedule>> {
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = ANY($1) ORDER BY id FOR UPDATE");
    let rows: Vec<ScheduleRow> = sqlx::query_as(&sql).bind(ids).fetch_all(conn).await?;
    rows.into_iter().map(Schedule::try_from).collect()
}

/// [`lock`], unless another transaction holds the row (another scheduler is ticking it):
/// then `None` at once.
pub async fn lock_unless_held(conn: &mut PgConnection, id: Uuid) -> Result<Option<Schedule>> {
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = $1 FOR UPDATE SKIP LOCKED");
    let row: Option<ScheduleRow> = sqlx::query_as(&sql).bind(id).fetch_optional(conn).await?;
    row.map(Schedule::try_from).transpose()
}

/// A schedule by id, or by the name of a live one.
pub async fn find(pool: &PgPool, id_or_name: &str) -> Result<Option<Schedule>> {
    let row: Option<ScheduleRow> = match id_or_name.parse::<Uuid>() {
        Ok(id) => {
            let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = $1");
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        }
        Err(_) => {
            let sql =
                format!("SELECT {COLUMNS} FROM schedules WHERE name = $1 AND state <> 'Deleted'");
            sqlx::query_as(&sql)
                .bind(id_or_name)
                .fetch_optional(pool)
                .await?
        }
    };
    row.map(Schedule::try_from).transpose()
}

/// Newest first, optionally of one state (deleted ones only when asked for).
pub async fn list(
    pool: &PgPool,
    state: Option<ScheduleState>,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<Schedule>, Option<String>)> {
    let (at, id) = crate::page_start(cursor);
    let sql = format!(
        "SELECT {COLUMNS} FROM schedules \
         WHERE (($1::text IS NULL AND state <> 'Deleted') OR state = $1) \
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    );
    let rows: Vec<ScheduleRow> = sqlx::query_as(&sql)
        .bind(state.map(ScheduleState::as_str))
        .bind(at)
        .bind(id)
        .bind(i64::from(limit) + 1)
        .fetch_all(pool)
        .await?;
    let schedules = rows
        .into_iter()
        .map(Schedule::try_from)
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::page_of(schedules, limit, |x| (x.created_at, x.id)))
}

/// Active schedules whose next tick has come by `now` (the ticker's clock, which decides
/// what is due), soonest first.
pub async fn due(pool: &PgPool, now: DateTime<Utc>, limit: i64) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM schedules WHERE state = 'Active' AND next_tick_at <= $2 \
         ORDER BY next_tick_at LIMIT $1",
    )
    .bind(limit)
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The soonest tick of any Active schedule, to sleep until.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    let (at,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT min(next_tick_at) FROM schedules WHERE state = 'Active'")
            .fetch_one(pool)
            .await?;
    Ok(at)
}
