//! Job events: when a job leaves its worker (it ended, or its attempt is retried or
//! requeued), an ephemeral worker is torn down; a warm-pool worker whose agent reported the
//! end goes back to Ready until it has run its share of jobs.

use hodei_domain::{Actor, DomainEvent, JobState, WorkerState};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;
use hodei_store::workers;
use uuid::Uuid;

use crate::State;

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    Outcome::from_result(tear_down(&state, &delivery).await)
}

/// The job and worker of an event by which a job leaves its worker, and why.
fn ended(event: &DomainEvent) -> Option<(Uuid, Uuid, String)> {
    #[derive(serde::Deserialize)]
    struct Ending {
        job_id: Uuid,
        worker_id: Option<Uuid>,
        #[serde(default)]
        to: Option<JobState>,
    }
    let leaves = [
        "JobCompleted",
        "JobExecutionError",
        "JobStatusChanged",
        "JobRetrying",
        "JobRequeued",
    ];
    if !leaves.contains(&event.event_type.as_str()) {
        return None;
    }
    let ending: Ending = serde_json::from_value(event.payload.clone()).ok()?;
    let why = match (event.event_type.as_str(), ending.to) {
        ("JobRetrying", _) => "is being retried".to_owned(),
        ("JobRequeued", _) => "was requeued".to_owned(),
        ("JobExecutionError", _) => format!("ended {}", JobState::Failed),
        (_, Some(to)) if to.is_terminal() => format!("ended {to}"),
        _ => return None,
    };
    Some((ending.job_id, ending.worker_id?, why))
}

#[tracing::instrument(name = "teardown", skip_all)]
async fn tear_down(state: &State, delivery: &Delivery) -> Result<(), ApiError> {
    let event: DomainEvent = delivery.decode()?;
    let Some((job_id, worker_id, why)) = ended(&event) else {
        return Ok(());
    };
    let mut tx = state.store.begin().await?;
    let Some(mut worker) = workers::lock(&mut tx, worker_id).await? else {
        return Err(ApiError::not_found(format!(
            "job {job_id} ended on unknown worker {worker_id}"
        )));
    };
    // The agent reported the end itself: the job's process is gone, a pool worker may go on.
    let reported_by_worker = event.actor == Actor::worker(worker_id);
    let events = worker.job_left(job_id, reported_by_worker, &why, &state.actor)?;
    if events.is_empty() {
        return Ok(());
    }
    tx.save(&mut worker, &events).await?;
    hodei_store::commit(tx).await?;
    if worker.state == WorkerState::Ready {
        tracing::info!(%worker_id, %job_id, jobs_run = worker.jobs_run, max_jobs = worker.max_jobs, "job ended; pool worker ready for the next one");
    } else {
        tracing::info!(%worker_id, %job_id, "job ended; worker torn down");
    }
    Ok(())
}
