//! Giving a job to a worker, inside the caller's transaction: the dispatcher's placements
//! and the scheduler's accept path (a job accepted while a warm worker waits goes to it in
//! the transaction that accepts it, one event hop sooner) share it.

use hodei_domain::{Actor, DomainEvent, Job, Worker};
use hodei_protocol::agent::{RunJob, WorkerCommand};
use hodei_protocol::{subjects, ApiError};
use hodei_store::outbox::{self, OutboxCommand};
use hodei_store::{jobs, workers, Store, Tx};
use uuid::Uuid;

/// Give `job` to `worker`: the worker goes Busy, the job goes Assigned unless it was already
/// Scheduled on this worker, and the RunJob command joins the events in the outbox.
pub async fn assign(
    conn: &mut Tx,
    job: &mut Job,
    worker: &mut Worker,
    actor: &Actor,
) -> Result<RunJob, ApiError> {
    let run = WorkerCommand::RunJob(assign_in_answer(conn, job, worker, actor).await?);
    let WorkerCommand::RunJob(body) = &run;
    outbox::append_command(
        conn,
        OutboxCommand {
            command_id: body.command_id,
            subject: subjects::worker_cmd(worker.id),
            worker_id: worker.id,
            command_type: "RunJob",
            correlation_id: &job.correlation_id,
            payload: &run,
        },
    )
    .await?;
    tracing::info!(job_id = %job.id, worker_id = %worker.id, attempt = job.attempt, "job sent to worker");
    let WorkerCommand::RunJob(body) = run;
    Ok(body)
}

/// [`assign`] for a worker that gets its job in the answer to its registration: the same
/// changes and events, without the RunJob copy on the worker's command subject, which that
/// agent would never read (a registration asked again is answered with the job again).
#[tracing::instrument(name = "assign", skip_all, fields(job_id = %job.id, worker_id = %worker.id))]
pub async fn assign_in_answer(
    conn: &mut Tx,
    job: &mut Job,
    worker: &mut Worker,
    actor: &Actor,
) -> Result<RunJob, ApiError> {
    // The job's change is written first, then the worker's (one commit).
    let assigned: Vec<DomainEvent> = match job.state {
        hodei_domain::JobState::Pending => vec![job.assign(worker.id, actor)?],
        _ => Vec::new(),
    };
    let busy = worker.assign(job.id, actor)?;
    conn.save(job, &assigned).await?;
    conn.save(worker, &[busy]).await?;
    Ok(run_job_of(job))
}

/// The command that runs `job`'s current attempt.
pub fn run_job_of(job: &Job) -> RunJob {
    RunJob {
        schema_version: hodei_protocol::SCHEMA_VERSION,
        command_id: Uuid::now_v7(),
        job_id: job.id,
        attempt: job.attempt,
        correlation_id: job.correlation_id.clone(),
        command: job.spec.command.clone(),
        args: job.spec.args.clone(),
        env: job.spec.env.clone(),
        working_dir: job.spec.working_dir.clone(),
    }
}

/// What [`assign_on_accept`] did with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAccept {
    /// Given to a free ready worker in the accepting transaction.
    Assigned,
    /// No free ready worker (no warm pool, or all busy): none becomes free in this
    /// transaction either, so the jobs accepted after it need not look.
    NoFreeWorker,
    /// Left to the dispatcher: a job in a container, or another job is placed first.
    Left,
}

/// Right after `job` was accepted, in the transaction that accepts it: if it is the next job
/// to place (no job of higher priority or older waits) and a free ready worker waits, give
/// it that worker now. Without a free ready worker it costs one index lookup and takes no
/// lock: the dispatcher places the job.
pub async fn assign_on_accept(
    tx: &mut Tx,
    job: &mut Job,
    actor: &Actor,
) -> Result<OnAccept, ApiError> {
    // A job in a container gets a container of its own (the dispatcher requests it).
    if job.spec.image.is_some() {
        return Ok(OnAccept::Left);
    }
    if !workers::any_free_ready(tx).await? {
        return Ok(OnAccept::NoFreeWorker);
    }
    hodei_store::placement_lock(tx).await?;
    if !jobs::is_next_pending(tx, jobs::Kinds::Processes, job.id).await? {
        return Ok(OnAccept::Left);
    }
    let Some(mut worker) = workers::lock_free_ready(tx).await? else {
        return Ok(OnAccept::NoFreeWorker);
    };
    assign(tx, job, &mut worker, actor).await?;
    Ok(OnAccept::Assigned)
}

/// A warm-pool worker that reported the end of `ended` (its job, which has just left it) and
/// has jobs left takes the next pending job at once, in one transaction: the job goes to the
/// agent in the answer to its report, with no RunJob command and no WorkerReady /
/// WorkerReadyForJob (nobody needs to hear that it was free: it is Busy again). `None` when
/// the worker is not such a worker or no job waits for a pool process; the registry then
/// releases it or tears it down on the job's event, as for any worker. A worker the
/// registry released first (it raced this) is given the job all the same.
///
/// The scheduler hands over in the report's own transaction ([`hand_over`]); this is its
/// way when that transaction failed and the reports were applied one at a time.
#[tracing::instrument(name = "assign", skip_all, fields(%worker_id))]
pub async fn next_for_pool_worker(
    store: &Store,
    worker_id: Uuid,
    ended: Uuid,
    actor: &Actor,
) -> Result<Option<RunJob>, ApiError> {
    // The caller looked first ([`workers::pooled_with_jobs_left`], for its whole batch).
    let mut tx = store.begin().await?;
    hodei_store::placement_lock(&mut tx).await?;
    let Some(worker) = workers::lock(&mut tx, worker_id).await? else {
        return Ok(None);
    };
    let run = hand_over(&mut tx, worker, ended, actor).await?;
    if run.is_some() {
        hodei_store::commit(tx).await?;
    }
    Ok(run)
}

/// [`next_for_pool_worker`] inside the caller's transaction, which holds the placement lock
/// (taken before any row lock, as every placement takes it), has locked `worker` (read as
/// locked, in this transaction) and commits.
pub async fn hand_over(
    tx: &mut Tx,
    mut worker: Worker,
    ended: Uuid,
    actor: &Actor,
) -> Result<Option<RunJob>, ApiError> {
    // Still Busy with the ended job, or already released by the registry on the job's event
    // (which raced this): either way free for the next job. (If the dispatcher gave it one
    // first, it is Busy with that one, and keeps it.)
    let goes_on = |worker: &Worker| {
        use hodei_domain::WorkerState::{Busy, Ready};
        let free = match worker.state {
            Busy => worker.current_job_id == Some(ended),
            Ready => worker.current_job_id.is_none(),
            _ => false,
        };
        worker.pooled && free && worker.jobs_run < worker.max_jobs
    };
    if !goes_on(&worker) {
        return Ok(None);
    }
    // A job in a container gets a container of its own: never a warm-pool process.
    let Some(mut next) = jobs::lock_next_pending(tx, jobs::Kinds::Processes).await? else {
        return Ok(None);
    };
    // Busy -> Ready -> Busy in one transaction: the events of the release are not written
    // (the assignment's WorkerStatusChanged records the change).
    if worker.state == hodei_domain::WorkerState::Busy {
        let _released = worker.job_left(ended, true, "ended", actor)?;
    }
    let run = assign_in_answer(tx, &mut next, &mut worker, actor).await?;
    tracing::info!(job_id = %next.id, worker_id = %worker.id, attempt = next.attempt, "next job given with the report");
    Ok(Some(run))
}
