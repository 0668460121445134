//! Giving a job to a worker, inside the caller's transaction: the dispatcher's placements
//! and the scheduler's accept path (a job accepted while a warm worker waits goes to it in
//! the transaction that accepts it, one event hop sooner) share it.

use hodei_domain::{Actor, DomainEvent, Job, Worker};
use hodei_protocol::agent::{RunJob, WorkerCommand};
use hodei_protocol::{subjects, ApiError};
use hodei_store::outbox::{self, OutboxCommand};
use hodei_store::{jobs, workers, Store, Tx};
use tracing::Instrument;
use uuid::Uuid;

/// Give `job` to `worker`: the worker goes Busy, the job goes Assigned unless it was already
/// Scheduled on this worker, and the RunJob command joins the events in the outbox.
pub async fn assign(
    conn: &mut Tx,
    job: &mut Job,
    worker: &mut Worker,
    actor: &Actor,
) -> Result<RunJob, ApiError> {
    give(conn, job, worker, actor, true).await
}

/// Append the RunJob command `run` of `job` for `worker_id` to the outbox.
async fn send(conn: &mut Tx, job: &Job, worker_id: Uuid, run: RunJob) -> Result<RunJob, ApiError> {
    let run = WorkerCommand::RunJob(run);
    let WorkerCommand::RunJob(body) = &run;
    outbox::append_command(
        conn,
        OutboxCommand {
            command_id: body.command_id,
            subject: subjects::worker_cmd(worker_id),
            worker_id,
            command_type: "RunJob",
            correlation_id: &job.correlation_id,
            payload: &run,
        },
    )
    .await?;
    let WorkerCommand::RunJob(body) = run;
    Ok(body)
}

/// The log line of a RunJob sent, once its rows are written.
fn log_sent(job: &Job, worker_id: Uuid) {
    tracing::info!(job_id = %job.id, %worker_id, attempt = job.attempt, "job sent to worker");
}

/// [`assign`] for a worker that gets its job in the answer to its registration: the same
/// changes and events, without the RunJob copy on the worker's command subject, which that
/// agent would never read (a registration asked again is answered with the job again).
pub async fn assign_in_answer(
    conn: &mut Tx,
    job: &mut Job,
    worker: &mut Worker,
    actor: &Actor,
) -> Result<RunJob, ApiError> {
    give(conn, job, worker, actor, false).await
}

/// [`assign`] (`send_too`: the RunJob goes to the worker's command subject too) or
/// [`assign_in_answer`]. The job's change is written first, then the worker's, whose
/// statement writes the rows appended since: the worker's event, then the command.
#[tracing::instrument(name = "assign", skip_all, fields(job_id = %job.id, worker_id = %worker.id))]
async fn give(
    conn: &mut Tx,
    job: &mut Job,
    worker: &mut Worker,
    actor: &Actor,
    send_too: bool,
) -> Result<RunJob, ApiError> {
    let assigned: Vec<DomainEvent> = match job.state {
        hodei_domain::JobState::Pending => vec![job.assign(worker.id, actor)?],
        _ => Vec::new(),
    };
    let busy = worker.assign(job.id, actor)?;
    conn.save(job, &assigned).await?;
    outbox::append_events(conn, &[busy]).await?;
    let run = match send_too {
        true => send(conn, job, worker.id, run_job_of(job)).await?,
        false => run_job_of(job),
    };
    conn.save(worker, &[]).await?;
    if send_too {
        log_sent(job, worker.id);
    }
    Ok(run)
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
/// it that worker now. Without a free ready worker it costs one statement and takes no
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
    if !hodei_store::placement_lock_if_worker_free(tx).await? {
        return Ok(OnAccept::NoFreeWorker);
    }
    if !jobs::is_next_pending(tx, jobs::Kinds::Processes, job.id).await? {
        return Ok(OnAccept::Left);
    }
    let Some(mut worker) = workers::lock_free_ready(tx).await? else {
        return Ok(OnAccept::NoFreeWorker);
    };
    assign(tx, job, &mut worker, actor).await?;
    Ok(OnAccept::Assigned)
}

/// A job given a free ready worker before its row was written ([`assign_before_insert`]):
/// the worker, locked and Busy in memory, and the events of both.
pub struct TakenBeforeInsert {
    worker: Worker,
    job_assigned: DomainEvent,
    worker_busy: DomainEvent,
}

/// In the transaction that accepts `job` (Pending, not written yet): if it would be the next
/// job to place (no process job waits, its key has a slot free) and a free ready worker
/// waits ([`workers::lock_free_ready_for_first`]), lock that worker and give it the job in memory, so that the
/// job's row is written once, already Assigned, instead of inserted Pending and updated.
/// After the insert, [`assign_inserted`] writes the worker and the events; if the job was not
/// inserted (its idempotency key was taken), dropping what this returns changes nothing.
/// Otherwise nothing changed, and the job waits or goes the ordinary way.
#[tracing::instrument(name = "assign", skip_all, fields(job_id = %job.id))]
pub async fn assign_before_insert(
    tx: &mut Tx,
    job: &mut Job,
    actor: &Actor,
) -> Result<BeforeInsert, ApiError> {
    // A job in a container gets a container of its own (the dispatcher requests it).
    let placeable = job.state == hodei_domain::JobState::Pending && job.not_before.is_none();
    if !placeable || job.spec.image.is_some() {
        return Ok(BeforeInsert::Left);
    }
    // No lock at all while every worker is busy.
    if !hodei_store::placement_lock_if_worker_free(tx).await? {
        return Ok(BeforeInsert::NoFreeWorker);
    }
    let (key, max) = match &job.spec.concurrency {
        Some(c) => (
            c.key.as_str(),
            Some(i32::try_from(c.max).unwrap_or(i32::MAX)),
        ),
        None => ("", None),
    };
    let Some(mut worker) = workers::lock_free_ready_for_first(tx, key, max).await? else {
        return Ok(BeforeInsert::Left);
    };
    let worker_busy = worker.assign(job.id, actor)?;
    let job_assigned = job.assign(worker.id, actor)?;
    Ok(BeforeInsert::Taken(TakenBeforeInsert {
        worker,
        job_assigned,
        worker_busy,
    }))
}

/// What [`assign_before_insert`] did with a job.
pub enum BeforeInsert {
    /// It took a free ready worker: [`assign_inserted`] finishes once the job is inserted.
    Taken(TakenBeforeInsert),
    /// No free ready worker, and none becomes free in this transaction.
    NoFreeWorker,
    /// Left to the ordinary way: a job in a container, one that is not the next to place.
    Left,
}

/// [`assign_before_insert`]'s second half, once `job` is inserted: its events
/// (`submitted`, then its assignment), the worker's change and the RunJob command.
pub async fn assign_inserted(
    tx: &mut Tx,
    job: &Job,
    submitted: &[DomainEvent],
    taken: TakenBeforeInsert,
) -> Result<RunJob, ApiError> {
    let TakenBeforeInsert {
        mut worker,
        job_assigned,
        worker_busy,
    } = taken;
    outbox::append_events(tx, submitted).await?;
    outbox::append_events(tx, &[job_assigned, worker_busy]).await?;
    let run = send(tx, job, worker.id, run_job_of(job)).await?;
    // Its statement writes every row of the accept so far, the command among them.
    tx.save(&mut worker, &[]).await?;
    log_sent(job, worker.id);
    Ok(run)
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
    let mut tx = store.begin_placing().await?;
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
    worker: Worker,
    ended: Uuid,
    actor: &Actor,
) -> Result<Option<RunJob>, ApiError> {
    let leaving = HandOver {
        worker,
        ended,
        why: "ended".to_owned(),
        may_go_on: true,
        span: tracing::Span::current(),
    };
    Ok(hand_over_all(tx, vec![leaving], actor).await?.remove(0))
}

/// A worker whose job `ended` has just left it as its agent reported (`why`: "ended
/// Succeeded", say), locked in the caller's transaction, and the span its hand-over is
/// recorded in.
pub struct HandOver {
    pub worker: Worker,
    pub ended: Uuid,
    pub why: String,
    /// Whether it may take a next job: only under the placement lock, taken before its row's.
    pub may_go_on: bool,
    pub span: tracing::Span,
}

/// [`hand_over`] for the workers of one transaction at once, their next jobs taken in the
/// order one hand-over after the other would take them: the jobs read and locked in two
/// statements ([`jobs::lock_next_pending_many`]), then written in one and the workers in
/// one (a round more when a head was passed over). The next job of each, in their order
/// (`None`: it does not go on, or no job waits).
///
/// Every worker that gets no next job leaves its ended job here too, as the registry would
/// on the job's event ([`Worker::job_left`]): a pool worker with jobs left is Ready again,
/// any other is torn down. The registry then finds nothing left to do.
pub async fn hand_over_all(
    tx: &mut Tx,
    leaving: Vec<HandOver>,
    actor: &Actor,
) -> Result<Vec<Option<RunJob>>, ApiError> {
    // Still Busy with the ended job, or already released by the registry on the job's event
    // (which raced this): either way free for the next job. (If the dispatcher gave it one
    // first, it is Busy with that one, and keeps it.)
    let goes_on = |one: &HandOver| {
        use hodei_domain::WorkerState::{Busy, Ready};
        let worker = &one.worker;
        let free = match worker.state {
            Busy => worker.current_job_id == Some(one.ended),
            Ready => worker.current_job_id.is_none(),
            _ => false,
        };
        one.may_go_on && worker.pooled && free && worker.jobs_run < worker.max_jobs
    };
    let mut runs: Vec<Option<RunJob>> = vec![None; leaving.len()];
    let (mut going, mut staying): (Vec<(usize, HandOver)>, Vec<(usize, HandOver)>) = leaving
        .into_iter()
        .enumerate()
        .partition(|(_, one)| goes_on(one));
    // A head passed over (it no longer waits once its lock is granted: a cancellation held
    // it) leaves the workers after it to another round, read after this round's writes.
    for _round in 0..3 {
        if going.is_empty() {
            break;
        }
        // A job in a container gets a container of its own: never a warm-pool process.
        let (next, passed_over) =
            jobs::lock_next_pending_many(tx, jobs::Kinds::Processes, going.len()).await?;
        let rest = going.split_off(next.len());
        let mut given: Vec<(usize, HandOver, Job, Vec<DomainEvent>)> =
            Vec::with_capacity(next.len());
        for ((i, mut one), mut job) in going.into_iter().zip(next) {
            // Busy -> Ready -> Busy in one transaction: the events of the release are not
            // written (the assignment's WorkerStatusChanged records the change).
            if one.worker.state == hodei_domain::WorkerState::Busy {
                let _released = one.worker.job_left(one.ended, true, "ended", actor)?;
            }
            let mut events = vec![job.assign(one.worker.id, actor)?];
            events.push(one.worker.assign(job.id, actor)?);
            given.push((i, one, job, events));
        }
        for (_, one, _, events) in &given {
            outbox::append_events(tx, events)
                .instrument(one.span.clone())
                .await?;
        }
        // The jobs' statement writes the outbox rows appended so far, these events among them.
        {
            let mut jobs: Vec<&mut Job> = given.iter_mut().map(|(_, _, job, _)| job).collect();
            tx.save_all(&mut jobs, &[]).await?;
        }
        {
            let mut workers: Vec<&mut Worker> = given
                .iter_mut()
                .map(|(_, one, _, _)| &mut one.worker)
                .collect();
            tx.save_all(&mut workers, &[]).await?;
        }
        for (i, one, job, _) in &given {
            one.span.in_scope(|| tracing::info!(job_id = %job.id, worker_id = %one.worker.id, attempt = job.attempt, "next job given with the report"));
            runs[*i] = Some(run_job_of(job));
        }
        going = rest;
        if !passed_over {
            break;
        }
    }
    staying.append(&mut going);
    release_all(tx, staying, actor).await?;
    Ok(runs)
}

/// The workers of [`hand_over_all`] that got no next job leave their ended jobs, written in
/// one statement.
async fn release_all(
    tx: &mut Tx,
    staying: Vec<(usize, HandOver)>,
    actor: &Actor,
) -> Result<(), ApiError> {
    let mut left: Vec<(HandOver, Vec<DomainEvent>)> = Vec::with_capacity(staying.len());
    for (_, mut one) in staying {
        let events = one.worker.job_left(one.ended, true, &one.why, actor)?;
        if !events.is_empty() {
            left.push((one, events));
        }
    }
    if left.is_empty() {
        return Ok(());
    }
    for (one, events) in &left {
        outbox::append_events(tx, events)
            .instrument(one.span.clone())
            .await?;
    }
    {
        let mut workers: Vec<&mut Worker> =
            left.iter_mut().map(|(one, _)| &mut one.worker).collect();
        tx.save_all(&mut workers, &[]).await?;
    }
    for (one, _) in &left {
        one.span.in_scope(|| log_left(&one.worker, one.ended));
    }
    Ok(())
}

/// The log line of a worker that job `job_id` has just left ([`Worker::job_left`]): torn
/// down, or a pool worker Ready for its next job; nothing otherwise.
pub fn log_left(worker: &Worker, job_id: Uuid) {
    let worker_id = worker.id;
    match worker.state {
        hodei_domain::WorkerState::Ready if worker.current_job_id.is_none() => {
            tracing::info!(%worker_id, %job_id, jobs_run = worker.jobs_run, max_jobs = worker.max_jobs, "job ended; pool worker ready for the next one")
        }
        hodei_domain::WorkerState::Terminating => {
            tracing::info!(%worker_id, %job_id, "job ended; worker torn down")
        }
        _ => {}
    }
}
