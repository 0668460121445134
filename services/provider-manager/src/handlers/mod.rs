//! One file per message the provider-manager understands.

pub mod destroy;
pub mod provision;

use hodei_store::{offers, StoreError};

use crate::providers::Kind;
use crate::State;

/// Count a create's or a destroy's success (`failure` is `None`) or failure on the provider's circuit; when
/// that opens or closes it, record the circuit where `hodei explain` reads it (best effort:
/// the circuit itself is this process's, and works without the record).
pub(crate) async fn count_on_circuit(state: &State, kind: Kind, failure: Option<&str>) {
    let Some(breaker) = state.providers.breaker(kind) else {
        return;
    };
    if !breaker.record(failure.is_none()) {
        return;
    }
    let view = breaker.view();
    let open = view.circuit != hodei_runtime::breaker::CircuitState::Closed;
    let circuit = offers::Circuit {
        state: format!("{:?}", view.circuit),
        consecutive_failures: view.consecutive_failures,
        retry_at: view
            .retry_in_ms
            .map(|ms| chrono::Utc::now() + chrono::Duration::milliseconds(ms as i64)),
        error: failure.filter(|_| open).map(str::to_owned),
    };
    let recorded = match state.store.acquire().await {
        Ok(mut conn) => offers::record_circuit(&mut conn, kind.name(), &circuit).await,
        Err(error) => Err(StoreError::from(error)),
    };
    if let Err(error) = recorded {
        tracing::warn!(%error, provider = kind.name(), "cannot record the provider's circuit");
    }
}
