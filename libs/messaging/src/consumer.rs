//! The one consumer loop: next message or shutdown, decode, handle inside a span, then
//! ack / nak with delay / term from the handler's [`Outcome`]. A message the handler rejects
//! is copied to HODEI_DLQ with its reason before it is terminated.
//!
//! The loop survives a lost consumer or server: it recreates its durable consumer with
//! exponential backoff and jitter (backon) and resumes where the consumer's ack floor is.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use hodei_protocol::ApiError;
use hodei_runtime::Shutdown;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::metrics::ConsumerCounters;
use crate::{header, JetStream};

/// What the loop does with a message once its handler returns.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Handled (or refused for good with an answer): acknowledge.
    Done,
    /// Could not be handled now (database down, conflict): redeliver after the delay.
    Retry { after: Duration, reason: String },
    /// Can never be handled (malformed, unknown): dead-letter it and terminate.
    Reject { reason: String },
    /// Refused for good (a forbidden transition, an unknown id): handling it again would be
    /// refused again, so it is counted by its code, logged and acknowledged.
    Refused(ApiError),
}

impl Outcome {
    pub fn retry(reason: impl std::fmt::Display) -> Outcome {
        Outcome::Retry {
            after: Duration::from_millis(500),
            reason: reason.to_string(),
        }
    }
    pub fn reject(reason: impl std::fmt::Display) -> Outcome {
        Outcome::Reject {
            reason: reason.to_string(),
        }
    }

    /// The usual mapping of a handler's result: malformed input is rejected (dead letter),
    /// transient trouble is retried, and anything else is [`Outcome::Refused`].
    pub fn from_result<T>(result: Result<T, ApiError>) -> Outcome {
        use hodei_protocol::ErrorCode::*;
        match result {
            Ok(_) => Outcome::Done,
            Err(error) => match error.code {
                BadRequest | PayloadTooLarge | UnsupportedSchemaVersion => Outcome::reject(error),
                code if code.is_transient() => Outcome::retry(error),
                _ => Outcome::Refused(error),
            },
        }
    }
}

/// One message as handlers see it.
pub struct Delivery {
    pub subject: String,
    pub headers: Option<async_nats::HeaderMap>,
    pub payload: Bytes,
    /// 1 on first delivery.
    pub delivered: i64,
    /// The message's sequence number in its stream.
    pub stream_sequence: u64,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(self.headers.as_ref(), name)
    }
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        crate::decode(&self.payload)
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub stream: &'static str,
    pub durable: String,
    /// The subjects it takes (NATS 2.10's filter subjects); none takes the whole stream.
    pub filter_subjects: Vec<String>,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// For [`run_batched`]: how long a batch may wait for more messages after its first.
    /// Zero (the default) handles what is already waiting at once.
    pub gather: Duration,
}

impl ConsumerConfig {
    /// `filters`: the subjects taken (`None` or an empty list: the whole stream).
    pub fn new(
        stream: &'static str,
        durable: impl Into<String>,
        filters: impl IntoIterator<Item = String>,
    ) -> Self {
        ConsumerConfig {
            stream,
            durable: durable.into(),
            filter_subjects: filters.into_iter().collect(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            gather: Duration::ZERO,
        }
    }

    /// Let [`run_batched`] gather a batch for up to `window` after its first message: fewer,
    /// larger batches for a consumer whose work is not on a job's path.
    pub fn gathering(mut self, window: Duration) -> Self {
        self.gather = window;
        self
    }
}

/// Run `handler` on every message of the consumer until shutdown, counting into `metrics`.
/// In-flight handling finishes before this returns; unacknowledged messages stay in the
/// stream for the next run.
pub async fn run<H, F>(
    js: JetStream,
    config: ConsumerConfig,
    metrics: &crate::Metrics,
    shutdown: Shutdown,
    mut handler: H,
) where
    H: FnMut(Delivery) -> F,
    F: Future<Output = Outcome>,
{
    let counters = metrics.consumer(&config.durable);
    while let Some(mut messages) = open_until_shutdown(&js, &config, &shutdown).await {
        loop {
            let Some(next) = shutdown.run_until_cancelled(messages.next()).await else {
                return;
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::warn!(consumer = %config.durable, %error, "consumer stream failed; reopening");
                    break;
                }
                None => {
                    tracing::warn!(consumer = %config.durable, "consumer stream ended; reopening");
                    break;
                }
            };
            handle(&js, &config, &counters, message, &mut handler).await;
        }
    }
}

/// Open (or reopen) the durable consumer, retrying with backoff; `None` once shut down.
async fn open_until_shutdown(
    js: &JetStream,
    config: &ConsumerConfig,
    shutdown: &Shutdown,
) -> Option<pull::Stream> {
    use backon::Retryable;
    let opened = (|| open(js, config))
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times(),
        )
        .notify(|error, delay| {
            tracing::warn!(consumer = %config.durable, %error, ?delay, "cannot open consumer; retrying")
        });
    match shutdown.run_until_cancelled(opened).await? {
        Ok(messages) => {
            tracing::info!(consumer = %config.durable, stream = config.stream, "consuming");
            Some(messages)
        }
        Err(error) => {
            tracing::error!(consumer = %config.durable, %error, "gave up opening the consumer");
            None
        }
    }
}

async fn open(js: &JetStream, config: &ConsumerConfig) -> Result<pull::Stream, async_nats::Error> {
    let stream = js.get_stream(config.stream).await?;
    // One filter goes in `filter_subject`, as the server reports it back.
    let (filter_subject, filter_subjects) = match config.filter_subjects.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    let wanted = pull::Config {
        durable_name: Some(config.durable.clone()),
        filter_subject,
        filter_subjects,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver,
        max_ack_pending: 1000,
        ..Default::default()
    };
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(&config.durable, wanted.clone())
        .await?;
    // A consumer made by an earlier version that took other subjects takes these from now
    // on: it keeps its place in the stream.
    let had = &consumer.cached_info().config;
    if (&had.filter_subject, &had.filter_subjects)
        != (&wanted.filter_subject, &wanted.filter_subjects)
    {
        tracing::info!(consumer = %config.durable, from = ?(&had.filter_subject, &had.filter_subjects), to = ?config.filter_subjects, "the consumer's subjects changed; updating it");
        consumer = stream.update_consumer(wanted).await?;
    }
    let got = &consumer.cached_info().config;
    if !config.filter_subjects.is_empty()
        && got.filter_subject.is_empty()
        && got.filter_subjects.is_empty()
    {
        // NATS before 2.10 ignores several filter subjects: every message comes, and the
        // handler acknowledges those it has nothing to do with.
        tracing::warn!(consumer = %config.durable, "the server ignored the consumer's filter subjects (NATS before 2.10?); it takes the whole stream");
    }
    Ok(pull_stream(&consumer).await?)
}

/// How long a pull request waits for messages: a request left on a node that is gone or cut
/// off is replaced after this (and a few seconds), whatever happened to it.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server says it is alive this often while there is nothing to deliver; two missed in
/// a row end the stream, and the loop opens it again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(4);

/// The messages of `consumer`, pulled with short requests and heartbeats, so that a request
/// lost with a NATS node (a node killed, or partitioned from the others) stalls it seconds,
/// not minutes. Every consumer loop (and the agent's commands) reads through this.
pub async fn pull_stream(
    consumer: &jetstream::consumer::PullConsumer,
) -> Result<pull::Stream, jetstream::consumer::StreamError> {
    consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
}

async fn handle<H, F>(
    js: &JetStream,
    config: &ConsumerConfig,
    counters: &ConsumerCounters,
    message: jetstream::Message,
    handler: &mut H,
) where
    H: FnMut(Delivery) -> F,
    F: Future<Output = Outcome>,
{
    let (delivery, span) = prepare(config, counters, &message);
    let outcome = handler(delivery).instrument(span.clone()).await;
    settle(js, config, counters, &message, outcome, &span).await;
}

/// [`run`], with up to `limit` messages handled at once (in this task): for handlers that
/// wait on something outside (a worker's teardown waits for its agent to stop), so that one
/// slow message does not hold up the others. Each message is settled when its handler ends.
pub async fn run_concurrently<H, F>(
    js: JetStream,
    config: ConsumerConfig,
    limit: usize,
    metrics: &crate::Metrics,
    shutdown: Shutdown,
    handler: H,
) where
    H: Fn(Delivery) -> F,
    F: Future<Output = Outcome>,
{
    use futures::stream::FuturesUnordered;
    let counters = metrics.consumer(&config.durable);
    let (js_ref, config_ref, counters_ref, handler_ref) = (&js, &config, &counters, &handler);
    while let Some(mut messages) = open_until_shutdown(&js, &config, &shutdown).await {
        let mut in_flight = FuturesUnordered::new();
        let reopen = loop {
            tokio::select! {
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = messages.next(), if in_flight.len() < limit.max(1) => match next {
                    Some(Ok(message)) => in_flight.push(async move {
                        let mut handler = handler_ref;
                        handle(js_ref, config_ref, counters_ref, message, &mut handler).await
                    }),
                    Some(Err(error)) => {
                        tracing::warn!(consumer = %config.durable, %error, "consumer stream failed; reopening");
                        break true;
                    }
                    None => {
                        tracing::warn!(consumer = %config.durable, "consumer stream ended; reopening");
                        break true;
                    }
                },
                () = shutdown.cancelled() => break false,
            }
        };
        while in_flight.next().await.is_some() {}
        if !reopen {
            return;
        }
    }
}

/// Run `handler` on batches of messages until shutdown: a batch is every message already
/// waiting (up to `max_batch`) once one arrives, so that a backlog is written in few round
/// trips while a lone message is handled at once (or, with [`ConsumerConfig::gathering`],
/// every message that arrives within that window). The handler answers an outcome per
/// message, in order; each message is then settled as [`run`] settles it.
pub async fn run_batched<H, F>(
    js: JetStream,
    config: ConsumerConfig,
    max_batch: usize,
    metrics: &crate::Metrics,
    shutdown: Shutdown,
    mut handler: H,
) where
    H: FnMut(Vec<(Delivery, tracing::Span)>) -> F,
    F: Future<Output = Vec<Outcome>>,
{
    use futures::FutureExt;
    let counters = metrics.consumer(&config.durable);
    while let Some(mut messages) = open_until_shutdown(&js, &config, &shutdown).await {
        'stream: loop {
            let Some(first) = shutdown.run_until_cancelled(messages.next()).await else {
                return;
            };
            let mut batch = Vec::with_capacity(max_batch);
            let mut next = first;
            let gathered = tokio::time::Instant::now() + config.gather;
            loop {
                match next {
                    Some(Ok(message)) => batch.push(message),
                    Some(Err(error)) => {
                        tracing::warn!(consumer = %config.durable, %error, "consumer stream failed; reopening");
                        settle_batch(&js, &config, &counters, batch, &mut handler).await;
                        break 'stream;
                    }
                    None => {
                        tracing::warn!(consumer = %config.durable, "consumer stream ended; reopening");
                        settle_batch(&js, &config, &counters, batch, &mut handler).await;
                        break 'stream;
                    }
                }
                if batch.len() >= max_batch {
                    break;
                }
                let more = match config.gather.is_zero() {
                    true => messages.next().now_or_never(),
                    false => tokio::time::timeout_at(gathered, messages.next())
                        .await
                        .ok(),
                };
                match more {
                    Some(more) => next = more,
                    None => break,
                }
            }
            settle_batch(&js, &config, &counters, batch, &mut handler).await;
        }
    }
}

async fn settle_batch<H, F>(
    js: &JetStream,
    config: &ConsumerConfig,
    counters: &ConsumerCounters,
    batch: Vec<jetstream::Message>,
    handler: &mut H,
) where
    H: FnMut(Vec<(Delivery, tracing::Span)>) -> F,
    F: Future<Output = Vec<Outcome>>,
{
    if batch.is_empty() {
        return;
    }
    let prepared: Vec<(Delivery, tracing::Span)> =
        batch.iter().map(|m| prepare(config, counters, m)).collect();
    let spans: Vec<tracing::Span> = prepared.iter().map(|(_, span)| span.clone()).collect();
    let mut outcomes = handler(prepared).await.into_iter();
    for (message, span) in batch.iter().zip(&spans) {
        let outcome = outcomes
            .next()
            .unwrap_or_else(|| Outcome::retry("the batch handler gave no outcome for it"));
        settle(js, config, counters, message, outcome, span).await;
    }
}

/// The message as handlers see it, and the span its handling runs in (a child of the trace
/// context the message carries).
fn prepare(
    config: &ConsumerConfig,
    counters: &ConsumerCounters,
    message: &jetstream::Message,
) -> (Delivery, tracing::Span) {
    let (delivered, stream_sequence) = message
        .info()
        .map(|info| (info.delivered, info.stream_sequence))
        .unwrap_or((1, 0));
    let delivery = Delivery {
        stream_sequence,
        subject: message.subject.to_string(),
        headers: message.headers.clone(),
        payload: message.payload.clone(),
        delivered,
    };
    let span = tracing::info_span!(
        "handle",
        otel.name = format!("{} {}", config.durable, delivery.subject.rsplit('.').next().unwrap_or_default()),
        otel.kind = "consumer",
        consumer = %config.durable,
        subject = %delivery.subject,
        delivered,
        correlation_id = delivery.header(hodei_protocol::headers::CORRELATION_ID).unwrap_or(""),
        trace_id = tracing::field::Empty,
    );
    hodei_runtime::telemetry::context::adopt(
        &span,
        crate::trace::parent_of(delivery.headers.as_ref()),
    );
    if delivered > 1 {
        counters.redelivered.inc();
    }
    (delivery, span)
}

/// Acknowledge, redeliver later, or dead-letter the message, by its handler's outcome.
async fn settle(
    js: &JetStream,
    config: &ConsumerConfig,
    counters: &ConsumerCounters,
    message: &jetstream::Message,
    outcome: Outcome,
    span: &tracing::Span,
) {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let outcome = match outcome {
        // The last delivery NATS will make: dead-letter it rather than let it vanish.
        Outcome::Retry { reason, .. }
            if config.max_deliver > 0 && delivered >= config.max_deliver =>
        {
            Outcome::Reject {
                reason: format!("gave up after {delivered} deliveries: {reason}"),
            }
        }
        outcome => outcome,
    };
    match &outcome {
        Outcome::Done | Outcome::Refused(_) => counters.done.inc(),
        Outcome::Retry { .. } => counters.retry.inc(),
        Outcome::Reject { .. } => counters.rejected.inc(),
    };
    let _entered = span.enter();
    let acked = match outcome {
        Outcome::Done => message.ack().await,
        Outcome::Refused(error) => {
            counters.metrics.refused(&error);
            message.ack().await
        }
        Outcome::Retry { after, reason } => {
            tracing::warn!(%reason, ?after, "handling failed; the message will be redelivered");
            message.ack_with(AckKind::Nak(Some(after))).await
        }
        Outcome::Reject { reason } => {
            tracing::error!(%reason, "message rejected; moving it to the dead-letter stream");
            if let Err(error) = dead_letter(js, config, message, &reason).await {
                tracing::error!(%error, "cannot dead-letter the message; it will be redelivered");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await
            } else {
                counters.dead_lettered.inc();
                message.ack_with(AckKind::Term).await
            }
        }
    };
    if let Err(error) = acked {
        tracing::warn!(%error, "acknowledgement failed; the message may be redelivered");
    }
}

/// Copy a message to `hodei.dlq.<consumer>` with where it came from and why it failed.
async fn dead_letter(
    js: &JetStream,
    config: &ConsumerConfig,
    message: &jetstream::Message,
    reason: &str,
) -> crate::Result<()> {
    let mut headers = message.headers.clone().unwrap_or_default();
    let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    // The original message id would make the DLQ stream drop the copy as a duplicate.
    headers.insert(
        hodei_protocol::headers::MSG_ID,
        format!("dlq-{}-{}-{stream_seq}", config.stream, config.durable).as_str(),
    );
    headers.insert("Hodei-Dlq-Reason", truncate(reason, 1024));
    headers.insert("Hodei-Dlq-Subject", message.subject.as_str());
    headers.insert("Hodei-Dlq-Stream", config.stream);
    headers.insert("Hodei-Dlq-Consumer", config.durable.as_str());
    let subject = format!("hodei.dlq.{}.{}", config.stream, config.durable);
    crate::publish_durable(js, subject, headers, message.payload.clone()).await
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
