//! JobQueued: jobs wait. For the JobQueued events waiting together, place as many pending
//! jobs (by priority, then age: usually those ones) on free ready workers, or on new workers
//! while there is room for them.

use hodei_domain::events::JobQueued;
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;

use super::placement::place_pending;
use crate::State;

/// Most JobQueued events taken together.
pub const MAX_BATCH: usize = 256;

pub async fn handle(state: State, batch: Vec<(Delivery, tracing::Span)>) -> Vec<Outcome> {
    let spans: Vec<tracing::Span> = batch
        .iter()
        .map(|(_, parent)| tracing::info_span!(parent: parent, "dispatch decision", job_id = tracing::field::Empty))
        .collect();
    let queued: Vec<Result<JobQueued, ApiError>> = batch
        .iter()
        .zip(&spans)
        .map(|((delivery, _), span)| {
            let queued = super::payload_of::<JobQueued>(delivery)?;
            span.record("job_id", tracing::field::display(queued.job_id));
            Ok(queued)
        })
        .collect();
    let wanted = queued.iter().filter(|q| q.is_ok()).count();
    // The placements are made in the first job's trace; every job's has its decision span.
    let placed = match wanted {
        0 => Outcome::Done,
        n => {
            use tracing::Instrument;
            let first = queued
                .iter()
                .zip(&spans)
                .find(|(q, _)| q.is_ok())
                .map(|(_, s)| s.clone());
            super::guarded(&state, async { place_pending(&state, n).await.map(drop) })
                .instrument(first.unwrap_or_else(tracing::Span::none))
                .await
        }
    };
    queued
        .into_iter()
        .map(|queued| match queued {
            Err(error) => Outcome::from_result::<()>(Err(error)),
            Ok(_) => placed.clone(),
        })
        .collect()
}
