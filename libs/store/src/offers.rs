//! The `provider_offers` table: each provider's labels and capacity.

use hodei_domain::ProviderOffer;
use sqlx::{PgConnection, PgPool};

use crate::Result;

/// Record (or replace) what a provider offers, as its provider-manager starts (with its
/// circuit closed, as a starting breaker is).
pub async fn advertise(conn: &mut PgConnection, offer: &ProviderOffer) -> Result<()> {
    sqlx::query(
        "INSERT INTO provider_offers (provider, labels, cpu_millis, memory_mb) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (provider) DO UPDATE SET labels = EXCLUDED.labels, cpu_millis = EXCLUDED.cpu_millis, \
                                              memory_mb = EXCLUDED.memory_mb, updated_at = now(), \
                                              circuit = 'Closed', circuit_failures = 0, \
                                              circuit_retry_at = NULL, circuit_error = NULL",
    )
    .bind(&offer.provider)
    .bind(sqlx::types::Json(&offer.labels))
    .bind(offer.cpu_millis as i32)
    .bind(offer.memory_mb as i32)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forget the offers of providers that are not among `providers` (no longer configured).
pub async fn keep_only(conn: &mut PgConnection, providers: &[&str]) -> Result<()> {
    sqlx::query("DELETE FROM provider_offers WHERE provider <> ALL($1)")
        .bind(providers)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn all(pool: &PgPool) -> Result<Vec<ProviderOffer>> {
    let rows: Vec<(
        String,
        sqlx::types::Json<std::collections::BTreeMap<String, String>>,
        i32,
        i32,
    )> = sqlx::query_as(
        "SELECT provider, labels, cpu_millis, memory_mb FROM provider_offers ORDER BY provider",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(provider, labels, cpu, memory)| ProviderOffer {
            provider,
            labels: labels.0,
            cpu_millis: cpu.max(0) as u32,
            memory_mb: memory.max(0) as u32,
        })
        .collect())
}

/// Memory (MiB) the placed container jobs hold (`default_mb` for a job that asked for none).
pub async fn docker_memory_in_use(conn: &mut PgConnection, default_mb: i32) -> Result<i64> {
    let (used,): (Option<i64>,) = sqlx::query_as(
        "SELECT sum(coalesce((spec->'resources'->>'memory_mb')::int, $1))::int8 FROM jobs \
         WHERE state IN ('Assigned', 'Scheduled', 'Running') AND spec ? 'image'",
    )
    .bind(default_mb)
    .fetch_one(conn)
    .await?;
    Ok(used.unwrap_or(0))
}

/// A provider's circuit as the provider-manager last recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Circuit {
    /// `Closed`, `Open` or `HalfOpen`.
    pub state: String,
    pub consecutive_failures: u32,
    /// While open: when a probe is let through.
    pub retry_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The failure that opened it.
    pub error: Option<String>,
}

/// Record `provider`'s circuit (when it opens or closes).
pub async fn record_circuit(
    conn: &mut PgConnection,
    provider: &str,
    circuit: &Circuit,
) -> Result<()> {
    sqlx::query(
        "UPDATE provider_offers SET circuit = $2, circuit_failures = $3, circuit_retry_at = $4, \
             circuit_error = $5 WHERE provider = $1",
    )
    .bind(provider)
    .bind(&circuit.state)
    .bind(i32::try_from(circuit.consecutive_failures).unwrap_or(i32::MAX))
    .bind(circuit.retry_at)
    .bind(&circuit.error)
    .execute(conn)
    .await?;
    Ok(())
}

/// `provider`'s circuit, if it made an offer.
pub async fn circuit_of(pool: &PgPool, provider: &str) -> Result<Option<Circuit>> {
    let row: Option<CircuitRow> = sqlx::query_as(
        "SELECT circuit, circuit_failures, circuit_retry_at, circuit_error \
         FROM provider_offers WHERE provider = $1",
    )
    .bind(provider)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| Circuit {
        state: row.circuit,
        consecutive_failures: row.circuit_failures.max(0) as u32,
        retry_at: row.circuit_retry_at,
        error: row.circuit_error,
    }))
}

#[derive(sqlx::FromRow)]
struct CircuitRow {
    circuit: String,
    circuit_failures: i32,
    circuit_retry_at: Option<chrono::DateTime<chrono::Utc>>,
    circuit_error: Option<String>,
}
