//! Why the domain refused a change. Every variant has a stable code that clients see.

use uuid::Uuid;

use crate::job::JobState;
use crate::schedule::ScheduleState;
use crate::worker::WorkerState;

pub type Result<T, E = DomainError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("job {job_id} cannot go from {from} to {to}")]
    InvalidJobTransition {
        job_id: Uuid,
        from: JobState,
        to: JobState,
    },

    #[error("job {job_id} cannot be {action} from state {from}")]
    InvalidJobAction {
        job_id: Uuid,
        from: JobState,
        action: &'static str,
    },

    #[error("worker {worker_id} cannot go from {from} to {to}")]
    InvalidWorkerTransition {
        worker_id: Uuid,
        from: WorkerState,
        to: WorkerState,
    },

    #[error("job {job_id} is not held by worker {worker_id}")]
    JobNotHeldByWorker { job_id: Uuid, worker_id: Uuid },

    #[error("worker {worker_id} presented a bootstrap token that is wrong or already spent")]
    InvalidBootstrapToken { worker_id: Uuid },

    #[error("invalid job spec: {0}")]
    InvalidJobSpec(String),

    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),

    #[error("schedule {schedule_id} cannot go from {from} to {to}")]
    InvalidScheduleTransition {
        schedule_id: Uuid,
        from: ScheduleState,
        to: ScheduleState,
    },
}

impl DomainError {
    /// The stable error code a client sees in an error reply.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::InvalidJobTransition { .. } | DomainError::InvalidJobAction { .. } => {
                "INVALID_JOB_TRANSITION"
            }
            DomainError::InvalidWorkerTransition { .. } => "INVALID_WORKER_TRANSITION",
            DomainError::JobNotHeldByWorker { .. } => "JOB_NOT_HELD_BY_WORKER",
            DomainError::InvalidBootstrapToken { .. } => "INVALID_BOOTSTRAP_TOKEN",
            DomainError::InvalidJobSpec(_) => "INVALID_JOB_SPEC",
            DomainError::InvalidSchedule(_) => "INVALID_SCHEDULE",
            DomainError::InvalidScheduleTransition { .. } => "INVALID_SCHEDULE_TRANSITION",
        }
    }
}
