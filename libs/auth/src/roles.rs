//! Who may do what on NATS: the subjects each role may publish and subscribe to. Everything
//! not listed is refused by nats-server itself.

use uuid::Uuid;

/// A NATS user's role in Hodei.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A control-plane service (scheduler, dispatcher, registry, audit, provider-manager,
    /// relay): the only ones that publish events and worker commands, answer the API
    /// subjects and manage streams and consumers.
    Service,
    /// Everything, for the test harness and benchmarks that inspect the system from the
    /// outside; never a client's or a service's role.
    Admin,
    /// Submit, get, list and cancel jobs; follow a job's events and logs.
    Submitter,
    /// Everything a submitter may, plus workers, providers, audit and dead letters.
    Operator,
    /// One worker's agent: its own reports and heartbeats, its own command consumer, the
    /// logs of the job it was provisioned for (`job_id`), its own inbox.
    Worker {
        worker_id: Uuid,
        job_id: Option<Uuid>,
    },
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Worker { .. } => "worker",
        }
    }
}

/// Publish and subscribe allow-lists of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The inbox prefix of a user named `name`: replies to it arrive under `<prefix>.>`, which
/// only that user may subscribe to. Clients set it as their inbox prefix.
pub fn inbox_prefix(name: &str) -> String {
    format!("_INBOX.{name}")
}

/// Name of the consumer a worker reads its commands with.
pub fn worker_consumer(worker_id: Uuid) -> String {
    format!("worker-{worker_id}")
}

const CLIENT_APIS: [&str; 5] = [
    "hodei.api.jobs.submit",
    "hodei.api.jobs.get",
    "hodei.api.jobs.list",
    "hodei.api.jobs.cancel",
    // A schedule submits jobs on a clock: whoever may submit may schedule.
    "hodei.api.schedules.*",
];
const OPERATOR_APIS: [&str; 4] = [
    "hodei.api.workers.list",
    "hodei.api.providers.list",
    "hodei.api.audit.query",
    "hodei.api.dlq.>",
];
/// Streams a client may read a job's events and logs from, with consumers of its own that
/// expire when it leaves (ephemeral: no durable consumer, no deletion, no stream change).
const FOLLOWED_STREAMS: [&str; 2] = ["HODEI_EVENTS", "HODEI_LOGS"];

pub fn permissions(role: &Role, name: &str) -> Permissions {
    let own_inbox = format!("{}.>", inbox_prefix(name));
    match role {
        Role::Admin => Permissions {
            publish: vec![">".into()],
            subscribe: vec![">".into()],
        },
        Role::Service => {
            // Every service: JetStream (its streams and durable consumers), the subjects
            // the outbox writes to, dead letters, its probes of JetStream, and answers to
            // any inbox (replies, and the answers to agents' reports).
            let publish = [
                "$JS.API.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                "hodei.events.>",
                "hodei.worker.*.cmd",
                "hodei.dlq.>",
                "hodei.probe.>",
                "_INBOX.>",
            ];
            // The subjects it answers, as each service's queue group.
            let serves: &[&str] = match name {
                "scheduler" => &CLIENT_APIS,
                "registry" => &[
                    "hodei.agent.*.register",
                    "hodei.agent.*.heartbeat",
                    "hodei.api.workers.list",
                ],
                "audit" => &["hodei.api.audit.query", "hodei.api.dlq.>"],
                "provider-manager" => &["hodei.api.providers.list"],
                _ => &[],
            };
            // Services that answer requests are NATS micro services: they answer
            // `$SRV.PING|INFO|STATS` (discovery) too.
            let discovery = (!serves.is_empty()).then_some("$SRV.>");
            Permissions {
                publish: publish.iter().map(|s| s.to_string()).collect(),
                subscribe: std::iter::once(own_inbox)
                    .chain(serves.iter().chain(&discovery).map(|s| s.to_string()))
                    .collect(),
            }
        }
        Role::Submitter | Role::Operator => {
            let mut publish: Vec<String> = CLIENT_APIS.iter().map(|s| s.to_string()).collect();
            publish.push("hodei.jobs.submit".into());
            if *role == Role::Operator {
                publish.extend(OPERATOR_APIS.iter().map(|s| s.to_string()));
                // `nats micro ls|info|stats`: which services run, and their counters.
                publish.push("$SRV.>".into());
            }
            for stream in FOLLOWED_STREAMS {
                publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
                publish.push(format!("$JS.API.CONSUMER.CREATE.{stream}"));
                publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"));
                publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.*"));
            }
            Permissions {
                publish,
                subscribe: vec![own_inbox, "hodei.events.job.>".into()],
            }
        }
        Role::Worker { worker_id, job_id } => {
            let consumer = worker_consumer(*worker_id);
            let stream = "HODEI_WORKER_CMDS";
            let mut publish = vec![
                format!("hodei.agent.{worker_id}.>"),
                format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.hodei.worker.{worker_id}.cmd"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
                format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
                format!("$JS.API.CONSUMER.DELETE.{stream}.{consumer}"),
                format!("$JS.ACK.{stream}.{consumer}.>"),
            ];
            // A worker provisioned for one job writes only that job's logs; a warm-pool
            // worker, given jobs after it connected, writes the logs of any job.
            publish.push(match job_id {
                Some(job_id) => format!("hodei.logs.{job_id}"),
                None => "hodei.logs.*".into(),
            });
            Permissions {
                publish,
                subscribe: vec![own_inbox],
            }
        }
    }
}

/// Whether `name` can be a credential's name: one subject token of letters, digits, `-`, `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_operators_ask_the_micro_api_and_only_serving_services_answer_it() {
        let srv = |perms: &[String]| perms.iter().any(|s| s.starts_with("$SRV"));
        assert!(srv(&permissions(&Role::Operator, "ops").publish));
        assert!(!srv(&permissions(&Role::Submitter, "ci").publish));
        for name in ["scheduler", "registry", "audit", "provider-manager"] {
            assert!(srv(&permissions(&Role::Service, name).subscribe), "{name}");
        }
        for name in ["dispatcher", "relay"] {
            assert!(!srv(&permissions(&Role::Service, name).subscribe), "{name}");
        }
    }
}
