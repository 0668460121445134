//! JobQueued: place the job on a free ready worker, or schedule it on a new one.

use hodei_domain::events::JobQueued;
use hodei_domain::{JobState, Worker};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;
use hodei_store::{jobs, outbox, workers, StoreError};
use uuid::Uuid;

use super::{payload_of, send_job};
use crate::State;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    super::guarded(&state, place(&state, &delivery)).await
}

#[tracing::instrument(name = "dispatch decision", skip_all)]
async fn place(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let queued: JobQueued = payload_of(delivery)?;
    let queued_at = delivery.decode::<hodei_domain::DomainEvent>()?.occurred_at;
    let mut tx = state.pool.begin().await.map_err(StoreError::from)?;
    let Some(mut job) = jobs::lock(&mut tx, queued.job_id).await? else {
        return Err(ApiError::not_found(format!(
            "JobQueued names unknown job {}",
            queued.job_id
        )));
    };
    if job.state != JobState::Pending || job.attempt != queued.attempt {
        tracing::debug!(job_id = %job.id, state = %job.state, "already placed; nothing to do");
        return Ok(());
    }
    if let Some(mut worker) = workers::lock_free_ready(&mut tx).await? {
        send_job(&mut tx, &mut job, &mut worker, &state.actor).await?;
    } else {
        let (worker, requested) = Worker::request(
            Uuid::now_v7(),
            &state.provider,
            Some(job.id),
            job.correlation_id.clone(),
            state.connect_timeout,
            &state.actor,
        );
        let scheduled = job.schedule(worker.id, &state.actor)?;
        workers::insert(&mut tx, &worker).await?;
        jobs::update(&mut tx, &mut job).await?;
        outbox::append_events(&mut tx, &[scheduled, requested]).await?;
        tracing::info!(job_id = %job.id, worker_id = %worker.id, provider = %state.provider, "no free worker; one requested");
    }
    hodei_store::commit(tx).await?;
    let latency = (chrono::Utc::now() - queued_at)
        .to_std()
        .unwrap_or_default();
    hodei_runtime::metrics::histogram(
        "hodei_dispatch_latency_seconds",
        "From JobQueued to the job placed on a worker",
        &[],
        hodei_runtime::metrics::DEFAULT_LATENCY_BUCKETS,
    )
    .observe_duration(latency);
    Ok(())
}
