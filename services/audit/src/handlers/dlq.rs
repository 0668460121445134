//! `hodei.api.dlq.*`: what operators do with dead letters. List and show read HODEI_DLQ;
//! replay publishes a dead letter again to its original subject (the normal path: the stream
//! and its consumers take it as any other message) and removes it; discard removes it. Both
//! are recorded in the audit log, with who asked.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use chrono::{DateTime, Utc};
use hodei_domain::events::{DeadLetterDiscarded, DeadLetterReplayed};
use hodei_domain::{Actor, DomainEvent, EventPayload};
use hodei_messaging::{publish_durable, streams};
use hodei_protocol::api::{DeadLetter, DeadLetterRef, ListDeadLetters, Page};
use hodei_protocol::{headers, ApiError, ErrorCode};
use uuid::Uuid;

use crate::State;

fn unavailable(what: &str) -> impl Fn(String) -> ApiError + '_ {
    move |error| ApiError::new(ErrorCode::Unavailable, format!("{what}: {error}"))
}

async fn dlq(state: &State) -> Result<Stream, ApiError> {
    state
        .js
        .get_stream(streams::DLQ)
        .await
        .map_err(|e| unavailable("opening HODEI_DLQ")(e.to_string()))
}

/// The message at `seq`, or None if there is none (never was, or removed).
async fn message(stream: &Stream, seq: u64) -> Result<Option<StreamMessage>, ApiError> {
    match stream.get_raw_message(seq).await {
        Ok(message) => Ok(Some(message)),
        Err(error) if matches!(error.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(error) => match error.kind() {
            // NATS 2.9 answers a deleted sequence with a JetStream error "no message found".
            LastRawMessageErrorKind::JetStream(e) if e.to_string().contains("no message found") => {
                Ok(None)
            }
            _ => Err(unavailable("reading HODEI_DLQ")(error.to_string())),
        },
    }
}

fn header(message: &StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .map(|v| v.to_string())
        .unwrap_or_default()
}

fn view(message: &StreamMessage, with_payload: bool) -> DeadLetter {
    let stored_at =
        DateTime::<Utc>::from_timestamp_nanos(message.time.unix_timestamp_nanos() as i64);
    DeadLetter {
        seq: message.sequence,
        dlq_subject: message.subject.to_string(),
        original_subject: header(message, "Hodei-Dlq-Subject"),
        source: header(message, "Hodei-Dlq-Stream"),
        consumer: header(message, "Hodei-Dlq-Consumer"),
        reason: header(message, "Hodei-Dlq-Reason"),
        stored_at,
        size: message.payload.len(),
        payload: with_payload.then(|| {
            let mut payload = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned())
            });
            mask_env(&mut payload);
            payload
        }),
    }
}

/// A job's environment values may be secrets: shown as `***` wherever an `env` object is.
fn mask_env(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                match inner {
                    Value::Object(env) if key == "env" => {
                        for secret in env.values_mut() {
                            *secret = Value::String("***".into());
                        }
                    }
                    other => mask_env(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_env),
        _ => {}
    }
}

/// The streams a dead letter of `source` may go back to: its own stream, or for an outbox
/// row the streams the outbox writes to.
fn replay_allowed(source: &str, subject: &str) -> bool {
    let streams: &[&str] = match source {
        "outbox" => &[streams::EVENTS, streams::WORKER_CMDS],
        stream => &[stream],
    };
    streams.iter().any(|stream| {
        hodei_messaging::stream_subjects(stream)
            .iter()
            .any(|filter| hodei_messaging::subject_matches(filter, subject))
    })
}

pub async fn list(state: State, request: ListDeadLetters) -> Result<Page<DeadLetter>, ApiError> {
    let limit = hodei_protocol::api::page_size(request.limit) as usize;
    let after = match request.cursor.as_deref() {
        Some(cursor) => cursor
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("`cursor` must be a previous next_cursor"))?,
        None => 0,
    };
    let stream = dlq(&state).await?;
    let info = stream
        .get_info()
        .await
        .map_err(|e| unavailable("reading HODEI_DLQ")(e.to_string()))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut items = Vec::new();
    let mut seq = first.max(after + 1);
    while seq <= last && items.len() < limit {
        if let Some(message) = message(&stream, seq).await? {
            items.push(view(&message, false));
        }
        seq += 1;
    }
    let next_cursor = (items.len() == limit && seq <= last).then(|| (seq - 1).to_string());
    Ok(Page { items, next_cursor })
}

pub async fn show(state: State, request: DeadLetterRef) -> Result<DeadLetter, ApiError> {
    let stream = dlq(&state).await?;
    let message = message(&stream, request.seq)
        .await?
        .ok_or_else(|| not_found(request.seq))?;
    Ok(view(&message, true))
}

fn not_found(seq: u64) -> ApiError {
    ApiError::not_found(format!("there is no dead letter {seq}"))
}

#[tracing::instrument(name = "dlq replay", skip_all, fields(seq = request.seq))]
pub async fn replay(state: State, request: DeadLetterRef) -> Result<DeadLetter, ApiError> {
    let stream = dlq(&state).await?;
    let message = message(&stream, request.seq)
        .await?
        .ok_or_else(|| not_found(request.seq))?;
    let dead = view(&message, false);
    if dead.original_subject.is_empty() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the dead letter does not say where it came from",
        ));
    }
    if !replay_allowed(&dead.source, &dead.original_subject) {
        tracing::warn!(seq = dead.seq, subject = %dead.original_subject, source = %dead.source, "replay refused: the subject is not one of its stream's");
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "dead letter {} would be replayed to {}, which is not a subject of {}",
                dead.seq, dead.original_subject, dead.source
            ),
        ));
    }
    let mut map = async_nats::HeaderMap::new();
    for (name, values) in message.headers.iter() {
        let name: &str = name.as_ref();
        if !name.starts_with("Hodei-Dlq-") && name != headers::MSG_ID {
            for value in values {
                map.append(name, value.as_str());
            }
        }
    }
    // A new id: the original may still be in the stream's duplicate window.
    map.insert(
        headers::MSG_ID,
        format!("replay-dlq-{}", message.sequence).as_str(),
    );
    publish_durable(
        &state.js,
        dead.original_subject.clone(),
        map,
        message.payload.clone(),
    )
    .await
    .map_err(|e| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("replaying to {}: {e}", dead.original_subject),
        )
    })?;
    stream
        .delete_message(message.sequence)
        .await
        .map_err(|e| unavailable("removing the replayed dead letter")(e.to_string()))?;
    let payload = DeadLetterReplayed {
        dlq_seq: dead.seq,
        original_subject: dead.original_subject.clone(),
        reason: dead.reason.clone(),
    };
    record(&state, &message, request.actor, &payload).await?;
    tracing::info!(seq = dead.seq, subject = %dead.original_subject, "dead letter replayed");
    Ok(dead)
}

#[tracing::instrument(name = "dlq discard", skip_all, fields(seq = request.seq))]
pub async fn discard(state: State, request: DeadLetterRef) -> Result<DeadLetter, ApiError> {
    let stream = dlq(&state).await?;
    let message = message(&stream, request.seq)
        .await?
        .ok_or_else(|| not_found(request.seq))?;
    let dead = view(&message, false);
    stream
        .delete_message(message.sequence)
        .await
        .map_err(|e| unavailable("removing the dead letter")(e.to_string()))?;
    let payload = DeadLetterDiscarded {
        dlq_seq: dead.seq,
        original_subject: dead.original_subject.clone(),
        reason: dead.reason.clone(),
    };
    record(&state, &message, request.actor, &payload).await?;
    tracing::info!(seq = dead.seq, "dead letter discarded");
    Ok(dead)
}

/// The operator's action, in the audit log under the dead message's correlation id.
async fn record<P: EventPayload>(
    state: &State,
    message: &StreamMessage,
    actor: Option<String>,
    payload: &P,
) -> Result<(), ApiError> {
    let actor = Actor(
        actor
            .filter(|a| !a.is_empty() && a.len() <= 128)
            .unwrap_or_else(|| "operator".into()),
    );
    let correlation_id = header(message, headers::CORRELATION_ID);
    let event = DomainEvent::new(Uuid::now_v7(), &correlation_id, &actor, payload);
    hodei_store::audit::record(&state.store, &[event]).await?;
    Ok(())
}
