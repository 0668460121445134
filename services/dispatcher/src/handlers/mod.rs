//! One file per message the dispatcher understands, and the assignment they share.

pub mod job_queued;
mod placement;
pub mod worker_ready;
pub mod worker_terminated;

pub(crate) use placement::{place_pending, replenish_pool};

use hodei_domain::{Actor, DomainEvent, Job, Worker};
use hodei_protocol::agent::{RunJob, WorkerCommand};
use hodei_protocol::{subjects, ApiError};
use hodei_store::outbox::{self, OutboxCommand};
use hodei_store::{jobs, workers, Tx};
use uuid::Uuid;

/// Give `job` to `worker`: the worker goes Busy, the job goes Assigned unless it was already
/// Scheduled on this worker, and the RunJob command joins the events in the outbox.
#[tracing::instrument(name = "assign", skip_all, fields(job_id = %job.id, worker_id = %worker.id))]
pub(crate) async fn send_job(
    conn: &mut Tx,
    job: &mut Job,
    worker: &mut Worker,
    actor: &Actor,
) -> Result<(), ApiError> {
    let mut events: Vec<DomainEvent> = Vec::with_capacity(2);
    if job.state == hodei_domain::JobState::Pending {
        events.push(job.assign(worker.id, actor)?);
    }
    events.push(worker.assign(job.id, actor)?);
    jobs::update(conn, job).await?;
    workers::update(conn, worker).await?;
    outbox::append_events(conn, &events).await?;
    let run = WorkerCommand::RunJob(RunJob {
        schema_version: hodei_protocol::SCHEMA_VERSION,
        command_id: Uuid::now_v7(),
        job_id: job.id,
        attempt: job.attempt,
        correlation_id: job.correlation_id.clone(),
        command: job.spec.command.clone(),
        args: job.spec.args.clone(),
        env: job.spec.env.clone(),
        working_dir: job.spec.working_dir.clone(),
    });
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
    Ok(())
}

/// Run a placement behind the dispatch circuit breaker: while it is open the message waits
/// (redelivered after the open window); transient failures count towards opening it.
pub(crate) async fn guarded<F>(
    state: &crate::State,
    placement: F,
) -> hodei_messaging::consumer::Outcome
where
    F: std::future::Future<Output = Result<(), ApiError>>,
{
    use hodei_messaging::consumer::Outcome;
    if let Err(wait) = state.breaker.allow() {
        return Outcome::Retry {
            after: wait,
            reason: "the dispatch circuit is open".into(),
        };
    }
    let result = placement.await;
    state
        .breaker
        .record(!matches!(&result, Err(error) if error.code.is_transient()));
    Outcome::from_result(result)
}

/// The event an envelope carries, decoded as `P`.
pub(crate) fn payload_of<P: hodei_domain::EventPayload>(
    delivery: &hodei_messaging::consumer::Delivery,
) -> Result<P, ApiError> {
    let event: DomainEvent = delivery.decode()?;
    match event.decode::<P>() {
        Some(Ok(payload)) => Ok(payload),
        Some(Err(e)) => Err(ApiError::bad_request(format!(
            "invalid {} payload: {e}",
            P::EVENT_TYPE
        ))),
        None => Err(ApiError::bad_request(format!(
            "expected {}, got {}",
            P::EVENT_TYPE,
            event.event_type
        ))),
    }
}
