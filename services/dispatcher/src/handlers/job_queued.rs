//! JobQueued: a job waits. Place the next pending job (by priority, then age: usually this
//! one) on a free ready worker, or on a new worker when there is room for one.

use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;

use super::placement::place_pending;
use crate::State;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    super::guarded(&state, place(&state, &delivery)).await
}

#[tracing::instrument(name = "dispatch decision", skip_all, fields(job_id = tracing::field::Empty))]
async fn place(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let queued: hodei_domain::events::JobQueued = super::payload_of(delivery)?;
    tracing::Span::current().record("job_id", tracing::field::display(queued.job_id));
    place_pending(state, 1).await?;
    Ok(())
}
