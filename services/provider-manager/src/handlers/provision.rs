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
use hodei_store::{hash_token, jobs, resources, workers, StoreError};
use uuid::Uuid;

use crate::providers::{docker::IMAGE_NOT_FOUND, Kind, WorkerSpec};
use crate::State;

pub async fn handle(state: Arc<State>, delivery: Delivery) -> Outcome {
    match provision(&state, &delivery).await {
        Ok(Some(wait)) => Outcome::Retry {
            after: wait.0,
            reason: format!("provider {} circuit is open", wait.1),
        },
        Ok(None) => Outcome::Done,
        Err(error) => Outcome::from_result::<()>(Err(error)),
    }
}

/// Provision the requested worker; `Some((wait, provider))` when that provider's circuit is
/// open (the request waits).
#[tracing::instrument(name = "provision", skip_all)]
async fn provision(
    state: &State,
    delivery: &Delivery,
) -> Result<Option<(std::time::Duration, &'static str)>, ApiError> {
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
    let mut tx = state.store.begin().await?;
    // The job decides the provider (its image), the resources and how long the worker's
    // credential lives: it is read with the worker's row.
    let Some((mut worker, job)) = workers::lock_with_job(&mut tx, request.worker_id).await? else {
        return Err(ApiError::not_found(format!(
            "there is no worker {}",
            request.worker_id
        )));
    };
    if worker.state != WorkerState::Creating {
        tracing::debug!(worker_id = %worker.id, state = %worker.state, "already provisioned; nothing to do");
        return Ok(None);
    }
    let image = job.as_ref().and_then(|job| job.spec.image.clone());
    let kind = Kind::of(image.as_deref());
    if let Some(Err(wait)) = state.providers.breaker(kind).map(|b| b.allow()) {
        return Ok(Some((wait, kind.name())));
    }
    let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let creds = match &state.signer {
        Some(signer) => Some(mint_credential(state, signer, &worker, job.as_ref())?),
        None => None,
    };
    let provisioned = worker.provisioned(hash_token(&token), &state.actor)?;
    tx.save(&mut worker, &[provisioned]).await?;

    let spec = WorkerSpec {
        worker_id: worker.id,
        token,
        correlation_id: worker.correlation_id.clone(),
        trace_context: hodei_runtime::telemetry::context::current(),
        creds,
        job_id: job.as_ref().map(|job| job.job_id),
        image,
        resources: job
            .as_ref()
            .map(|job| job.spec.resources)
            .unwrap_or_default(),
    };
    let created = if kind == Kind::Process {
        // An agent starts in a millisecond: it is started inside the transaction, which then
        // records its resource with the worker's change (one commit, and never an agent
        // without its row). Its registration waits for that commit on the worker's row lock.
        let created = state.providers.create(kind, spec).await;
        if let Ok(resource_id) = &created {
            resources::record(&mut tx, worker.id, kind.name(), resource_id).await?;
        }
        hodei_store::commit(tx).await?;
        created
    } else {
        // A container takes longer to create: nothing waits on the worker's row meanwhile.
        hodei_store::commit(tx).await?;
        let created = state.providers.create(kind, spec).await;
        if let Ok(resource_id) = &created {
            let mut conn = state.store.acquire().await.map_err(StoreError::from)?;
            resources::record(&mut conn, worker.id, kind.name(), resource_id).await?;
        }
        created
    };
    match created {
        Ok(_) => {
            super::count_on_circuit(state, kind, None).await;
            Ok(None)
        }
        Err(error) if error.0.starts_with(IMAGE_NOT_FOUND) => {
            // The engine answered: the provider is fine, the job cannot run. No retry.
            super::count_on_circuit(state, kind, None).await;
            tracing::warn!(worker_id = %worker.id, %error, "the job's image does not exist");
            give_up(state, worker.id, error.to_string(), true).await?;
            Ok(None)
        }
        Err(error) => {
            super::count_on_circuit(state, kind, Some(&error.to_string())).await;
            tracing::error!(worker_id = %worker.id, %error, "provisioning failed");
            give_up(state, worker.id, error.to_string(), false).await?;
            Ok(None)
        }
    }
}

/// The worker's own credential: only its subjects, its command consumer, its inbox and the
/// logs of the job it is provisioned for; valid for as long as that job may take.
fn mint_credential(
    state: &State,
    signer: &hodei_auth::Signer,
    worker: &hodei_domain::Worker,
    job: Option<&workers::ProvisionedFor>,
) -> Result<String, ApiError> {
    let ttl = match job {
        Some(job) => {
            job.policy.schedule_to_start()
                + job.policy.execution()
                + std::time::Duration::from_secs(300)
        }
        None => state.pool_credential_ttl,
    };
    let role = hodei_auth::Role::Worker {
        worker_id: worker.id,
        job_id: job.map(|job| job.job_id),
    };
    signer
        .mint(&worker.id.to_string(), &role, Some(ttl))
        .map_err(|e| ApiError::internal(format!("minting the worker's credential: {e}")))
}

/// The worker could not be created: it ends, and the job that waits for it is requeued
/// (it gets another worker; its schedule-to-start deadline still bounds the wait), or, when
/// `fatal` (its image does not exist), fails with the provider's reason.
async fn give_up(
    state: &State,
    worker_id: Uuid,
    error: String,
    fatal: bool,
) -> Result<(), ApiError> {
    let mut tx = state.store.begin().await?;
    let Some(mut worker) = workers::lock(&mut tx, worker_id).await? else {
        return Ok(());
    };
    let events = [
        worker.provisioning_failed(error.clone(), &state.actor)?,
        worker.terminated(&state.actor)?,
    ];
    tx.save(&mut worker, &events).await?;
    if let Some(mut job) = jobs::lock_scheduled_on(&mut tx, worker_id).await? {
        if job.state == JobState::Scheduled {
            let events = if fatal {
                vec![job.fail(None, error, &state.actor)?]
            } else {
                job.requeue(
                    format!("no worker could be provisioned: {error}"),
                    &state.actor,
                )?
            };
            tx.save(&mut job, &events).await?;
        }
    }
    hodei_store::commit(tx).await?;
    Ok(())
}
