//! The domain event catalogue and the envelope every event travels in.
//!
//! An event is an [`DomainEvent`] envelope (id, time, type, aggregate, correlation id, actor)
//! around a JSON payload. The payload types below are the catalogue; each names its event
//! type and aggregate through [`EventPayload`]. The envelope keeps the payload as JSON so
//! that the relay, the audit log and clients in other languages handle every event alike.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::job::JobState;
use crate::worker::WorkerState;

/// Version of the envelope and payload schemas; bumped on any incompatible change.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregateType {
    Job,
    Worker,
    Schedule,
    /// A message of the dead-letter stream, as operators act on it.
    #[serde(rename = "dead_letter")]
    DeadLetter,
}

impl AggregateType {
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::Job => "job",
            AggregateType::Worker => "worker",
            AggregateType::Schedule => "schedule",
            AggregateType::DeadLetter => "dead_letter",
        }
    }
}

/// Who caused a change: a service (`scheduler`), an agent (`worker:<id>`) or a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Actor(pub String);

impl Actor {
    pub fn service(name: &str) -> Self {
        Actor(name.to_owned())
    }
    pub fn worker(id: Uuid) -> Self {
        Actor(format!("worker:{id}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    pub schema_version: u32,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub event_type: String,
    pub aggregate_type: AggregateType,
    pub aggregate_id: Uuid,
    pub correlation_id: String,
    pub actor: Actor,
    pub payload: serde_json::Value,
}

impl DomainEvent {
    pub fn new<P: EventPayload>(
        aggregate_id: Uuid,
        correlation_id: &str,
        actor: &Actor,
        payload: &P,
    ) -> Self {
        DomainEvent {
            schema_version: EVENT_SCHEMA_VERSION,
            event_id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            event_type: P::EVENT_TYPE.to_owned(),
            aggregate_type: P::AGGREGATE,
            aggregate_id,
            correlation_id: correlation_id.to_owned(),
            actor: actor.clone(),
            payload: serde_json::to_value(payload).expect("event payloads always serialize"),
        }
    }

    /// `hodei.events.<aggregate>.<id>.<EventType>`
    pub fn subject(&self) -> String {
        format!(
            "hodei.events.{}.{}.{}",
            self.aggregate_type.as_str(),
            self.aggregate_id,
            self.event_type
        )
    }

    pub fn is<P: EventPayload>(&self) -> bool {
        self.event_type == P::EVENT_TYPE
    }

    /// The typed payload, if this event is of type `P`.
    pub fn decode<P: EventPayload>(&self) -> Option<Result<P, serde_json::Error>> {
        self.is::<P>()
            .then(|| serde_json::from_value(self.payload.clone()))
    }
}

/// A payload of the catalogue: it knows its event type and the aggregate it belongs to.
pub trait EventPayload: Serialize + DeserializeOwned {
    const EVENT_TYPE: &'static str;
    const AGGREGATE: AggregateType;
}

macro_rules! catalogue {
    ($($aggregate:ident: $($name:ident),+;)+) => {
        $($(impl EventPayload for $name {
            const EVENT_TYPE: &'static str = stringify!($name);
            const AGGREGATE: AggregateType = AggregateType::$aggregate;
        })+)+

        /// Every event type of the catalogue, as written in `event_type`.
        pub const EVENT_TYPES: &[&str] = &[$($(stringify!($name)),+),+];
    };
}

catalogue! {
    Job: JobCreated, JobQueued, JobAssigned, JobStatusChanged, JobCompleted, JobExecutionError,
         JobRequeued, JobRetrying;
    Worker: WorkerProvisioningRequested, WorkerProvisioned, WorkerProvisioningFailed,
         WorkerRegistered, WorkerReady, WorkerReadyForJob, WorkerStatusChanged, WorkerHeartbeat,
         WorkerTerminating, WorkerTerminated;
    Schedule: ScheduleCreated, ScheduleFired, ScheduleTickSkipped, ScheduleTicksMissed,
         SchedulePaused, ScheduleResumed, ScheduleDeleted;
    DeadLetter: DeadLetterReplayed, DeadLetterDiscarded;
}

// ----- job events -----

/// A job was accepted. The environment's values are not recorded, only its names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCreated {
    pub job_id: Uuid,
    pub command: String,
    pub args: Vec<String>,
    pub env_keys: Vec<String>,
    pub working_dir: Option<String>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub policy: crate::policy::JobPolicy,
    /// Its concurrency limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<crate::job::Concurrency>,
}

/// A job is waiting for a worker (first attempt or a later one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobQueued {
    pub job_id: Uuid,
    pub attempt: u32,
}

/// A job was placed on a worker: `Assigned` to a ready one, or `Scheduled` on one being
/// provisioned for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAssigned {
    pub job_id: Uuid,
    pub worker_id: Uuid,
    pub from: JobState,
    pub to: JobState,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatusChanged {
    pub job_id: Uuid,
    pub from: JobState,
    pub to: JobState,
    pub worker_id: Option<Uuid>,
    pub reason: Option<String>,
}

/// The job's process ran to its end: `Succeeded` with exit code 0, `Failed` otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCompleted {
    pub job_id: Uuid,
    pub worker_id: Uuid,
    pub from: JobState,
    pub to: JobState,
    pub exit_code: i32,
    pub attempt: u32,
}

/// The job failed without an exit code of its own (the command could not start, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobExecutionError {
    pub job_id: Uuid,
    pub worker_id: Option<Uuid>,
    pub from: JobState,
    pub error: String,
    pub attempt: u32,
}

/// Named transition back to Pending: an assignment that was never acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequeued {
    pub job_id: Uuid,
    pub worker_id: Option<Uuid>,
    pub from: JobState,
    pub attempt: u32,
    pub reason: String,
}

/// Named transition back to Pending: a failed attempt with attempts left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRetrying {
    pub job_id: Uuid,
    pub worker_id: Option<Uuid>,
    pub from: JobState,
    /// The attempt that starts now.
    pub attempt: u32,
    pub reason: String,
    /// When the job is queued again (after its backoff).
    pub retry_at: DateTime<Utc>,
}

// ----- schedule events -----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleCreated {
    pub schedule_id: Uuid,
    pub name: String,
    pub trigger: crate::schedule::Trigger,
    pub overlap: crate::schedule::Overlap,
    pub catch_up: crate::schedule::CatchUp,
    pub command: String,
    pub args: Vec<String>,
    /// The names of the job's environment (never the values).
    pub env_keys: Vec<String>,
    pub next_tick_at: DateTime<Utc>,
}

/// A tick ran: its job was created (idempotency key `<schedule id>:<tick time>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleFired {
    pub schedule_id: Uuid,
    pub tick_at: DateTime<Utc>,
    pub job_id: Uuid,
}

/// A tick did not run (its previous run had not ended, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleTickSkipped {
    pub schedule_id: Uuid,
    pub tick_at: DateTime<Utc>,
    pub reason: String,
}

/// Ticks that passed while no scheduler ran, and did not run (the catch-up policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleTicksMissed {
    pub schedule_id: Uuid,
    pub first_tick_at: DateTime<Utc>,
    pub last_tick_at: DateTime<Utc>,
    pub count: u32,
    /// The count stopped at its bound: at least this many.
    pub at_least: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulePaused {
    pub schedule_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleResumed {
    pub schedule_id: Uuid,
    pub next_tick_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleDeleted {
    pub schedule_id: Uuid,
    pub from: crate::schedule::ScheduleState,
    /// Why, when it was not on request (its cron expression has no tick left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// ----- operators' actions on dead letters (recorded by the audit service) -----

/// A dead letter was published again to its original subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterReplayed {
    pub dlq_seq: u64,
    pub original_subject: String,
    pub reason: String,
}

/// A dead letter was removed for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterDiscarded {
    pub dlq_seq: u64,
    pub original_subject: String,
    pub reason: String,
}

// ----- worker events -----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerProvisioningRequested {
    pub worker_id: Uuid,
    pub provider: String,
    pub for_job: Option<Uuid>,
    /// A warm-pool worker (reused for several jobs).
    #[serde(default)]
    pub pooled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerProvisioned {
    pub worker_id: Uuid,
    pub provider: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerProvisioningFailed {
    pub worker_id: Uuid,
    pub provider: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRegistered {
    pub worker_id: Uuid,
    pub pid: Option<u32>,
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReady {
    pub worker_id: Uuid,
    pub from: WorkerState,
}

/// A ready worker can take a job; `reserved_for` names the job it was provisioned for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReadyForJob {
    pub worker_id: Uuid,
    pub reserved_for: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatusChanged {
    pub worker_id: Uuid,
    pub from: WorkerState,
    pub to: WorkerState,
    pub job_id: Option<Uuid>,
}

/// Liveness. The registry records heartbeats on the worker row; this event exists for
/// clients that publish liveness into the event stream and is not emitted per beat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    pub worker_id: Uuid,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerTerminating {
    pub worker_id: Uuid,
    pub from: WorkerState,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerTerminated {
    pub worker_id: Uuid,
    pub from: WorkerState,
}
