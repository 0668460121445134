//! Reports to the scheduler: stored in HODEI_AGENT first (so none is lost), then answered
//! on our own inbox, so that a refusal reaches the agent as a typed error.

use std::time::Duration;

use async_nats::Client;
use backon::Retryable;
use futures::StreamExt;
use hodei_messaging::{encode, message_headers, publish_durable, JetStream};
use hodei_protocol::agent::ReportAccepted;
use hodei_protocol::{headers, ApiError, ErrorCode, Reply};
use serde::Serialize;

pub async fn send<T: Serialize>(
    client: &Client,
    js: &JetStream,
    subject: String,
    msg_id: String,
    correlation_id: &str,
    body: &T,
) -> Result<ReportAccepted, ApiError> {
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
