//! W3C trace context in NATS headers: injected on every publish and request, extracted by
//! every consumer and request handler so that their spans continue the sender's trace.

use std::collections::HashMap;

use async_nats::HeaderMap;
use hodei_runtime::telemetry::context::{self, Context};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Put W3C fields (from [`context::current`] or [`context::of_span`]) into headers.
pub fn inject(headers: &mut HeaderMap, fields: HashMap<String, String>) {
    for (name, value) in fields {
        headers.insert(name.as_str(), value.as_str());
    }
}

/// Put the current span's trace context into headers, unless they carry one already.
pub fn inject_current(headers: &mut HeaderMap) {
    if headers.get(TRACEPARENT).is_none() {
        inject(headers, context::current());
    }
}

/// The trace context a message carries (an empty context if none).
pub fn parent_of(headers: Option<&HeaderMap>) -> Context {
    let fields: Vec<(String, String)> = [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), headers?.get(name)?.as_str().to_owned())))
        .collect();
    context::from_fields(&fields)
}
