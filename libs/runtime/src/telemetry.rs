//! Logs and traces. Every process logs through `tracing` (human or JSON lines on stderr) and
//! exports its spans with OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the other standard `OTEL_*` variables apply.
//! Spans carry W3C trace context across NATS and the outbox (see [`context`]), so one job is
//! one trace. Export failures are logged (once per outage), never silent.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::LogFormat;

/// Keeps the tracer provider, when spans are exported; [`Telemetry::shutdown`] flushes what is
/// left.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether this process builds OpenTelemetry spans: only when it exports them. Without an
/// exporter, [`context`] still carries the trace context from each message to the ones it
/// causes (and into every log line), without building a span per step that nothing reads:
/// that was about a tenth of the control plane's CPU per job.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Install logging and tracing for `service`. Call before the async runtime starts (the OTLP
/// HTTP client must not be built inside it).
pub fn init(service: &'static str, format: LogFormat) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let mut export_error = None;
    let provider = if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_resource(Resource::builder().with_service_name(service).build())
                    .with_batch_exporter(Reporting::new(exporter))
                    .build(),
            ),
            Err(error) => {
                export_error = Some(error.to_string());
                None
            }
        }
    } else {
        None
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
        // Colours only for a person at a terminal: a log file or a collector gets plain text.
        LogFormat::Human => fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(filter())
    });
    let exporting = traces.is_some();
    if tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok()
    {
        EXPORTING.store(exporting, Ordering::Relaxed);
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            otlp = exporting,
            "starting"
        );
        if let Some(error) = export_error {
            tracing::error!(%error, "cannot set up the OTLP exporter; spans will not be exported");
        }
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Export the spans still buffered, giving up after `limit`.
    pub fn shutdown(self, limit: Duration) {
        let Some(provider) = self.provider else {
            return;
        };
        if let Err(error) = provider.shutdown_with_timeout(limit) {
            eprintln!("telemetry: flushing spans at shutdown failed: {error}");
        }
    }
}

/// Wraps the OTLP exporter so that failures are reported: one error when exports start
/// failing, one line when they work again, and a count.
#[derive(Debug)]
struct Reporting<E> {
    inner: E,
    failing: AtomicBool,
    failures: AtomicU64,
}

impl<E> Reporting<E> {
    fn new(inner: E) -> Self {
        Reporting {
            inner,
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("span export works again");
                }
            }
            Err(error) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(%error, spans, failures, "span export failed; spans are being lost");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// W3C trace context (`traceparent`, `tracestate`) in and out of carriers: NATS headers,
/// outbox metadata, a process' environment. With an exporter, each span's context is its
/// OpenTelemetry span's. Without one, a span's context is the one it adopted (or the nearest
/// ancestor's): the trace and the caller's span go on unchanged to what the span causes, and a
/// span with no caller's context starts a trace of its own, as an exported root span would.
pub mod context {
    use super::*;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::registry::LookupSpan;

    pub use opentelemetry::Context;

    struct MapCarrier<'a>(&'a mut HashMap<String, String>);
    impl Injector for MapCarrier<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key.to_owned(), value);
        }
    }
    struct PairsCarrier<'a>(&'a [(String, String)]);
    impl Extractor for PairsCarrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| k.as_str()).collect()
        }
    }

    /// Whether this process builds and exports spans; without, a step that only a trace
    /// would show (a publish, say) need not open one.
    pub fn exporting() -> bool {
        EXPORTING.load(Ordering::Relaxed)
    }

    /// The context a span adopted, kept with the span where no OpenTelemetry span is built.
    struct Adopted(Context);

    /// `f` on `span`'s data in the registry (`None` for a span that is disabled or outside
    /// this process' subscriber).
    fn with_data<T>(
        span: &tracing::Span,
        f: impl FnOnce(
            tracing_subscriber::registry::SpanRef<'_, tracing_subscriber::Registry>,
        ) -> Option<T>,
    ) -> Option<T> {
        span.with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            f(registry.span(id)?)
        })
        .flatten()
    }

    /// The context of `span`: its OpenTelemetry span's, or the one it or its nearest ancestor
    /// adopted (empty if none did).
    fn context_of(span: &tracing::Span) -> Context {
        if exporting() {
            return span.context();
        }
        with_data(span, |data| {
            data.scope()
                .find_map(|s| s.extensions().get::<Adopted>().map(|a| a.0.clone()))
        })
        .unwrap_or_default()
    }

    /// A new trace, for a span that adopts none.
    fn new_root() -> Context {
        let ids = RandomIdGenerator::default();
        Context::new().with_remote_span_context(SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ))
    }

    /// The trace context of `span` as W3C fields (empty if there is none).
    pub fn of_span(span: &tracing::Span) -> HashMap<String, String> {
        let mut fields = HashMap::new();
        let cx = context_of(span);
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MapCarrier(&mut fields))
        });
        fields
    }

    /// The trace context of the current span as W3C fields.
    pub fn current() -> HashMap<String, String> {
        of_span(&tracing::Span::current())
    }

    /// A context from W3C fields (names compared without case).
    pub fn from_fields(fields: &[(String, String)]) -> Context {
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&PairsCarrier(fields)))
    }

    /// Make `span` a child of `parent` (when `parent` carries a valid remote span; else the
    /// root of a new trace) and record its trace id in the span's `trace_id` field, so that
    /// every log line says it.
    pub fn adopt(span: &tracing::Span, parent: Context) {
        let valid = parent.span().span_context().is_valid();
        let cx = if exporting() {
            if valid {
                let _ = span.set_parent(parent);
            }
            span.context()
        } else {
            let cx = if valid { parent } else { new_root() };
            with_data(span, |data| {
                data.extensions_mut().replace(Adopted(cx.clone()))
            });
            cx
        };
        if let Some(trace_id) = trace_id_of(&cx) {
            span.record("trace_id", trace_id.as_str());
        }
    }

    /// Record `name` with `attributes` on the current span's trace only, not as a log line:
    /// for steps every trace should show that the audit log already keeps, row by row.
    pub fn trace_event(name: &'static str, attributes: &[(&'static str, String)]) {
        if !exporting() {
            return;
        }
        let attributes = attributes
            .iter()
            .map(|(key, value)| opentelemetry::KeyValue::new(*key, value.clone()))
            .collect();
        tracing::Span::current().add_event(name, attributes);
    }

    /// The trace id of `span`, as 32 hex digits.
    pub fn trace_id(span: &tracing::Span) -> Option<String> {
        trace_id_of(&context_of(span))
    }

    fn trace_id_of(cx: &Context) -> Option<String> {
        let span_context = cx.span().span_context().clone();
        span_context
            .is_valid()
            .then(|| span_context.trace_id().to_string())
    }
}
