//! The state-timeout monitor of jobs: every non-terminal job has a deadline (`deadline_at`,
//! indexed); one cheap query finds the overdue ones and each gets its named transition
//! (time out, requeue, retry, or queue again after a backoff) through the normal rule: one
//! transaction with its events. It sleeps until the next deadline, at most `max_sleep`.

use std::time::Duration;

use hodei_domain::Actor;
use hodei_runtime::Shutdown;
use hodei_store::{jobs, Store, StoreError};
use uuid::Uuid;

const BATCH: usize = 200;

pub async fn run(store: Store, max_sleep: Duration, shutdown: Shutdown) {
    let actor = Actor::service("scheduler-monitor");
    hodei_runtime::sweep::run(
        "jobs",
        hodei_runtime::sweep::Pace {
            batch: BATCH,
            max_sleep,
            wake: None,
        },
        shutdown,
        || async {
            jobs::due(&store, BATCH as i64)
                .await
                .map_err(|e| e.to_string())
        },
        || async { jobs::next_due(&store).await.map_err(|e| e.to_string()) },
        |job_id| {
            let (store, actor) = (&store, &actor);
            async move {
                expire(store, job_id, actor)
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
}

#[tracing::instrument(name = "state timeout", skip(store, actor))]
async fn expire(store: &Store, job_id: Uuid, actor: &Actor) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    let Some(mut job) = jobs::lock(&mut tx, job_id).await? else {
        return Ok(());
    };
    let from = job.state;
    let events = match job.expire(chrono::Utc::now(), hodei_runtime::jitter(), actor) {
        Ok(events) if !events.is_empty() => events,
        Ok(_) => return Ok(()),
        Err(error) => {
            tracing::warn!(%error, "timeout refused by the state machine");
            return Ok(());
        }
    };
    tx.save(&mut job, &events).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(%job_id, %from, to = %job.state, event = %events[0].event_type, "state timeout applied");
    Ok(())
}
