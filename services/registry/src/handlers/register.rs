//! `hodei.agent.<worker_id>.register`: an agent proves it is the worker that was provisioned
//! by presenting the one-time bootstrap token; the token is spent and the worker is Ready.

use hodei_domain::Actor;
use hodei_messaging::api::RequestContext;
use hodei_protocol::agent::{RegisterWorker, Registered};
use hodei_protocol::{subjects, ApiError, ErrorCode};
use hodei_store::{hash_token, jobs, outbox, workers};

use crate::State;

#[tracing::instrument(name = "register", skip_all, fields(worker_id = %request.worker_id))]
pub async fn handle(
    state: State,
    request: RegisterWorker,
    ctx: RequestContext,
) -> Result<Registered, ApiError> {
    let subject_worker = subjects::worker_id_of(&ctx.subject);
    if subject_worker != Some(request.worker_id) {
        return Err(ApiError::new(
            ErrorCode::WorkerMismatch,
            format!(
                "registration for worker {} arrived on {}",
                request.worker_id, ctx.subject
            ),
        ));
    }
    let mut tx = state.store.begin().await?;
    let mut worker = workers::lock(&mut tx, request.worker_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("there is no worker {}", request.worker_id)))?;
    // The token is spent here; the agent's instance value binds any repeat to this agent.
    let session_hash = request
        .instance
        .as_deref()
        .map(|instance| hash_token(&format!("{}/{instance}", request.token)));
    let registration = worker.register(
        &hash_token(&request.token),
        session_hash.as_deref(),
        request.pid,
        request.hostname,
        state.lost_after,
        &Actor::worker(worker.id),
    )?;
    let Some(registration) = registration else {
        // A registration asked again (its answer was lost): answered as before, with the
        // job it was given then, if any.
        let run = match (worker.reserved_job_id, worker.current_job_id) {
            (Some(reserved), Some(current)) if reserved == current => {
                jobs::get(&state.store, current)
                    .await?
                    .filter(|job| !job.state.is_terminal())
                    .map(|job| hodei_placement::run_job_of(&job))
            }
            _ => None,
        };
        tracing::info!(worker_id = %worker.id, "registration repeated; answered as before");
        return Ok(Registered {
            worker_id: worker.id,
            heartbeat_interval_ms: state.heartbeat_interval_ms,
            lost_after_ms: Some(state.lost_after.as_millis() as u64),
            max_jobs: worker.max_jobs,
            run,
        });
    };
    // A worker provisioned for one job that still waits for it gets it now, in this
    // transaction and in the answer (not also on its command subject), and nobody is told
    // it was ready: the dispatcher would otherwise look at it on WorkerReadyForJob, one
    // round through the stream later, only to find it Busy. (Worker, then job: the lock
    // order of every placement.)
    let run = match jobs::lock_scheduled_on(&mut tx, worker.id).await? {
        Some(mut job) if worker.reserved_job_id == Some(job.id) => {
            // The worker's row is written once, Busy, by the assignment.
            outbox::append_events(&mut tx, &registration.given_its_job()).await?;
            Some(
                hodei_placement::assign_in_answer(&mut tx, &mut job, &mut worker, &state.actor)
                    .await?,
            )
        }
        _ => {
            tx.save(&mut worker, &registration.waiting()).await?;
            None
        }
    };
    hodei_store::commit(tx).await?;
    match &run {
        Some(run) => {
            tracing::info!(worker_id = %worker.id, pid = ?request.pid, job_id = %run.job_id, "worker registered; its job given in the answer")
        }
        None => {
            tracing::info!(worker_id = %worker.id, pid = ?request.pid, "worker registered and ready")
        }
    }
    Ok(Registered {
        worker_id: worker.id,
        heartbeat_interval_ms: state.heartbeat_interval_ms,
        lost_after_ms: Some(state.lost_after.as_millis() as u64),
        max_jobs: worker.max_jobs,
        run,
    })
}
