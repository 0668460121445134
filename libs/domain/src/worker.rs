//! The worker state machine and the worker aggregate.
//!
//! Creating -> Connecting|Terminating; Connecting -> Ready|Terminating;
//! Ready -> Busy|Draining|Terminating; Busy -> Ready|Draining|Terminating;
//! Draining -> Terminating; Terminating -> Terminated; Terminated has no exit.
//! Every method of [`Worker`] goes through [`WorkerState::can_transition_to`] (the seed
//! analysis' Gap 1: no method validates on its own).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{DomainError, Result};

/// How long the provider has to destroy a worker before the teardown is asked for again.
pub const TEARDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a requested worker may take to register before it is given up, by default.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
use crate::events::{
    Actor, DomainEvent, EventPayload, WorkerProvisioned, WorkerProvisioningFailed,
    WorkerProvisioningRequested, WorkerReady, WorkerReadyForJob, WorkerRegistered,
    WorkerStatusChanged, WorkerTerminated, WorkerTerminating,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkerState {
    Creating,
    Connecting,
    Ready,
    Busy,
    Draining,
    Terminating,
    Terminated,
}

impl WorkerState {
    pub const ALL: [WorkerState; 7] = [
        WorkerState::Creating,
        WorkerState::Connecting,
        WorkerState::Ready,
        WorkerState::Busy,
        WorkerState::Draining,
        WorkerState::Terminating,
        WorkerState::Terminated,
    ];

    /// The one transition table of the worker machine.
    pub fn can_transition_to(self, to: WorkerState) -> bool {
        use WorkerState::*;
        matches!(
            (self, to),
            (Creating, Connecting | Terminating)
                | (Connecting, Ready | Terminating)
                | (Ready, Busy | Draining | Terminating)
                | (Busy, Ready | Draining | Terminating)
                | (Draining, Terminating)
                | (Terminating, Terminated)
        )
    }

    pub fn is_terminal(self) -> bool {
        self == WorkerState::Terminated
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Creating => "Creating",
            WorkerState::Connecting => "Connecting",
            WorkerState::Ready => "Ready",
            WorkerState::Busy => "Busy",
            WorkerState::Draining => "Draining",
            WorkerState::Terminating => "Terminating",
            WorkerState::Terminated => "Terminated",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WorkerState::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown worker state '{s}'"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub id: Uuid,
    pub state: WorkerState,
    pub provider: String,
    /// The job this worker was provisioned for (ephemeral workers).
    pub reserved_job_id: Option<Uuid>,
    /// A warm-pool worker: provisioned ahead of demand and reused for up to `max_jobs` jobs.
    pub pooled: bool,
    /// How many jobs the worker runs before it is torn down (1 for an ephemeral worker).
    pub max_jobs: u32,
    /// How many jobs it has been given.
    pub jobs_run: u32,
    pub current_job_id: Option<Uuid>,
    /// SHA-256 of the one-time bootstrap token. It registers the worker once (from
    /// Connecting); the same agent asking again while Ready is answered without a change.
    pub token_hash: Option<String>,
    pub correlation_id: String,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When the state-timeout monitor acts: a worker that never connects, or that stopped
    /// sending heartbeats (each heartbeat moves it). None while nothing is awaited.
    pub deadline_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a worker is asked of a provider for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An ephemeral worker reserved for one job, torn down when that job leaves it.
    ForJob(Uuid),
    /// A warm-pool worker, taking queued jobs one after the other, up to `max_jobs`.
    Pool { max_jobs: u32 },
}

/// What a registration raised: the worker is registered, and either waits for its job
/// ([`Registration::waiting`]: the dispatcher is told it is ready) or is given it in the
/// same transaction ([`Registration::given_its_job`]: nothing needs to hear it was ready).
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Registration {
    registered: DomainEvent,
    ready: [DomainEvent; 2],
}

impl Registration {
    /// WorkerRegistered, WorkerReady, WorkerReadyForJob: the dispatcher gives the worker a
    /// job (its reserved one, or a pending one for a pool worker) or tears it down.
    pub fn waiting(self) -> Vec<DomainEvent> {
        let [ready, for_job] = self.ready;
        vec![self.registered, ready, for_job]
    }

    /// WorkerRegistered alone: the worker is given its job (Ready -> Busy, with an event of
    /// its own) before the registration commits.
    pub fn given_its_job(self) -> Vec<DomainEvent> {
        vec![self.registered]
    }
}

impl Worker {
    /// A worker asked of a provider, in Creating; it must register within `connect_timeout`.
    pub fn request(
        id: Uuid,
        provider: &str,
        purpose: Purpose,
        correlation_id: String,
        connect_timeout: std::time::Duration,
        actor: &Actor,
    ) -> (Worker, DomainEvent) {
        let now = Utc::now();
        let (for_job, pooled, max_jobs) = match purpose {
            Purpose::ForJob(job_id) => (Some(job_id), false, 1),
            Purpose::Pool { max_jobs } => (None, true, max_jobs.max(1)),
        };
        let worker = Worker {
            id,
            state: WorkerState::Creating,
            provider: provider.to_owned(),
            reserved_job_id: for_job,
            pooled,
            max_jobs,
            jobs_run: 0,
            current_job_id: None,
            token_hash: None,
            correlation_id,
            last_heartbeat_at: None,
            deadline_at: Some(now + connect_timeout),
            version: 0,
            created_at: now,
            updated_at: now,
        };
        let event = worker.event(
            actor,
            &WorkerProvisioningRequested {
                worker_id: id,
                provider: provider.to_owned(),
                for_job,
                pooled,
            },
        );
        (worker, event)
    }

    fn event<P: EventPayload>(&self, actor: &Actor, payload: &P) -> DomainEvent {
        DomainEvent::new(self.id, &self.correlation_id, actor, payload)
    }

    /// The only place the state changes.
    fn transition(&mut self, to: WorkerState) -> Result<WorkerState> {
        let from = self.state;
        if !from.can_transition_to(to) {
            return Err(DomainError::InvalidWorkerTransition {
                worker_id: self.id,
                from,
                to,
            });
        }
        self.state = to;
        self.updated_at = Utc::now();
        Ok(from)
    }

    /// The provider created the resource; the agent holds a bootstrap token whose hash is kept.
    pub fn provisioned(&mut self, token_hash: String, actor: &Actor) -> Result<DomainEvent> {
        self.transition(WorkerState::Connecting)?;
        self.token_hash = Some(token_hash);
        let provider = self.provider.clone();
        Ok(self.event(
            actor,
            &WorkerProvisioned {
                worker_id: self.id,
                provider,
            },
        ))
    }

    /// The provider could not create the resource (or start the agent): the worker goes to
    /// Terminating; the caller ends it with [`Worker::terminated`] once nothing is left of it.
    pub fn provisioning_failed(&mut self, error: String, actor: &Actor) -> Result<DomainEvent> {
        self.transition(WorkerState::Terminating)?;
        self.deadline_at = None;
        let provider = self.provider.clone();
        Ok(self.event(
            actor,
            &WorkerProvisioningFailed {
                worker_id: self.id,
                provider,
                error,
            },
        ))
    }

    /// The agent registers with its bootstrap token, which is spent: Connecting -> Ready.
    /// `session_hash` (the hash of the token with the agent's instance value) replaces the
    /// token's hash: a registration asked again is answered (with no change) only when it
    /// comes from that same agent; the bare token is refused from now on.
    /// `lost_after`: how long it may go without a heartbeat before it is declared lost.
    pub fn register(
        &mut self,
        presented_token_hash: &str,
        session_hash: Option<&str>,
        pid: Option<u32>,
        hostname: Option<String>,
        lost_after: std::time::Duration,
        actor: &Actor,
    ) -> Result<Option<Registration>> {
        let kept_is = |presented: &str| {
            self.token_hash
                .as_deref()
                .is_some_and(|kept| constant_time_eq(kept.as_bytes(), presented.as_bytes()))
        };
        match self.state {
            WorkerState::Connecting if kept_is(presented_token_hash) => {}
            // The same agent's retry of the registration that made it Ready (its answer was
            // lost), and that may already have given it its reserved job.
            WorkerState::Ready | WorkerState::Busy if session_hash.is_some_and(kept_is) => {
                return Ok(None)
            }
            _ => return Err(DomainError::InvalidBootstrapToken { worker_id: self.id }),
        }
        self.token_hash = session_hash.map(str::to_owned);
        let from = self.transition(WorkerState::Ready)?;
        self.last_heartbeat_at = Some(self.updated_at);
        self.deadline_at = Some(self.updated_at + lost_after);
        let registered = self.event(
            actor,
            &WorkerRegistered {
                worker_id: self.id,
                pid,
                hostname,
            },
        );
        let ready = self.ready_events(from, actor);
        Ok(Some(Registration { registered, ready }))
    }

    /// Ready -> Busy with a job.
    pub fn assign(&mut self, job_id: Uuid, actor: &Actor) -> Result<DomainEvent> {
        let from = self.transition(WorkerState::Busy)?;
        self.current_job_id = Some(job_id);
        self.jobs_run += 1;
        Ok(self.event(
            actor,
            &WorkerStatusChanged {
                worker_id: self.id,
                from,
                to: WorkerState::Busy,
                job_id: Some(job_id),
            },
        ))
    }

    /// Busy -> Ready: the job is done and the worker takes another (warm pools).
    pub fn release(&mut self, actor: &Actor) -> Result<Vec<DomainEvent>> {
        let from = self.transition(WorkerState::Ready)?;
        self.current_job_id = None;
        self.reserved_job_id = None;
        Ok(self.ready_events(from, actor).to_vec())
    }

    /// It is Ready (coming from `from`) and waits for a job: its reserved one, if any.
    fn ready_events(&self, from: WorkerState, actor: &Actor) -> [DomainEvent; 2] {
        [
            self.event(
                actor,
                &WorkerReady {
                    worker_id: self.id,
                    from,
                },
            ),
            self.event(
                actor,
                &WorkerReadyForJob {
                    worker_id: self.id,
                    reserved_for: self.reserved_job_id,
                },
            ),
        ]
    }

    /// Whether `job_id` leaving would change this worker ([`Worker::job_left`]): it holds
    /// that job and is not already going away. A pool worker that was handed its next job
    /// with the report of the last one no longer holds the last one.
    pub fn is_left_by(&self, job_id: Uuid) -> bool {
        let holds_job = self.current_job_id == Some(job_id) || self.reserved_job_id == Some(job_id);
        holds_job
            && !matches!(
                self.state,
                WorkerState::Terminating | WorkerState::Terminated
            )
    }

    /// Its job `job_id` left the worker. A pool worker whose agent reported the end itself
    /// (`reported_by_worker`: the process is gone) and that has jobs left goes back to Ready
    /// for the next one; any other worker is torn down, which ends whatever the job left
    /// running (a cancelled or timed-out job's process). Nothing happens if the worker does
    /// not hold that job or is already going away.
    pub fn job_left(
        &mut self,
        job_id: Uuid,
        reported_by_worker: bool,
        why: &str,
        actor: &Actor,
    ) -> Result<Vec<DomainEvent>> {
        if !self.is_left_by(job_id) {
            return Ok(Vec::new());
        }
        let reusable = self.pooled
            && reported_by_worker
            && self.state == WorkerState::Busy
            && self.jobs_run < self.max_jobs;
        if reusable {
            return self.release(actor);
        }
        let reason = if self.pooled && self.jobs_run >= self.max_jobs {
            format!(
                "job {job_id} {why}; the worker ran its {} jobs",
                self.max_jobs
            )
        } else {
            format!("job {job_id} {why}")
        };
        Ok(vec![self.terminate(reason, actor)?])
    }

    /// Stop taking jobs; the current one (if any) finishes.
    pub fn drain(&mut self, actor: &Actor) -> Result<DomainEvent> {
        let from = self.transition(WorkerState::Draining)?;
        Ok(self.event(
            actor,
            &WorkerStatusChanged {
                worker_id: self.id,
                from,
                to: WorkerState::Draining,
                job_id: self.current_job_id,
            },
        ))
    }

    /// Tear the worker down (its job finished, it was lost, or it is being drained away).
    pub fn terminate(&mut self, reason: String, actor: &Actor) -> Result<DomainEvent> {
        let from = self.transition(WorkerState::Terminating)?;
        self.deadline_at = Some(self.updated_at + TEARDOWN_TIMEOUT);
        Ok(self.event(
            actor,
            &WorkerTerminating {
                worker_id: self.id,
                from,
                reason,
            },
        ))
    }

    /// The provider destroyed the resource.
    pub fn terminated(&mut self, actor: &Actor) -> Result<DomainEvent> {
        let from = self.transition(WorkerState::Terminated)?;
        self.token_hash = None;
        self.deadline_at = None;
        Ok(self.event(
            actor,
            &WorkerTerminated {
                worker_id: self.id,
                from,
            },
        ))
    }
}

impl Worker {
    /// What the state-timeout monitor does with a worker at `now`: one that never connected
    /// or stopped sending heartbeats is torn down. Returns the reason with the event, or
    /// nothing if the worker is not due.
    pub fn expire(
        &mut self,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> Result<Option<(DomainEvent, WorkerFault)>> {
        if self.deadline_at.is_none_or(|at| at > now) {
            return Ok(None);
        }
        let fault = match self.state {
            WorkerState::Creating | WorkerState::Connecting => WorkerFault::NeverConnected,
            WorkerState::Ready | WorkerState::Busy | WorkerState::Draining => WorkerFault::Lost,
            WorkerState::Terminating => WorkerFault::TeardownOverdue,
            WorkerState::Terminated => return Ok(None),
        };
        let reason = match fault {
            WorkerFault::NeverConnected => "never registered in time".to_owned(),
            WorkerFault::Lost => "lost: no heartbeat in time".to_owned(),
            WorkerFault::TeardownOverdue => {
                // Not a transition: the teardown is asked for again (the provider destroys
                // idempotently) until the provider reports the worker Terminated.
                self.deadline_at = Some(now + TEARDOWN_TIMEOUT);
                let payload = WorkerTerminating {
                    worker_id: self.id,
                    from: WorkerState::Terminating,
                    reason: "teardown not confirmed in time; asked again".into(),
                };
                return Ok(Some((self.event(actor, &payload), fault)));
            }
        };
        Ok(Some((self.terminate(reason, actor)?, fault)))
    }
}

/// Why the monitor tore a worker down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerFault {
    /// Its job never started there: requeue it.
    NeverConnected,
    /// Its job may have been running: retry or fail it by the job's policy.
    Lost,
    /// The provider has not confirmed the teardown: it is asked for again.
    TeardownOverdue,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkerState::*;

    fn expected(from: WorkerState, to: WorkerState) -> bool {
        let allowed: &[WorkerState] = match from {
            Creating => &[Connecting, Terminating],
            Connecting => &[Ready, Terminating],
            Ready => &[Busy, Draining, Terminating],
            Busy => &[Ready, Draining, Terminating],
            Draining => &[Terminating],
            Terminating => &[Terminated],
            Terminated => &[],
        };
        allowed.contains(&to)
    }

    #[test]
    fn every_pair_of_worker_states_has_the_answer_of_the_table() {
        let mut checked = 0;
        for from in WorkerState::ALL {
            for to in WorkerState::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    expected(from, to),
                    "{from} -> {to}"
                );
                checked += 1;
            }
            assert!(
                !from.can_transition_to(from),
                "same state is not a transition"
            );
        }
        assert_eq!(checked, 49);
        assert!(WorkerState::ALL
            .iter()
            .all(|to| !Terminated.can_transition_to(*to)));
    }

    #[test]
    fn worker_states_round_trip_through_their_names() {
        for state in WorkerState::ALL {
            assert_eq!(state.as_str().parse::<WorkerState>().unwrap(), state);
        }
    }

    fn worker_in(state: WorkerState) -> Worker {
        let (mut worker, _) = Worker::request(
            Uuid::now_v7(),
            "process",
            Purpose::ForJob(Uuid::nil()),
            "c".into(),
            CONNECT_TIMEOUT,
            &Actor::service("t"),
        );
        worker.state = state;
        worker.token_hash = Some("hash".into());
        worker
    }

    /// Every method, from every state, succeeds exactly when the central table allows its target.
    #[test]
    fn every_worker_method_is_validated_by_the_central_table() {
        let a = Actor::service("t");
        type Method = fn(&mut Worker, &Actor) -> bool;
        let methods: [(WorkerState, Method); 6] = [
            (Connecting, |w, a| w.provisioned("hash".into(), a).is_ok()),
            (Busy, |w, a| w.assign(Uuid::nil(), a).is_ok()),
            (Ready, |w, a| w.release(a).is_ok()),
            (Draining, |w, a| w.drain(a).is_ok()),
            (Terminating, |w, a| w.terminate("done".into(), a).is_ok()),
            (Terminated, |w, a| w.terminated(a).is_ok()),
        ];
        let methods: Vec<(WorkerState, Method)> = methods
            .into_iter()
            .chain([(
                Terminating,
                (|w: &mut Worker, a: &Actor| w.provisioning_failed("x".into(), a).is_ok())
                    as Method,
            )])
            .collect();
        for from in WorkerState::ALL {
            for &(to, method) in &methods {
                let mut worker = worker_in(from);
                let before = worker.clone();
                let ok = method(&mut worker, &a);
                assert_eq!(ok, from.can_transition_to(to), "{from} -> {to}");
                if ok {
                    assert_eq!(worker.state, to);
                } else {
                    assert_eq!(
                        worker, before,
                        "a refused change leaves the worker as it was"
                    );
                }
            }
            // Registering spends the token: only from Connecting, and through the table.
            let mut worker = worker_in(from);
            let registered = worker.register(
                "hash",
                Some("s"),
                None,
                None,
                std::time::Duration::from_secs(15),
                &a,
            );
            let changed = registered.as_ref().is_ok_and(Option::is_some);
            assert_eq!(
                changed,
                from == Connecting && from.can_transition_to(Ready),
                "register from {from}"
            );
            // The bare token (its hash was replaced by the session's at registration) is
            // only good in Connecting.
            assert_eq!(
                registered.is_ok(),
                from == Connecting,
                "register from {from}"
            );
        }
    }

    #[test]
    fn the_bootstrap_token_is_checked_then_spent() {
        let a = Actor::service("t");
        let lost = std::time::Duration::from_secs(15);
        let mut worker = worker_in(Connecting);
        assert_eq!(
            worker.register("wrong", Some("session"), None, None, lost, &a),
            Err(DomainError::InvalidBootstrapToken {
                worker_id: worker.id
            })
        );
        assert_eq!(worker.state, Connecting);
        let registration = worker
            .register("hash", Some("session"), Some(7), None, lost, &a)
            .unwrap()
            .expect("the first registration changes the worker");
        let types = |events: Vec<DomainEvent>| -> Vec<String> {
            events.into_iter().map(|e| e.event_type).collect()
        };
        assert_eq!(
            types(registration.clone().waiting()),
            ["WorkerRegistered", "WorkerReady", "WorkerReadyForJob"]
        );
        assert_eq!(types(registration.given_its_job()), ["WorkerRegistered"]);
        assert!(
            worker
                .register("hash", Some("session"), None, None, lost, &a)
                .unwrap()
                .is_none(),
            "the same agent asking again changes nothing"
        );
        assert!(
            worker
                .register("hash", Some("another agent"), None, None, lost, &a)
                .is_err(),
            "the spent token with another instance is refused"
        );
        assert!(
            worker.register("hash", None, None, None, lost, &a).is_err(),
            "the spent token alone is refused"
        );
        assert_eq!(worker.state, Ready);
        worker.assign(Uuid::nil(), &a).unwrap();
        assert!(
            worker
                .register("hash", Some("session"), None, None, lost, &a)
                .unwrap()
                .is_none(),
            "asked again once it has its job (the answer with the job was lost): nothing changes"
        );
        worker.terminate("done".into(), &a).unwrap();
        assert!(
            worker
                .register("hash", Some("session"), None, None, lost, &a)
                .is_err(),
            "nothing registers a worker being torn down"
        );
        assert_eq!(worker.state, Terminating);
    }

    #[test]
    fn the_monitor_tears_down_workers_that_never_connect_or_go_silent() {
        let a = Actor::service("t");
        let (mut creating, _) = Worker::request(
            Uuid::now_v7(),
            "process",
            Purpose::ForJob(Uuid::nil()),
            "c".into(),
            CONNECT_TIMEOUT,
            &a,
        );
        assert_eq!(
            creating.expire(Utc::now(), &a).unwrap(),
            None,
            "not due yet"
        );
        let due = creating.deadline_at.unwrap();
        let (event, fault) = creating.expire(due, &a).unwrap().unwrap();
        assert_eq!(
            (event.event_type.as_str(), fault),
            ("WorkerTerminating", WorkerFault::NeverConnected)
        );
        let mut busy = worker_in(Busy);
        busy.deadline_at = Some(Utc::now());
        assert_eq!(
            busy.expire(Utc::now(), &a).unwrap().unwrap().1,
            WorkerFault::Lost
        );
        assert_eq!(busy.state, Terminating);
        let overdue = busy.deadline_at.unwrap();
        let (again, fault) = busy.expire(overdue, &a).unwrap().unwrap();
        assert_eq!(
            (again.event_type.as_str(), fault),
            ("WorkerTerminating", WorkerFault::TeardownOverdue)
        );
        assert_eq!(busy.state, Terminating, "asking again is not a transition");
        assert!(busy.deadline_at.unwrap() > overdue);
        busy.terminated(&a).unwrap();
        assert_eq!(
            busy.expire(Utc::now() + chrono::Duration::hours(1), &a)
                .unwrap(),
            None,
            "no deadline once terminated"
        );
    }

    #[test]
    fn a_failed_provisioning_goes_through_terminating_to_terminated() {
        let a = Actor::service("t");
        for from in [Creating, Connecting] {
            let mut worker = worker_in(from);
            let failed = worker
                .provisioning_failed("no such binary".into(), &a)
                .unwrap();
            assert_eq!(failed.event_type, "WorkerProvisioningFailed");
            assert_eq!(
                worker.terminated(&a).unwrap().event_type,
                "WorkerTerminated"
            );
            assert_eq!(worker.state, Terminated);
        }
        assert!(worker_in(Terminated)
            .provisioning_failed("x".into(), &a)
            .is_err());
    }

    fn pool_worker(max_jobs: u32) -> Worker {
        let a = Actor::service("t");
        let (mut worker, _) = Worker::request(
            Uuid::now_v7(),
            "process",
            Purpose::Pool { max_jobs },
            "c".into(),
            CONNECT_TIMEOUT,
            &a,
        );
        worker.state = Ready;
        worker
    }

    #[test]
    fn a_pool_worker_takes_jobs_until_it_has_run_its_share() {
        let a = Actor::service("t");
        let mut worker = pool_worker(2);
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        worker.assign(first, &a).unwrap();
        let events = worker.job_left(first, true, "ended Succeeded", &a).unwrap();
        let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["WorkerReady", "WorkerReadyForJob"]);
        assert_eq!((worker.state, worker.current_job_id), (Ready, None));
        worker.assign(second, &a).unwrap();
        let events = worker.job_left(second, true, "ended Failed", &a).unwrap();
        assert_eq!(events[0].event_type, "WorkerTerminating");
        assert_eq!(worker.state, Terminating, "its second job was its last");
    }

    #[test]
    fn a_pool_worker_whose_job_ended_without_its_report_is_torn_down() {
        let a = Actor::service("t");
        let mut worker = pool_worker(100);
        let job = Uuid::now_v7();
        worker.assign(job, &a).unwrap();
        worker.job_left(job, false, "ended Cancelled", &a).unwrap();
        assert_eq!(worker.state, Terminating, "the process may still run");
    }

    #[test]
    fn an_ephemeral_worker_is_torn_down_and_a_foreign_job_changes_nothing() {
        let a = Actor::service("t");
        let job = Uuid::now_v7();
        let (mut worker, _) = Worker::request(
            Uuid::now_v7(),
            "process",
            Purpose::ForJob(job),
            "c".into(),
            CONNECT_TIMEOUT,
            &a,
        );
        worker.state = Ready;
        assert!(worker
            .job_left(Uuid::now_v7(), true, "ended Succeeded", &a)
            .unwrap()
            .is_empty());
        worker.assign(job, &a).unwrap();
        worker.job_left(job, true, "ended Succeeded", &a).unwrap();
        assert_eq!(worker.state, Terminating);
        assert!(worker
            .job_left(job, true, "ended Succeeded", &a)
            .unwrap()
            .is_empty());
    }
}
