//! Running the one job: spawn, report started, stream the output, report how it ended.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use backon::Retryable;
use hodei_messaging::{encode, message_headers, publish_durable, JetStream};
use hodei_protocol::agent::{JobFinished, JobStarted, RunJob};
use hodei_protocol::logs::{LogBatch, LogLine, LogStream};
use hodei_protocol::{subjects, ErrorCode};
use hodei_runtime::telemetry::context;
use hodei_runtime::Shutdown;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::reports;
use crate::spawn::Spawn;

/// Longest log line kept; longer ones are cut (and say so).
const MAX_LINE_BYTES: usize = 16 * 1024;
const MAX_BATCH_LINES: usize = 512;
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Who a job runs as and with which limits; its environment is built from an allow-list.
pub struct Runner {
    /// uid, gid and home of the jobs' user, when the agent runs as root and drops to it.
    user: Option<(u32, u32, String)>,
    /// An error that fails every job (the configured user does not exist).
    refused: Option<String>,
    max_open_files: u64,
    max_processes: u64,
    /// The agent's LANG and TZ (the only settings of its own a job inherits).
    locale: Vec<(&'static str, String)>,
    /// A job that ends this soon after its start is reported once (see
    /// `Config::report_together_ms`).
    report_together_within: Option<Duration>,
    /// Where the answers to this agent's reports come.
    answers: reports::Answers,
}

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Runner {
    pub fn new(config: &crate::Config) -> anyhow::Result<Runner> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let (user, refused) = if !root || config.job_user == "root" {
            (None, None)
        } else {
            match lookup_user(&config.job_user) {
                Some(user) => (Some(user), None),
                None => (
                    None,
                    Some(format!(
                        "the jobs' user {} does not exist (scripts/setup.sh creates hodei-job; \
                         HODEI_JOB_USER names another)",
                        config.job_user
                    )),
                ),
            }
        };
        Ok(Runner {
            user,
            refused,
            max_open_files: config.job_max_open_files,
            max_processes: config.job_max_processes,
            locale: ["LANG", "TZ"]
                .into_iter()
                .filter_map(|name| Some((name, std::env::var(name).ok()?)))
                .collect(),
            report_together_within: (config.report_together_ms > 0)
                .then(|| Duration::from_millis(config.report_together_ms)),
            answers: reports::Answers::default(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        client: &Client,
        js: &JetStream,
        worker_id: Uuid,
        job: RunJob,
        command_message: Option<&jetstream::Message>,
        parent: opentelemetry::Context,
        shutdown: Shutdown,
        last: bool,
    ) -> anyhow::Result<Option<Next>> {
        let span = tracing::info_span!(
            "run",
            otel.name = "run job",
            job_id = %job.job_id,
            correlation_id = %job.correlation_id,
            trace_id = tracing::field::Empty,
        );
        context::adopt(&span, parent);
        let next = self
            .execute(client, js, worker_id, job, command_message, shutdown, last)
            .instrument(span.clone())
            .await?;
        // The next job was handed over in this job's trace: its run continues it.
        Ok(next.map(|run| Next {
            run,
            parent: context::from_fields(&context::of_span(&span).into_iter().collect::<Vec<_>>()),
        }))
    }

    /// The job's process: nothing of the agent's environment but PATH, LANG and TZ, then the
    /// job's own `env`, its ids and its trace context; as the jobs' user, with limits, in a
    /// process group of its own ([`Spawn::start`]).
    fn process_of(&self, job: &RunJob) -> Spawn {
        let home = match &self.user {
            Some((_, _, home)) if home != "/nonexistent" && !home.is_empty() => home.clone(),
            Some(_) => "/tmp".to_owned(),
            None => std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        };
        let mut env = vec![
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("HOME".to_owned(), home),
        ];
        env.extend(self.locale.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env.extend(job.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend([
            ("HODEI_JOB_ID".to_owned(), job.job_id.to_string()),
            ("HODEI_ATTEMPT".to_owned(), job.attempt.to_string()),
            (
                "HODEI_CORRELATION_ID".to_owned(),
                job.correlation_id.clone(),
            ),
        ]);
        // A traced program continues the job's trace from here.
        env.extend(
            context::current()
                .into_iter()
                .map(|(name, value)| (name.to_ascii_uppercase(), value)),
        );
        Spawn {
            program: job.command.clone(),
            args: job.args.clone(),
            env,
            working_dir: job.working_dir.clone(),
            user: self.user.as_ref().map(|(uid, gid, _)| (*uid, *gid)),
            max_open_files: self.max_open_files,
            max_processes: self.max_processes,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        client: &Client,
        js: &JetStream,
        worker_id: Uuid,
        job: RunJob,
        command_message: Option<&jetstream::Message>,
        shutdown: Shutdown,
        last: bool,
    ) -> anyhow::Result<Option<RunJob>> {
        let ack = || async {
            if let Some(message) = command_message {
                let _ = message.ack().await;
            }
        };
        let process = self.process_of(&job);
        let oom_before = oom_kills();
        let logs = LogShipper::new(js.clone(), job.job_id, job.attempt);

        let spawned = match &self.refused {
            Some(refused) => Err(refused.clone()),
            None => process
                .start()
                .map_err(|error| format!("cannot start `{}`: {error}", job.command)),
        };
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                tracing::warn!(%error, "job could not start");
                ack().await;
                logs.finish(0, None).await;
                return Ok(report_finished(
                    client,
                    js,
                    &self.answers,
                    worker_id,
                    &job,
                    None,
                    Some(error),
                    false,
                    last,
                )
                .await);
            }
        };
        let pid = Some(child.id());
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

        // A short job's start goes with its end, in one report.
        let ended_early = match self.report_together_within {
            Some(within) => shutdown
                .run_until_cancelled(tokio::time::timeout(within, child.wait()))
                .await
                .and_then(Result::ok),
            None => None,
        };
        if ended_early.is_none() {
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
                &self.answers,
                worker_id,
                &job,
                reports::Kind::Started,
                &started,
            )
            .await
            {
                Err(error) if !error.code.is_transient() => {
                    tracing::warn!(code = error.code.as_str(), message = %error.message, "start refused; killing the job");
                    let _ = child.kill().await;
                    for task in [stdout, stderr] {
                        task.abort();
                    }
                    shipping.abort();
                    ack().await;
                    return Ok(None);
                }
                answer => log_answer("started", answer),
            }
            // The start is on record: from here a redelivered RunJob must not run the job
            // again.
            ack().await;
        }

        let together = ended_early.is_some();
        let status = match ended_early {
            Some(status) => status,
            None => tokio::select! {
                status = child.wait() => status,
                _ = shutdown.cancelled() => {
                    tracing::warn!("agent stopping; killing the job");
                    let _ = child.kill().await;
                    child.wait().await
                }
            },
        };
        // Whatever the job left behind (daemons, `setsid` children: they are ours, as the
        // agent is a child subreaper) ends with it.
        kill_descendants();
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
        // The kernel's OOM killer may have ended the job or one of its processes.
        let oom = (oom_kills() > oom_before)
            .then(|| "the job exceeded its memory limit: a process was killed (OOM)".to_owned());
        let (exit_code, error) = match &status {
            Ok(status) => match status.code() {
                Some(code) => (Some(code), oom.filter(|_| code != 0)),
                None => (
                    None,
                    Some(
                        oom.unwrap_or_else(|| format!("the job was ended by a signal ({status})")),
                    ),
                ),
            },
            Err(e) => (None, Some(format!("cannot wait for the job: {e}"))),
        };
        tracing::info!(?exit_code, ?error, "job ended");
        let batches = logs.seq;
        logs.finish(batches, exit_code).await;
        let next = report_finished(
            client,
            js,
            &self.answers,
            worker_id,
            &job,
            exit_code,
            error,
            together,
            last,
        )
        .await;
        if together {
            // Start and end are on record together: only now may the command go.
            ack().await;
        }
        Ok(next)
    }
}

/// A job the agent was given with its last report, and the trace its run continues.
pub struct Next {
    pub run: RunJob,
    pub parent: opentelemetry::Context,
}

/// Report how the attempt ended (retried until answered or refused; the answer is logged),
/// that it started too when `started` (a short job's one report), and that the agent runs no
/// job after it when `last`; a warm-pool worker's next job, when the answer brings one.
#[allow(clippy::too_many_arguments)]
async fn report_finished(
    client: &Client,
    js: &JetStream,
    answers: &reports::Answers,
    worker_id: Uuid,
    job: &RunJob,
    exit_code: Option<i32>,
    error: Option<String>,
    started: bool,
    last: bool,
) -> Option<RunJob> {
    let finished = JobFinished {
        schema_version: hodei_protocol::SCHEMA_VERSION,
        worker_id,
        job_id: job.job_id,
        attempt: job.attempt,
        exit_code,
        error,
        started,
        last,
    };
    let answer = reports::send(
        client,
        js,
        answers,
        worker_id,
        job,
        reports::Kind::Finished,
        &finished,
    )
    .await;
    let next = answer
        .as_ref()
        .ok()
        .and_then(|accepted| accepted.next.clone());
    log_answer("finished", answer);
    next
}

fn log_answer(
    kind: &str,
    answer: Result<hodei_protocol::agent::ReportAccepted, hodei_protocol::ApiError>,
) {
    match answer {
        // The scheduler logs each report it applies ("report applied", with the job's state).
        Ok(accepted) => tracing::debug!(report = kind, state = %accepted.state, "report accepted"),
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
        let payload = encode(&batch);
        let store = || {
            publish_durable(
                &self.js,
                subject.clone(),
                message_headers(&msg_id, None),
                payload.clone(),
            )
        };
        let stored = store
            .retry(crate::retrying(100, 2_000).with_max_times(3))
            .notify(|error, delay| {
                tracing::warn!(%error, seq = batch.seq, ?delay, "log batch not stored; retrying")
            })
            .await;
        if stored.is_ok() {
            return;
        }
        tracing::error!(seq = batch.seq, lines = batch.lines.len(), "log batch lost");
    }
}

/// uid, gid and home directory of `name`.
fn lookup_user(name: &str) -> Option<(u32, u32, String)> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into pwd and buf, which outlive the call.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: pw_dir points into buf, NUL-terminated, when getpwnam_r succeeded.
    let home = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) }
        .to_string_lossy()
        .into_owned();
    Some((pwd.pw_uid, pwd.pw_gid, home))
}

/// Make the agent the reaper of every orphan below it: a job's process that double-forks or
/// calls `setsid` is still the agent's descendant, so it is found and ended with the job.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot become a child subreaper");
    }
}

/// SIGKILL every descendant of this process (found through /proc), until none is left, and
/// reap the orphans that were handed to us. Called once the job's own process has been
/// waited for, so no exit status anyone waits for is taken. It blocks the agent's one thread
/// for as long: a few reads of /proc, or, with descendants left, a few milliseconds while the
/// kernel ends them.
pub fn kill_descendants() {
    let me = std::process::id() as i32;
    for _ in 0..50 {
        let descendants = descendants_of(me);
        if descendants.is_empty() {
            return;
        }
        for pid in &descendants {
            // SAFETY: kill(2) and a non-blocking waitpid(2) of our own descendants.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
        for pid in &descendants {
            unsafe {
                libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
    tracing::warn!("processes of the job survived SIGKILL");
}

/// Live (not zombie) descendants of `root`, from the kernel's list of each task's children
/// (`/proc/<pid>/task/<tid>/children`): a few reads, where a scan of /proc reads one file per
/// process on the machine (about half of a pool agent's CPU per job, measured with perf). A kernel without
/// those lists gets the scan.
fn descendants_of(root: i32) -> Vec<i32> {
    if !std::path::Path::new(&format!("/proc/{root}/task/{root}/children")).exists() {
        return descendants_by_scan(root);
    }
    let mut found: Vec<i32> = Vec::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        for child in children_of(pid) {
            if !found.contains(&child) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found.retain(|pid| !is_zombie(*pid));
    found
}

/// The children of every thread of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat_state(&stat) == Some("Z"))
}

/// The state field of a `/proc/<pid>/stat` line: pid (comm) state ppid ..., where comm may
/// hold spaces and parentheses.
fn stat_state(stat: &str) -> Option<&str> {
    stat.rsplit(')').next()?.split_whitespace().next()
}

/// [`descendants_of`] by reading every process' parent from /proc.
fn descendants_by_scan(root: i32) -> Vec<i32> {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let mut fields = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .skip(1);
            let Some(ppid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            parents.push((pid, ppid, stat_state(&stat) == Some("Z")));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(pid, ppid, _)| *ppid == parent && !found.contains(pid))
                .map(|(pid, _, _)| *pid)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    found
        .into_iter()
        .skip(1)
        .filter(|pid| !parents.iter().any(|(p, _, zombie)| p == pid && *zombie))
        .collect()
}

/// How many processes the kernel's OOM killer ended in this agent's memory cgroup (v2
/// `memory.events`, or v1 `memory.oom_control`; 0 when neither can be read).
fn oom_kills() -> u64 {
    [
        "/sys/fs/cgroup/memory.events",
        "/sys/fs/cgroup/memory/memory.oom_control",
    ]
    .iter()
    .find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
    })
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The children lists and the scan of /proc find the same descendants: a child and the
    /// grandchild it started.
    #[test]
    fn the_childrens_lists_find_what_a_scan_of_proc_finds() {
        let me = std::process::id() as i32;
        // `&` forks the grandchild before `echo` runs: once the line is read, both exist.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo started; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh starts");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "started");
        assert_eq!(descendants_by_scan(me).len(), 2, "sh and its sleep");
        let mut listed = descendants_of(me);
        let mut scanned = descendants_by_scan(me);
        listed.sort_unstable();
        scanned.sort_unstable();
        assert_eq!(listed, scanned);
        assert!(listed.contains(&(child.id() as i32)), "{listed:?}");
        for pid in &listed {
            // SAFETY: kill(2) of this test's own descendants.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        child.wait().unwrap();
    }
}
