//! What the consumer loops ([`crate::consumer`]) and the request/reply endpoints
//! ([`crate::api`]) count. A service registers these once and hands a clone to each loop
//! and endpoint; each consumer loop then takes its own counters once, when it starts.

use hodei_protocol::ApiError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The messaging families of one process. Cheap to clone: clones count into the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    messages: Family<MessageLabels, Counter>,
    redeliveries: Family<ConsumerLabels, Counter>,
    dead_letters: Family<ConsumerLabels, Counter>,
    refusals: Family<CodeLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    consumer: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    consumer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

impl Metrics {
    pub fn register(metrics: &mut hodei_runtime::metrics::Metrics) -> Metrics {
        Metrics {
            messages: metrics.counter_family(
                "hodei_consumer_messages_total",
                "Messages handled, by consumer and outcome",
            ),
            redeliveries: metrics.counter_family(
                "hodei_consumer_redeliveries_total",
                "Messages delivered again",
            ),
            dead_letters: metrics
                .counter_family("hodei_dead_letters_total", "Messages moved to HODEI_DLQ"),
            refusals: metrics.counter_family(
                "hodei_refusals_total",
                "Requests and messages refused, by error code",
            ),
        }
    }

    /// The counters of the consumer `durable`.
    pub(crate) fn consumer(&self, durable: &str) -> ConsumerCounters {
        let outcome = |outcome| {
            self.messages.get_or_create_owned(&MessageLabels {
                consumer: durable.to_owned(),
                outcome,
            })
        };
        let consumer = ConsumerLabels {
            consumer: durable.to_owned(),
        };
        ConsumerCounters {
            done: outcome("done"),
            retry: outcome("retry"),
            rejected: outcome("rejected"),
            redelivered: self.redeliveries.get_or_create_owned(&consumer),
            dead_lettered: self.dead_letters.get_or_create_owned(&consumer),
            metrics: self.clone(),
        }
    }

    /// Counts a refusal by its code, and logs it.
    pub(crate) fn refused(&self, error: &ApiError) {
        self.refusals
            .get_or_create(&CodeLabels {
                code: error.code.as_str(),
            })
            .inc();
        crate::api::log_refusal(error);
    }
}

/// What one consumer loop counts, taken once when the loop starts.
pub(crate) struct ConsumerCounters {
    pub done: Counter,
    pub retry: Counter,
    pub rejected: Counter,
    pub redelivered: Counter,
    pub dead_lettered: Counter,
    pub metrics: Metrics,
}
