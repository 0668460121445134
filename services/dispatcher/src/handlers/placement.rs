//! Placement: which pending job runs next, on which worker, and whether a worker may be
//! created for it. Every decision is one transaction under the placement lock, so decisions
//! of several handlers and dispatcher instances never race for a worker, a job or capacity.

use hodei_domain::{Job, Purpose, Worker};
use hodei_protocol::ApiError;
use hodei_store::{jobs, outbox, workers, Tx};
use uuid::Uuid;

use super::send_job;
use crate::State;

/// Most placements made in one transaction.
const MAX_PLACEMENTS_PER_TRANSACTION: usize = 64;

/// Place pending jobs, highest priority then oldest first, while a free ready worker waits or
/// (without a warm pool) a new worker fits within the capacity; at most `limit` of them.
/// Placements are made in transactions of up to [`MAX_PLACEMENTS_PER_TRANSACTION`] (one
/// commit for all); a transaction that fails is made again one placement at a time, so that
/// one job that cannot be placed never holds up the others. Returns how many were placed.
pub(crate) async fn place_pending(state: &State, limit: usize) -> Result<usize, ApiError> {
    let looks = looks(state).await?;
    if !looks.placeable {
        return Ok(0);
    }
    place_looked(state, &looks, limit).await
}

/// Placement's first look ([`hodei_store::placement_looks`]: one statement without the
/// placement lock). At capacity, each submission's look would otherwise lock the queue's
/// head only to give it up. Whatever changes after this look raises its own event, which
/// places again: a worker freed WorkerReadyForJob or WorkerTerminated, a job that may go
/// JobQueued (on submission, retry and release alike).
pub(crate) async fn looks(state: &State) -> Result<hodei_store::Looks, ApiError> {
    Ok(
        hodei_store::placement_looks(&state.store, state.warm_pool.is_some(), state.max_workers)
            .await?,
    )
}

/// [`place_pending`] once [`looks`] found something placeable.
pub(crate) async fn place_looked(
    state: &State,
    looks: &hodei_store::Looks,
    limit: usize,
) -> Result<usize, ApiError> {
    // Only pool workers are ever free and Ready: without a pool, and none of an earlier one
    // alive at the look, placements make new workers without looking for a free one.
    let free_may_wait = state.warm_pool.is_some() || looks.live_pooled;
    let place_together = |wanted| place_together(state, wanted, free_may_wait);
    let mut placed = 0;
    while placed < limit {
        let wanted = (limit - placed).min(MAX_PLACEMENTS_PER_TRANSACTION);
        let (n, more) = match place_together(wanted).await {
            Ok(done) => done,
            Err(error) if wanted > 1 => {
                tracing::warn!(%error, wanted, "a batch of placements failed; placing one at a time");
                let mut n = 0;
                while n < wanted {
                    match place_together(1).await? {
                        (1, true) => n += 1,
                        (m, _) => return Ok(placed + n + m),
                    }
                }
                (n, true)
            }
            Err(error) => return Err(error),
        };
        placed += n;
        if !more {
            break;
        }
    }
    Ok(placed)
}

/// Up to `limit` placements in one transaction under the placement lock; how many were
/// made, and whether there may be more to make (every one asked for was made). Free ready
/// workers are looked for only if `free_may_wait`.
async fn place_together(
    state: &State,
    limit: usize,
    free_may_wait: bool,
) -> Result<(usize, bool), ApiError> {
    let mut tx = state.store.begin_placing().await?;
    let mut waited = Vec::with_capacity(limit);
    // Once the next job of one kind cannot be placed, the other kind's jobs behind it still
    // may be: placement goes on with those alone.
    let mut kinds = jobs::Kinds::Any;
    // Under the placement lock nobody else takes a free worker or makes one, so each is
    // looked up once per transaction: the room for new workers is counted once and then
    // kept here, and once no worker is free none is looked for again. (A worker freed or
    // ended meanwhile raises its own event, which places again.)
    let mut room: Option<u32> = None;
    let mut any_free = free_may_wait;
    while waited.len() < limit {
        let Some(mut job) = jobs::lock_next_pending(&mut tx, kinds).await? else {
            break;
        };
        let waited_for = chrono::Utc::now() - job.updated_at;
        // A job in a container gets a container of its own: never a warm-pool process.
        let in_container = job.spec.image.is_some();
        let free = match in_container || !any_free {
            true => None,
            false => workers::lock_free_ready(&mut tx).await?,
        };
        any_free &= in_container || free.is_some();
        if let Some(mut worker) = free {
            send_job(&mut tx, &mut job, &mut worker, &state.actor).await?;
        } else if in_container && !container_fits(&mut tx, &job).await? {
            tracing::debug!(job_id = %job.id, "the docker provider's memory is taken; the job waits");
            match kinds {
                jobs::Kinds::Any => kinds = jobs::Kinds::Processes,
                _ => break,
            }
            continue;
        } else if (in_container || state.warm_pool.is_none())
            && room_left(&mut tx, state, &mut room).await? > 0
        {
            schedule_on_new_worker(&mut tx, state, &mut job).await?;
            room = room.map(|left| left - 1);
        } else {
            tracing::debug!(job_id = %job.id, "no free worker and no room for one; the job waits");
            // Without room, no job of either kind gets a new worker; with room but no free
            // pool worker, container jobs (which get workers of their own) still may.
            // Without room but with a warm pool, process jobs may still find a free pool
            // worker behind a container job.
            match (kinds, in_container) {
                (jobs::Kinds::Any, false) if state.warm_pool.is_some() => {
                    kinds = jobs::Kinds::Containers
                }
                (jobs::Kinds::Any, true) if state.warm_pool.is_some() => {
                    kinds = jobs::Kinds::Processes
                }
                _ => break,
            }
            continue;
        }
        waited.push(waited_for);
    }
    if waited.is_empty() {
        return Ok((0, false));
    }
    hodei_store::commit(tx).await?;
    for waited in &waited {
        state
            .dispatch_latency
            .observe(waited.to_std().unwrap_or_default().as_secs_f64());
    }
    Ok((waited.len(), waited.len() == limit))
}

/// Provision warm-pool workers until the pool has its size (within the capacity); when the
/// pool is smaller than the pool workers alive (it was shrunk or turned off), tear idle
/// surplus workers down (busy ones go when their job ends).
pub(crate) async fn replenish_pool(state: &State) -> Result<u32, ApiError> {
    // Without a pool there is only a surplus to tear down, and only while pool workers of an
    // earlier configuration live: a look without the lock finds most times that none do.
    // (Without a pool no pool worker is made, so none appears after the look.)
    if state.warm_pool.is_none() && !workers::any_live_pooled(&state.store).await? {
        return Ok(0);
    }
    keep_pool(state).await
}

/// [`replenish_pool`] without its look (the caller's [`looks`] found pool workers alive, or
/// a pool is kept).
pub(crate) async fn keep_pool(state: &State) -> Result<u32, ApiError> {
    let mut tx = state.store.begin_placing().await?;
    let surplus = pool_surplus(&mut tx, state).await?;
    if surplus > 0 {
        let mut torn_down = 0;
        for mut worker in workers::lock_idle_pooled(&mut tx, surplus).await? {
            let event = worker.terminate("the warm pool shrank".into(), &state.actor)?;
            tx.save(&mut worker, &[event]).await?;
            torn_down += 1;
        }
        hodei_store::commit(tx).await?;
        tracing::info!(
            torn_down,
            surplus,
            "idle pool workers beyond the pool's size torn down"
        );
        return Ok(0);
    }
    let Some(pool) = state.warm_pool else {
        return Ok(0);
    };
    let live = workers::count_live(&mut tx).await?;
    let missing = pool
        .size
        .saturating_sub(live.pool_members)
        .min(state.max_workers.saturating_sub(live.workers));
    for _ in 0..missing {
        let (worker, requested) = Worker::request(
            Uuid::now_v7(),
            &state.provider,
            Purpose::Pool {
                max_jobs: pool.max_jobs_per_worker,
            },
            hodei_protocol::new_correlation_id(),
            state.connect_timeout,
            &state.actor,
        );
        workers::insert(&mut tx, &worker).await?;
        outbox::append_events(&mut tx, &[requested]).await?;
    }
    hodei_store::commit(tx).await?;
    if missing > 0 {
        tracing::info!(
            requested = missing,
            pool_size = pool.size,
            "warm pool topped up"
        );
    }
    Ok(missing)
}

/// How many pool workers are alive beyond the configured pool size (all of them without a pool).
async fn pool_surplus(conn: &mut Tx, state: &State) -> Result<u32, ApiError> {
    let live = workers::count_live(conn).await?;
    let size = state.warm_pool.map_or(0, |pool| pool.size);
    Ok(live.pool_members.saturating_sub(size))
}

/// How many more workers may be created now: counted at the first ask of a transaction,
/// then `counted` (which the caller lowers for each worker it makes).
async fn room_left(
    conn: &mut Tx,
    state: &State,
    counted: &mut Option<u32>,
) -> Result<u32, ApiError> {
    if let Some(left) = *counted {
        return Ok(left);
    }
    let live = workers::count_live(conn).await?;
    let left = state.max_workers.saturating_sub(live.workers);
    *counted = Some(left);
    Ok(left)
}

/// Whether the container job `job` fits in what the docker provider has left (its offer's
/// memory less what placed container jobs hold). Without an offer, it fits.
async fn container_fits(conn: &mut Tx, job: &hodei_domain::Job) -> Result<bool, ApiError> {
    let (capacity,): (Option<i32>,) =
        sqlx::query_as("SELECT max(memory_mb) FROM provider_offers WHERE provider = 'docker'")
            .fetch_one(&mut **conn)
            .await
            .map_err(hodei_store::StoreError::from)?;
    let Some(capacity) = capacity else {
        return Ok(true);
    };
    let default = hodei_domain::offer::DEFAULT_CONTAINER_MEMORY_MB as i32;
    let used = hodei_store::offers::docker_memory_in_use(conn, default).await?;
    let wants = job.spec.resources.memory_mb.map_or(default, |mb| mb as i32);
    Ok(used + i64::from(wants) <= i64::from(capacity))
}

/// Pending -> Scheduled on a worker requested for this job alone (Creating), reserved for it.
async fn schedule_on_new_worker(
    conn: &mut Tx,
    state: &State,
    job: &mut Job,
) -> Result<(), ApiError> {
    // The job's change first: the audit trail reads in the order the events were made.
    let worker_id = Uuid::now_v7();
    let scheduled = job.schedule(worker_id, &state.actor)?;
    let (worker, requested) = Worker::request(
        worker_id,
        &state.provider,
        Purpose::ForJob(job.id),
        job.correlation_id.clone(),
        state.connect_timeout,
        &state.actor,
    );
    workers::insert(conn, &worker).await?;
    conn.save(job, &[scheduled, requested]).await?;
    tracing::info!(job_id = %job.id, worker_id = %worker.id, provider = %state.provider, "no free worker; one requested");
    Ok(())
}
