//! A real OTLP/HTTP trace receiver: it accepts `POST /v1/traces` with the standard protobuf
//! `ExportTraceServiceRequest` and keeps every span with its service's name. The tracing
//! tests read what it kept; `hodei-trace-sink` runs it as a program (docker-compose.yml,
//! where no Jaeger image can be built) and prints every span it receives.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::net::TcpListener;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// The span's events: each one's name and its string attributes.
    pub events: Vec<ReceivedEvent>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReceivedEvent {
    pub name: String,
    pub attributes: Vec<(String, String)>,
}

type OnSpan = Arc<dyn Fn(&ReceivedSpan) + Send + Sync>;

#[derive(Clone)]
pub struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    pub endpoint: String,
}

impl Receiver {
    /// Listen on a free port of 127.0.0.1, keeping every span.
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0", None).await
    }

    /// Listen on `addr`; every span received is kept and given to `on_span`.
    pub async fn start_on(addr: &str, on_span: Option<OnSpan>) -> Receiver {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Receiver {
            spans: Default::default(),
            endpoint,
        };
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state((receiver.spans.clone(), on_span));
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    pub fn spans_of_trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

/// The attributes whose values are strings, as (key, value).
fn strings<'a>(
    attributes: impl IntoIterator<Item = &'a opentelemetry_proto::tonic::common::v1::KeyValue>,
) -> Vec<(String, String)> {
    attributes
        .into_iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn receive(
    State((spans, on_span)): State<(Arc<Mutex<Vec<ReceivedSpan>>>, Option<OnSpan>)>,
    body: Bytes,
) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut kept = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = strings(resource_spans.resource.iter().flat_map(|r| &r.attributes))
            .into_iter()
            .find(|(key, _)| key == "service.name")
            .map(|(_, value)| value)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                let span = ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    events: span
                        .events
                        .iter()
                        .map(|event| ReceivedEvent {
                            name: event.name.clone(),
                            attributes: strings(&event.attributes),
                        })
                        .collect(),
                };
                if let Some(on_span) = &on_span {
                    on_span(&span);
                }
                kept.push(span);
            }
        }
    }
    StatusCode::OK
}
