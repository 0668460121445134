//! WorkerReadyForJob: send the worker the job it was provisioned for, or (a warm-pool worker)
//! the next pending job; a worker whose reserved job no longer waits for it is torn down.

use hodei_domain::events::WorkerReadyForJob;
use hodei_domain::WorkerState;
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;
use hodei_store::{jobs, workers};

use super::{payload_of, send_job};
use crate::State;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    super::guarded(&state, dispatch(&state, &delivery)).await
}

#[tracing::instrument(name = "dispatch decision", skip_all)]
async fn dispatch(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let ready: WorkerReadyForJob = payload_of(delivery)?;
    let mut tx = state.store.begin_placing().await?;
    let Some(mut worker) = workers::lock(&mut tx, ready.worker_id).await? else {
        return Err(ApiError::not_found(format!(
            "WorkerReadyForJob names unknown worker {}",
            ready.worker_id
        )));
    };
    if worker.state != WorkerState::Ready {
        tracing::debug!(worker_id = %worker.id, state = %worker.state, "worker no longer ready; nothing to do");
        return Ok(());
    }
    if let Some(mut job) = jobs::lock_scheduled_on(&mut tx, worker.id).await? {
        send_job(&mut tx, &mut job, &mut worker, &state.actor).await?;
    } else if worker.reserved_job_id.is_some() {
        let event = worker.terminate(
            "the job it was provisioned for no longer waits".into(),
            &state.actor,
        )?;
        tx.save(&mut worker, &[event]).await?;
        tracing::info!(worker_id = %worker.id, "reserved job gone; worker torn down");
    } else if worker.pooled && state.warm_pool.is_none() {
        // The pool was turned off. (A pool made smaller tears its idle surplus down at the
        // dispatcher's start; busy members retire after their share of jobs.)
        let event = worker.terminate("the warm pool was turned off".into(), &state.actor)?;
        tx.save(&mut worker, &[event]).await?;
        tracing::info!(worker_id = %worker.id, "pool worker torn down: no warm pool any more");
    } else if let Some(mut job) =
        // A job in a container waits for a container of its own, not this pool process.
        jobs::lock_next_pending(&mut tx, jobs::Kinds::Processes).await?
    {
        send_job(&mut tx, &mut job, &mut worker, &state.actor).await?;
    }
    hodei_store::commit(tx).await?;
    Ok(())
}
