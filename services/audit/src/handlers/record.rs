//! Every event of HODEI_EVENTS: store it once; a redelivery finds it stored and changes nothing.

use hodei_domain::DomainEvent;
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;

use crate::State;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    Outcome::from_result(record(&state, &delivery).await)
}

#[tracing::instrument(name = "audit write", skip_all)]
async fn record(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let event: DomainEvent = delivery.decode()?;
    let new = hodei_store::audit::record(&state.pool, std::slice::from_ref(&event)).await?;
    if new == 0 {
        tracing::debug!(event_id = %event.event_id, "already recorded");
    } else {
        tracing::debug!(event_id = %event.event_id, event_type = %event.event_type, "recorded");
    }
    Ok(())
}
