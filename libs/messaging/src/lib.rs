//! Everything Hodei says over NATS goes through here: connecting, the streams of `nats/`
//! (created idempotently at start-up), message headers, strict decoding, the one consumer loop
//! every service uses ([`consumer::run`]), and request/reply endpoints ([`api::serve`]).

pub mod api;
pub mod consumer;
mod metrics;
pub mod trace;

pub use metrics::Metrics;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use hodei_protocol::{headers, ApiError, ErrorCode, MAX_PAYLOAD_BYTES, SCHEMA_VERSION};
use serde::de::DeserializeOwned;

pub use async_nats::{Client, HeaderMap as Headers};
pub use jetstream::Context as JetStream;

use std::path::Path;

pub type Result<T, E = MessagingError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("{context}: {source}")]
    Nats {
        context: String,
        source: async_nats::Error,
    },
    #[error("stream definition {name} is invalid: {source}")]
    StreamDefinition {
        name: &'static str,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("NATS credentials {0}")]
    Credentials(String),
    #[error("{0}")]
    Url(String),
}

/// `map_err(nats("what we were doing"))`
pub fn nats<E: Into<async_nats::Error>>(
    context: impl Into<String>,
) -> impl FnOnce(E) -> MessagingError {
    let context = context.into();
    move |source| MessagingError::Nats {
        context,
        source: source.into(),
    }
}

/// The stream definitions in `nats/`, in NATS' own JSON format (`nats stream add --config`).
pub const STREAMS: &[(&str, &str)] = &[
    (
        "HODEI_SUBMISSIONS",
        include_str!("../../../nats/HODEI_SUBMISSIONS.json"),
    ),
    (
        "HODEI_EVENTS",
        include_str!("../../../nats/HODEI_EVENTS.json"),
    ),
    (
        "HODEI_WORKER_CMDS",
        include_str!("../../../nats/HODEI_WORKER_CMDS.json"),
    ),
    (
        "HODEI_AGENT",
        include_str!("../../../nats/HODEI_AGENT.json"),
    ),
    ("HODEI_LOGS", include_str!("../../../nats/HODEI_LOGS.json")),
    ("HODEI_DLQ", include_str!("../../../nats/HODEI_DLQ.json")),
    (
        "HODEI_PROBE",
        include_str!("../../../nats/HODEI_PROBE.json"),
    ),
];

pub mod streams {
    pub const SUBMISSIONS: &str = "HODEI_SUBMISSIONS";
    pub const EVENTS: &str = "HODEI_EVENTS";
    pub const WORKER_CMDS: &str = "HODEI_WORKER_CMDS";
    pub const AGENT: &str = "HODEI_AGENT";
    pub const LOGS: &str = "HODEI_LOGS";
    pub const DLQ: &str = "HODEI_DLQ";
}

/// Connect to NATS; waits for the server if it is not up yet, and reconnects for ever.
/// With `creds` (a standard `.creds` file), the connection authenticates as that user and
/// takes the inbox prefix its permissions allow (`_INBOX.<user name>`).
pub async fn connect(url: &str, name: &str, creds: Option<&Path>) -> Result<Client> {
    options(name, creds)
        .await?
        .retry_on_initial_connect()
        .connect(servers(url)?)
        .await
        .map_err(nats(format!("connecting to NATS at {url}")))
}

/// The servers of a NATS URL, which may list several, comma-separated (every node of a
/// cluster): `nats://a:4222,nats://b:4222`.
pub fn servers(url: &str) -> Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| MessagingError::Url(format!("NATS URL {u}: {e}")))
        })
        .collect()
}

/// How often [`stay_on_a_serving_node`] asks JetStream, and how long each answer may take.
const SERVING_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Failed probes in a row after which the client leaves its node.
const SERVING_PROBE_FAILURES: u32 = 3;

/// Keep the client on a NATS node that can serve JetStream. NATS' own pings check only the
/// path to the node: a node cut off from the rest of its cluster (a partition) still answers
/// them, so its clients would stay on it while every stream request times out. Every 2 s
/// `probe` asks JetStream something (a service publishes to a replicated stream, an agent
/// asks for its own consumer); after three failures in a row, while connected, the client
/// reconnects, to another server of its list. Runs until shutdown; with a single server
/// there is nowhere else to go and it does nothing.
pub async fn stay_on_a_serving_node<P, F>(
    client: Client,
    servers: usize,
    mut probe: P,
    shutdown: hodei_runtime::Shutdown,
) where
    P: FnMut() -> F,
    F: std::future::Future<Output = std::result::Result<(), String>>,
{
    if servers < 2 {
        return;
    }
    let mut failures = 0;
    while shutdown
        .run_until_cancelled(tokio::time::sleep(SERVING_PROBE_EVERY))
        .await
        .is_some()
    {
        if client.connection_state() != async_nats::connection::State::Connected {
            failures = 0;
            continue;
        }
        let error = match tokio::time::timeout(SERVING_PROBE_EVERY, probe()).await {
            Ok(Ok(())) => {
                failures = 0;
                continue;
            }
            Ok(Err(error)) => error,
            Err(_) => "no answer".to_owned(),
        };
        failures += 1;
        tracing::warn!(%error, failures, "JetStream does not answer on this NATS node");
        if failures >= SERVING_PROBE_FAILURES {
            tracing::warn!(
                server = %client.server_info().server_name,
                "leaving a NATS node that cannot serve JetStream"
            );
            if let Err(error) = client.force_reconnect().await {
                tracing::warn!(%error, "cannot reconnect");
            }
            failures = 0;
        }
    }
}

/// Whether a JetStream error says that the node has no cluster to serve from (10008).
pub fn cluster_unavailable(error: &async_nats::jetstream::Error) -> bool {
    error.error_code() == async_nats::jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
}

/// [`stay_on_a_serving_node`] for the service `name`: the probe is a publish to
/// HODEI_PROBE (`hodei.probe.<name>`), which is acknowledged only once a quorum of the
/// stream's replicas stored it, as every publish of the service is. A node cut off from the
/// others answers what it can answer alone (the account's information, say); not this.
pub fn keep_jetstream_reachable(
    js: JetStream,
    name: &str,
    servers: usize,
    shutdown: hodei_runtime::Shutdown,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let subject = format!("hodei.probe.{name}");
    let client = js.client();
    let probe = move || {
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            let ack = js
                .publish(subject, Bytes::new())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(drop).map_err(|e| e.to_string())
        }
    };
    stay_on_a_serving_node(client, servers, probe, shutdown)
}

/// Connect options for `name`, authenticated with `creds` when given.
pub async fn options(name: &str, creds: Option<&Path>) -> Result<async_nats::ConnectOptions> {
    let mut options = match creds {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| MessagingError::Credentials(format!("{}: {e}", path.display())))?;
            let invalid = |e| MessagingError::Credentials(format!("{}: {e}", path.display()));
            let jwt = hodei_auth::jwt::jwt_of_creds(&text).map_err(invalid)?;
            let user = hodei_auth::jwt::claims(jwt).map_err(invalid)?;
            let key_pair =
                std::sync::Arc::new(hodei_auth::jwt::key_pair_of_creds(&text).map_err(invalid)?);
            // The nonce the server sends is signed with the user's key, as async-nats's own
            // `with_credentials` does (its parser of the file is left out: see
            // `key_pair_of_creds`).
            let mut options = async_nats::ConnectOptions::with_jwt(jwt.to_owned(), move |nonce| {
                let key_pair = key_pair.clone();
                async move { key_pair.sign(&nonce).map_err(async_nats::AuthError::new) }
            });
            if let Some(user) = user["name"].as_str() {
                options = options.custom_inbox_prefix(hodei_auth::inbox_prefix(user));
            }
            options
        }
        None => async_nats::ConnectOptions::new(),
    };
    // Pings every few seconds: a server that went silent (a node cut off from the network)
    // is noticed, and left for another node, in seconds rather than minutes.
    options = options
        .name(name)
        .connection_timeout(std::time::Duration::from_secs(5))
        .ping_interval(std::time::Duration::from_secs(5))
        .reconnect_to_server_callback(|servers, _info| async move { first_connection(&servers) });
    // TLS: a `tls://` URL requires it; a private CA is named by HODEI_NATS_CA.
    if let Some(ca) = std::env::var_os("HODEI_NATS_CA") {
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    Ok(options)
}

/// A client's first connection goes to one of its servers (picked at random, as the default
/// selection picks) at once. Left to the default, it waits a "delay" of zero first, which the
/// runtime's timer rounds up to its next millisecond tick: 1.1 ms of every agent's start,
/// measured. Later connections (a reconnect, a server that failed) keep the default
/// selection and its backoff.
fn first_connection(servers: &[async_nats::Server]) -> Option<async_nats::ReconnectToServer> {
    if servers.is_empty()
        || servers
            .iter()
            .any(|s| s.did_connect || s.failed_attempts > 0)
    {
        return None;
    }
    let pick = (uuid::Uuid::new_v4().as_u128() % servers.len() as u128) as usize;
    Some(async_nats::ReconnectToServer {
        addr: servers[pick].addr.clone(),
        delay: Some(std::time::Duration::ZERO),
    })
}

/// Whether `subject` matches the NATS subject filter `filter` (`*` one token, `>` the rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in filter.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (expected, Some(actual)) if expected == actual => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// The subjects of stream `name` as `nats/` defines it (empty for an unknown stream).
pub fn stream_subjects(name: &str) -> Vec<String> {
    STREAMS
        .iter()
        .find(|(stream, _)| *stream == name)
        .and_then(|(_, definition)| serde_json::from_str::<serde_json::Value>(definition).ok())
        .and_then(|definition| {
            definition["subjects"].as_array().map(|subjects| {
                subjects
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Create every stream of `nats/`, or bring an existing one to its definition.
/// `replicas` overrides the definitions' `num_replicas` (3 on a three-node cluster).
pub async fn ensure_streams(js: &JetStream, replicas: Option<usize>) -> Result<()> {
    for (name, definition) in STREAMS {
        let mut config: jetstream::stream::Config = serde_json::from_str(definition)
            .map_err(|source| MessagingError::StreamDefinition { name, source })?;
        if let Some(replicas) = replicas {
            config.num_replicas = replicas;
        }
        js.create_or_update_stream(config)
            .await
            .map_err(nats(format!("creating stream {name}")))?;
    }
    Ok(())
}

/// Headers for a message with a deduplication id and, when known, its correlation id.
pub fn message_headers(msg_id: &str, correlation_id: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(headers::MSG_ID, msg_id);
    if let Some(correlation_id) = correlation_id {
        map.insert(headers::CORRELATION_ID, correlation_id);
    }
    map
}

pub fn header<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    map?.get(name).map(|value| value.as_str())
}

/// Publish to a stream and wait until the stream has stored it.
pub async fn publish_durable(
    js: &JetStream,
    subject: String,
    mut headers: HeaderMap,
    payload: Bytes,
) -> Result<()> {
    trace::inject_current(&mut headers);
    js.publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(nats(format!("publishing to {subject}")))?
        .await
        .map_err(nats(format!("waiting for the stream to store {subject}")))?;
    Ok(())
}

/// Strict decoding of a request, report or event: size limit, known schema version, no
/// unknown fields (where the type says so). Errors are the client-facing ones.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the payload is {} bytes; at most {MAX_PAYLOAD_BYTES} are accepted",
                payload.len()
            ),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(default)]
        schema_version: Option<serde_json::Value>,
    }
    let version: Version = serde_json::from_slice(payload)
        .map_err(|e| ApiError::bad_request(format!("the payload is not a JSON object: {e}")))?;
    match version.schema_version {
        None => {}
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {}
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedSchemaVersion,
                format!(
                    "schema_version {other} is not supported; this server speaks {SCHEMA_VERSION}"
                ),
            ))
        }
    }
    serde_json::from_slice(payload)
        .map_err(|e| ApiError::bad_request(format!("invalid payload: {e}")))
}

pub fn encode<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("protocol types always serialize"))
}

#[cfg(test)]
mod subject_tests {
    use super::*;

    #[test]
    fn filters_match_as_nats_matches_them() {
        assert!(subject_matches(
            "hodei.events.>",
            "hodei.events.job.x.JobQueued"
        ));
        assert!(!subject_matches("hodei.events.>", "hodei.events"));
        assert!(subject_matches("hodei.worker.*.cmd", "hodei.worker.w.cmd"));
        assert!(!subject_matches(
            "hodei.worker.*.cmd",
            "hodei.worker.w.cmd.x"
        ));
        assert!(!subject_matches(
            "hodei.jobs.submit",
            "hodei.api.jobs.submit"
        ));
        assert_eq!(stream_subjects("HODEI_SUBMISSIONS"), ["hodei.jobs.submit"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hodei_protocol::api::SubmitJob;

    #[test]
    fn every_stream_definition_parses() {
        for (name, definition) in STREAMS {
            let config: jetstream::stream::Config = serde_json::from_str(definition).unwrap();
            assert_eq!(&config.name, name);
        }
    }

    #[test]
    fn decoding_refuses_bad_input_with_a_code() {
        assert_eq!(
            decode::<SubmitJob>(b"{not json").unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            decode::<SubmitJob>(br#"{"command":"x","bogus":1}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            decode::<SubmitJob>(br#"{"schema_version":9,"command":"x"}"#)
                .unwrap_err()
                .code,
            ErrorCode::UnsupportedSchemaVersion
        );
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert_eq!(
            decode::<SubmitJob>(&big).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
        assert_eq!(
            decode::<SubmitJob>(br#"{"schema_version":1,"command":"x"}"#)
                .unwrap()
                .command,
            "x"
        );
    }
}

/// Health check: the NATS connection is up.
pub fn health(client: &Client) -> hodei_runtime::endpoint::HealthCheck {
    let client = client.clone();
    std::sync::Arc::new(move || {
        let state = client.connection_state();
        Box::pin(async move {
            match state {
                async_nats::connection::State::Connected => Ok(()),
                other => Err(format!("NATS: {other:?}")),
            }
        })
    })
}

/// Connect and make sure every stream exists; what every service does at start-up.
/// A server that is up but not answering JetStream yet is retried with backoff for a minute.
pub async fn connect_and_ensure_streams(
    url: &str,
    name: &str,
    creds: Option<&Path>,
    replicas: Option<usize>,
) -> Result<(Client, JetStream)> {
    use backon::Retryable;
    let client = connect(url, name, creds).await?;
    let js = jetstream::new(client.clone());
    (|| ensure_streams(&js, replicas))
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(100))
                .with_max_delay(std::time::Duration::from_secs(5))
                .with_jitter()
                .with_total_delay(Some(std::time::Duration::from_secs(60)))
                .without_max_times(),
        )
        .notify(|error, delay| {
            tracing::warn!(%error, ?delay, "cannot create the streams yet; retrying")
        })
        .await?;
    Ok((client, js))
}
