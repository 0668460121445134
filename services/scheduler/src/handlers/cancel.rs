//! `hodei.api.jobs.cancel`: a job not yet ended is Cancelled; the registry then tears its
//! worker down, which kills the job's process and everything it started.

use hodei_domain::Actor;
use hodei_protocol::api::{CancelJob, JobView};
use hodei_protocol::ApiError;
use hodei_store::{jobs, outbox};

use crate::State;

#[tracing::instrument(name = "cancel", skip_all, fields(job_id = %request.job_id))]
pub async fn handle(state: State, request: CancelJob) -> Result<JobView, ApiError> {
    let reason = request
        .reason
        .unwrap_or_else(|| "cancelled on request".to_owned());
    if reason.len() > 1024 {
        return Err(ApiError::bad_request("reason must be at most 1024 bytes"));
    }
    let mut tx = hodei_store::begin(&state.pool).await?;
    let mut job = jobs::lock(&mut tx, request.job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("there is no job {}", request.job_id)))?;
    let event = job.cancel(reason, &Actor::service(crate::SERVICE))?;
    jobs::update(&mut tx, &mut job).await?;
    outbox::append_events(&mut tx, &[event]).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(job_id = %job.id, "job cancelled");
    Ok(JobView::from(&job))
}
