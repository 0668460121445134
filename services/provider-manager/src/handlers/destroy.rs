//! WorkerTerminating: destroy the worker's resource, then record it Terminated.

use std::sync::Arc;

use hodei_domain::events::WorkerTerminating;
use hodei_domain::{DomainEvent, WorkerState};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::{ApiError, ErrorCode};
use hodei_store::{jobs, resources, workers, StoreError};

use crate::providers::{Kind, Teardown};
use crate::State;

pub async fn handle(state: Arc<State>, delivery: Delivery) -> Outcome {
    match destroy(&state, &delivery).await {
        Ok(Some(wait)) => Outcome::Retry {
            after: wait,
            reason: "provider docker circuit is open".into(),
        },
        Ok(None) => Outcome::Done,
        Err(error) => Outcome::from_result::<()>(Err(error)),
    }
}

/// Destroy the worker's resource and record it Terminated; `Some(wait)` while its provider's
/// circuit is open (the teardown waits: it is never given up).
#[tracing::instrument(name = "destroy", skip_all)]
async fn destroy(
    state: &State,
    delivery: &Delivery,
) -> Result<Option<std::time::Duration>, ApiError> {
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
    // A worker this instance started as a process needs no look: the process provider
    // holds its agent's process group and needs no resource id. Any other is looked up.
    let found;
    let (provider, resource_id) = match state.providers.process.holds(worker_id) {
        true => (Some(Kind::Process.name()), None),
        false => {
            let mut conn = state.store.acquire().await.map_err(StoreError::from)?;
            found = resources::find(&mut conn, worker_id).await?;
            match &found {
                Some((provider, id)) => (Some(provider.as_str()), Some(id.as_str())),
                None => (None, None),
            }
        }
    };
    // Only the docker provider's destroys count on its circuit.
    let breaker = match provider {
        Some("docker") => state.providers.breaker(Kind::Docker),
        _ => None,
    };
    if let Some(Err(wait)) = breaker.map(|b| b.allow()) {
        return Ok(Some(wait));
    }
    let destroyed = state
        .providers
        .destroy(provider, worker_id, resource_id)
        .await;
    if breaker.is_some() {
        let failure = destroyed.as_ref().err().map(|e| e.to_string());
        super::count_on_circuit(state, Kind::Docker, failure.as_deref()).await;
    }
    let teardown = destroyed.map_err(|e| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("destroying worker {worker_id}: {e}"),
        )
    })?;
    if let Teardown::Unconfirmed(why) = &teardown {
        tracing::warn!(%worker_id, why, "teardown not confirmed");
    }
    let mut tx = state.store.begin().await?;
    let Some((mut worker, fences)) = workers::lock_fencing(&mut tx, worker_id).await? else {
        return Err(ApiError::not_found(format!(
            "there is no worker {worker_id}"
        )));
    };
    if worker.state != WorkerState::Terminating {
        return Ok(None);
    }
    let terminated = worker.terminated(&state.actor)?;
    tx.save(&mut worker, &[terminated]).await?;
    // A job that waited for this worker to be gone (it was lost) may run again now, or,
    // if nobody can say its first run is over, fails.
    let confirmed = match &teardown {
        Teardown::Confirmed => Ok(()),
        Teardown::Unconfirmed(why) => Err(why.clone()),
    };
    if fences {
        for mut job in jobs::lock_fenced_by(&mut tx, worker_id).await? {
            let events = job.worker_gone(worker_id, confirmed.clone(), &state.actor)?;
            tx.save(&mut job, &events).await?;
        }
    }
    resources::forget(&mut tx, worker_id).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(%worker_id, "worker destroyed");
    // Only a pool worker is sent commands: one provisioned for a job gets it in the answer
    // to its registration, and nothing on its command subject.
    if worker.pooled {
        forget_commands(state, worker_id).await;
    }
    Ok(None)
}

/// A worker's commands carry its jobs' environments: once it is gone nobody reads them, and
/// they leave its stream.
async fn forget_commands(state: &State, worker_id: uuid::Uuid) {
    let stream = state
        .js
        .get_stream_no_info(hodei_messaging::streams::WORKER_CMDS)
        .await;
    let purged = match stream {
        Ok(stream) => stream
            .purge()
            .filter(hodei_protocol::subjects::worker_cmd(worker_id))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = purged {
        // Not lost: the stream's max age removes them within a day.
        tracing::warn!(%worker_id, %error, "cannot purge the worker's commands");
    }
}

/// At start and then periodically: whatever a provider still holds of workers that are
/// Terminated or unknown (this service was killed while destroying them, or before it
/// recorded them) is destroyed.
pub async fn reconcile(state: &State) {
    let leftovers = state.providers.leftovers().await;
    if leftovers.is_empty() {
        return;
    }
    let ids: Vec<uuid::Uuid> = leftovers.iter().map(|(id, _)| *id).collect();
    let live: Vec<uuid::Uuid> = match workers::live_among(&state.store, &ids).await {
        Ok(live) => live,
        Err(error) => {
            tracing::warn!(%error, "cannot reconcile the provider's leftovers now");
            return;
        }
    };
    for (worker_id, provider) in leftovers.into_iter().filter(|(id, _)| !live.contains(id)) {
        match state
            .providers
            .destroy(Some(provider), worker_id, None)
            .await
        {
            Ok(_) => tracing::info!(%worker_id, "removed what was left of an ended worker"),
            Err(error) => {
                tracing::warn!(%worker_id, %error, "cannot remove an ended worker's leftovers")
            }
        }
    }
}
