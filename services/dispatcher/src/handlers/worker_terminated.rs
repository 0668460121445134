//! WorkerTerminated: a worker is gone and its capacity is free. Top the warm pool up, and
//! place jobs that waited for room.

use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;

use super::placement::{keep_pool, looks, place_looked};
use crate::State;

/// Most jobs one freed worker lets through at once (more when several freed meanwhile).
const CATCH_UP: usize = 64;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    super::guarded(&state, rebalance(&state, &delivery)).await
}

#[tracing::instrument(name = "capacity freed", skip_all)]
async fn rebalance(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let _: hodei_domain::events::WorkerTerminated = super::payload_of(delivery)?;
    // One look for both. Keeping the pool never makes a job placeable that was not (the
    // workers it makes are not Ready yet; those it tears down still count until they end),
    // so the look may come first.
    let looks = looks(state).await?;
    if state.warm_pool.is_some() || looks.live_pooled {
        keep_pool(state).await?;
    }
    if looks.placeable {
        place_looked(state, &looks, CATCH_UP).await?;
    }
    Ok(())
}
