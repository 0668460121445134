//! Running the one job: spawn, report started, stream the output, report how it ended.

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use hodei_messaging::{encode, message_headers, publish_durable, JetStream};
use hodei_protocol::agent::{JobFinished, JobStarted, RunJob};
use hodei_protocol::logs::{LogBatch, LogLine, LogStream};
use hodei_protocol::{subjects, ErrorCode};
use hodei_runtime::telemetry::context;
use hodei_runtime::Shutdown;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::reports;

/// Longest log line kept; longer ones are cut (and say so).
const MAX_LINE_BYTES: usize = 16 * 1024;
const MAX_BATCH_LINES: usize = 512;
const MAX_BATCH_BYTES: usize = 256 * 1024;

pub async fn run(
    client: &Client,
    js: &JetStream,
    worker_id: Uuid,
    job: RunJob,
    command_message: Option<&jetstream::Message>,
    parent: opentelemetry::Context,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let span = tracing::info_span!(
        "run",
        otel.name = "run job",
        job_id = %job.job_id,
        correlation_id = %job.correlation_id,
        trace_id = tracing::field::Empty,
    );
    context::adopt(&span, parent);
    execute(client, js, worker_id, job, command_message, shutdown)
        .instrument(span)
        .await
}

async fn execute(
    client: &Client,
    js: &JetStream,
    worker_id: Uuid,
    job: RunJob,
    command_message: Option<&jetstream::Message>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let ack = || async {
        if let Some(message) = command_message {
            let _ = message.ack().await;
        }
    };
    let mut command = Command::new(&job.command);
    command
        .args(&job.args)
        .envs(&job.env)
        .env("HODEI_JOB_ID", job.job_id.to_string())
        .env("HODEI_CORRELATION_ID", &job.correlation_id)
        .env_remove("HODEI_BOOTSTRAP_TOKEN")
        .env_remove("TRACEPARENT")
        .env_remove("TRACESTATE")
        // A traced program continues the job's trace from here.
        .envs(
            context::current()
                .into_iter()
                .map(|(name, value)| (name.to_ascii_uppercase(), value)),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = &job.working_dir {
        command.current_dir(dir);
    }
    let logs = LogShipper::new(js.clone(), job.job_id, job.attempt);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let error = format!("cannot start `{}`: {error}", job.command);
            tracing::warn!(%error, "job could not start");
            ack().await;
            logs.finish(0, None).await;
            report_finished(client, js, worker_id, &job, None, Some(error)).await;
            return Ok(());
        }
    };
    let pid = child.id();
    let started = JobStarted {
        schema_version: hodei_protocol::SCHEMA_VERSION,
        worker_id,
        job_id: job.job_id,
        attempt: job.attempt,
        pid,
    };
    match reports::send(
        client,
        js,
        subjects::agent_started(worker_id),
        format!("{worker_id}.{}.{}.started", job.job_id, job.attempt),
        &job.correlation_id,
        &started,
    )
    .await
    {
        Err(error) if !error.code.is_transient() => {
            tracing::warn!(code = error.code.as_str(), message = %error.message, "start refused; killing the job");
            let _ = child.kill().await;
            ack().await;
            return Ok(());
        }
        answer => log_answer("started", answer),
    }
    // The start is on record: from here a redelivered RunJob must not run the job again.
    ack().await;
    tracing::info!(pid, command = %job.command, "job running");

    let (lines_tx, lines_rx) = mpsc::channel::<LogLine>(4096);
    let stdout = tokio::spawn(read_lines(
        child.stdout.take().expect("stdout is piped"),
        LogStream::Stdout,
        lines_tx.clone(),
    ));
    let stderr = tokio::spawn(read_lines(
        child.stderr.take().expect("stderr is piped"),
        LogStream::Stderr,
        lines_tx,
    ));
    let shipping = tokio::spawn(logs.ship(lines_rx));

    let status = tokio::select! {
        status = child.wait() => status,
        _ = shutdown.wait() => {
            tracing::warn!("agent stopping; killing the job");
            let _ = child.kill().await;
            child.wait().await
        }
    };
    // Output still buffered in the pipes is read; a grandchild that keeps them open is not
    // waited for long.
    for reader in [stdout, stderr] {
        let abort = reader.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let logs = shipping.await.expect("the log shipper does not panic");
    let (exit_code, error) = match &status {
        Ok(status) => match status.code() {
            Some(code) => (Some(code), None),
            None => (
                None,
                Some(format!("the job was ended by a signal ({status})")),
            ),
        },
        Err(e) => (None, Some(format!("cannot wait for the job: {e}"))),
    };
    tracing::info!(?exit_code, ?error, "job ended");
    let batches = logs.seq;
    logs.finish(batches, exit_code).await;
    report_finished(client, js, worker_id, &job, exit_code, error).await;
    Ok(())
}

/// Report how the attempt ended (retried until answered or refused; the answer is logged).
async fn report_finished(
    client: &Client,
    js: &JetStream,
    worker_id: Uuid,
    job: &RunJob,
    exit_code: Option<i32>,
    error: Option<String>,
) {
    let finished = JobFinished {
        schema_version: hodei_protocol::SCHEMA_VERSION,
        worker_id,
        job_id: job.job_id,
        attempt: job.attempt,
        exit_code,
        error,
    };
    let answer = reports::send(
        client,
        js,
        subjects::agent_finished(worker_id),
        format!("{worker_id}.{}.{}.finished", job.job_id, job.attempt),
        &job.correlation_id,
        &finished,
    )
    .await;
    log_answer("finished", answer);
}

fn log_answer(
    kind: &str,
    answer: Result<hodei_protocol::agent::ReportAccepted, hodei_protocol::ApiError>,
) {
    match answer {
        Ok(accepted) => tracing::info!(report = kind, state = %accepted.state, "report accepted"),
        Err(error) if error.code == ErrorCode::Unavailable => {
            tracing::warn!(report = kind, message = %error.message, "report stored, answer pending")
        }
        Err(error) => {
            tracing::warn!(report = kind, code = error.code.as_str(), message = %error.message, "report refused")
        }
    }
}

async fn read_lines<R: AsyncRead + Unpin>(
    pipe: R,
    stream: LogStream,
    lines: mpsc::Sender<LogLine>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let mut line = String::from_utf8_lossy(&buf).into_owned();
                if line.len() > MAX_LINE_BYTES {
                    let mut end = MAX_LINE_BYTES;
                    while !line.is_char_boundary(end) {
                        end -= 1;
                    }
                    line.truncate(end);
                    line.push_str(" [line cut by hodei]");
                }
                if lines.send(LogLine { stream, line }).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Publishes the job's output in numbered batches: whatever accumulated while the previous
/// batch was being stored goes in the next one.
struct LogShipper {
    js: JetStream,
    job_id: Uuid,
    attempt: u32,
    seq: u64,
}

impl LogShipper {
    fn new(js: JetStream, job_id: Uuid, attempt: u32) -> Self {
        LogShipper {
            js,
            job_id,
            attempt,
            seq: 0,
        }
    }

    async fn ship(mut self, mut lines: mpsc::Receiver<LogLine>) -> Self {
        while let Some(first) = lines.recv().await {
            let mut bytes = first.line.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_LINES && bytes < MAX_BATCH_BYTES {
                match lines.try_recv() {
                    Ok(line) => {
                        bytes += line.line.len();
                        batch.push(line);
                    }
                    Err(_) => break,
                }
            }
            self.publish(batch, false, None).await;
        }
        self
    }

    async fn finish(mut self, seq: u64, exit_code: Option<i32>) {
        self.seq = seq;
        self.publish(Vec::new(), true, exit_code).await;
    }

    async fn publish(&mut self, lines: Vec<LogLine>, eof: bool, exit_code: Option<i32>) {
        let batch = LogBatch {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            job_id: self.job_id,
            attempt: self.attempt,
            seq: self.seq,
            lines,
            eof,
            exit_code,
        };
        let msg_id = format!("{}.{}.log.{}", self.job_id, self.attempt, self.seq);
        self.seq += 1;
        let subject = subjects::logs(self.job_id);
        for delay in [0u64, 100, 500, 2000] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            match publish_durable(
                &self.js,
                subject.clone(),
                message_headers(&msg_id, None),
                encode(&batch),
            )
            .await
            {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, seq = batch.seq, "log batch not stored; retrying")
                }
            }
        }
        tracing::error!(seq = batch.seq, lines = batch.lines.len(), "log batch lost");
    }
}
