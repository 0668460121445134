//! Every event of HODEI_EVENTS: store it once; a redelivery finds it stored and changes nothing.
//! Events waiting together are stored in one INSERT.

use hodei_domain::DomainEvent;
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;

use crate::State;

/// Most events written in one INSERT.
pub const MAX_BATCH: usize = 256;

pub async fn handle(state: State, batch: Vec<(Delivery, tracing::Span)>) -> Vec<Outcome> {
    // Each event's own "audit write" span (in its job's trace) covers the shared write.
    let spans: Vec<tracing::Span> = batch
        .iter()
        .map(|(_, parent)| tracing::info_span!(parent: parent, "audit write"))
        .collect();
    let decoded: Vec<Result<DomainEvent, ApiError>> = batch
        .iter()
        .map(|(delivery, _)| delivery.decode())
        .collect();
    let events: Vec<DomainEvent> = decoded
        .iter()
        .filter_map(|event| event.as_ref().ok().cloned())
        .collect();
    let written = hodei_store::audit::record(&state.store, &events)
        .await
        .map_err(ApiError::from);
    drop(spans);
    if let Ok(new) = &written {
        tracing::debug!(
            events = events.len(),
            new,
            "recorded (events already recorded are skipped)"
        );
    }
    decoded
        .into_iter()
        .map(|event| match (event, &written) {
            (Err(error), _) => Outcome::from_result::<()>(Err(error)),
            (Ok(_), Ok(_)) => Outcome::Done,
            (Ok(_), Err(error)) => Outcome::from_result::<()>(Err(error.clone())),
        })
        .collect()
}
