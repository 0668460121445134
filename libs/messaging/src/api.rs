//! Request/reply endpoints (`hodei.api.*`, the agents' `hodei.agent.*.register`) and the
//! client side of them.
//!
//! Every service that answers requests is a NATS micro service ([`Service::start`], the
//! async-nats `service` API): `nats micro ls`, `info` and `stats` (or `$SRV.PING`,
//! `$SRV.INFO`, `$SRV.STATS`) list it, its endpoints, how many requests each answered, how
//! long they took and, in each endpoint's `data`, how many it refused. The subjects and the
//! answers are Hodei's own, as the AsyncAPI document says: [`Service::serve`] decodes each
//! request strictly, runs the handler (many at once, bounded) and answers `Reply<T>`, data
//! or a typed error whose code is also in the `Hodei-Error-Code` header. Requests are shared
//! by every instance of a service through its queue group.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::service::ServiceExt;
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

/// Refusals by endpoint name, reported in the endpoints' stats (`data.refused`).
type Refusals = Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>;

/// One Hodei service as a NATS micro service: its endpoints are added with [`Self::serve`].
pub struct Service {
    inner: async_nats::service::Service,
    client: Client,
    refusals: Refusals,
    metrics: crate::Metrics,
}

impl Service {
    /// Register `name` (`hodei-scheduler`, ...) with the version of this build; every
    /// endpoint answers in the queue group `queue_group` and counts its refusals in
    /// `metrics` (`hodei_refusals_total{code}`) as well as in its stats.
    pub async fn start(
        client: Client,
        name: &str,
        description: &str,
        queue_group: &str,
        metrics: &crate::Metrics,
    ) -> crate::Result<Service> {
        let refusals = Refusals::default();
        let counts = refusals.clone();
        let inner = client
            .service_builder()
            .description(description)
            .queue_group(queue_group)
            .stats_handler(move |endpoint, _| {
                let refused = counts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&endpoint)
                    .map_or(0, |n| n.load(Ordering::Relaxed));
                serde_json::json!({ "refused": refused })
            })
            .start(name, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(nats(format!("registering the micro service {name}")))?;
        tracing::info!(service = name, "micro service registered");
        Ok(Service {
            inner,
            client,
            refusals,
            metrics: metrics.clone(),
        })
    }

    /// Serve `subject` until shutdown; in-flight requests are finished before it returns.
    /// The endpoint's name is the subject's last tokens without wildcards
    /// (`hodei.api.jobs.submit` → `jobs-submit`, `hodei.agent.*.register` → `agent-register`).
    pub async fn serve<Req, Resp, H, F>(
        &self,
        subject: &str,
        shutdown: Shutdown,
        handler: H,
    ) -> crate::Result<()>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Fn(Req, RequestContext) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Resp, ApiError>> + Send + 'static,
    {
        let name = endpoint_name(subject);
        let refused = Arc::new(AtomicU64::new(0));
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), refused.clone());
        let mut requests = self
            .inner
            .endpoint_builder()
            .name(&name)
            .add(subject)
            .await
            .map_err(nats(format!("serving {subject}")))?;
        tracing::info!(subject, endpoint = %name, "serving");
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(Some(request)) = shutdown.run_until_cancelled(requests.next()).await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (handler, refused, metrics) =
                (handler.clone(), refused.clone(), self.metrics.clone());
            let message = &request.message;
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
                    let message = &request.message;
                    let context = RequestContext {
                        subject: message.subject.to_string(),
                        headers: message.headers.clone(),
                    };
                    let result = match crate::decode::<Req>(&message.payload) {
                        Ok(body) => handler(body, context).await,
                        Err(error) => Err(error),
                    };
                    if let Err(error) = &result {
                        refused.fetch_add(1, Ordering::Relaxed);
                        metrics.refused(error);
                    }
                    if message.reply.is_some() {
                        let (headers, payload) = reply_of(result);
                        if let Err(error) = request.respond_with_headers(Ok(payload), headers).await
                        {
                            tracing::warn!(%error, "cannot send the reply");
                        }
                    }
                    drop(permit);
                }
                .instrument(span),
            );
            while tasks.try_join_next().is_some() {}
        }
        let _ = requests.stop().await;
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Leave the micro service (its `$SRV` subjects) once every endpoint has ended.
    pub async fn stop(self) {
        let _ = self.inner.stop().await;
        let _ = self.client.flush().await;
    }
}

/// `hodei.api.jobs.submit` → `jobs-submit`; `hodei.agent.*.register` → `agent-register`;
/// `hodei.api.dlq.>` → `dlq`.
fn endpoint_name(subject: &str) -> String {
    let tokens: Vec<&str> = subject
        .split('.')
        .filter(|t| !matches!(*t, "*" | ">" | "hodei" | "api"))
        .collect();
    tokens.join("-")
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

/// Log a refusal: as an error when it is transient trouble, a warning otherwise.
pub(crate) fn log_refusal(error: &ApiError) {
    if error.code.is_transient() {
        tracing::error!(code = error.code.as_str(), message = %error.message, "request failed");
    } else {
        tracing::warn!(code = error.code.as_str(), message = %error.message, "request refused");
    }
}

/// The `Reply` envelope of a result, and its headers (the error code of a refusal).
fn reply_of<T: Serialize>(result: Result<T, ApiError>) -> (HeaderMap, bytes::Bytes) {
    let mut map = HeaderMap::new();
    let reply = match result {
        Ok(data) => Reply::ok(data),
        Err(error) => {
            map.insert(headers::ERROR_CODE, error.code.as_str());
            Reply::err(error)
        }
    };
    (map, encode(&reply))
}

/// Publish a `Reply` (data or typed error) to `reply_to`.
pub async fn respond<T: Serialize>(
    client: &Client,
    reply_to: &str,
    result: Result<T, ApiError>,
) -> crate::Result<()> {
    let (map, payload) = reply_of(result);
    client
        .publish_with_headers(reply_to.to_owned(), map, payload)
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
