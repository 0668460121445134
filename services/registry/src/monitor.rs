//! The state-timeout monitor of workers: a worker that never registers is torn down and its
//! job requeued; a worker whose heartbeats stopped is declared lost, torn down, and its job
//! retried or failed by the job's policy — each in one transaction with its events.

use std::time::Duration;

use hodei_domain::{Actor, DomainEvent, WorkerFault};
use hodei_runtime::Shutdown;
use hodei_store::{jobs, workers, Store, StoreError};
use uuid::Uuid;

const BATCH: usize = 200;

pub async fn run(store: Store, max_sleep: Duration, shutdown: Shutdown) {
    let actor = Actor::service("registry-monitor");
    hodei_runtime::sweep::run(
        "workers",
        hodei_runtime::sweep::Pace {
            batch: BATCH,
            max_sleep,
            wake: None,
        },
        shutdown,
        || async {
            workers::due(&store, BATCH as i64)
                .await
                .map_err(|e| e.to_string())
        },
        || async { workers::next_due(&store).await.map_err(|e| e.to_string()) },
        |worker_id| {
            let (store, actor) = (&store, &actor);
            async move {
                expire(store, worker_id, actor)
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
}

#[tracing::instrument(name = "worker timeout", skip(store, actor))]
async fn expire(store: &Store, worker_id: Uuid, actor: &Actor) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    let Some(mut worker) = workers::lock(&mut tx, worker_id).await? else {
        return Ok(());
    };
    let job_id = worker.current_job_id.or(worker.reserved_job_id);
    let (terminating, fault) = match worker.expire(chrono::Utc::now(), actor) {
        Ok(Some(expired)) => expired,
        Ok(None) => return Ok(()),
        Err(error) => {
            tracing::warn!(%error, "worker timeout refused by the state machine");
            return Ok(());
        }
    };
    let mut moved_on: Option<(hodei_domain::Job, Vec<DomainEvent>)> = None;
    if let (Some(job_id), true) = (job_id, fault != WorkerFault::TeardownOverdue) {
        if let Some(mut job) = jobs::lock(&mut tx, job_id).await? {
            let outcome = if job.worker_id != Some(worker_id) || job.state.is_terminal() {
                Ok(Vec::new())
            } else {
                match fault {
                    WorkerFault::NeverConnected => {
                        job.requeue(format!("worker {worker_id} never registered"), actor)
                    }
                    WorkerFault::Lost => job.worker_lost(worker_id, hodei_runtime::jitter(), actor),
                    WorkerFault::TeardownOverdue => Ok(Vec::new()),
                }
            };
            match outcome {
                Ok(job_events) if !job_events.is_empty() => moved_on = Some((job, job_events)),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%job_id, %error, "the job of the worker could not be moved on")
                }
            }
        }
    }
    tx.save(&mut worker, &[terminating]).await?;
    if let Some((mut job, events)) = moved_on {
        tx.save(&mut job, &events).await?;
    }
    hodei_store::commit(tx).await?;
    tracing::warn!(%worker_id, ?fault, job_id = ?job_id, "worker timed out and is torn down");
    Ok(())
}
