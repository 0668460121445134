//! `hodei.api.jobs.submit` (request/reply) and `hodei.jobs.submit` (durable stream).
//!
//! The same idempotency key twice makes one job: the key is unique in `jobs`, so a second
//! submission finds the first job, whatever the stream's duplicate window says.

use hodei_domain::Job;
use hodei_messaging::api::{respond, RequestContext};
use hodei_messaging::consumer::{Delivery, Outcome};
use hodei_protocol::api::{SubmitAccepted, SubmitJob};
use hodei_protocol::{headers, new_correlation_id, trace_id_of, ApiError, ErrorCode};
use hodei_store::{jobs, outbox};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use crate::State;

pub async fn from_api(
    state: State,
    request: SubmitJob,
    ctx: RequestContext,
) -> Result<SubmitAccepted, ApiError> {
    let correlation_id = correlation_of(
        ctx.header("traceparent"),
        ctx.header(headers::CORRELATION_ID),
    );
    let key = request
        .idempotency_key
        .clone()
        .or_else(|| ctx.header(headers::MSG_ID).map(str::to_owned));
    submit(&state, request, key, correlation_id).await
}

pub async fn from_stream(state: State, delivery: Delivery) -> Outcome {
    let result = match delivery.decode::<SubmitJob>() {
        Ok(request) => {
            let correlation_id = correlation_of(
                delivery.header("traceparent"),
                delivery.header(headers::CORRELATION_ID),
            );
            // Without a key of the client's, the stream position still makes a redelivery
            // of this very message idempotent.
            let key = request
                .idempotency_key
                .clone()
                .or_else(|| delivery.header(headers::MSG_ID).map(str::to_owned))
                .unwrap_or_else(|| format!("hodei.jobs.submit#{}", delivery.stream_sequence));
            submit(&state, request, Some(key), correlation_id).await
        }
        Err(error) => Err(error),
    };
    if let Some(reply_to) = delivery.header(headers::REPLY_TO) {
        if let Err(error) = respond(&state.client, reply_to, result.clone()).await {
            tracing::warn!(%error, "cannot answer the submission");
        }
    }
    if let Ok(accepted) = &result {
        tracing::info!(job_id = %accepted.job_id, created = accepted.created, "submission from the stream");
    }
    Outcome::from_result(result)
}

/// The trace id of the span accepting the submission (the client's trace when it sent a
/// `traceparent`); without tracing, the client's trace id or correlation id, else a new one.
fn correlation_of(traceparent: Option<&str>, correlation_id: Option<&str>) -> String {
    hodei_runtime::telemetry::context::trace_id(&tracing::Span::current())
        .or_else(|| traceparent.and_then(trace_id_of).map(str::to_owned))
        .or_else(|| {
            correlation_id
                .filter(|c| !c.is_empty() && c.len() <= 128 && !c.contains('\0'))
                .map(str::to_owned)
        })
        .unwrap_or_else(new_correlation_id)
}

#[tracing::instrument(name = "submit", skip_all, fields(job_id = tracing::field::Empty, correlation_id = %correlation_id))]
async fn submit(
    state: &State,
    request: SubmitJob,
    idempotency_key: Option<String>,
    correlation_id: String,
) -> Result<SubmitAccepted, ApiError> {
    if let Some(key) = &idempotency_key {
        if key.is_empty() || key.len() > 256 || key.contains('\0') {
            return Err(ApiError::bad_request(
                "idempotency_key must have 1 to 256 characters, none of them NUL",
            ));
        }
    }
    let spec = request.spec();
    if let Err(why) = hodei_domain::satisfiable(&offers(state).await?, &spec) {
        // A submission asked again for a job accepted when a provider could run it.
        if let Some(existing) = existing(state, idempotency_key.as_deref()).await? {
            return Ok(accepted(&existing, false));
        }
        return Err(ApiError::new(
            ErrorCode::NoProvider,
            format!("no provider can run this job: {why}"),
        ));
    }
    let (job, events) = Job::submit(
        Uuid::now_v7(),
        spec,
        request.policy.clone(),
        correlation_id,
        idempotency_key,
        &state.actor,
    )?;
    tracing::Span::current().record("job_id", tracing::field::display(job.id));
    let (reply, answer) = oneshot::channel();
    let submission = Submission {
        job,
        events,
        span: tracing::Span::current(),
        reply,
    };
    if state.accepting.send(submission).await.is_err() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the scheduler is stopping",
        ));
    }
    answer.await.unwrap_or_else(|_| {
        Err(ApiError::new(
            ErrorCode::Unavailable,
            "the scheduler is stopping",
        ))
    })
}

/// Most submissions accepted in one transaction.
const MAX_BATCH: usize = 64;

/// A new job on its way to its transaction, and whom to tell how it went.
pub(crate) struct Submission {
    job: Job,
    events: Vec<hodei_domain::DomainEvent>,
    span: tracing::Span,
    reply: oneshot::Sender<Result<SubmitAccepted, ApiError>>,
}

/// Where submissions wait for their transaction ([`State::accepting`]), bounded.
pub(crate) fn queue() -> (mpsc::Sender<Submission>, mpsc::Receiver<Submission>) {
    mpsc::channel(2 * MAX_BATCH)
}

/// `hodei_submissions_waiting`: the submissions in the queue, not yet in a transaction
/// (read at each scrape; 0 once the queue is gone).
pub(crate) fn register_queue_gauge(
    metrics: &mut hodei_runtime::metrics::Metrics,
    queue: &mpsc::Sender<Submission>,
) {
    use hodei_runtime::metrics::Sample;
    const NAME: &str = "hodei_submissions_waiting";
    let queue = queue.downgrade();
    metrics.gauges_on_scrape(
        "the submissions' queue",
        &[(
            NAME,
            "Submissions waiting for the transaction that accepts them",
        )],
        move || {
            let waiting = queue
                .upgrade()
                .map_or(0, |queue| queue.max_capacity() - queue.capacity());
            Box::pin(async move { Ok(vec![Sample::new(NAME, Vec::new(), waiting as f64)]) })
        },
    );
}

/// Accept the submissions of `queue` as they come: those that arrive while a transaction
/// runs are accepted together in the next (group commit: one insert, one outbox insert,
/// one commit for all). Once `served` (the service has stopped taking requests and answered
/// those it took) the queue takes no more and what it holds is accepted.
pub(crate) async fn accept_all(
    state: State,
    mut queue: mpsc::Receiver<Submission>,
    served: hodei_runtime::Shutdown,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closed = false;
    loop {
        tokio::select! {
            taken = queue.recv_many(&mut batch, MAX_BATCH) => {
                if taken == 0 {
                    break;
                }
                accept(&state, std::mem::take(&mut batch)).await;
            }
            () = served.cancelled(), if !closed => {
                queue.close();
                closed = true;
            }
        }
    }
}

/// Accept a batch of new jobs in one transaction; if it fails, each on its own, so that a
/// submission only ever fails for what is wrong with it.
async fn accept(state: &State, batch: Vec<Submission>) {
    let jobs: Vec<(&Job, &[hodei_domain::DomainEvent], &tracing::Span)> = batch
        .iter()
        .map(|s| (&s.job, s.events.as_slice(), &s.span))
        .collect();
    let results = match accept_in_one(state, &jobs).await {
        Ok(results) => results,
        Err(error) if batch.len() > 1 => {
            tracing::warn!(%error, submissions = batch.len(), "a batch's transaction failed; accepting its jobs one at a time");
            let mut results = Vec::with_capacity(batch.len());
            for one in &jobs {
                results.push(
                    match accept_in_one(state, std::slice::from_ref(one)).await {
                        Ok(mut one) => one.remove(0),
                        Err(error) => Err(error),
                    },
                );
            }
            results
        }
        Err(error) => vec![Err(error)],
    };
    for (submission, result) in batch.into_iter().zip(results) {
        // The submitter may have gone (its request timed out): the job stands all the same.
        let _ = submission.reply.send(result);
    }
}

/// The transaction that accepts `jobs`, with their events; each job that is the next to place
/// while a warm worker waits goes to it in the same transaction. A job whose idempotency key
/// was taken (by an older job, or one before it in `jobs`) is answered with the job that has
/// the key, read after the commit.
async fn accept_in_one(
    state: &State,
    jobs: &[(&Job, &[hodei_domain::DomainEvent], &tracing::Span)],
) -> Result<Vec<Result<SubmitAccepted, ApiError>>, ApiError> {
    let mut tx = state.store.begin().await?;
    // The first job, if it would be the next to place and a warm worker is free, takes the
    // worker before it is written: its row is written once, already Assigned.
    let (first, first_events, first_span) = jobs[0];
    let mut first = first.clone();
    use hodei_placement::BeforeInsert;
    let before = hodei_placement::assign_before_insert(&mut tx, &mut first, &state.actor)
        .instrument(first_span.clone())
        .await?;
    // Once no warm worker is free, none becomes free in this transaction.
    let mut worker_may_be_free = !matches!(before, BeforeInsert::NoFreeWorker);
    let taken = match before {
        BeforeInsert::Taken(taken) => Some(taken),
        _ => None,
    };
    // In the order of their keys: two schedulers inserting the same keys never wait for
    // each other in a circle.
    let mut by_key: Vec<&Job> = std::iter::once(&first)
        .chain(jobs[1..].iter().map(|j| j.0))
        .collect();
    by_key.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
    let inserted = jobs::insert_many(&mut tx, &by_key).await?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    if let Some(taken) = taken.filter(|_| inserted.contains(&first.id)) {
        hodei_placement::assign_inserted(&mut tx, &first, first_events, taken)
            .instrument(first_span.clone())
            .await?;
        outcomes.push(Some((first, true)));
    }
    for &(job, events, span) in &jobs[outcomes.len()..] {
        if !inserted.contains(&job.id) {
            outcomes.push(None);
            continue;
        }
        let mut job = job.clone();
        let placed = async {
            outbox::append_events(&mut tx, events).await?;
            if !worker_may_be_free {
                return Ok::<_, ApiError>(false);
            }
            use hodei_placement::OnAccept;
            let placed = hodei_placement::assign_on_accept(&mut tx, &mut job, &state.actor).await?;
            worker_may_be_free = placed != OnAccept::NoFreeWorker;
            Ok(placed == OnAccept::Assigned)
        }
        .instrument(span.clone())
        .await?;
        outcomes.push(Some((job, placed)));
    }
    hodei_store::commit(tx)
        .instrument(jobs[0].2.clone())
        .await?;
    let mut results = Vec::with_capacity(jobs.len());
    for (&(job, _, span), outcome) in jobs.iter().zip(outcomes) {
        results.push(match outcome {
            Some((job, placed)) => {
                span.in_scope(|| tracing::info!(job_id = %job.id, correlation_id = %job.correlation_id, command = %job.spec.command, placed, "job accepted"));
                Ok(accepted(&job, true))
            }
            // Another submission with the same key won: answer with its job.
            None => match existing(state, job.idempotency_key.as_deref()).await {
                Ok(Some(existing)) => Ok(accepted(&existing, false)),
                Ok(None) => Err(ApiError::internal("the idempotency key is taken but its job is gone")),
                Err(error) => Err(error),
            },
        });
    }
    Ok(results)
}

/// The job that holds the idempotency key `key`, if any.
async fn existing(state: &State, key: Option<&str>) -> Result<Option<Job>, ApiError> {
    let Some(key) = key else { return Ok(None) };
    let mut conn = state
        .store
        .acquire()
        .await
        .map_err(hodei_store::StoreError::from)?;
    Ok(jobs::find_by_idempotency_key(&mut conn, key).await?)
}

/// The providers' offers, at most a few seconds old.
pub(crate) async fn offers(state: &State) -> Result<Vec<hodei_domain::ProviderOffer>, ApiError> {
    let mut cached = state.offers.lock().await;
    // Until a provider-manager has recorded its offers there is nothing to keep: read again.
    if cached.1.is_empty() || cached.0.elapsed() >= crate::OFFERS_FRESH_FOR {
        *cached = (
            std::time::Instant::now(),
            hodei_store::offers::all(&state.store).await?,
        );
    }
    Ok(cached.1.clone())
}

fn accepted(job: &Job, created: bool) -> SubmitAccepted {
    SubmitAccepted {
        job_id: job.id,
        correlation_id: job.correlation_id.clone(),
        state: job.state,
        created,
    }
}
