//! Request/reply endpoints (`hodei.api.*`) and the client side of them.
//!
//! [`serve`] decodes each request strictly, runs the handler (many at once, bounded) and
//! answers `Reply<T>`: data, or a typed error whose code is also in the `Hodei-Error-Code`
//! header. Requests are shared by every instance of a service through a queue group.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use hodei_protocol::{headers, ApiError, ErrorCode, Reply};
use hodei_runtime::Shutdown;
use serde::{de::DeserializeOwned, Serialize};
use tracing::Instrument;

use crate::{encode, header, nats, MessagingError};

/// At most this many requests of one endpoint are handled at once.
const MAX_IN_FLIGHT: usize = 256;

/// What a handler knows of the request besides its body.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub subject: String,
    pub headers: Option<HeaderMap>,
}

impl RequestContext {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(self.headers.as_ref(), name)
    }
}

/// Serve `subject` until shutdown; in-flight requests are finished before it returns.
pub async fn serve<Req, Resp, H, F>(
    client: Client,
    subject: &str,
    queue_group: &str,
    shutdown: Shutdown,
    handler: H,
) -> crate::Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(Req, RequestContext) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Resp, ApiError>> + Send + 'static,
{
    let mut requests = client
        .queue_subscribe(subject.to_owned(), queue_group.to_owned())
        .await
        .map_err(nats(format!("subscribing to {subject}")))?;
    tracing::info!(subject, "serving");
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(Some(message)) = shutdown.guard(requests.next()).await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (client, handler) = (client.clone(), handler.clone());
        let span = tracing::info_span!(
            "request",
            otel.name = %subject_pattern(&message.subject),
            otel.kind = "server",
            subject = %message.subject,
            correlation_id = header(message.headers.as_ref(), headers::CORRELATION_ID).unwrap_or(""),
            trace_id = tracing::field::Empty,
        );
        hodei_runtime::telemetry::context::adopt(
            &span,
            crate::trace::parent_of(message.headers.as_ref()),
        );
        tasks.spawn(
            async move {
                let context = RequestContext {
                    subject: message.subject.to_string(),
                    headers: message.headers.clone(),
                };
                let result = match crate::decode::<Req>(&message.payload) {
                    Ok(request) => handler(request, context).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = &result {
                    log_refusal(error);
                }
                if let Some(reply) = message.reply {
                    let reply_to = reply.to_string();
                    if let Err(error) = respond(&client, &reply_to, result).await {
                        tracing::warn!(%error, "cannot send the reply");
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
        while tasks.try_join_next().is_some() {}
    }
    let _ = requests.unsubscribe().await;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The endpoint a request went to, without the ids in it (`hodei.agent.*.register`).
fn subject_pattern(subject: &str) -> String {
    subject
        .split('.')
        .map(|token| {
            if token.parse::<uuid::Uuid>().is_ok() {
                "*"
            } else {
                token
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

pub fn log_refusal(error: &ApiError) {
    hodei_runtime::metrics::counter(
        "hodei_refusals_total",
        "Requests and messages refused, by error code",
        &[("code", error.code.as_str())],
    )
    .inc();
    if error.code.is_transient() {
        tracing::error!(code = error.code.as_str(), message = %error.message, "request failed");
    } else {
        tracing::warn!(code = error.code.as_str(), message = %error.message, "request refused");
    }
}

/// Publish a `Reply` (data or typed error) to `reply_to`.
pub async fn respond<T: Serialize>(
    client: &Client,
    reply_to: &str,
    result: Result<T, ApiError>,
) -> crate::Result<()> {
    let mut map = HeaderMap::new();
    let reply = match result {
        Ok(data) => Reply::ok(data),
        Err(error) => {
            map.insert(headers::ERROR_CODE, error.code.as_str());
            Reply::err(error)
        }
    };
    client
        .publish_with_headers(reply_to.to_owned(), map, encode(&reply))
        .await
        .map_err(nats(format!("replying on {reply_to}")))
}

/// Send a request and decode its `Reply`. Transport failures come back as `UNAVAILABLE`.
pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
    client: &Client,
    subject: &str,
    headers: Option<HeaderMap>,
    body: &Req,
    timeout: Duration,
) -> Result<Resp, ApiError> {
    let mut headers = headers.unwrap_or_default();
    crate::trace::inject_current(&mut headers);
    let call = client.request_with_headers(subject.to_owned(), headers, encode(body));
    let message = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(message)) => message,
        Ok(Err(error)) => {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("no answer on {subject}: {error}"),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("no answer on {subject} within {timeout:?}"),
            ))
        }
    };
    let reply: Reply<Resp> = serde_json::from_slice(&message.payload)
        .map_err(|e| ApiError::internal(format!("unreadable reply on {subject}: {e}")))?;
    reply.into_result()
}

impl From<MessagingError> for ApiError {
    fn from(error: MessagingError) -> Self {
        match error {
            MessagingError::Api(api) => api,
            other => ApiError::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}
