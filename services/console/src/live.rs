//! Server-Sent Events for the pages' live updates, from the session's own connection: the
//! ids of jobs whose events arrive (a page then fetches what changed), and a job's log lines
//! from its log stream.

use std::convert::Infallible;
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use hodei_protocol::logs::{LogBatch, LogStream};
use serde::Deserialize;
use uuid::Uuid;

use crate::session::Session;
use crate::{App, Failure, Operator};

#[derive(Deserialize)]
pub struct Which {
    /// Only this job's events.
    #[serde(default)]
    job: Option<Uuid>,
}

/// `data: <job id>` for every job event (of one job, with `?job=`).
pub async fn job_events(
    State(app): State<Arc<App>>,
    Operator(session): Operator,
    Query(which): Query<Which>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    let subject = match which.job {
        Some(job_id) => format!("hodei.events.job.{job_id}.>"),
        None => "hodei.events.job.>".to_owned(),
    };
    let events = session.client.subscribe(subject).await.map_err(|e| {
        Failure::Api(hodei_protocol::ApiError::new(
            hodei_protocol::ErrorCode::Unavailable,
            format!("cannot follow job events: {e}"),
        ))
    })?;
    let ids = events.filter_map(|message| async move {
        let job_id = message.subject.split('.').nth(3)?.to_owned();
        Some(Ok(Event::default().data(job_id)))
    });
    let ids = ids.take_until(ends(&app, &session));
    Ok(Sse::new(ids).keep_alive(KeepAlive::default()))
}

/// The job's log lines as `data: {"stream": ..., "line": ...}`, from its first; `event: end`
/// after the last.
pub async fn logs(
    State(app): State<Arc<App>>,
    Operator(session): Operator,
    Path(job_id): Path<Uuid>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    let unavailable = |e: String| {
        Failure::Api(hodei_protocol::ApiError::new(
            hodei_protocol::ErrorCode::Unavailable,
            format!("cannot read the job's logs: {e}"),
        ))
    };
    let stream = session
        .js
        .get_stream(hodei_messaging::streams::LOGS)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: hodei_protocol::subjects::logs(job_id),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let lines = messages
        .take_while(|message| futures::future::ready(message.is_ok()))
        .filter_map(|message| async move {
            let batch: LogBatch = serde_json::from_slice(&message.ok()?.payload).ok()?;
            let mut events: Vec<Result<Event, Infallible>> = batch
                .lines
                .iter()
                .map(|line| {
                    let stream = match line.stream {
                        LogStream::Stderr => "stderr",
                        _ => "stdout",
                    };
                    let data = serde_json::json!({"stream": stream, "line": line.line});
                    Ok(Event::default().data(data.to_string()))
                })
                .collect();
            if batch.eof {
                events.push(Ok(Event::default().event("end").data("")));
            }
            Some(futures::stream::iter(events))
        })
        .flatten()
        .take_until(ends(&app, &session));
    Ok(Sse::new(lines).keep_alive(KeepAlive::default()))
}

/// When a live stream ends: at the console's stop or at its session's expiry.
fn ends(app: &App, session: &Session) -> impl std::future::Future<Output = ()> + Send + 'static {
    let stop = app.shutdown.clone().cancelled_owned();
    let expiry = tokio::time::sleep_until(session.expires.into());
    async move {
        tokio::select! {
            () = stop => {}
            () = expiry => {}
        }
    }
}
