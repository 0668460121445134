//! The `dispatch_settings` row: the capacity and the warm pool's size the dispatchers place
//! within, as the last dispatcher started recorded them (`hodei explain` reads them).

use sqlx::{PgConnection, PgPool};

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSettings {
    pub max_workers: u32,
    pub warm_pool_size: u32,
}

/// Record the settings of the dispatcher that starts.
pub async fn record(conn: &mut PgConnection, settings: DispatchSettings) -> Result<()> {
    sqlx::query(
        "INSERT INTO dispatch_settings (max_workers, warm_pool_size) VALUES ($1, $2) \
         ON CONFLICT (singleton) DO UPDATE SET max_workers = EXCLUDED.max_workers, \
             warm_pool_size = EXCLUDED.warm_pool_size, updated_at = now()",
    )
    .bind(i32::try_from(settings.max_workers).unwrap_or(i32::MAX))
    .bind(i32::try_from(settings.warm_pool_size).unwrap_or(i32::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// The settings recorded, if a dispatcher ever started.
pub async fn get(pool: &PgPool) -> Result<Option<DispatchSettings>> {
    let row: Option<(i32, i32)> =
        sqlx::query_as("SELECT max_workers, warm_pool_size FROM dispatch_settings")
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(max_workers, pool_size)| DispatchSettings {
        max_workers: max_workers.max(0) as u32,
        warm_pool_size: pool_size.max(0) as u32,
    }))
}
