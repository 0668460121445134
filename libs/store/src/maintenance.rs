//! Housekeeping of the tables every job churns through: published outbox rows are deleted
//! after a retention, and the churning tables are vacuumed and analyzed, so that their
//! partial "queue" indexes (pending outbox rows, pending jobs, free workers) do not fill up
//! with dead entries that every placement and every relay batch would walk over. Autovacuum
//! does this too where it is on and keeps up; this does not depend on it.

use std::time::Duration;

use sqlx::PgPool;

use crate::Result;

/// Tables updated several times per job.
pub const CHURNING: [&str; 3] = ["outbox_events", "jobs", "workers"];

/// Delete published outbox rows older than `retention` (dead rows stay for the DLQ's record),
/// at most `batch` per statement; returns how many went.
pub async fn delete_published_outbox(
    pool: &PgPool,
    retention: Duration,
    batch: i64,
) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let result = sqlx::query(
            "DELETE FROM outbox_events WHERE id IN ( \
                 SELECT id FROM outbox_events \
                 WHERE status = 'published' AND published_at < now() - $1 * interval '1 millisecond' \
                 LIMIT $2)",
        )
        .bind(retention.as_millis() as f64)
        .bind(batch)
        .execute(pool)
        .await?;
        deleted += result.rows_affected();
        if result.rows_affected() < batch as u64 {
            return Ok(deleted);
        }
    }
}

/// `VACUUM (ANALYZE)` of each churning table (outside any transaction, as VACUUM must be).
pub async fn vacuum_churning_tables(pool: &PgPool) -> Result<()> {
    for table in CHURNING {
        sqlx::raw_sql(&format!("VACUUM (ANALYZE) {table}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}
