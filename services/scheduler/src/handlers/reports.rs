//! `hodei.agent.<worker_id>.started` and `.finished`: a worker's reports about its job.
//!
//! A report is applied only if the worker named in the subject is the one in the body and
//! holds the job, and the job's state machine allows the change. Anything else is refused
//! with a typed error (answered on `Hodei-Reply-To`, logged) and changes nothing.

use hodei_domain::{Actor, Job};
use hodei_messaging::api::respond;
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::agent::{JobFinished, JobStarted, ReportAccepted};
use hodei_protocol::{headers, subjects, ApiError, ErrorCode};
use uuid::Uuid;

use crate::State;

enum Report {
    Started(JobStarted),
    Finished(JobFinished),
}

pub async fn handle(state: State, delivery: Delivery) -> Outcome {
    let result = apply(&state, &delivery).await;
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

#[tracing::instrument(name = "report", skip_all)]
async fn apply(state: &State, delivery: &Delivery) -> Result<ReportAccepted, ApiError> {
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
    let actor = Actor::worker(worker_id);
    let job = hodei_store::change_job(&state.store, job_id, |job| {
        apply_to(job, worker_id, report, &actor)
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("there is no job {job_id}")))?;
    Ok(ReportAccepted {
        job_id,
        state: job.state,
    })
}

fn apply_to(
    job: &mut Job,
    worker_id: Uuid,
    report: Report,
    actor: &Actor,
) -> Result<Vec<hodei_domain::DomainEvent>, ApiError> {
    let events = match report {
        Report::Started(_) => vec![job.start(worker_id, actor)?],
        Report::Finished(JobFinished {
            exit_code, error, ..
        }) => job.finish(worker_id, exit_code, error, hodei_runtime::jitter(), actor)?,
    };
    Ok(events)
}
