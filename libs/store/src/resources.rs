//! The `provider_resources` table: what a provider created for a worker.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

pub async fn record(
    conn: &mut PgConnection,
    worker_id: Uuid,
    provider: &str,
    resource_id: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO provider_resources (worker_id, provider, resource_id) VALUES ($1, $2, $3) \
         ON CONFLICT (worker_id) DO UPDATE SET resource_id = EXCLUDED.resource_id",
    )
    .bind(worker_id)
    .bind(provider)
    .bind(resource_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The provider and its resource id of a worker.
pub async fn find(conn: &mut PgConnection, worker_id: Uuid) -> Result<Option<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT provider, resource_id FROM provider_resources WHERE worker_id = $1")
            .bind(worker_id)
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn forget(conn: &mut PgConnection, worker_id: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM provider_resources WHERE worker_id = $1")
        .bind(worker_id)
        .execute(conn)
        .await?;
    Ok(())
}
