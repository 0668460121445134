//! `hodei.agent.<worker_id>.started` and `.finished`: a worker's reports about its job.
//!
//! A report is applied only if the worker named in the subject is the one in the body and
//! holds the job, the attempt it speaks of is the job's, and the job's state machine allows
//! the change. A short job's finished report may say that it started too (`started`): both
//! changes are applied together. Anything else is refused with a typed error (answered on
//! `Hodei-Reply-To`, logged) and changes nothing.

use std::collections::HashMap;

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
/// transaction (one commit), with the next job of each warm-pool worker whose job ended in
/// it (so that the job's end and the worker's next job are heard of together: nobody
/// releases the worker in between). A batch whose transaction fails is applied one report
/// at a time, so that a report only ever fails for what is wrong with it, each pool worker
/// then taking its next job in a transaction of its own. Each is answered and settled on
/// its own.
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
    let (applied, mut handed_over) = match apply_with_hand_overs(&state, &changes).await {
        Ok(done) => done,
        Err(error) => {
            tracing::warn!(%error, reports = changes.len(), "a batch's transaction failed; applying its reports one at a time");
            let pooled = pool_workers_reporting_ends(&state, &changes).await;
            let applied =
                hodei_store::change_each(
                    &state.store,
                    &changes,
                    &|job: &mut Job, (worker_id, report)| apply_to(job, worker_id, report),
                )
                .await;
            let mut handed_over = HashMap::new();
            for (one, ended) in leaving_pool_workers(&changes, &applied, &pooled) {
                if handed_over.contains_key(&one.input.0) {
                    continue;
                }
                let next = next_job(&state, one.input.0, ended)
                    .instrument(one.span.clone())
                    .await;
                handed_over.insert(one.input.0, next);
            }
            (applied, handed_over)
        }
    };
    let mut applied = applied.into_iter();
    let mut outcomes = Vec::with_capacity(batch.len());
    for (((delivery, _), read), span) in batch.iter().zip(read).zip(&spans) {
        // The report's job as its change left it, and the worker's next job, if it got one.
        let result = read.and_then(|(job_id, worker_id, _)| {
            let job = applied
                .next()
                .unwrap_or_else(|| Err(ApiError::internal("no outcome for the report")))?
                .ok_or_else(|| ApiError::not_found(format!("there is no job {job_id}")))?;
            Ok(ReportAccepted {
                job_id: job.id,
                state: job.state,
                next: handed_over.remove(&worker_id).flatten(),
            })
        });
        outcomes.push(
            answer(&state, delivery, result)
                .instrument(span.clone())
                .await,
        );
    }
    outcomes
}

/// Of a batch's changes and their outcomes, the reports of the workers whose job left them,
/// with that job.
fn leaving_workers<'a>(
    changes: &'a [Change<(Uuid, Report)>],
    outcomes: &'a [Result<Option<Job>, ApiError>],
) -> impl Iterator<Item = (&'a Change<(Uuid, Report)>, &'a Job)> + 'a {
    changes.iter().zip(outcomes).filter_map(|(one, outcome)| {
        let (worker_id, report) = &one.input;
        let Ok(Some(job)) = outcome else { return None };
        left_its_worker(report, job, *worker_id).then_some((one, job))
    })
}

/// Of the reports of [`leaving_workers`], those of the workers in `pooled`: those that take
/// their next job now.
fn leaving_pool_workers<'a>(
    changes: &'a [Change<(Uuid, Report)>],
    outcomes: &'a [Result<Option<Job>, ApiError>],
    pooled: &'a [Uuid],
) -> impl Iterator<Item = (&'a Change<(Uuid, Report)>, Uuid)> + 'a {
    leaving_workers(changes, outcomes)
        .filter(|(one, _)| pooled.contains(&one.input.0))
        .map(|(one, job)| (one, job.id))
}

/// Why a job left its worker, as the worker's teardown reason says it.
fn why_left(job: &Job) -> String {
    if job.state.is_terminal() {
        format!("ended {}", job.state)
    } else {
        "is being retried".to_owned()
    }
}

/// Whether the job left the reporting worker with this report: it ended, or was retried
/// (Pending again, off the worker).
fn left_its_worker(report: &Report, job: &Job, worker_id: Uuid) -> bool {
    matches!(report, Report::Finished(_)) && job.worker_id != Some(worker_id)
        || job.state.is_terminal()
}

/// Every report's change in one transaction, then the next job of each pool worker whose job
/// left it, and every other worker whose job left it leaves it (as the registry would on the
/// job's event: torn down, or a pool worker Ready again); one commit. When a pool worker with
/// jobs left reports its job's end, the placement lock is taken first (as every placement
/// takes it; in the statement that looks, which then locks the reporting workers' rows:
/// [`workers::lock_reporting`]), then the jobs' (worker before job, as the registry's
/// monitor takes them for a lost worker). The changes' outcomes, and the job each pool worker was
/// given (`None`: no job waits, or the worker does not go on).
async fn apply_with_hand_overs(
    state: &State,
    changes: &[Change<(Uuid, Report)>],
) -> Result<
    (
        Vec<Result<Option<Job>, ApiError>>,
        HashMap<Uuid, Option<RunJob>>,
    ),
    ApiError,
> {
    let Some(first) = changes.first() else {
        return Ok((Vec::new(), HashMap::new()));
    };
    let ending = ending(changes);
    // Workers whose report says their job was their last take no next job: without one that
    // may, no statement looks for pool workers (and none takes the placement lock).
    let may_go_on = may_go_on(changes);
    let mut tx = state.store.begin().await?;
    let (placing, reporting) = workers::lock_reporting(&mut tx, &ending, &may_go_on).await?;
    let mut locked: HashMap<Uuid, hodei_domain::Worker> = reporting
        .into_iter()
        .map(|worker| (worker.id, worker))
        .collect();
    let outcomes =
        hodei_store::change_all_in(&mut tx, changes, &|job: &mut Job, (worker_id, report)| {
            apply_to(job, worker_id, report)
        })
        .await?;
    // Each worker as locked above (the jobs' changes do not touch its row), handed over to
    // once: a second report of it in the batch neither gets nor hides its next job.
    let leaving: Vec<hodei_placement::HandOver> = leaving_workers(changes, &outcomes)
        .filter_map(|(one, job)| {
            Some(hodei_placement::HandOver {
                worker: locked.remove(&one.input.0)?,
                ended: job.id,
                why: why_left(job),
                may_go_on: placing && may_go_on.binary_search(&one.input.0).is_ok(),
                span: one.span.clone(),
            })
        })
        .collect();
    let workers: Vec<Uuid> = leaving.iter().map(|one| one.worker.id).collect();
    let next = hodei_placement::hand_over_all(&mut tx, leaving, &state.actor)
        .instrument(first.span.clone())
        .await?;
    let handed_over: HashMap<Uuid, Option<RunJob>> = workers.into_iter().zip(next).collect();
    hodei_store::commit(tx)
        .instrument(first.span.clone())
        .await?;
    Ok((outcomes, handed_over))
}

/// The workers that report their job's end in this batch, each once, in id order.
fn ending(changes: &[Change<(Uuid, Report)>]) -> Vec<Uuid> {
    workers_reporting(changes, |_| true)
}

/// Of [`ending`], those whose report does not say that it ended their last job (`last`):
/// those that may take a next job with it.
fn may_go_on(changes: &[Change<(Uuid, Report)>]) -> Vec<Uuid> {
    workers_reporting(changes, |finished| !finished.last)
}

/// The workers with a finished report in this batch that `wanted` keeps, each once, in id
/// order.
fn workers_reporting(
    changes: &[Change<(Uuid, Report)>],
    wanted: impl Fn(&JobFinished) -> bool,
) -> Vec<Uuid> {
    let mut workers: Vec<Uuid> = changes
        .iter()
        .filter(|c| matches!(&c.input.1, Report::Finished(finished) if wanted(finished)))
        .map(|c| c.input.0)
        .collect();
    workers.sort_unstable();
    workers.dedup();
    workers
}

/// Of the workers that report their job's end in this batch (and do not say it was their
/// last), the warm-pool workers with jobs left, for a batch applied one report at a time: one
/// look for the whole batch (most workers are ephemeral). A failed look gives none: the
/// registry then releases them on the jobs' events, as for any worker.
async fn pool_workers_reporting_ends(
    state: &State,
    changes: &[Change<(Uuid, Report)>],
) -> Vec<Uuid> {
    let ending = may_go_on(changes);
    if ending.is_empty() {
        return ending;
    }
    workers::pooled_with_jobs_left(&state.store, &ending)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot look at the workers; no next job given with these reports");
            Vec::new()
        })
}

/// The next job of a pool worker whose job `ended` left it, when its report was applied on
/// its own. The report is applied: a failure here must not undo that (the registry releases
/// the worker on the job's event, and the dispatcher places the job).
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
    // A report delivered again after the job was retried (onto the same pool worker, say)
    // speaks of an attempt that is over.
    let attempt = match &report {
        Report::Started(r) => r.attempt,
        Report::Finished(r) => r.attempt,
    };
    if attempt != job.attempt {
        return Err(ApiError::new(
            ErrorCode::InvalidJobTransition,
            format!(
                "the report is about attempt {attempt} of job {}, which is at attempt {}",
                job.id, job.attempt
            ),
        ));
    }
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
