//! `hodei.api.jobs.get` and `hodei.api.jobs.list`.

use hodei_protocol::api::{GetJob, JobView, ListJobs, Page};
use hodei_protocol::ApiError;
use hodei_store::jobs;
use uuid::Uuid;

use crate::State;

pub async fn get(state: State, request: GetJob) -> Result<JobView, ApiError> {
    match jobs::get(&state.store, request.job_id).await? {
        Some(job) => {
            let mut view = JobView::from(&job);
            view.waiting_reason = waiting_reason(&state, &job).await?;
            Ok(view)
        }
        None => Err(ApiError::not_found(format!(
            "there is no job {}",
            request.job_id
        ))),
    }
}

/// Why a Pending job waits, from what holds it now.
async fn waiting_reason(
    state: &State,
    job: &hodei_domain::Job,
) -> Result<Option<String>, ApiError> {
    if job.state != hodei_domain::JobState::Pending {
        return Ok(None);
    }
    if let Some(worker_id) = job.fenced_by {
        return Ok(Some(format!(
            "waiting until its lost worker {worker_id} is confirmed gone"
        )));
    }
    if let Some(at) = job.not_before {
        return Ok(Some(format!(
            "waiting for its retry at {}",
            at.to_rfc3339()
        )));
    }
    if let Some(limit) = &job.spec.concurrency {
        // The holders named, up to ten.
        const NAMED: usize = 10;
        let (placed, holders) = jobs::placed_of_key(&state.store, &limit.key, NAMED as i64).await?;
        if placed >= i64::from(limit.max) {
            let mut ids: Vec<String> = holders.iter().map(Uuid::to_string).collect();
            if placed > NAMED as i64 {
                ids.push(format!("and {} more", placed - NAMED as i64));
            }
            return Ok(Some(format!(
                "waiting for a slot of concurrency key '{}': {placed} of {} placed ({})",
                limit.key,
                limit.max,
                ids.join(", ")
            )));
        }
    }
    if job.spec.image.is_some() {
        let offers = hodei_store::offers::all(&state.store).await?;
        if let Some(docker) = offers.iter().find(|o| o.provider == "docker") {
            let default = hodei_domain::offer::DEFAULT_CONTAINER_MEMORY_MB as i32;
            let mut conn = state
                .store
                .acquire()
                .await
                .map_err(hodei_store::StoreError::from)?;
            let used = hodei_store::offers::docker_memory_in_use(&mut conn, default).await?;
            let wants = job
                .spec
                .resources
                .memory_mb
                .map_or(default as i64, i64::from);
            if used + wants > i64::from(docker.memory_mb) {
                return Ok(Some(format!(
                    "waiting for capacity: the docker provider has {used} of {} MiB in use and \
                     the job needs {wants}",
                    docker.memory_mb
                )));
            }
        }
    }
    Ok(Some("waiting for a worker".into()))
}

pub async fn list(state: State, request: ListJobs) -> Result<Page<JobView>, ApiError> {
    let limit = request.limit.unwrap_or(50).clamp(1, 500);
    let (jobs, next_cursor) = jobs::list(
        &state.store,
        request.state,
        limit,
        request.cursor.as_deref(),
    )
    .await?;
    Ok(Page {
        items: jobs.iter().map(JobView::from).collect(),
        next_cursor,
    })
}
