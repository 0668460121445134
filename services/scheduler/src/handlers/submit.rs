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
                .filter(|c| !c.is_empty() && c.len() <= 128)
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
        if key.is_empty() || key.len() > 256 {
            return Err(ApiError::bad_request(
                "idempotency_key must have 1 to 256 characters",
            ));
        }
        let mut conn = state
            .store
            .acquire()
            .await
            .map_err(hodei_store::StoreError::from)?;
        if let Some(existing) = jobs::find_by_idempotency_key(&mut conn, key).await? {
            return Ok(accepted(&existing, false));
        }
    }
    let spec = request.spec();
    if let Err(why) = hodei_domain::satisfiable(&offers(state).await?, &spec) {
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
    let mut tx = state.store.begin().await?;
    if !jobs::insert(&mut tx, &job).await? {
        // Another submission with the same key won the race: answer with its job.
        drop(tx);
        let key = job.idempotency_key.as_deref().unwrap_or_default();
        let mut conn = state
            .store
            .acquire()
            .await
            .map_err(hodei_store::StoreError::from)?;
        let existing = jobs::find_by_idempotency_key(&mut conn, key)
            .await?
            .ok_or_else(|| {
                ApiError::internal("the idempotency key is taken but its job is gone")
            })?;
        return Ok(accepted(&existing, false));
    }
    outbox::append_events(&mut tx, &events).await?;
    let mut job = job;
    let placed = hodei_placement::assign_on_accept(&mut tx, &mut job, &state.actor).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(job_id = %job.id, correlation_id = %job.correlation_id, command = %job.spec.command, placed, "job accepted");
    Ok(accepted(&job, true))
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
