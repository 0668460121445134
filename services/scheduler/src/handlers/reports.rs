//! `hodei.agent.<worker_id>.started` and `.finished`: a worker's reports about its job.
//!
//! A report is applied only if the worker named in the subject is the one in the body and
//! holds the job, and the job's state machine allows the change. A short job's finished
//! report may say that it started too (`started`): both changes are applied together. Anything else is refused
//! with a typed error (answered on `Hodei-Reply-To`, logged) and changes nothing.

use hodei_domain::{Actor, Job, JobState};
use hodei_messaging::api::respond;
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::agent::{JobFinished, JobStarted, ReportAccepted, RunJob};
use hodei_protocol::{headers, subjects, ApiError, ErrorCode};
use hodei_store::{workers, Change};
use tracing::Instrument;
use uuid::Uuid;

use crate::State;

/// Most reports applied in one transaction.
pub const MAX_BATCH: usize = 128;

#[derive(Clone)]
enum Report {
    Started(JobStarted),
    Finished(JobFinished),
}

/// The reports waiting together: each read and checked on its own, then all applied in one
/// transaction (one commit); a batch whose transaction fails is applied one report at a
/// time, so that a report only ever fails for what is wrong with it. Each is answered and
/// settled on its own.
pub async fn handle(state: State, batch: Vec<(Delivery, tracing::Span)>) -> Vec<Outcome> {
    let spans: Vec<tracing::Span> = batch
        .iter()
        .map(|(_, parent)| tracing::info_span!(parent: parent, "report"))
        .collect();
    let read: Vec<Result<(Uuid, Uuid, Report), ApiError>> = batch
        .iter()
        .zip(&spans)
        .map(|((delivery, _), span)| span.in_scope(|| read(delivery)))
        .collect();
    let changes: Vec<Change<(Uuid, Report)>> = read
        .iter()
        .zip(&spans)
        .filter_map(|(read, span)| {
            let (job_id, worker_id, report) = read.as_ref().ok()?;
            Some(Change {
                id: *job_id,
                input: (*worker_id, report.clone()),
                span: span.clone(),
            })
        })
        .collect();
    let mut applied = hodei_store::change_many(
        &state.store,
        &changes,
        |job: &mut Job, (worker_id, report)| apply_to(job, worker_id, report),
    )
    .await
    .into_iter();
    // Each report's job as its change left it, and whether the job left the worker.
    let accepted: Vec<Result<(Job, Uuid, bool), ApiError>> = read
        .into_iter()
        .map(|read| {
            let (job_id, worker_id, report) = read?;
            let job = applied
                .next()
                .unwrap_or_else(|| Err(ApiError::internal("no outcome for the report")))?
                .ok_or_else(|| ApiError::not_found(format!("there is no job {job_id}")))?;
            // Ended, or retried (Pending again, off the worker).
            let left = matches!(report, Report::Finished(_)) && job.worker_id != Some(worker_id)
                || job.state.is_terminal();
            Ok((job, worker_id, left))
        })
        .collect();
    let pooled = pool_workers_left(&state, &accepted).await;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (((delivery, _), accepted), span) in batch.iter().zip(accepted).zip(&spans) {
        let result = match accepted {
            Err(error) => Err(error),
            Ok((job, worker_id, left)) => {
                let next = match left && pooled.contains(&worker_id) {
                    true => {
                        next_job(&state, worker_id, job.id)
                            .instrument(span.clone())
                            .await
                    }
                    false => None,
                };
                Ok(ReportAccepted {
                    job_id: job.id,
                    state: job.state,
                    next,
                })
            }
        };
        outcomes.push(
            answer(&state, delivery, result)
                .instrument(span.clone())
                .await,
        );
    }
    outcomes
}

/// Of the workers whose job left them in this batch, the warm-pool workers with jobs left:
/// one look for the whole batch (most workers are ephemeral). A failed look gives none: the
/// registry then releases them on the jobs' events, as for any worker.
async fn pool_workers_left(
    state: &State,
    accepted: &[Result<(Job, Uuid, bool), ApiError>],
) -> Vec<Uuid> {
    let left: Vec<Uuid> = accepted
        .iter()
        .filter_map(|a| match a {
            Ok((_, worker_id, true)) => Some(*worker_id),
            _ => None,
        })
        .collect();
    if left.is_empty() {
        return left;
    }
    workers::pooled_with_jobs_left(&state.store, &left)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot look at the workers; no next job given with these reports");
            Vec::new()
        })
}

/// The next job of a pool worker whose job `ended` left it. The report is applied: a failure
/// here must not undo that (the registry releases the worker on the job's event, and the
/// dispatcher places the job).
async fn next_job(state: &State, worker_id: Uuid, ended: Uuid) -> Option<RunJob> {
    hodei_placement::next_for_pool_worker(&state.store, worker_id, ended, &state.actor)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, %worker_id, "no next job given with the report");
            None
        })
}

/// Answer the report on its `Hodei-Reply-To`, if it asks for one, and settle it.
async fn answer(
    state: &State,
    delivery: &Delivery,
    result: Result<ReportAccepted, ApiError>,
) -> Outcome {
    if let Some(reply_to) = delivery.header(headers::REPLY_TO) {
        if let Err(error) = respond(&state.client, reply_to, result.clone()).await {
            tracing::warn!(%error, "cannot answer the report");
        }
    }
    if let Ok(accepted) = &result {
        tracing::info!(job_id = %accepted.job_id, state = %accepted.state, "report applied");
    }
    Outcome::from_result(result)
}

/// The job a report is about, the worker it comes from (the subject's, which must be the
/// one it names) and what it says.
fn read(delivery: &Delivery) -> Result<(Uuid, Uuid, Report), ApiError> {
    let worker_id = subjects::worker_id_of(&delivery.subject)
        .ok_or_else(|| ApiError::bad_request(format!("{} names no worker", delivery.subject)))?;
    let report = match delivery.subject.rsplit('.').next() {
        Some("started") => Report::Started(delivery.decode()?),
        Some("finished") => Report::Finished(delivery.decode()?),
        _ => {
            return Err(ApiError::bad_request(format!(
                "{} is not a report subject",
                delivery.subject
            )))
        }
    };
    let (job_id, claimed) = match &report {
        Report::Started(r) => (r.job_id, r.worker_id),
        Report::Finished(r) => (r.job_id, r.worker_id),
    };
    if claimed != worker_id {
        return Err(ApiError::new(
            ErrorCode::WorkerMismatch,
            format!("worker {worker_id} published a report in the name of worker {claimed}"),
        ));
    }
    Ok((job_id, worker_id, report))
}

fn apply_to(
    job: &mut Job,
    worker_id: Uuid,
    report: Report,
) -> Result<Vec<hodei_domain::DomainEvent>, ApiError> {
    let actor = &Actor::worker(worker_id);
    let events = match report {
        Report::Started(_) => vec![job.start(worker_id, actor)?],
        Report::Finished(JobFinished {
            exit_code,
            error,
            started,
            ..
        }) => {
            // A short job's one report: its start first (unless that is on record already,
            // as for a report delivered again), then its end, in this one transaction.
            let start =
                match started && matches!(job.state, JobState::Assigned | JobState::Scheduled) {
                    true => Some(job.start(worker_id, actor)?),
                    false => None,
                };
            let ended = job.finish(worker_id, exit_code, error, hodei_runtime::jitter(), actor)?;
            start.into_iter().chain(ended).collect()
        }
    };
    Ok(events)
}
