//! WorkerTerminated: a worker is gone and its capacity is free. Top the warm pool up, and
//! place jobs that waited for room.

use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;

use super::placement::{place_pending, replenish_pool};
use crate::State;

/// Most jobs one freed worker lets through at once (more when several freed meanwhile).
const CATCH_UP: usize = 64;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    super::guarded(&state, rebalance(&state, &delivery)).await
}

#[tracing::instrument(name = "capacity freed", skip_all)]
async fn rebalance(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let _: hodei_domain::events::WorkerTerminated = super::payload_of(delivery)?;
    replenish_pool(state).await?;
    place_pending(state, CATCH_UP).await?;
    Ok(())
}
