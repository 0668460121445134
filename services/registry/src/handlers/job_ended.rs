//! Job events: when a job leaves its worker (it ended, or its attempt is retried or
//! requeued), an ephemeral worker is torn down; a warm-pool worker whose agent reported the
//! end goes back to Ready until it has run its share of jobs.

use std::collections::HashMap;

use hodei_domain::{Actor, DomainEvent, JobState, Worker};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::ApiError;
use hodei_store::{workers, Change};
use uuid::Uuid;

use crate::State;

/// Most job events handled in one transaction.
pub const MAX_BATCH: usize = 256;

/// How long a batch of job events waits for more before it is handled. Nearly every job's
/// end has already released its worker in the transaction of the agent's report (or of the
/// hand-over of its next job), so most of these events change nothing; what is left (a
/// cancelled or timed-out job's worker, a report applied on its own) is torn down this much
/// later. Gathered, a stream of job ends is looked at a few times a second instead of once
/// per event or two, each with its wake-ups and its look at the workers.
pub const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// The job events that may tell of a job leaving its worker: the only ones the registry
/// takes (JobCreated, JobQueued and JobAssigned never do).
pub const LEAVING: [&str; 5] = [
    "JobCompleted",
    "JobExecutionError",
    "JobStatusChanged",
    "JobRetrying",
    "JobRequeued",
];

/// The job events waiting together: those by which a job leaves its worker change their
/// workers in one transaction ([`hodei_store::change_many`]: one at a time if it fails);
/// the others are acknowledged as they are.
pub async fn handle(state: State, batch: Vec<(Delivery, tracing::Span)>) -> Vec<Outcome> {
    let spans: Vec<tracing::Span> = batch
        .iter()
        .map(|(_, parent)| tracing::info_span!(parent: parent, "teardown"))
        .collect();
    let read: Vec<Result<Option<Leaving>, ApiError>> = batch
        .iter()
        .map(|(delivery, _)| Ok(leaving(&delivery.decode()?)))
        .collect();
    let read = without_unheld(&state, read).await;
    let changes: Vec<Change<Leaving>> = read
        .iter()
        .zip(&spans)
        .filter_map(|(read, span)| {
            let leaving = read.as_ref().ok()?.as_ref()?;
            Some(Change {
                id: leaving.worker_id,
                input: leaving.clone(),
                span: span.clone(),
            })
        })
        .collect();
    let mut changed = hodei_store::change_many(
        &state.store,
        &changes,
        |worker: &mut Worker, leaving: Leaving| {
            Ok::<_, ApiError>(worker.job_left(
                leaving.job_id,
                leaving.reported_by_worker,
                &leaving.why,
                &state.actor,
            )?)
        },
    )
    .await
    .into_iter();
    read.into_iter()
        .zip(&spans)
        .map(|(read, span)| {
            let _entered = span.enter();
            let result = read.and_then(|leaving| {
                let Some(leaving) = leaving else {
                    return Ok(());
                };
                let worker = changed
                    .next()
                    .unwrap_or_else(|| Err(ApiError::internal("no outcome for the event")))?
                    .ok_or_else(|| {
                        ApiError::not_found(format!(
                            "job {} ended on unknown worker {}",
                            leaving.job_id, leaving.worker_id
                        ))
                    })?;
                hodei_placement::log_left(&worker, leaving.job_id);
                Ok(())
            });
            Outcome::from_result(result)
        })
        .collect()
}

/// The leavings whose worker holds the job still: one unlocked look for the whole batch
/// keeps the others (nothing to change) out of the transaction, which would lock their
/// workers only to find that. Most ends on a warm pool are such: the scheduler handed the
/// worker its next job with the report of this one. The locked change looks again at what
/// is left; if this look fails, every leaving goes to it.
async fn without_unheld(
    state: &State,
    read: Vec<Result<Option<Leaving>, ApiError>>,
) -> Vec<Result<Option<Leaving>, ApiError>> {
    let ids: Vec<Uuid> = read
        .iter()
        .filter_map(|r| Some(r.as_ref().ok()?.as_ref()?.worker_id))
        .collect();
    if ids.is_empty() {
        return read;
    }
    let workers: HashMap<Uuid, Worker> = match workers::get_all(&state.store, &ids).await {
        Ok(workers) => workers.into_iter().map(|w| (w.id, w)).collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot look at the workers first; locking each");
            return read;
        }
    };
    read.into_iter()
        .map(|r| {
            r.map(|leaving| {
                leaving.filter(|l| {
                    workers
                        .get(&l.worker_id)
                        .is_none_or(|worker| worker.is_left_by(l.job_id))
                })
            })
        })
        .collect()
}

/// A job leaving its worker: which, why, and whether the agent reported the end itself (the
/// job's process is gone: a pool worker may go on).
#[derive(Clone)]
struct Leaving {
    job_id: Uuid,
    worker_id: Uuid,
    why: String,
    reported_by_worker: bool,
}

/// The job leaving its worker that `event` tells of, if it tells of one.
fn leaving(event: &DomainEvent) -> Option<Leaving> {
    #[derive(serde::Deserialize)]
    struct Ending {
        job_id: Uuid,
        worker_id: Option<Uuid>,
        #[serde(default)]
        to: Option<JobState>,
    }
    if !LEAVING.contains(&event.event_type.as_str()) {
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
    let worker_id = ending.worker_id?;
    Some(Leaving {
        job_id: ending.job_id,
        worker_id,
        why,
        reported_by_worker: event.actor == Actor::worker(worker_id),
    })
}
