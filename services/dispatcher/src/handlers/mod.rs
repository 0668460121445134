//! One file per message the dispatcher understands, and the placement they share.

pub mod job_queued;
mod placement;
pub mod worker_ready;
pub mod worker_terminated;

pub(crate) use hodei_placement::assign as send_job;
pub(crate) use placement::{place_pending, replenish_pool};

use hodei_domain::DomainEvent;
use hodei_protocol::ApiError;

/// Run a placement behind the dispatch circuit breaker: while it is open the message waits
/// (redelivered after the open window); transient failures count towards opening it.
pub(crate) async fn guarded<F>(
    state: &crate::State,
    placement: F,
) -> hodei_messaging::consumer::Outcome
where
    F: std::future::Future<Output = Result<(), ApiError>>,
{
    use hodei_messaging::consumer::Outcome;
    if let Err(wait) = state.breaker.allow() {
        return Outcome::Retry {
            after: wait,
            reason: "the dispatch circuit is open".into(),
        };
    }
    let result = placement.await;
    state
        .breaker
        .record(!matches!(&result, Err(error) if error.code.is_transient()));
    Outcome::from_result(result)
}

/// The event an envelope carries, decoded as `P`.
pub(crate) fn payload_of<P: hodei_domain::EventPayload>(
    delivery: &hodei_messaging::consumer::Delivery,
) -> Result<P, ApiError> {
    let event: DomainEvent = delivery.decode()?;
    match event.decode::<P>() {
        Some(Ok(payload)) => Ok(payload),
        Some(Err(e)) => Err(ApiError::bad_request(format!(
            "invalid {} payload: {e}",
            P::EVENT_TYPE
        ))),
        None => Err(ApiError::bad_request(format!(
            "expected {}, got {}",
            P::EVENT_TYPE,
            event.event_type
        ))),
    }
}
