//! `hodei.api.jobs.get` and `hodei.api.jobs.list`.

use hodei_protocol::api::{GetJob, JobView, ListJobs, Page};
use hodei_protocol::ApiError;
use hodei_store::jobs;

use crate::State;

pub async fn get(state: State, request: GetJob) -> Result<JobView, ApiError> {
    match jobs::get(&state.store, request.job_id).await? {
        Some(job) => {
            let mut view = JobView::from(&job);
            view.waiting_reason = Some(super::explain::reason(&state, &job).await?);
            Ok(view)
        }
        None => Err(ApiError::not_found(format!(
            "there is no job {}",
            request.job_id
        ))),
    }
}

pub async fn list(state: State, request: ListJobs) -> Result<Page<JobView>, ApiError> {
    let limit = hodei_protocol::api::page_size(request.limit);
    if request
        .concurrency_key
        .as_ref()
        .is_some_and(|k| k.len() > 128)
        || request.labels.len() > 16
    {
        return Err(ApiError::bad_request(
            "filter by a concurrency key of at most 128 bytes and at most 16 labels",
        ));
    }
    let filter = jobs::Filter {
        state: request.state,
        concurrency_key: request.concurrency_key.as_deref(),
        labels: Some(&request.labels),
    };
    let (jobs, next_cursor) =
        jobs::list(&state.store, filter, limit, request.cursor.as_deref()).await?;
    Ok(Page {
        items: jobs.iter().map(JobView::from).collect(),
        next_cursor,
    })
}
