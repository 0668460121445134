//! Why a job is where it is (`hodei explain`, the job view's `waiting_reason`), computed
//! from live state when it is asked: the job's row, its worker's, the provider offers and
//! circuits, the dispatchers' capacity and the placed jobs of its concurrency key.

use chrono::{DateTime, Utc};
use hodei_domain::{Job, JobState, WorkerState};
use hodei_protocol::ApiError;
use hodei_store::{capacity, jobs, offers, workers, StoreError};
use uuid::Uuid;

use crate::State;

/// Holders of a full concurrency key named in its reason.
const NAMED_HOLDERS: usize = 10;

/// One sentence: why `job` waits, where it runs, or how it ended.
pub async fn reason(state: &State, job: &Job) -> Result<String, ApiError> {
    let now = Utc::now();
    match job.state {
        JobState::Pending => pending(state, job, now).await,
        JobState::Scheduled => scheduled(state, job, now).await,
        JobState::Assigned | JobState::Running => on_worker(state, job, now).await,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Timeout => {
            Ok(ended(job))
        }
    }
}

async fn pending(state: &State, job: &Job, now: DateTime<Utc>) -> Result<String, ApiError> {
    if let Some(worker_id) = job.fenced_by {
        return Ok(format!(
            "waiting until its lost worker {worker_id} is confirmed gone"
        ));
    }
    if let Some(at) = job.not_before.filter(|at| *at > now) {
        return Ok(format!(
            "waiting for its retry at {} (in {}; attempt {} of {})",
            at.to_rfc3339(),
            since(now, at),
            job.attempt,
            job.policy.retry.max_attempts
        ));
    }
    let offers = offers::all(&state.store).await?;
    if let Err(why) = hodei_domain::satisfiable(&offers, &job.spec) {
        return Ok(format!("no provider can run it: {why}"));
    }
    if let Some(limit) = &job.spec.concurrency {
        let (placed, holders) =
            jobs::placed_of_key(&state.store, &limit.key, NAMED_HOLDERS as i64).await?;
        if placed >= i64::from(limit.max) {
            let mut ids: Vec<String> = holders.iter().map(Uuid::to_string).collect();
            if placed > NAMED_HOLDERS as i64 {
                ids.push(format!("and {} more", placed - NAMED_HOLDERS as i64));
            }
            return Ok(format!(
                "waiting for a slot of concurrency key '{}': {placed} of {} placed ({})",
                limit.key,
                limit.max,
                ids.join(", ")
            ));
        }
    }
    if let Some(short) = docker_shortfall(state, &offers, job).await? {
        return Ok(format!("waiting for capacity: {short}"));
    }
    let Some(settings) = capacity::get(&state.store).await? else {
        return Ok("waiting for a dispatcher: none has started".into());
    };
    let (alive, pool_members, free) = workers::occupancy(&state.store).await?;
    if job.spec.image.is_none() && settings.warm_pool_size > 0 {
        if free == 0 {
            return Ok(format!(
                "waiting for a free pool worker: {} of {pool_members} pool workers are busy or \
                 starting (pool size {})",
                pool_members - free,
                settings.warm_pool_size
            ));
        }
    } else if alive >= settings.max_workers {
        return Ok(format!(
            "waiting for capacity: {alive} of {} workers alive",
            settings.max_workers
        ));
    }
    // Placement goes in order and, at a container job whose memory is taken, goes on with
    // process jobs only: the container jobs behind it wait too.
    let next = match job.spec.image {
        Some(_) => jobs::next_pending(&state.store, jobs::Kinds::Containers).await?,
        None => None,
    };
    if let Some(next) = next {
        if next.id != job.id {
            if let Some(short) = docker_shortfall(state, &offers, &next).await? {
                return Ok(format!(
                    "waiting behind job {}, the next to place, which waits for capacity: {short}",
                    next.id
                ));
            }
        }
    }
    Ok(format!(
        "waiting to be placed (pending for {}): capacity is free, a dispatcher places it next",
        since(job.updated_at, now)
    ))
}

/// For a container job whose memory the docker provider does not have free now: what is in
/// use and what it needs.
async fn docker_shortfall(
    state: &State,
    offers: &[hodei_domain::ProviderOffer],
    job: &Job,
) -> Result<Option<String>, ApiError> {
    if job.spec.image.is_none() {
        return Ok(None);
    }
    let Some(docker) = offers.iter().find(|o| o.provider == "docker") else {
        return Ok(None);
    };
    let default = hodei_domain::offer::DEFAULT_CONTAINER_MEMORY_MB as i32;
    let mut conn = state.store.acquire().await.map_err(StoreError::from)?;
    let used = offers::docker_memory_in_use(&mut conn, default).await?;
    let wants = job
        .spec
        .resources
        .memory_mb
        .map_or(default as i64, i64::from);
    Ok((used + wants > i64::from(docker.memory_mb)).then(|| {
        format!(
            "the docker provider has {used} of {} MiB in use and the job needs {wants}",
            docker.memory_mb
        )
    }))
}

/// Scheduled: a worker was requested for this job alone; it waits for the provider to
/// start it, then for its agent to register.
async fn scheduled(state: &State, job: &Job, now: DateTime<Utc>) -> Result<String, ApiError> {
    let Some(worker_id) = job.worker_id else {
        return Ok("scheduled, without a worker (inconsistent)".into());
    };
    let provider = if job.spec.image.is_some() {
        "docker"
    } else {
        "process"
    };
    let Some(worker) = workers::get(&state.store, worker_id).await? else {
        return Ok(format!(
            "scheduled on worker {worker_id}, which is not known"
        ));
    };
    match worker.state {
        WorkerState::Creating => {
            if let Some(circuit) = offers::circuit_of(&state.store, provider).await? {
                if circuit.state != "Closed" {
                    let last = circuit
                        .error
                        .map(|e| format!(" (last: {e})"))
                        .unwrap_or_default();
                    let next = match circuit.retry_at {
                        Some(at) if at > now => format!("; next try in {}", since(now, at)),
                        _ => "; a probe is let through next".into(),
                    };
                    return Ok(format!(
                        "waiting for the {provider} provider: its circuit is open after {} \
                         consecutive failures{last}{next}",
                        circuit.consecutive_failures
                    ));
                }
            }
            Ok(format!(
                "waiting for the {provider} provider to start its worker {worker_id} \
                 (requested {} ago)",
                since(worker.created_at, now)
            ))
        }
        WorkerState::Connecting => Ok(format!(
            "waiting for its worker {worker_id} to register (started by the {provider} \
             provider at {}, {} ago)",
            worker.updated_at.to_rfc3339(),
            since(worker.updated_at, now)
        )),
        other => Ok(format!(
            "waiting for its worker {worker_id}, which is {other}"
        )),
    }
}

/// Assigned or Running on a worker: which, since when, and its last heartbeat.
async fn on_worker(state: &State, job: &Job, now: DateTime<Utc>) -> Result<String, ApiError> {
    let Some(worker_id) = job.worker_id else {
        return Ok(format!("{}, without a worker (inconsistent)", job.state));
    };
    let doing = match job.state {
        JobState::Running => "running",
        _ => "assigned, waiting for the agent to start it,",
    };
    let heartbeat = match workers::get(&state.store, worker_id).await? {
        Some(worker) => match worker.last_heartbeat_at {
            Some(at) => format!(
                "its last heartbeat {} ago; the worker is {}",
                since(at, now),
                worker.state
            ),
            None => format!("no heartbeat yet; the worker is {}", worker.state),
        },
        None => "the worker is not known".into(),
    };
    Ok(format!(
        "{doing} on worker {worker_id} since {} ({} ago, attempt {}); {heartbeat}",
        job.updated_at.to_rfc3339(),
        since(job.updated_at, now),
        job.attempt
    ))
}

/// A terminal job: how it ended and why.
fn ended(job: &Job) -> String {
    let at = job.updated_at.to_rfc3339();
    let attempts = format!(
        "attempt {} of {}",
        job.attempt, job.policy.retry.max_attempts
    );
    let exit = job
        .exit_code
        .map(|c| format!(" with exit code {c}"))
        .unwrap_or_default();
    let why = job
        .error
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    match job.state {
        JobState::Succeeded => format!("succeeded at {at}{exit} ({attempts})"),
        JobState::Failed => format!("failed at {at}{exit}{why} ({attempts})"),
        JobState::Cancelled => format!("cancelled at {at}{why}"),
        JobState::Timeout => format!("timed out at {at}{why} ({attempts})"),
        other => format!("{other}"),
    }
}

/// A duration for people: `850 ms`, `12.3 s`, `4 min 5 s`, `2 h 3 min`.
fn since(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let ms = (to - from).num_milliseconds().max(0);
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        let t0 = Utc::now();
        let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
        assert_eq!(since(t0, at(850)), "850 ms");
        assert_eq!(since(t0, at(12_345)), "12.3 s");
        assert_eq!(since(t0, at(245_000)), "4 min 5 s");
        assert_eq!(since(t0, at(7_380_000)), "2 h 3 min");
        assert_eq!(since(at(10), t0), "0 ms", "never negative");
    }
}
