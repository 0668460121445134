//! What the worker agent and the control plane say to each other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schema_version;

/// Request on `hodei.agent.<worker_id>.register`; the reply is `Reply<Registered>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorker {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub worker_id: Uuid,
    pub token: String,
    /// A random value the agent process makes at start and never shows: the bootstrap token
    /// is spent by the first registration, and a registration asked again (its answer was
    /// lost) is answered only when it carries the same token *and* the same instance, that
    /// is, only to the agent that registered. Any other is refused and changes nothing.
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub worker_id: Uuid,
    pub heartbeat_interval_ms: u64,
    /// After this long without its control plane (NATS unreachable), the agent kills its job
    /// and exits: by then the registry has declared it lost and its job may run elsewhere.
    #[serde(default)]
    pub lost_after_ms: Option<u64>,
    /// How many jobs the agent runs before it exits: 1 for an ephemeral worker, more for a
    /// warm-pool worker, which waits for its next job on the same command subject.
    #[serde(default = "one")]
    pub max_jobs: u32,
    /// The job of a worker provisioned for one job, assigned in the registration itself, so
    /// that it starts without another round through the stream. The same RunJob is also on
    /// the worker's command subject (the durable copy); the agent runs a job attempt once.
    #[serde(default)]
    pub run: Option<RunJob>,
}

fn one() -> u32 {
    1
}

/// Core NATS publish on `hodei.agent.<worker_id>.heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub worker_id: Uuid,
    #[serde(default)]
    pub job_id: Option<Uuid>,
}

/// Published to the stream on `hodei.agent.<worker_id>.started` / `.finished`. If the
/// `Hodei-Reply-To` header is set, the scheduler answers there with `Reply<ReportAccepted>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStarted {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub worker_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
    #[serde(default)]
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFinished {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub worker_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
    /// The process' exit code; absent when it never ran or died by a signal.
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
    /// The job's start was not reported on its own: it ended so soon after it started (a
    /// short job) that this one report records both, in one transaction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
    /// The agent runs no job after this one (an ephemeral worker's one job, or a warm-pool
    /// worker's last): the scheduler does not look for a next job to give it with the
    /// answer. Only an optimisation: without it the scheduler looks, as for any report.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub last: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportAccepted {
    pub job_id: Uuid,
    pub state: hodei_domain::JobState,
    /// For a warm-pool worker that reported its job's end while another job waited: its next
    /// job, assigned with the report (no RunJob command is written for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<RunJob>,
}

/// Commands on `hodei.worker.<worker_id>.cmd`, written to the outbox with the change that
/// causes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WorkerCommand {
    RunJob(RunJob),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunJob {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub command_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
    pub correlation_id: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
}
