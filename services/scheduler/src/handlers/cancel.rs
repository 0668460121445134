//! `hodei.api.jobs.cancel`: a job not yet ended is Cancelled; the registry then tears its
//! worker down, which kills the job's process and everything it started.

use hodei_domain::Actor;
use hodei_protocol::api::{CancelJob, JobView};
use hodei_protocol::ApiError;

use crate::State;

#[tracing::instrument(name = "cancel", skip_all, fields(job_id = %request.job_id))]
pub async fn handle(state: State, request: CancelJob) -> Result<JobView, ApiError> {
    let reason = request
        .reason
        .unwrap_or_else(|| "cancelled on request".to_owned());
    if reason.len() > 1024 {
        return Err(ApiError::bad_request("reason must be at most 1024 bytes"));
    }
    let actor = Actor::service(crate::SERVICE);
    let job = hodei_store::change(
        &state.store,
        request.job_id,
        |job: &mut hodei_domain::Job| Ok::<_, ApiError>(vec![job.cancel(reason, &actor)?]),
    )
    .await?
    .ok_or_else(|| ApiError::not_found(format!("there is no job {}", request.job_id)))?;
    tracing::info!(job_id = %job.id, "job cancelled");
    Ok(JobView::from(&job))
}
