//! WorkerTerminating: destroy the worker's resource, then record it Terminated.

use std::sync::Arc;

use hodei_domain::events::WorkerTerminating;
use hodei_domain::{DomainEvent, WorkerState};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::{ApiError, ErrorCode};
use hodei_store::{outbox, resources, workers, StoreError};

use crate::providers::Provider;
use crate::State;

pub async fn handle<P: Provider>(state: Arc<State<P>>, delivery: Delivery) -> Outcome {
    Outcome::from_result(destroy(&state, &delivery).await)
}

#[tracing::instrument(name = "destroy", skip_all)]
async fn destroy<P: Provider>(state: &State<P>, delivery: &Delivery) -> Result<(), ApiError> {
    let event: DomainEvent = delivery.decode()?;
    let terminating: WorkerTerminating = match event.decode() {
        Some(Ok(terminating)) => terminating,
        _ => {
            return Err(ApiError::bad_request(format!(
                "not a WorkerTerminating event: {}",
                event.event_type
            )))
        }
    };
    let worker_id = terminating.worker_id;
    let resource_id = {
        let mut conn = state.pool.acquire().await.map_err(StoreError::from)?;
        resources::find(&mut conn, worker_id).await?
    };
    state
        .provider
        .destroy(worker_id, resource_id.as_deref())
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("destroying worker {worker_id}: {e}"),
            )
        })?;
    let mut tx = hodei_store::begin(&state.pool).await?;
    let Some(mut worker) = workers::lock(&mut tx, worker_id).await? else {
        return Err(ApiError::not_found(format!(
            "there is no worker {worker_id}"
        )));
    };
    if worker.state != WorkerState::Terminating {
        return Ok(());
    }
    let terminated = worker.terminated(&state.actor)?;
    workers::update(&mut tx, &mut worker).await?;
    outbox::append_events(&mut tx, &[terminated]).await?;
    resources::forget(&mut tx, worker_id).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(%worker_id, "worker destroyed");
    Ok(())
}
