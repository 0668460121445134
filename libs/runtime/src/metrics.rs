//! The numbers every Hodei process reports to Prometheus, kept in a `prometheus-client`
//! registry (the Prometheus project's own crate) rather than in code of our own.
//!
//! Operators need to see what each service is doing (messages handled, how long they took,
//! how many jobs wait in each state) without reading logs. A process builds one [`Metrics`]
//! at start-up, hands each component the handles it reports through, and then gives it to
//! [`crate::endpoint`], which serves it on `/metrics`. There is no process-wide registry:
//! what a component counts is whatever it was handed, so a test can build its own.
//!
//! Two ways to report, for two kinds of number:
//! - **Handles** ([`Metrics::counter`], [`Metrics::counter_family`], [`Metrics::gauge_family`],
//!   [`Metrics::latency_histogram`]) for what the process itself sees happen. A component
//!   registers its families once, when it is built, and keeps them; for a label set it knows
//!   in advance it keeps the concrete counter too, so counting is one atomic operation.
//! - **Gauges computed on scrape** ([`Metrics::gauges_on_scrape`]) for numbers that live
//!   elsewhere, such as jobs by state in PostgreSQL, and are only worth computing when
//!   someone asks. They are computed at every scrape, concurrently, each within
//!   [`COLLECTOR_TIMEOUT`]; one that fails or is too slow is left out of that scrape.
//!
//! The exposition is Prometheus text format 0.0.4, as `prometheus-client` writes it
//! ([`prometheus_text`]). A counter is registered under its name without `_total`, the
//! suffix the format adds; the helpers here take the exposed name (`hodei_events_total`), so
//! that the names in the code are the ones an operator queries.

use std::collections::BTreeSet;
use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::BoxFuture;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Latency buckets in seconds, from half a millisecond (a local handler) to ten seconds (a
/// slow database or a stuck network call).
pub const DEFAULT_LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How long gauges computed on scrape may take before a scrape goes on without them. Below
/// Prometheus' default scrape timeout (10 s), so a stuck query loses only its own numbers.
pub const COLLECTOR_TIMEOUT: Duration = Duration::from_secs(5);

/// The label set of a gauge computed on scrape: label names and values, in the order
/// written.
pub type Labels = Vec<(&'static str, String)>;

/// A gauge holding any number, NaN and infinities included.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// What a label set of a family must be: the `#[derive(EncodeLabelSet)]` structs of the
/// components, or [`Labels`].
pub trait LabelSet: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync {}
impl<T: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync> LabelSet for T {}

/// One value computed on scrape, for one of the families declared with
/// [`Metrics::gauges_on_scrape`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Labels,
    pub value: f64,
}

impl Sample {
    pub fn new(name: &'static str, labels: Labels, value: f64) -> Sample {
        Sample {
            name,
            labels,
            value,
        }
    }
}

type Compute = Box<dyn Fn() -> BoxFuture<'static, Result<Vec<Sample>, String>> + Send + Sync>;

/// Gauge families whose values one computation sets at every scrape.
struct Scraped {
    what: &'static str,
    families: Vec<(&'static str, Family<Labels, FloatGauge>)>,
    compute: Compute,
}

/// The metrics of one process: the registry, and what to compute when it is scraped.
pub struct Metrics {
    registry: Registry,
    names: BTreeSet<String>,
    scraped: Vec<Scraped>,
    /// [`COLLECTOR_TIMEOUT`], shorter in tests.
    timeout: Duration,
    /// One scrape at a time: a scrape sets the computed gauges and then encodes them.
    scraping: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            registry: Registry::default(),
            names: BTreeSet::new(),
            scraped: Vec::new(),
            timeout: COLLECTOR_TIMEOUT,
            scraping: tokio::sync::Mutex::new(()),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Register `metric` under `name` as it is registered with `prometheus-client` (a
    /// counter without its `_total`).
    ///
    /// # Panics
    /// If `name` is registered already: two families of one name would make the exposition
    /// invalid. That is a mistake in the code, and a test that builds the component finds it.
    #[track_caller]
    pub fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        if !self.names.insert(name.to_owned()) {
            panic!("metric {name} is registered twice");
        }
        self.registry.register(name, help, metric);
    }

    /// A counter without labels; `name` is the exposed name, ending in `_total`.
    #[track_caller]
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.register(counter_stem(name), help, counter.clone());
        counter
    }

    /// A family of counters, one per label set; `name` is the exposed name, ending in
    /// `_total`.
    #[track_caller]
    pub fn counter_family<L: LabelSet + 'static>(
        &mut self,
        name: &str,
        help: &str,
    ) -> Family<L, Counter> {
        let family = Family::<L, Counter>::default();
        self.register(counter_stem(name), help, family.clone());
        family
    }

    /// A family of gauges, one per label set.
    #[track_caller]
    pub fn gauge_family<L: LabelSet + 'static>(
        &mut self,
        name: &str,
        help: &str,
    ) -> Family<L, Gauge> {
        let family = Family::<L, Gauge>::default();
        self.register(name, help, family.clone());
        family
    }

    /// A histogram without labels, with [`DEFAULT_LATENCY_BUCKETS`].
    #[track_caller]
    pub fn latency_histogram(&mut self, name: &str, help: &str) -> Histogram {
        let histogram = Histogram::new(DEFAULT_LATENCY_BUCKETS.iter().copied());
        self.register(name, help, histogram.clone());
        histogram
    }

    /// Gauge families (`(name, help)`) whose samples `compute` returns at every scrape:
    /// each scrape shows exactly the samples of that scrape's computation. A computation that
    /// fails, panics or takes longer than [`COLLECTOR_TIMEOUT`] leaves its families empty
    /// for that scrape (with a warning); a sample of a name not declared is left out.
    #[track_caller]
    pub fn gauges_on_scrape<F>(
        &mut self,
        what: &'static str,
        families: &[(&'static str, &str)],
        compute: F,
    ) where
        F: Fn() -> BoxFuture<'static, Result<Vec<Sample>, String>> + Send + Sync + 'static,
    {
        let families = families
            .iter()
            .map(|(name, help)| {
                let family = Family::<Labels, FloatGauge>::default();
                self.register(name, help, family.clone());
                (*name, family)
            })
            .collect();
        self.scraped.push(Scraped {
            what,
            families,
            compute: Box::new(compute),
        });
    }

    /// Everything in Prometheus text format 0.0.4 ([`CONTENT_TYPE`]), after computing the
    /// gauges computed on scrape. Must run inside a Tokio runtime.
    pub async fn encode(&self) -> String {
        let _one_at_a_time = self.scraping.lock().await;
        self.refresh().await;
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Runs every computation at once (each a task, so a panic loses only its numbers) and
    /// sets its gauges.
    async fn refresh(&self) {
        let running: Vec<_> = self
            .scraped
            .iter()
            .map(|scraped| tokio::spawn(tokio::time::timeout(self.timeout, (scraped.compute)())))
            .collect();
        for (scraped, task) in self.scraped.iter().zip(running) {
            for (_, family) in &scraped.families {
                family.clear();
            }
            let samples = match task.await {
                Ok(Ok(Ok(samples))) => samples,
                Ok(Ok(Err(error))) => {
                    tracing::warn!(what = scraped.what, %error, "metrics computation failed; this scrape goes on without it");
                    continue;
                }
                Ok(Err(_)) => {
                    tracing::warn!(what = scraped.what, timeout = ?self.timeout, "metrics computation timed out; this scrape goes on without it");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(what = scraped.what, %error, "metrics computation panicked; this scrape goes on without it");
                    continue;
                }
            };
            for sample in samples {
                match scraped
                    .families
                    .iter()
                    .find(|(name, _)| *name == sample.name)
                {
                    Some((_, family)) => {
                        family.get_or_create(&sample.labels).set(sample.value);
                    }
                    None => tracing::warn!(
                        what = scraped.what,
                        metric = sample.name,
                        "a metrics computation reports a metric it did not declare; it is left out"
                    ),
                }
            }
        }
    }
}

/// The name a counter is registered under: its exposed name without the `_total` that the
/// exposition adds.
#[track_caller]
fn counter_stem(name: &str) -> &str {
    name.strip_suffix("_total")
        .unwrap_or_else(|| panic!("counter {name} must be named with its _total suffix"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Outcome {
        consumer: String,
        outcome: &'static str,
    }

    /// Every sample as `name{labels}` -> value, checking that each family has one HELP and
    /// one TYPE line before its samples and that every sample belongs to the family above it.
    pub(crate) fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
        let mut samples = std::collections::BTreeMap::new();
        let mut family: Option<(String, String)> = None;
        let mut helped = None;
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped = Some(rest.split(' ').next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(helped.as_deref(), Some(name), "TYPE after its HELP: {text}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                family = Some((name.to_owned(), kind.to_owned()));
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                let (family, kind) = family.as_ref().expect("a sample after its TYPE");
                let suffix = name.strip_prefix(family.as_str());
                let belongs = match kind.as_str() {
                    "histogram" => matches!(suffix, Some("_bucket" | "_sum" | "_count")),
                    _ => suffix == Some(""),
                };
                assert!(belongs, "{line} outside its family {family}");
                let value = match value {
                    "NaN" => f64::NAN,
                    "+Inf" => f64::INFINITY,
                    value => value
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line}")),
                };
                assert!(
                    samples.insert(series.to_owned(), value).is_none(),
                    "{series} twice"
                );
            }
        }
        samples
    }

    #[tokio::test]
    async fn the_exposition_has_todays_names_labels_and_types() {
        let mut metrics = Metrics::new();
        let messages = metrics.counter_family::<Outcome>(
            "hodei_consumer_messages_total",
            "Messages handled, by consumer and outcome",
        );
        let published = metrics.counter("hodei_outbox_published_total", "Outbox rows published");
        let circuits = metrics.gauge_family::<Labels>("hodei_circuit_state", "Circuit breakers");
        let latency =
            metrics.latency_histogram("hodei_dispatch_latency_seconds", "Placement latency");
        let done = messages.get_or_create_owned(&Outcome {
            consumer: "audit".into(),
            outcome: "done",
        });
        done.inc_by(3);
        published.inc_by(42);
        circuits
            .get_or_create(&vec![("circuit", "provider:process".to_owned())])
            .set(2);
        for seconds in [0.0001, 0.003, 0.2, 42.0] {
            latency.observe(seconds);
        }

        let text = metrics.encode().await;
        let samples = samples(&text);

        assert!(
            text.contains("# HELP hodei_consumer_messages_total Messages handled, by consumer and outcome.\n# TYPE hodei_consumer_messages_total counter\n"),
            "{text}"
        );
        assert_eq!(
            samples[r#"hodei_consumer_messages_total{consumer="audit",outcome="done"}"#],
            3.0
        );
        assert_eq!(samples["hodei_outbox_published_total"], 42.0);
        assert!(
            text.contains("# TYPE hodei_circuit_state gauge\n"),
            "{text}"
        );
        assert_eq!(
            samples[r#"hodei_circuit_state{circuit="provider:process"}"#],
            2.0
        );
        assert!(
            text.contains("# TYPE hodei_dispatch_latency_seconds histogram\n"),
            "{text}"
        );
        assert_eq!(
            samples[r#"hodei_dispatch_latency_seconds_bucket{le="0.0005"}"#],
            1.0
        );
        assert_eq!(
            samples[r#"hodei_dispatch_latency_seconds_bucket{le="0.25"}"#],
            3.0
        );
        assert_eq!(
            samples[r#"hodei_dispatch_latency_seconds_bucket{le="+Inf"}"#],
            4.0
        );
        assert_eq!(samples["hodei_dispatch_latency_seconds_count"], 4.0);
        assert!((samples["hodei_dispatch_latency_seconds_sum"] - 42.2031).abs() < 1e-9);
    }

    #[tokio::test]
    async fn label_values_and_help_are_escaped() {
        let mut metrics = Metrics::new();
        metrics
            .counter_family::<Labels>("escaped_total", "Two lines\nand a \\")
            .get_or_create(&vec![("path", "C:\\dir \"quoted\"\nnext".to_owned())])
            .inc();
        let text = metrics.encode().await;
        assert!(
            text.contains(r#"escaped_total{path="C:\\dir \"quoted\"\nnext"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("# HELP escaped_total Two lines\\nand a \\\\.\n"),
            "{text}"
        );
        assert_eq!(samples(&text).len(), 1);
    }

    #[tokio::test]
    async fn gauges_on_scrape_are_computed_at_every_scrape() {
        let mut metrics = Metrics::new();
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = runs.clone();
        metrics.gauges_on_scrape(
            "jobs",
            &[
                ("hodei_jobs", "Jobs by state"),
                ("hodei_lag_seconds", "Lag"),
            ],
            move || {
                let runs = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Box::pin(async move {
                    Ok(vec![
                        Sample::new("hodei_jobs", vec![("state", "Queued".into())], runs as f64),
                        Sample::new("hodei_jobs", vec![("state", "Running".into())], 0.0),
                        Sample::new("hodei_lag_seconds", vec![], f64::NAN),
                        Sample::new("undeclared", vec![], 1.0),
                    ])
                })
            },
        );
        let first = samples(&metrics.encode().await);
        assert_eq!(first[r#"hodei_jobs{state="Queued"}"#], 1.0);
        assert_eq!(first[r#"hodei_jobs{state="Running"}"#], 0.0);
        assert!(first["hodei_lag_seconds"].is_nan());
        assert!(!first.contains_key("undeclared"));
        let text = metrics.encode().await;
        assert!(text.contains("# TYPE hodei_jobs gauge\n"), "{text}");
        assert_eq!(samples(&text)[r#"hodei_jobs{state="Queued"}"#], 2.0);
    }

    #[tokio::test]
    async fn a_failed_or_panicking_computation_loses_only_its_own_numbers() {
        let mut metrics = Metrics::new();
        metrics.counter("kept_total", "k").inc();
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failing = fail.clone();
        metrics.gauges_on_scrape("flaky", &[("flaky", "f")], move || {
            let fail = failing.load(std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                if fail {
                    Err("the database is down".to_owned())
                } else {
                    Ok(vec![Sample::new("flaky", vec![], 7.0)])
                }
            })
        });
        metrics.gauges_on_scrape("broken", &[("broken", "b")], || {
            Box::pin(async { panic!("the query broke") })
        });
        assert_eq!(samples(&metrics.encode().await)["flaky"], 7.0);

        fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = samples(&metrics.encode().await);
        let expected: std::collections::BTreeMap<String, f64> =
            [("kept_total".to_owned(), 1.0)].into();
        assert_eq!(samples, expected, "a stale value is not shown");
    }

    #[tokio::test]
    async fn a_slow_computation_is_left_out_after_the_timeout() {
        let mut metrics = Metrics::new();
        metrics.timeout = Duration::from_millis(50);
        metrics.gauges_on_scrape("slow", &[("slow", "s")], || {
            Box::pin(async {
                // Never answers.
                std::future::pending::<()>().await;
                Ok(vec![Sample::new("slow", vec![], 1.0)])
            })
        });
        let text = metrics.encode().await;
        assert!(samples(&text).is_empty(), "{text}");
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn registering_one_name_twice_is_a_mistake_in_the_code() {
        let mut metrics = Metrics::new();
        metrics.counter("twice_total", "t");
        metrics.gauge_family::<Labels>("twice", "t");
    }

    #[test]
    #[should_panic(expected = "must be named with its _total suffix")]
    fn counters_are_named_as_exposed() {
        Metrics::new().counter("no_suffix", "n");
    }
}
