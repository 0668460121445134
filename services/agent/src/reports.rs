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

/// Send the report of `kind` about `job` (its message id names the worker, the job, the
/// attempt and the kind, so that a report sent again is stored once).
pub async fn send<T: Serialize>(
    client: &Client,
    js: &JetStream,
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
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("cannot subscribe to {inbox}: {e}"),
        )
    })?;
    let mut map = message_headers(&msg_id, Some(correlation_id));
    map.insert(headers::REPLY_TO, inbox.as_str());
    let payload = encode(body);
    let store = || publish_durable(js, subject.clone(), map.clone(), payload.clone());
    store
        .retry(crate::retrying(100, 10_000).with_max_times(5))
        .notify(|error, delay| tracing::warn!(%error, ?delay, "report not stored yet; retrying"))
        .await
        .map_err(|error| ApiError::new(ErrorCode::Unavailable, error.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(30), answers.next()).await {
        Ok(Some(message)) => serde_json::from_slice::<Reply<ReportAccepted>>(&message.payload)
            .map_err(|e| ApiError::internal(format!("unreadable answer: {e}")))?
            .into_result(),
        _ => Err(ApiError::new(
            ErrorCode::Unavailable,
            "the report is stored but no answer came in 30 s",
        )),
    }
}
