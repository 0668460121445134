//! Reports to the scheduler: stored in HODEI_AGENT first (so none is lost), then answered
//! on our own inbox, so that a refusal reaches the agent as a typed error.

use std::time::Duration;

use async_nats::Client;
use backon::Retryable;
use futures::StreamExt;
use hodei_messaging::{encode, message_headers, publish_durable, JetStream};
use hodei_protocol::agent::{ReportAccepted, RunJob};
use hodei_protocol::{headers, subjects, ApiError, ErrorCode, Reply};
use serde::Serialize;

/// Which report: its subject is `hodei.agent.<worker_id>.<kind>`.
#[derive(Clone, Copy)]
pub enum Kind {
    Started,
    Finished,
}

/// Where the scheduler's answers to this agent's reports come: one subscription for the
/// agent's life (one per report would cost the server a SUB and an UNSUB each), each report
/// answered on a subject of its own below it, so that a late answer to an earlier report
/// is never taken for this one's.
#[derive(Default)]
pub struct Answers {
    /// The subscription to `<inbox>.*`, made with the first report.
    subscription: tokio::sync::Mutex<Option<(String, async_nats::Subscriber)>>,
    next: std::sync::atomic::AtomicU64,
}

/// Send the report of `kind` about `job` (its message id names the worker, the job, the
/// attempt and the kind, so that a report sent again is stored once).
pub async fn send<T: Serialize>(
    client: &Client,
    js: &JetStream,
    answers: &Answers,
    worker_id: uuid::Uuid,
    job: &RunJob,
    kind: Kind,
    body: &T,
) -> Result<ReportAccepted, ApiError> {
    let (subject, name) = match kind {
        Kind::Started => (subjects::agent_started(worker_id), "started"),
        Kind::Finished => (subjects::agent_finished(worker_id), "finished"),
    };
    let msg_id = format!("{worker_id}.{}.{}.{name}", job.job_id, job.attempt);
    let correlation_id = job.correlation_id.as_str();
    let mut subscription = answers.subscription.lock().await;
    if subscription.is_none() {
        let prefix = client.new_inbox();
        let subscribed = client.subscribe(format!("{prefix}.*")).await.map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("cannot subscribe to {prefix}.*: {e}"),
            )
        })?;
        *subscription = Some((prefix, subscribed));
    }
    let (prefix, incoming) = subscription.as_mut().expect("subscribed above");
    let inbox = format!(
        "{prefix}.{}",
        answers
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut map = message_headers(&msg_id, Some(correlation_id));
    map.insert(headers::REPLY_TO, inbox.as_str());
    let payload = encode(body);
    let store = || publish_durable(js, subject.clone(), map.clone(), payload.clone());
    store
        .retry(crate::retrying(100, 10_000).with_max_times(5))
        .notify(|error, delay| tracing::warn!(%error, ?delay, "report not stored yet; retrying"))
        .await
        .map_err(|error| ApiError::new(ErrorCode::Unavailable, error.to_string()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, incoming.next()).await {
            Ok(Some(message)) if message.subject.as_str() == inbox => {
                return serde_json::from_slice::<Reply<ReportAccepted>>(&message.payload)
                    .map_err(|e| ApiError::internal(format!("unreadable answer: {e}")))?
                    .into_result();
            }
            // A late answer to an earlier report (one delivered again, say).
            Ok(Some(_)) => continue,
            Ok(None) => {
                // The subscription ended with the connection: the next report makes another.
                *subscription = None;
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the report is stored but its answer's subscription ended",
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the report is stored but no answer came in 30 s",
                ))
            }
        }
    }
}
