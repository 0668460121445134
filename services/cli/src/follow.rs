//! Reading a job's logs and events from JetStream with ordered consumers.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::StreamExt;
use hodei_domain::{DomainEvent, JobState};
use hodei_messaging::api::request;
use hodei_protocol::api::{GetJob, JobView};
use hodei_protocol::logs::{LogBatch, LogStream};
use hodei_protocol::subjects;
use uuid::Uuid;

async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
) -> anyhow::Result<jetstream::consumer::pull::Ordered> {
    let stream = js
        .get_stream(stream)
        .await
        .with_context(|| format!("opening stream {stream}"))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("creating an ordered consumer")?;
    consumer.messages().await.context("reading messages")
}

fn print_batch(batch: &LogBatch, json: bool) {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    for line in &batch.lines {
        if json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"seq": batch.seq, "stream": line.stream, "line": line.line})
            );
        } else if line.stream == LogStream::Stderr {
            let _ = writeln!(err, "{}", line.line);
        } else {
            let _ = writeln!(out, "{}", line.line);
        }
    }
    let _ = out.flush();
}

/// Print the job's output; without `follow`, stop at what is stored now.
pub async fn logs(
    js: &jetstream::Context,
    job_id: Uuid,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut messages = ordered(js, hodei_messaging::streams::LOGS, subjects::logs(job_id)).await?;
    loop {
        let next = if follow {
            messages.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                Ok(next) => next,
                Err(_) => return Ok(()),
            }
        };
        let Some(message) = next else { return Ok(()) };
        let message = message.context("reading logs")?;
        let batch: LogBatch =
            serde_json::from_slice(&message.payload).context("unreadable log batch")?;
        print_batch(&batch, json);
        let caught_up = message.info().map(|i| i.pending == 0).unwrap_or(false);
        if batch.eof || (!follow && caught_up) {
            return Ok(());
        }
    }
}

/// Whether an event ends its job.
fn ends_job(event: &DomainEvent) -> bool {
    match event.event_type.as_str() {
        "JobCompleted" | "JobExecutionError" => true,
        "JobStatusChanged" => event
            .payload
            .get("to")
            .and_then(|to| serde_json::from_value::<JobState>(to.clone()).ok())
            .is_some_and(JobState::is_terminal),
        _ => false,
    }
}

/// Follow the job's output and events until it has ended and its output is complete.
pub async fn run_to_end(
    client: &async_nats::Client,
    js: &jetstream::Context,
    job_id: Uuid,
    timeout: Duration,
) -> anyhow::Result<JobView> {
    let logs = tokio::spawn({
        let js = js.clone();
        async move { logs(&js, job_id, true, false).await }
    });
    let mut events = ordered(
        js,
        hodei_messaging::streams::EVENTS,
        subjects::job_events(job_id),
    )
    .await?;
    while let Some(message) = events.next().await {
        let message = message.context("reading job events")?;
        let event: DomainEvent =
            serde_json::from_slice(&message.payload).context("unreadable event")?;
        if ends_job(&event) {
            break;
        }
    }
    // The output's last batch is stored before the job's end is reported; if the agent died
    // without writing it, do not wait for ever.
    let logs_abort = logs.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), logs)
        .await
        .is_err()
    {
        logs_abort.abort();
        eprintln!("hodei: the job ended but its output is incomplete");
    }
    request(
        client,
        subjects::API_JOBS_GET,
        None,
        &GetJob {
            schema_version: 1,
            job_id,
        },
        timeout,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{} ({})", e.message, e.code.as_str()))
}
