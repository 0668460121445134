//! The job state machine and the job aggregate.
//!
//! The table (from the seed analysis): Pending -> Assigned|Scheduled|Failed|Cancelled|Timeout;
//! Assigned -> Running|Failed|Timeout|Cancelled; Scheduled -> Running|Failed|Timeout|Cancelled;
//! Running -> Succeeded|Failed|Cancelled|Timeout; terminal states have no exit; staying in the
//! same state is not a transition. Two named extensions lead back to Pending and start a new
//! attempt: `requeue` (an assignment that never ran) and `retry` (a failed attempt).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{DomainError, Result};
use crate::events::{
    Actor, DomainEvent, JobAssigned, JobCompleted, JobCreated, JobExecutionError, JobQueued,
    JobRequeued, JobRetrying, JobStatusChanged,
};
use crate::policy::{JobPolicy, RetryOn, ACK_TIMEOUT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Assigned,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Timeout,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Assigned,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Timeout,
    ];

    /// The one transition table of the job machine.
    pub fn can_transition_to(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Pending, Assigned | Scheduled | Failed | Cancelled | Timeout)
                | (Assigned, Running | Failed | Timeout | Cancelled)
                | (Scheduled, Running | Failed | Timeout | Cancelled)
                | (Running, Succeeded | Failed | Cancelled | Timeout)
        )
    }

    /// Named extension: an assignment that never started goes back to Pending.
    pub fn can_requeue(self) -> bool {
        matches!(self, JobState::Assigned | JobState::Scheduled)
    }

    /// Named extension: a failed attempt (before or while running) goes back to Pending.
    pub fn can_retry(self) -> bool {
        matches!(
            self,
            JobState::Assigned | JobState::Scheduled | JobState::Running
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Timeout
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "Pending",
            JobState::Assigned => "Assigned",
            JobState::Scheduled => "Scheduled",
            JobState::Running => "Running",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Cancelled => "Cancelled",
            JobState::Timeout => "Timeout",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown job state '{s}'"))
    }
}

/// What to run. Limits keep one job from filling the database or a NATS message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A container image to run in (the Docker provider); none: a local process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Labels its provider must have (every one of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// What the job's worker gets; none: the provider's defaults.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// At most `max` jobs of `key` are placed at once; none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// A concurrency limit: at most `max` jobs with this `key` are placed (Assigned, Scheduled or
/// Running) at once, across every dispatcher. Each job carries its own `max`; the job next in
/// line is placed only while fewer than its `max` jobs of its key are placed. A slot is free
/// again exactly when its job leaves the placed states (it ends, is cancelled, times out, is
/// requeued or retried, or its worker is lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    pub key: String,
    pub max: u32,
}

impl Concurrency {
    pub const MAX_KEY_BYTES: usize = 128;
    pub const MAX_LIMIT: u32 = 100_000;
}

/// CPU and memory of a job's worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Thousandths of a CPU (1000: one CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Memory limit in MiB; a job that exceeds it is killed and fails, saying so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.cpu_millis.is_none() && self.memory_mb.is_none()
    }
}

impl JobSpec {
    pub const MAX_ARGS: usize = 1024;
    pub const MAX_TOTAL_BYTES: usize = 256 * 1024;

    pub fn validate(&self) -> Result<()> {
        let invalid = |why: String| Err(DomainError::InvalidJobSpec(why));
        if self.command.trim().is_empty() {
            return invalid("command must not be empty".into());
        }
        if self.args.len() > Self::MAX_ARGS {
            return invalid(format!("at most {} arguments are allowed", Self::MAX_ARGS));
        }
        let strings = std::iter::once(&self.command)
            .chain(&self.args)
            .chain(self.env.iter().flat_map(|(k, v)| [k, v]))
            .chain(&self.working_dir)
            .chain(self.labels.iter().flat_map(|(k, v)| [k, v]))
            .chain(&self.image)
            .chain(self.selector.iter().flat_map(|(k, v)| [k, v]));
        let mut total = 0;
        for s in strings {
            if s.contains('\0') {
                return invalid("command, arguments, environment and working directory must not contain NUL bytes".into());
            }
            total += s.len();
        }
        if total > Self::MAX_TOTAL_BYTES {
            return invalid(format!(
                "the spec is {total} bytes; at most {} are allowed",
                Self::MAX_TOTAL_BYTES
            ));
        }
        if let Some(key) = self.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return invalid(format!("environment name '{key}' is empty or contains '='"));
        }
        if let Some(image) = &self.image {
            if image.is_empty() || image.len() > 255 || image.contains(char::is_whitespace) {
                return invalid(format!(
                    "image '{image}' must be 1 to 255 characters without spaces"
                ));
            }
        }
        if self.resources.cpu_millis == Some(0) || self.resources.memory_mb == Some(0) {
            return invalid("resources must be more than zero".into());
        }
        if self.resources.memory_mb.is_some_and(|mb| mb < 6) {
            return invalid("a memory limit is at least 6 MiB".into());
        }
        if let Some(Concurrency { key, max }) = &self.concurrency {
            if key.is_empty()
                || key.len() > Concurrency::MAX_KEY_BYTES
                || key.chars().any(char::is_control)
            {
                return invalid(format!(
                    "a concurrency key is 1 to {} bytes without control characters",
                    Concurrency::MAX_KEY_BYTES
                ));
            }
            if *max == 0 || *max > Concurrency::MAX_LIMIT {
                return invalid(format!(
                    "a concurrency limit is 1 to {}",
                    Concurrency::MAX_LIMIT
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub state: JobState,
    pub spec: JobSpec,
    /// 1 for the first attempt; each requeue or retry starts the next.
    pub attempt: u32,
    pub worker_id: Option<Uuid>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub correlation_id: String,
    pub idempotency_key: Option<String>,
    pub policy: JobPolicy,
    /// The latest start of this attempt; past it, a job not yet running times out.
    pub start_by: DateTime<Utc>,
    /// When the state-timeout monitor acts on the job's current state (none when terminal).
    pub deadline_at: Option<DateTime<Utc>>,
    /// A retried job waits in Pending until then before it is queued again.
    pub not_before: Option<DateTime<Utc>>,
    /// A job whose worker was lost waits, too, until the provider confirms that nothing of
    /// that worker runs any more (so its process can never run twice at once).
    pub fenced_by: Option<Uuid>,
    /// Optimistic concurrency: the version the row had when it was loaded.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Job {
    /// A new job, Pending, with its JobCreated and JobQueued events.
    pub fn submit(
        id: Uuid,
        spec: JobSpec,
        policy: JobPolicy,
        correlation_id: String,
        idempotency_key: Option<String>,
        actor: &Actor,
    ) -> Result<(Job, Vec<DomainEvent>)> {
        spec.validate()?;
        policy.validate()?;
        let now = Utc::now();
        let start_by = now + policy.schedule_to_start();
        let job = Job {
            policy,
            start_by,
            deadline_at: Some(start_by),
            not_before: None,
            fenced_by: None,
            id,
            state: JobState::Pending,
            attempt: 1,
            worker_id: None,
            exit_code: None,
            error: None,
            correlation_id,
            idempotency_key,
            version: 0,
            created_at: now,
            updated_at: now,
            spec,
        };
        let created = JobCreated {
            job_id: id,
            command: job.spec.command.clone(),
            args: job.spec.args.clone(),
            env_keys: job.spec.env.keys().cloned().collect(),
            working_dir: job.spec.working_dir.clone(),
            idempotency_key: job.idempotency_key.clone(),
            labels: job.spec.labels.clone(),
            policy: job.policy.clone(),
            concurrency: job.spec.concurrency.clone(),
        };
        let events = vec![job.event(actor, &created), job.queued_event(actor)];
        Ok((job, events))
    }

    fn event<P: crate::EventPayload>(&self, actor: &Actor, payload: &P) -> DomainEvent {
        DomainEvent::new(self.id, &self.correlation_id, actor, payload)
    }

    fn queued_event(&self, actor: &Actor) -> DomainEvent {
        self.event(
            actor,
            &JobQueued {
                job_id: self.id,
                attempt: self.attempt,
            },
        )
    }

    /// The only place a table transition is applied.
    fn transition(&mut self, to: JobState) -> Result<JobState> {
        let from = self.state;
        if !from.can_transition_to(to) {
            return Err(DomainError::InvalidJobTransition {
                job_id: self.id,
                from,
                to,
            });
        }
        self.state = to;
        self.updated_at = Utc::now();
        Ok(from)
    }

    fn ensure_held_by(&self, worker_id: Uuid) -> Result<()> {
        if self.worker_id != Some(worker_id) {
            return Err(DomainError::JobNotHeldByWorker {
                job_id: self.id,
                worker_id,
            });
        }
        Ok(())
    }

    /// Pending -> Assigned to a worker that is ready now.
    pub fn assign(&mut self, worker_id: Uuid, actor: &Actor) -> Result<DomainEvent> {
        self.place(worker_id, JobState::Assigned, actor)
    }

    /// Pending -> Scheduled on a worker being provisioned for this job.
    pub fn schedule(&mut self, worker_id: Uuid, actor: &Actor) -> Result<DomainEvent> {
        self.place(worker_id, JobState::Scheduled, actor)
    }

    fn place(&mut self, worker_id: Uuid, to: JobState, actor: &Actor) -> Result<DomainEvent> {
        let from = self.transition(to)?;
        self.worker_id = Some(worker_id);
        self.deadline_at = Some((self.updated_at + ACK_TIMEOUT).min(self.start_by));
        Ok(self.event(
            actor,
            &JobAssigned {
                job_id: self.id,
                worker_id,
                from,
                to,
                attempt: self.attempt,
            },
        ))
    }

    /// The holding worker reports that the process started.
    pub fn start(&mut self, worker_id: Uuid, actor: &Actor) -> Result<DomainEvent> {
        self.ensure_held_by(worker_id)?;
        let from = self.transition(JobState::Running)?;
        self.deadline_at = Some(self.updated_at + self.policy.execution());
        Ok(self.event(
            actor,
            &JobStatusChanged {
                job_id: self.id,
                from,
                to: JobState::Running,
                worker_id: Some(worker_id),
                reason: None,
            },
        ))
    }

    /// The holding worker reports the exit code: 0 -> Succeeded, anything else -> Failed.
    pub fn complete(
        &mut self,
        worker_id: Uuid,
        exit_code: i32,
        actor: &Actor,
    ) -> Result<DomainEvent> {
        self.ensure_held_by(worker_id)?;
        let to = if exit_code == 0 {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        let from = self.transition(to)?;
        self.exit_code = Some(exit_code);
        self.ended();
        Ok(self.event(
            actor,
            &JobCompleted {
                job_id: self.id,
                worker_id,
                from,
                to,
                exit_code,
                attempt: self.attempt,
            },
        ))
    }

    /// The attempt failed without an exit code (the command could not start, ...).
    /// A worker reporting it must hold the job; the control plane passes `None`.
    pub fn fail(
        &mut self,
        worker_id: Option<Uuid>,
        error: String,
        actor: &Actor,
    ) -> Result<DomainEvent> {
        if let Some(worker_id) = worker_id {
            self.ensure_held_by(worker_id)?;
        }
        let from = self.transition(JobState::Failed)?;
        self.error = Some(error.clone());
        self.ended();
        Ok(self.event(
            actor,
            &JobExecutionError {
                job_id: self.id,
                worker_id: self.worker_id,
                from,
                error,
                attempt: self.attempt,
            },
        ))
    }

    pub fn cancel(&mut self, reason: String, actor: &Actor) -> Result<DomainEvent> {
        self.end_with(JobState::Cancelled, reason, actor)
    }

    pub fn time_out(&mut self, reason: String, actor: &Actor) -> Result<DomainEvent> {
        self.end_with(JobState::Timeout, reason, actor)
    }

    fn end_with(&mut self, to: JobState, reason: String, actor: &Actor) -> Result<DomainEvent> {
        let from = self.transition(to)?;
        self.error = Some(reason.clone());
        self.ended();
        Ok(self.event(
            actor,
            &JobStatusChanged {
                job_id: self.id,
                from,
                to,
                worker_id: self.worker_id,
                reason: Some(reason),
            },
        ))
    }

    /// The holding worker reports how the attempt ended. A failure with attempts left (by
    /// the retry policy) starts the next attempt after its backoff; otherwise the job ends.
    /// `jitter` is a random number in [0, 1).
    pub fn finish(
        &mut self,
        worker_id: Uuid,
        exit_code: Option<i32>,
        error: Option<String>,
        jitter: f64,
        actor: &Actor,
    ) -> Result<Vec<DomainEvent>> {
        self.ensure_held_by(worker_id)?;
        let failed = exit_code != Some(0);
        if failed
            && self.state == JobState::Running
            && self.policy.retry.retries(self.attempt, RetryOn::Failed)
        {
            let reason = match (exit_code, &error) {
                (Some(code), _) => format!("attempt {} exited with {code}", self.attempt),
                (None, Some(error)) => format!("attempt {} failed: {error}", self.attempt),
                (None, None) => format!("attempt {} failed", self.attempt),
            };
            let backoff = self.policy.retry.backoff(self.attempt, jitter);
            return self.retry(reason, backoff, actor);
        }
        Ok(vec![match exit_code {
            Some(code) => {
                let completed = self.complete(worker_id, code, actor)?;
                // A failure's reason, when the agent knows one (its memory limit, say).
                if code != 0 {
                    self.error = error;
                }
                completed
            }
            None => self.fail(
                Some(worker_id),
                error.unwrap_or_else(|| "the job ended without an exit code".into()),
                actor,
            )?,
        }])
    }

    /// What the state-timeout monitor does with a job at `now`: queue a retry whose backoff
    /// is over, requeue an assignment never acknowledged, retry or time out an attempt past
    /// its deadline. Nothing (no events) if the job is not due.
    pub fn expire(
        &mut self,
        now: DateTime<Utc>,
        jitter: f64,
        actor: &Actor,
    ) -> Result<Vec<DomainEvent>> {
        if self.state == JobState::Pending
            && self.fenced_by.is_none()
            && self.not_before.is_some_and(|at| at <= now)
        {
            return Ok(vec![self.release(actor)?]);
        }
        if self.deadline_at.is_none_or(|at| at > now) {
            return Ok(Vec::new());
        }
        let late = |what: &str, limit: std::time::Duration| {
            format!("{what} within {} ms", limit.as_millis())
        };
        match self.state {
            JobState::Pending if self.fenced_by.is_some() => {
                let worker_id = self.fenced_by.take().expect("fenced");
                Ok(vec![self.fail(
                    None,
                    format!(
                        "its lost worker {worker_id} was never confirmed gone; the job is not \
                         retried automatically"
                    ),
                    actor,
                )?])
            }
            JobState::Pending => {
                Ok(vec![self.time_out(
                    late("not started", self.policy.schedule_to_start()),
                    actor,
                )?])
            }
            JobState::Assigned | JobState::Scheduled if now >= self.start_by => {
                Ok(vec![self.time_out(
                    late("not started", self.policy.schedule_to_start()),
                    actor,
                )?])
            }
            JobState::Assigned | JobState::Scheduled => self.requeue(
                format!(
                    "the worker did not acknowledge within {} s",
                    ACK_TIMEOUT.as_secs()
                ),
                actor,
            ),
            JobState::Running if self.policy.retry.retries(self.attempt, RetryOn::Timeout) => {
                let reason = late("attempt did not finish", self.policy.execution());
                let backoff = self.policy.retry.backoff(self.attempt, jitter);
                self.retry(reason, backoff, actor)
            }
            JobState::Running => {
                Ok(vec![self.time_out(
                    late("did not finish", self.policy.execution()),
                    actor,
                )?])
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The job's worker stopped answering: retry if the policy says so, else fail.
    pub fn worker_lost(
        &mut self,
        worker_id: Uuid,
        jitter: f64,
        actor: &Actor,
    ) -> Result<Vec<DomainEvent>> {
        self.ensure_held_by(worker_id)?;
        let reason = format!("worker {worker_id} was lost");
        if self.state.can_retry() && self.policy.retry.retries(self.attempt, RetryOn::Lost) {
            let backoff = self.policy.retry.backoff(self.attempt, jitter);
            let mut events = self.retry(
                format!("{reason}; retried once its teardown is confirmed"),
                backoff,
                actor,
            )?;
            // Not queued yet, whatever the backoff: the lost worker may still be running the
            // job. Its confirmed teardown releases it ([`Job::worker_gone`]).
            events.retain(|event| event.event_type != "JobQueued");
            self.not_before.get_or_insert(self.updated_at);
            self.fenced_by = Some(worker_id);
            return Ok(events);
        }
        Ok(vec![self.fail(None, reason, actor)?])
    }

    /// The provider has torn down the worker this job waited for. `confirmed`: nothing of it
    /// runs (the job may run again: queued now, or when its backoff ends); otherwise the job
    /// fails, as nobody can tell whether its first run is still going.
    pub fn worker_gone(
        &mut self,
        worker_id: Uuid,
        confirmed: Result<(), String>,
        actor: &Actor,
    ) -> Result<Vec<DomainEvent>> {
        if self.fenced_by != Some(worker_id) || self.state != JobState::Pending {
            return Ok(Vec::new());
        }
        self.fenced_by = None;
        match confirmed {
            Ok(()) if self.not_before.is_some_and(|at| at <= Utc::now()) => {
                Ok(vec![self.release(actor)?])
            }
            // Released by the monitor when its backoff ends.
            Ok(()) => {
                self.updated_at = Utc::now();
                Ok(Vec::new())
            }
            Err(why) => Ok(vec![self.fail(
                None,
                format!(
                    "worker {worker_id} was lost and its teardown could not be confirmed ({why}); \
                     the job is not retried automatically"
                ),
                actor,
            )?]),
        }
    }

    fn ended(&mut self) {
        self.deadline_at = None;
        self.not_before = None;
        self.fenced_by = None;
    }

    /// Named transition: an assignment that never ran goes back to Pending, next attempt,
    /// still bound by the attempt's schedule-to-start deadline.
    pub fn requeue(&mut self, reason: String, actor: &Actor) -> Result<Vec<DomainEvent>> {
        if !self.state.can_requeue() {
            return Err(DomainError::InvalidJobAction {
                job_id: self.id,
                from: self.state,
                action: "requeued",
            });
        }
        let (from, worker_id) = self.back_to_pending();
        self.deadline_at = Some(self.start_by);
        let requeued = JobRequeued {
            job_id: self.id,
            worker_id,
            from,
            attempt: self.attempt,
            reason,
        };
        Ok(vec![self.event(actor, &requeued), self.queued_event(actor)])
    }

    /// Named transition: a failed attempt with attempts left goes back to Pending. It is
    /// queued again after `backoff` (by [`Job::release`], or at once when `backoff` is zero)
    /// and has the policy's schedule-to-start time from then.
    pub fn retry(
        &mut self,
        reason: String,
        backoff: std::time::Duration,
        actor: &Actor,
    ) -> Result<Vec<DomainEvent>> {
        if !self.state.can_retry() {
            return Err(DomainError::InvalidJobAction {
                job_id: self.id,
                from: self.state,
                action: "retried",
            });
        }
        let (from, worker_id) = self.back_to_pending();
        let retry_at = self.updated_at + backoff;
        self.start_by = retry_at + self.policy.schedule_to_start();
        self.deadline_at = Some(self.start_by);
        self.not_before = (!backoff.is_zero()).then_some(retry_at);
        let retrying = JobRetrying {
            job_id: self.id,
            worker_id,
            from,
            attempt: self.attempt,
            reason,
            retry_at,
        };
        let mut events = vec![self.event(actor, &retrying)];
        if self.not_before.is_none() {
            events.push(self.queued_event(actor));
        }
        Ok(events)
    }

    /// A retried job whose backoff is over is queued again (JobQueued, no state change).
    pub fn release(&mut self, actor: &Actor) -> Result<DomainEvent> {
        if self.state != JobState::Pending || self.not_before.is_none() {
            return Err(DomainError::InvalidJobAction {
                job_id: self.id,
                from: self.state,
                action: "released",
            });
        }
        self.not_before = None;
        self.updated_at = Utc::now();
        Ok(self.queued_event(actor))
    }

    fn back_to_pending(&mut self) -> (JobState, Option<Uuid>) {
        let from = self.state;
        let worker_id = self.worker_id.take();
        self.state = JobState::Pending;
        self.attempt += 1;
        self.updated_at = Utc::now();
        (from, worker_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    /// The expected answer for every (from, to) pair, written out as the seed analysis gives it.
    fn expected(from: JobState, to: JobState) -> bool {
        let allowed: &[JobState] = match from {
            Pending => &[Assigned, Scheduled, Failed, Cancelled, Timeout],
            Assigned => &[Running, Failed, Timeout, Cancelled],
            Scheduled => &[Running, Failed, Timeout, Cancelled],
            Running => &[Succeeded, Failed, Cancelled, Timeout],
            Succeeded | Failed | Cancelled | Timeout => &[],
        };
        allowed.contains(&to)
    }

    #[test]
    fn every_pair_of_job_states_has_the_answer_of_the_table() {
        let mut checked = 0;
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    expected(from, to),
                    "{from} -> {to}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 64);
    }

    #[test]
    fn same_state_is_never_a_transition_and_terminal_states_have_no_exit() {
        for state in JobState::ALL {
            assert!(!state.can_transition_to(state));
            if state.is_terminal() {
                assert!(JobState::ALL.iter().all(|to| !state.can_transition_to(*to)));
                assert!(!state.can_requeue() && !state.can_retry());
            }
        }
    }

    #[test]
    fn only_placed_jobs_requeue_and_only_live_attempts_retry() {
        for state in JobState::ALL {
            assert_eq!(
                state.can_requeue(),
                matches!(state, Assigned | Scheduled),
                "{state}"
            );
            assert_eq!(
                state.can_retry(),
                matches!(state, Assigned | Scheduled | Running),
                "{state}"
            );
        }
    }

    #[test]
    fn job_states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
        }
        assert!("Exploded".parse::<JobState>().is_err());
    }

    fn job_in(state: JobState) -> Job {
        let actor = Actor::service("test");
        let spec = JobSpec {
            command: "true".into(),
            ..Default::default()
        };
        let (mut job, _) = Job::submit(
            Uuid::now_v7(),
            spec,
            JobPolicy::default(),
            "corr".into(),
            None,
            &actor,
        )
        .unwrap();
        job.state = state;
        job.worker_id = Some(Uuid::nil());
        job
    }

    #[test]
    fn every_aggregate_method_obeys_the_table_from_every_state() {
        let actor = Actor::service("test");
        let w = Uuid::nil();
        type Method = fn(&mut Job, Uuid, &Actor) -> Result<DomainEvent>;
        let methods: [(JobState, Method); 6] = [
            (Assigned, |j, w, a| j.assign(w, a)),
            (Scheduled, |j, w, a| j.schedule(w, a)),
            (Running, |j, w, a| j.start(w, a)),
            (Succeeded, |j, w, a| j.complete(w, 0, a)),
            (Cancelled, |j, _, a| j.cancel("asked".into(), a)),
            (Timeout, |j, _, a| j.time_out("late".into(), a)),
        ];
        for from in JobState::ALL {
            for (to, method) in methods {
                let mut job = job_in(from);
                let before = job.clone();
                let outcome = method(&mut job, w, &actor);
                if from.can_transition_to(to) {
                    let event = outcome.unwrap();
                    assert_eq!(job.state, to);
                    assert_eq!(event.correlation_id, "corr");
                } else {
                    assert!(outcome.is_err(), "{from} -> {to} must be refused");
                    assert_eq!(job, before, "a refused change leaves the job as it was");
                }
            }
            let mut job = job_in(from);
            let failed = job.complete(w, 3, &actor);
            assert_eq!(failed.is_ok(), from.can_transition_to(Failed));
            let mut job = job_in(from);
            assert_eq!(
                job.fail(None, "boom".into(), &actor).is_ok(),
                from.can_transition_to(Failed)
            );
        }
    }

    #[test]
    fn a_worker_that_does_not_hold_the_job_is_refused_and_changes_nothing() {
        let actor = Actor::service("test");
        let mut job = job_in(Assigned);
        let before = job.clone();
        let stranger = Uuid::now_v7();
        assert_eq!(
            job.start(stranger, &actor),
            Err(DomainError::JobNotHeldByWorker {
                job_id: job.id,
                worker_id: stranger
            })
        );
        assert_eq!(job, before);
    }

    #[test]
    fn a_result_for_a_finished_job_is_refused() {
        let actor = Actor::service("test");
        let mut job = job_in(Running);
        job.complete(Uuid::nil(), 0, &actor).unwrap();
        let err = job.complete(Uuid::nil(), 1, &actor).unwrap_err();
        assert_eq!(err.code(), "INVALID_JOB_TRANSITION");
        assert_eq!(job.state, Succeeded);
        assert_eq!(job.exit_code, Some(0));
    }

    #[test]
    fn requeue_and_retry_start_a_new_attempt_with_their_own_events() {
        let actor = Actor::service("test");
        let mut job = job_in(Scheduled);
        let events = job.requeue("never acknowledged".into(), &actor).unwrap();
        assert_eq!(job.state, Pending);
        assert_eq!(job.attempt, 2);
        assert_eq!(job.worker_id, None);
        let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["JobRequeued", "JobQueued"]);

        let mut job = job_in(Running);
        let events = job
            .retry("exit 1".into(), std::time::Duration::ZERO, &actor)
            .unwrap();
        assert_eq!((job.state, job.attempt), (Pending, 2));
        let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            ["JobRetrying", "JobQueued"],
            "no backoff: queued at once"
        );
        assert!(job_in(Running).requeue("x".into(), &actor).is_err());
        assert!(job_in(Pending)
            .retry("x".into(), std::time::Duration::ZERO, &actor)
            .is_err());
    }

    #[test]
    fn a_retry_with_backoff_waits_in_pending_until_released() {
        let actor = Actor::service("test");
        let mut job = job_in(Running);
        let backoff = std::time::Duration::from_secs(2);
        let events = job.retry("exit 1".into(), backoff, &actor).unwrap();
        assert_eq!(events.len(), 1, "not queued before its backoff");
        let retry_at = job.not_before.expect("waits");
        assert_eq!(retry_at, job.updated_at + backoff);
        assert_eq!(job.start_by, retry_at + job.policy.schedule_to_start());
        assert_eq!(job.release(&actor).unwrap().event_type, "JobQueued");
        assert!(job.not_before.is_none());
        assert!(job.release(&actor).is_err(), "released once");
    }

    #[test]
    fn a_failed_attempt_is_retried_while_the_policy_allows_then_the_job_fails() {
        let actor = Actor::service("test");
        let mut job = job_in(Running);
        job.policy.retry.max_attempts = 2;
        let w = Uuid::nil();
        let events = job.finish(w, Some(3), None, 0.5, &actor).unwrap();
        assert_eq!(events[0].event_type, "JobRetrying");
        assert_eq!((job.state, job.attempt), (Pending, 2));
        job.not_before = None;
        job.assign(w, &actor).unwrap();
        job.start(w, &actor).unwrap();
        let events = job.finish(w, Some(3), None, 0.5, &actor).unwrap();
        assert_eq!(events[0].event_type, "JobCompleted");
        assert_eq!((job.state, job.exit_code), (Failed, Some(3)));
        let mut ok = job_in(Running);
        ok.policy.retry.max_attempts = 5;
        ok.finish(w, Some(0), None, 0.5, &actor).unwrap();
        assert_eq!(ok.state, Succeeded, "success is never retried");
    }

    #[test]
    fn the_monitor_times_out_requeues_retries_and_releases_by_state() {
        let actor = Actor::service("test");
        let later = |job: &Job| job.deadline_at.unwrap() + chrono::Duration::milliseconds(1);
        let mut pending = job_in(Pending);
        assert!(
            pending.expire(Utc::now(), 0.5, &actor).unwrap().is_empty(),
            "not due yet"
        );
        let at = later(&pending);
        pending.expire(at, 0.5, &actor).unwrap();
        assert_eq!(pending.state, Timeout);

        let mut assigned = job_in(Pending);
        assigned.assign(Uuid::nil(), &actor).unwrap();
        let at = later(&assigned);
        let events = assigned.expire(at, 0.5, &actor).unwrap();
        assert_eq!(events[0].event_type, "JobRequeued");
        assert_eq!((assigned.state, assigned.attempt), (Pending, 2));

        let mut running = job_in(Pending);
        running.assign(Uuid::nil(), &actor).unwrap();
        running.start(Uuid::nil(), &actor).unwrap();
        let at = later(&running);
        running.expire(at, 0.5, &actor).unwrap();
        assert_eq!(running.state, Timeout);

        let mut retried = job_in(Pending);
        retried.policy.retry = crate::RetryPolicy {
            max_attempts: 2,
            retry_on: vec![RetryOn::Timeout],
            ..Default::default()
        };
        retried.assign(Uuid::nil(), &actor).unwrap();
        retried.start(Uuid::nil(), &actor).unwrap();
        let at = later(&retried);
        assert_eq!(
            retried.expire(at, 0.5, &actor).unwrap()[0].event_type,
            "JobRetrying"
        );
        let release_at = retried.not_before.unwrap();
        assert_eq!(
            retried.expire(release_at, 0.5, &actor).unwrap()[0].event_type,
            "JobQueued"
        );
    }

    #[test]
    fn a_lost_worker_retries_or_fails_the_job_by_policy() {
        let actor = Actor::service("test");
        let mut job = job_in(Running);
        job.worker_lost(Uuid::nil(), 0.5, &actor).unwrap();
        assert_eq!(job.state, Failed, "by default there is one attempt");
        let mut job = job_in(Running);
        job.policy.retry.max_attempts = 2;
        assert_eq!(
            job.worker_lost(Uuid::nil(), 0.5, &actor).unwrap()[0].event_type,
            "JobRetrying"
        );
        assert_eq!((job.state, job.attempt), (Pending, 2));
        assert!(
            job_in(Running)
                .worker_lost(Uuid::now_v7(), 0.5, &actor)
                .is_err(),
            "only for the job's own worker"
        );
    }

    #[test]
    fn a_job_of_a_lost_worker_runs_again_only_once_that_worker_is_confirmed_gone() {
        let actor = Actor::service("test");
        let lost = Uuid::nil();
        let mut job = job_in(Running);
        job.policy.retry.max_attempts = 3;
        let events = job.worker_lost(lost, 0.5, &actor).unwrap();
        assert!(
            events.iter().all(|e| e.event_type != "JobQueued"),
            "not queued while the lost worker may still run it"
        );
        assert_eq!(job.fenced_by, Some(lost));
        let far = Utc::now() + chrono::Duration::days(1);
        let before_deadline = job.start_by - chrono::Duration::seconds(1);
        assert!(
            job.expire(before_deadline.min(far), 0.5, &actor)
                .unwrap()
                .is_empty(),
            "its backoff ending does not release it"
        );
        assert!(job
            .worker_gone(Uuid::now_v7(), Ok(()), &actor)
            .unwrap()
            .is_empty());
        assert_eq!(
            job.fenced_by,
            Some(lost),
            "only its own worker's teardown counts"
        );
        job.not_before = Some(Utc::now() - chrono::Duration::seconds(1));
        let released = job.worker_gone(lost, Ok(()), &actor).unwrap();
        assert_eq!(released[0].event_type, "JobQueued");
        assert_eq!((job.fenced_by, job.not_before), (None, None));

        // A teardown nobody can confirm fails the job: never an automatic second run.
        let mut job = job_in(Running);
        job.policy.retry.max_attempts = 3;
        job.worker_lost(lost, 0.5, &actor).unwrap();
        job.worker_gone(lost, Err("no cgroups".into()), &actor)
            .unwrap();
        assert_eq!(job.state, Failed);
        assert!(job
            .error
            .as_deref()
            .unwrap()
            .contains("could not be confirmed"));

        // Nor does waiting past its start deadline run it: it fails and says why.
        let mut job = job_in(Running);
        job.policy.retry.max_attempts = 3;
        job.worker_lost(lost, 0.5, &actor).unwrap();
        let late = job.start_by + chrono::Duration::seconds(1);
        job.expire(late, 0.5, &actor).unwrap();
        assert_eq!(job.state, Failed);
        assert!(job
            .error
            .as_deref()
            .unwrap()
            .contains("never confirmed gone"));
    }

    #[test]
    fn deadlines_follow_the_state() {
        let actor = Actor::service("test");
        let mut job = job_in(Pending);
        assert_eq!(job.deadline_at, Some(job.start_by));
        job.assign(Uuid::nil(), &actor).unwrap();
        assert!(job.deadline_at.unwrap() <= job.updated_at + ACK_TIMEOUT);
        job.start(Uuid::nil(), &actor).unwrap();
        assert_eq!(
            job.deadline_at,
            Some(job.updated_at + job.policy.execution())
        );
        job.complete(Uuid::nil(), 0, &actor).unwrap();
        assert_eq!(job.deadline_at, None);
    }

    #[test]
    fn a_bad_spec_is_refused_with_its_reason() {
        let actor = Actor::service("test");
        for spec in [
            JobSpec {
                command: " ".into(),
                ..Default::default()
            },
            JobSpec {
                command: "a\0b".into(),
                ..Default::default()
            },
            JobSpec {
                command: "x".into(),
                env: [("A=B".into(), "1".into())].into(),
                ..Default::default()
            },
            JobSpec {
                command: "x".into(),
                args: vec!["y".repeat(JobSpec::MAX_TOTAL_BYTES)],
                ..Default::default()
            },
            JobSpec {
                command: "x".into(),
                concurrency: Some(Concurrency {
                    key: "".into(),
                    max: 2,
                }),
                ..Default::default()
            },
            JobSpec {
                command: "x".into(),
                concurrency: Some(Concurrency {
                    key: "k".repeat(129),
                    max: 2,
                }),
                ..Default::default()
            },
            JobSpec {
                command: "x".into(),
                concurrency: Some(Concurrency {
                    key: "tenant-42".into(),
                    max: 0,
                }),
                ..Default::default()
            },
        ] {
            let err = Job::submit(
                Uuid::now_v7(),
                spec,
                JobPolicy::default(),
                "c".into(),
                None,
                &actor,
            )
            .unwrap_err();
            assert_eq!(err.code(), "INVALID_JOB_SPEC");
        }
    }
}
