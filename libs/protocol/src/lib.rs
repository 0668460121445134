//! The public contract of Hodei in Rust types: subjects, headers, API requests and replies,
//! agent reports, worker commands, log batches and error codes.
//!
//! `docs/asyncapi.yaml` documents the same contract for clients in any language; change both
//! together. Every payload carries `schema_version` ([`SCHEMA_VERSION`]).

pub mod agent;
pub mod api;
pub mod logs;
pub mod schedules;
pub mod spawner;

pub use api::{ApiError, ErrorCode, Reply};

use uuid::Uuid;

/// Version of every payload schema of this contract.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest request or report a service accepts (bytes); larger ones get `PAYLOAD_TOO_LARGE`.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024;

pub fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// Every subject of the contract.
pub mod subjects {
    use super::Uuid;

    pub const API_JOBS_SUBMIT: &str = "hodei.api.jobs.submit";
    pub const API_JOBS_GET: &str = "hodei.api.jobs.get";
    pub const API_JOBS_LIST: &str = "hodei.api.jobs.list";
    pub const API_JOBS_CANCEL: &str = "hodei.api.jobs.cancel";
    pub const API_SCHEDULES_CREATE: &str = "hodei.api.schedules.create";
    pub const API_SCHEDULES_LIST: &str = "hodei.api.schedules.list";
    pub const API_SCHEDULES_GET: &str = "hodei.api.schedules.get";
    pub const API_SCHEDULES_PAUSE: &str = "hodei.api.schedules.pause";
    pub const API_SCHEDULES_RESUME: &str = "hodei.api.schedules.resume";
    pub const API_SCHEDULES_DELETE: &str = "hodei.api.schedules.delete";
    pub const API_WORKERS_LIST: &str = "hodei.api.workers.list";
    pub const API_AUDIT_QUERY: &str = "hodei.api.audit.query";
    pub const API_PROVIDERS_LIST: &str = "hodei.api.providers.list";
    pub const API_DLQ_LIST: &str = "hodei.api.dlq.list";
    pub const API_DLQ_SHOW: &str = "hodei.api.dlq.show";
    pub const API_DLQ_REPLAY: &str = "hodei.api.dlq.replay";
    pub const API_DLQ_DISCARD: &str = "hodei.api.dlq.discard";
    /// Durable fire-and-forget submissions (stream HODEI_SUBMISSIONS).
    pub const JOBS_SUBMIT: &str = "hodei.jobs.submit";
    pub const EVENTS_ALL: &str = "hodei.events.>";

    pub fn worker_cmd(worker_id: Uuid) -> String {
        format!("hodei.worker.{worker_id}.cmd")
    }
    pub fn agent_register(worker_id: Uuid) -> String {
        format!("hodei.agent.{worker_id}.register")
    }
    pub fn agent_heartbeat(worker_id: Uuid) -> String {
        format!("hodei.agent.{worker_id}.heartbeat")
    }
    pub fn agent_started(worker_id: Uuid) -> String {
        format!("hodei.agent.{worker_id}.started")
    }
    pub fn agent_finished(worker_id: Uuid) -> String {
        format!("hodei.agent.{worker_id}.finished")
    }
    pub fn logs(job_id: Uuid) -> String {
        format!("hodei.logs.{job_id}")
    }
    /// Every event of one job.
    pub fn job_events(job_id: Uuid) -> String {
        format!("hodei.events.job.{job_id}.>")
    }
    /// Events of one type, of any aggregate id: `hodei.events.<aggregate>.*.<EventType>`.
    pub fn events_of_type(aggregate: &str, event_type: &str) -> String {
        format!("hodei.events.{aggregate}.*.{event_type}")
    }
    /// The worker id in `hodei.agent.<id>.<report>` or `hodei.worker.<id>.cmd`.
    pub fn worker_id_of(subject: &str) -> Option<Uuid> {
        subject.split('.').nth(2)?.parse().ok()
    }
}

/// Message headers of the contract.
pub mod headers {
    /// JetStream's deduplication id: the event id, or the client's idempotency key.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const CORRELATION_ID: &str = "Hodei-Correlation-Id";
    pub const EVENT_TYPE: &str = "Hodei-Event-Type";
    /// Where a service answers a report that travelled through a stream.
    pub const REPLY_TO: &str = "Hodei-Reply-To";
    /// Set on every error reply, equal to `error.code` in its body.
    pub const ERROR_CODE: &str = "Hodei-Error-Code";
}

/// The W3C trace id of a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (_version, trace_id, span_id) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(trace_id, 32) && hex(span_id, 16) && trace_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

/// A fresh correlation id, shaped like a W3C trace id (32 lowercase hex digits).
pub fn new_correlation_id() -> String {
    Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_taken_only_from_valid_traceparents() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of("garbage"), None);
        assert_eq!(new_correlation_id().len(), 32);
    }

    #[test]
    fn worker_ids_are_read_from_agent_and_command_subjects() {
        let id = Uuid::now_v7();
        assert_eq!(
            subjects::worker_id_of(&subjects::agent_finished(id)),
            Some(id)
        );
        assert_eq!(subjects::worker_id_of(&subjects::worker_cmd(id)), Some(id));
        assert_eq!(subjects::worker_id_of("hodei.agent.nope.started"), None);
    }
}
