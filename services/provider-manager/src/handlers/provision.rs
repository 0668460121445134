//! WorkerProvisioningRequested: mint the bootstrap token, record the worker as provisioned
//! (Creating -> Connecting, token hash kept) and start its agent. If the agent cannot be
//! started, the worker ends and the job it was requested for is requeued, in one
//! transaction; the provider's circuit breaker counts the failure, and while it is open
//! requests wait (they are redelivered later) instead of failing their jobs.

use std::sync::Arc;

use hodei_domain::events::WorkerProvisioningRequested;
use hodei_domain::{DomainEvent, JobState, WorkerState};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;
use hodei_store::{hash_token, jobs, outbox, resources, workers, StoreError};
use uuid::Uuid;

use crate::providers::{Provider, WorkerSpec};
use crate::State;

pub async fn handle<P: Provider>(state: Arc<State<P>>, delivery: Delivery) -> Outcome {
    if let Err(wait) = state.breaker.allow() {
        return Outcome::Retry {
            after: wait,
            reason: format!("provider {} circuit is open", state.provider.name()),
        };
    }
    Outcome::from_result(provision(&state, &delivery).await)
}

#[tracing::instrument(name = "provision", skip_all)]
async fn provision<P: Provider>(state: &State<P>, delivery: &Delivery) -> Result<(), ApiError> {
    let event: DomainEvent = delivery.decode()?;
    let request: WorkerProvisioningRequested = match event.decode() {
        Some(Ok(request)) => request,
        _ => {
            return Err(ApiError::bad_request(format!(
                "not a WorkerProvisioningRequested event: {}",
                event.event_type
            )))
        }
    };
    let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let mut tx = hodei_store::begin(&state.pool).await?;
    let Some(mut worker) = workers::lock(&mut tx, request.worker_id).await? else {
        return Err(ApiError::not_found(format!(
            "there is no worker {}",
            request.worker_id
        )));
    };
    if worker.state != WorkerState::Creating {
        tracing::debug!(worker_id = %worker.id, state = %worker.state, "already provisioned; nothing to do");
        state.breaker.record(true);
        return Ok(());
    }
    let creds = match &state.signer {
        Some(signer) => Some(mint_credential(state, signer, &worker).await?),
        None => None,
    };
    let provisioned = worker.provisioned(hash_token(&token), &state.actor)?;
    workers::update(&mut tx, &mut worker).await?;
    outbox::append_events(&mut tx, &[provisioned]).await?;
    hodei_store::commit(tx).await?;

    let spec = WorkerSpec {
        worker_id: worker.id,
        token,
        correlation_id: worker.correlation_id.clone(),
        trace_context: hodei_runtime::telemetry::context::current(),
        creds,
    };
    match state.provider.create(spec).await {
        Ok(resource_id) => {
            state.breaker.record(true);
            let mut conn = state.pool.acquire().await.map_err(StoreError::from)?;
            resources::record(&mut conn, worker.id, state.provider.name(), &resource_id).await?;
            Ok(())
        }
        Err(error) => {
            state.breaker.record(false);
            tracing::error!(worker_id = %worker.id, %error, "provisioning failed");
            give_up(state, worker.id, error.to_string()).await
        }
    }
}

/// The worker's own credential: only its subjects, its command consumer, its inbox and the
/// logs of the job it is provisioned for; valid for as long as that job may take.
async fn mint_credential<P: Provider>(
    state: &State<P>,
    signer: &hodei_auth::Signer,
    worker: &hodei_domain::Worker,
) -> Result<String, ApiError> {
    let job_id = worker.reserved_job_id.filter(|_| !worker.pooled);
    let ttl = match job_id {
        Some(job_id) => match jobs::get(&state.pool, job_id).await? {
            Some(job) => {
                job.policy.schedule_to_start()
                    + job.policy.execution()
                    + std::time::Duration::from_secs(300)
            }
            None => state.pool_credential_ttl,
        },
        None => state.pool_credential_ttl,
    };
    let role = hodei_auth::Role::Worker {
        worker_id: worker.id,
        job_id,
    };
    signer
        .mint(&worker.id.to_string(), &role, Some(ttl))
        .map_err(|e| ApiError::internal(format!("minting the worker's credential: {e}")))
}

/// The worker could not be created: it ends, and the job that waits for it is requeued
/// (it gets another worker; its schedule-to-start deadline still bounds the wait).
async fn give_up<P: Provider>(
    state: &State<P>,
    worker_id: Uuid,
    error: String,
) -> Result<(), ApiError> {
    let mut tx = hodei_store::begin(&state.pool).await?;
    let Some(mut worker) = workers::lock(&mut tx, worker_id).await? else {
        return Ok(());
    };
    let mut events = vec![worker.provisioning_failed(error.clone(), &state.actor)?];
    events.push(worker.terminated(&state.actor)?);
    workers::update(&mut tx, &mut worker).await?;
    if let Some(mut job) = jobs::lock_scheduled_on(&mut tx, worker_id).await? {
        if job.state == JobState::Scheduled {
            events.extend(job.requeue(
                format!("no worker could be provisioned: {error}"),
                &state.actor,
            )?);
            jobs::update(&mut tx, &mut job).await?;
        }
    }
    outbox::append_events(&mut tx, &events).await?;
    hodei_store::commit(tx).await?;
    Ok(())
}
