//! Requests and replies of the `hodei.api.*` request/reply endpoints.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hodei_domain::{JobPolicy, JobSpec, JobState, WorkerState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schema_version;

/// Every reply: `{"schema_version":1,"ok":true,"data":{..}}` or
/// `{"schema_version":1,"ok":false,"error":{"code":"NOT_FOUND","message":".."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T> {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl<T> Reply<T> {
    pub fn ok(data: T) -> Self {
        Reply {
            schema_version: crate::SCHEMA_VERSION,
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(error: ApiError) -> Self {
        Reply {
            schema_version: crate::SCHEMA_VERSION,
            ok: false,
            data: None,
            error: Some(error),
        }
    }
    pub fn into_result(self) -> Result<T, ApiError> {
        match (self.ok, self.data, self.error) {
            (true, Some(data), _) => Ok(data),
            (_, _, Some(error)) => Err(error),
            _ => Err(ApiError::new(
                ErrorCode::Internal,
                "reply carries neither data nor error",
            )),
        }
    }
}

/// Stable error codes; clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    PayloadTooLarge,
    UnsupportedSchemaVersion,
    NotFound,
    InvalidJobSpec,
    InvalidJobTransition,
    InvalidSchedule,
    InvalidScheduleTransition,
    InvalidWorkerTransition,
    JobNotHeldByWorker,
    WorkerMismatch,
    InvalidBootstrapToken,
    /// No provider can ever run the job (its selector, image or resources).
    NoProvider,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedSchemaVersion => "UNSUPPORTED_SCHEMA_VERSION",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::InvalidJobSpec => "INVALID_JOB_SPEC",
            ErrorCode::InvalidJobTransition => "INVALID_JOB_TRANSITION",
            ErrorCode::InvalidSchedule => "INVALID_SCHEDULE",
            ErrorCode::InvalidScheduleTransition => "INVALID_SCHEDULE_TRANSITION",
            ErrorCode::InvalidWorkerTransition => "INVALID_WORKER_TRANSITION",
            ErrorCode::JobNotHeldByWorker => "JOB_NOT_HELD_BY_WORKER",
            ErrorCode::WorkerMismatch => "WORKER_MISMATCH",
            ErrorCode::InvalidBootstrapToken => "INVALID_BOOTSTRAP_TOKEN",
            ErrorCode::NoProvider => "NO_PROVIDER",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// Whether the same request may succeed later (the caller should retry or redeliver).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::Conflict
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, message)
    }
}

impl From<hodei_domain::DomainError> for ApiError {
    fn from(err: hodei_domain::DomainError) -> Self {
        use hodei_domain::DomainError as D;
        let code = match &err {
            D::InvalidJobTransition { .. } | D::InvalidJobAction { .. } => {
                ErrorCode::InvalidJobTransition
            }
            D::InvalidWorkerTransition { .. } => ErrorCode::InvalidWorkerTransition,
            D::JobNotHeldByWorker { .. } => ErrorCode::JobNotHeldByWorker,
            D::InvalidBootstrapToken { .. } => ErrorCode::InvalidBootstrapToken,
            D::InvalidJobSpec(_) => ErrorCode::InvalidJobSpec,
            D::InvalidSchedule(_) => ErrorCode::InvalidSchedule,
            D::InvalidScheduleTransition { .. } => ErrorCode::InvalidScheduleTransition,
        };
        ApiError::new(code, err.to_string())
    }
}

/// `hodei.api.jobs.submit` and `hodei.jobs.submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A container image to run the job in (the Docker provider); none: a local process.
    #[serde(default)]
    pub image: Option<String>,
    /// CPU (`cpu_millis`) and memory (`memory_mb`) of the job's worker.
    #[serde(default)]
    pub resources: hodei_domain::Resources,
    /// Labels the job's provider must have; a job no provider can ever run is refused
    /// (`NO_PROVIDER`).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The same key twice makes one job. On the stream, `Nats-Msg-Id` serves when this is absent.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Timeouts, retries and priority; every field has a default.
    #[serde(default)]
    pub policy: JobPolicy,
    /// At most `max` jobs of `key` placed at once (`{"key": "tenant-42", "max": 2}`).
    #[serde(default)]
    pub concurrency: Option<hodei_domain::Concurrency>,
}

impl SubmitJob {
    pub fn spec(&self) -> JobSpec {
        JobSpec {
            command: self.command.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            labels: self.labels.clone(),
            image: self.image.clone(),
            resources: self.resources,
            selector: self.selector.clone(),
            concurrency: self.concurrency.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitAccepted {
    pub job_id: Uuid,
    pub correlation_id: String,
    pub state: JobState,
    /// false when the idempotency key named a job that already existed.
    pub created: bool,
}

/// `hodei.api.jobs.cancel`: any job not yet ended; a running job's process is killed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub job_id: Uuid,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetJob {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub job_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListJobs {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    #[serde(default)]
    pub state: Option<JobState>,
    /// Only jobs of this concurrency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// Only jobs with every one of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// At most 500; 50 when absent.
    #[serde(default)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: Uuid,
    pub state: JobState,
    pub command: String,
    pub args: Vec<String>,
    pub working_dir: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Why the job is where it is, from live state (`hodei explain`): what a Pending job
    /// waits for, what a placed one waits for or runs on, how an ended one ended. In the
    /// answer to `hodei.api.jobs.get`, not in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
    /// The container image it runs in, if any.
    #[serde(default)]
    pub image: Option<String>,
    /// Its concurrency limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<hodei_domain::Concurrency>,
    pub attempt: u32,
    pub worker_id: Option<Uuid>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub correlation_id: String,
    pub idempotency_key: Option<String>,
    pub policy: JobPolicy,
    /// A retried job waits until then before it is queued again.
    pub retry_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&hodei_domain::Job> for JobView {
    fn from(job: &hodei_domain::Job) -> Self {
        JobView {
            job_id: job.id,
            state: job.state,
            command: job.spec.command.clone(),
            args: job.spec.args.clone(),
            working_dir: job.spec.working_dir.clone(),
            labels: job.spec.labels.clone(),
            image: job.spec.image.clone(),
            concurrency: job.spec.concurrency.clone(),
            waiting_reason: None,
            attempt: job.attempt,
            worker_id: job.worker_id,
            exit_code: job.exit_code,
            error: job.error.clone(),
            correlation_id: job.correlation_id.clone(),
            idempotency_key: job.idempotency_key.clone(),
            policy: job.policy.clone(),
            retry_at: job.not_before,
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}

/// The page size a list request asks for: 50 when absent, at most 500 (at least 1).
pub fn page_size(limit: Option<u32>) -> u32 {
    limit.unwrap_or(50).clamp(1, 500)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListWorkers {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    #[serde(default)]
    pub state: Option<WorkerState>,
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    pub worker_id: Uuid,
    pub state: WorkerState,
    pub provider: String,
    pub current_job_id: Option<Uuid>,
    pub reserved_job_id: Option<Uuid>,
    /// A warm-pool worker, reused for up to `max_jobs` jobs.
    #[serde(default)]
    pub pooled: bool,
    #[serde(default)]
    pub jobs_run: u32,
    #[serde(default)]
    pub max_jobs: u32,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&hodei_domain::Worker> for WorkerView {
    fn from(w: &hodei_domain::Worker) -> Self {
        WorkerView {
            worker_id: w.id,
            state: w.state,
            provider: w.provider.clone(),
            current_job_id: w.current_job_id,
            reserved_job_id: w.reserved_job_id,
            pooled: w.pooled,
            jobs_run: w.jobs_run,
            max_jobs: w.max_jobs,
            last_heartbeat_at: w.last_heartbeat_at,
            created_at: w.created_at,
            updated_at: w.updated_at,
        }
    }
}

/// `hodei.api.audit.query`: every given criterion must match; results in recording order,
/// or in occurrence order with a time bound, a correlation id or an aggregate id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub aggregate_id: Option<Uuid>,
    #[serde(default)]
    pub actor: Option<String>,
    /// occurred_at >= from
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// occurred_at < to
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// At most 1000; 100 when absent.
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub correlation_id: String,
    pub actor: String,
    pub payload: serde_json::Value,
}

/// Request types default to the current schema version and no other field set.
macro_rules! current_version_default {
    ($($name:ident { $($field:ident),* }),+) => {$(
        impl Default for $name {
            fn default() -> Self {
                $name { schema_version: crate::SCHEMA_VERSION, $($field: Default::default()),* }
            }
        }
    )+};
}

current_version_default! {
    SubmitJob { command, args, env, working_dir, labels, image, resources, selector, idempotency_key, policy, concurrency },
    ListJobs { state, concurrency_key, labels, limit, cursor },
    ListWorkers { state, limit, cursor },
    AuditQuery { correlation_id, event_type, aggregate_id, actor, from, to, limit, cursor }
}

/// `hodei.api.dlq.list`: dead letters in HODEI_DLQ, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDeadLetters {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// At most 500; 50 when absent.
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `hodei.api.dlq.show`, `.replay` and `.discard`: one dead letter by its sequence in HODEI_DLQ.
/// `actor` names who asks, for the audit log (default `operator`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterRef {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub seq: u64,
    #[serde(default)]
    pub actor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub dlq_subject: String,
    /// Where the message was going (or came from) when it failed.
    pub original_subject: String,
    /// The stream it came from (`outbox` for rows the relay could not publish).
    pub source: String,
    /// The consumer (or `relay`) that gave up on it.
    pub consumer: String,
    pub reason: String,
    pub stored_at: DateTime<Utc>,
    pub size: usize,
    /// The message itself (`show` only): JSON when it parses, a string otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}
