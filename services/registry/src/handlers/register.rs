//! `hodei.agent.<worker_id>.register`: an agent proves it is the worker that was provisioned
//! by presenting the one-time bootstrap token; the token is spent and the worker is Ready.

use hodei_domain::Actor;
use hodei_messaging::api::RequestContext;
use hodei_protocol::agent::{RegisterWorker, Registered};
use hodei_protocol::{subjects, ApiError, ErrorCode};
use hodei_store::{hash_token, outbox, workers};

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
    let mut tx = hodei_store::begin(&state.pool).await?;
    let mut worker = workers::lock(&mut tx, request.worker_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("there is no worker {}", request.worker_id)))?;
    let events = worker.register(
        &hash_token(&request.token),
        request.pid,
        request.hostname,
        state.lost_after,
        &Actor::worker(worker.id),
    )?;
    if events.is_empty() {
        tracing::info!(worker_id = %worker.id, "registration repeated; already ready");
        return Ok(Registered {
            worker_id: worker.id,
            heartbeat_interval_ms: state.heartbeat_interval_ms,
            max_jobs: worker.max_jobs,
        });
    }
    workers::update(&mut tx, &mut worker).await?;
    outbox::append_events(&mut tx, &events).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(worker_id = %worker.id, pid = ?request.pid, "worker registered and ready");
    Ok(Registered {
        worker_id: worker.id,
        heartbeat_interval_ms: state.heartbeat_interval_ms,
        max_jobs: worker.max_jobs,
    })
}
