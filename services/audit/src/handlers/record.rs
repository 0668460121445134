//! Every event of HODEI_EVENTS: store it once; a redelivery finds it stored and changes nothing.
//! Events waiting together are stored in one INSERT; a batch the database refuses is
//! stored one event at a time, so that only the event refused is dead-lettered.

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
    let mut written = match hodei_store::audit::record(&state.store, &events).await {
        Ok(new) => {
            tracing::debug!(
                events = events.len(),
                new,
                "recorded (events already recorded are skipped)"
            );
            events.iter().map(|_| Outcome::Done).collect()
        }
        Err(error) if error.is_transient() => {
            let error = ApiError::from(error);
            events
                .iter()
                .map(|_| Outcome::from_result::<()>(Err(error.clone())))
                .collect()
        }
        // One event the database refuses must not hold up the others: each alone, so that
        // only the one refused is dead-lettered.
        Err(error) => {
            tracing::warn!(%error, events = events.len(), "the batch was refused; recording its events one at a time");
            one_at_a_time(&state, &events).await
        }
    }
    .into_iter();
    drop(spans);
    decoded
        .into_iter()
        .map(|event| match event {
            Err(error) => Outcome::from_result::<()>(Err(error)),
            Ok(_) => written
                .next()
                .unwrap_or_else(|| Outcome::retry("no outcome for the event")),
        })
        .collect()
}

async fn one_at_a_time(state: &State, events: &[DomainEvent]) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(events.len());
    for event in events {
        outcomes.push(
            match hodei_store::audit::record(&state.store, std::slice::from_ref(event)).await {
                Ok(_) => Outcome::Done,
                Err(error) if error.is_transient() => Outcome::retry(error),
                Err(error) => Outcome::reject(format!("the audit log refuses this event: {error}")),
            },
        );
    }
    outcomes
}
