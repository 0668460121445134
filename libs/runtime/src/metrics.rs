//! The numbers every Hodei process reports to Prometheus, written without a metrics crate.
//!
//! Operators need to see what each service is doing (messages handled, how long they took,
//! how many jobs wait in each state) without reading logs. The Prometheus text format is small
//! enough to write by hand, so this module keeps the dependency tree, and the build, as it is.
//!
//! Two ways to report, for two kinds of number:
//! - **Handles** ([`counter`], [`gauge`], [`histogram`]) for what the process itself sees
//!   happen. Get a handle once and keep it: looking one up takes a lock, updating it is one
//!   atomic operation. The same name and labels always give the same underlying value.
//! - **Collectors** ([`register_collector`]) for numbers that live elsewhere, such as jobs by
//!   state in PostgreSQL, and are only worth computing when someone asks. They run at scrape
//!   time, concurrently, each with [`COLLECTOR_TIMEOUT`].
//!
//! [`render`] writes both in text exposition format 0.0.4; [`crate::http`] serves it.
//! Everything lives in one process-wide [`Registry`]; a test can make its own to stay
//! independent of other tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// A boxed, sendable future: the same type as `futures::future::BoxFuture`, so a closure
/// ending in `.boxed()` fits, without this crate depending on `futures`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Computes samples when metrics are scraped. See [`register_collector`].
pub type Collector = Arc<dyn Fn() -> BoxFuture<'static, Vec<Sample>> + Send + Sync>;

/// Latency buckets in seconds, from half a millisecond (a local handler) to ten seconds (a
/// slow database or a stuck network call).
pub const DEFAULT_LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How long one collector may take before a scrape goes on without its samples. Below
/// Prometheus' default scrape timeout (10 s), so a stuck query loses only its own numbers.
pub const COLLECTOR_TIMEOUT: Duration = Duration::from_secs(5);

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// The process-wide registry that the free functions of this module use.
pub fn global() -> &'static Registry {
    REGISTRY.get_or_init(Registry::default)
}

/// A counter in the global registry; see [`Registry::counter`].
#[track_caller]
pub fn counter(name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
    global().counter(name, help, labels)
}

/// A gauge in the global registry; see [`Registry::gauge`].
#[track_caller]
pub fn gauge(name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
    global().gauge(name, help, labels)
}

/// A histogram in the global registry; see [`Registry::histogram`].
#[track_caller]
pub fn histogram(name: &str, help: &str, labels: &[(&str, &str)], buckets: &[f64]) -> Histogram {
    global().histogram(name, help, labels, buckets)
}

/// Adds a collector to the global registry; see [`Registry::register_collector`].
pub fn register_collector<F>(name: &str, collector: F)
where
    F: Fn() -> BoxFuture<'static, Vec<Sample>> + Send + Sync + 'static,
{
    global().register_collector(name, collector)
}

/// The global registry in text exposition format; see [`Registry::render`].
pub async fn render() -> String {
    global().render().await
}

/// A value that only goes up, such as messages handled. Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, such as connections open. Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, delta: f64) {
        let add = |bits| Some((f64::from_bits(bits) + delta).to_bits());
        // The closure always returns Some, so this cannot fail.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, add);
    }

    pub fn inc(&self) {
        self.add(1.0);
    }

    pub fn dec(&self) {
        self.add(-1.0);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Counts observations (usually durations in seconds) into buckets, with their sum. Cheap to
/// clone; clones share it.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramCore>);

#[derive(Debug)]
struct HistogramCore {
    /// Upper bounds, ascending and finite; `+Inf` is implied.
    bounds: Box<[f64]>,
    /// One count per bound plus one for above the last bound. Not cumulative, so an
    /// observation touches one counter; rendering adds them up, and the total is `_count`,
    /// which therefore always equals the `+Inf` bucket.
    counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram(Arc::new(HistogramCore {
            bounds: bounds.into(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }))
    }

    /// Records one observation. NaN is ignored: it would make `_sum` NaN for good.
    pub fn observe(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        let core = &self.0;
        let bucket = core.bounds.partition_point(|bound| *bound < value);
        core.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let add = |bits| Some((f64::from_bits(bits) + value).to_bits());
        let _ = core
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, add);
    }

    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// Observes the time from now until the returned guard is dropped.
    pub fn start_timer(&self) -> Timer {
        Timer {
            histogram: self.clone(),
            start: Instant::now(),
        }
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of the observations so far.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.0.sum_bits.load(Ordering::Relaxed))
    }
}

/// Observes its own lifetime in seconds into a [`Histogram`] when dropped.
#[must_use = "the timer observes when it is dropped, so dropping it at once measures nothing"]
#[derive(Debug)]
pub struct Timer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe_duration(self.start.elapsed());
    }
}

/// One value computed by a collector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub help: String,
    pub kind: SampleKind,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The Prometheus type a collected sample is reported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    Gauge,
    Counter,
}

impl Sample {
    pub fn gauge(name: &str, help: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample::new(name, help, SampleKind::Gauge, labels, value)
    }

    pub fn counter(name: &str, help: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample::new(name, help, SampleKind::Counter, labels, value)
    }

    fn new(
        name: &str,
        help: &str,
        kind: SampleKind,
        labels: &[(&str, &str)],
        value: f64,
    ) -> Sample {
        Sample {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }
}

/// Metric families and collectors. Use [`global`] (through this module's free functions) in
/// services; a test may make its own with `Registry::default()`.
#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
    collectors: Mutex<BTreeMap<String, Collector>>,
}

/// Label pairs sorted by name, so that the order a caller writes them in does not matter.
type Labels = Vec<(String, String)>;

struct Family {
    help: String,
    kind: FamilyKind,
    series: BTreeMap<Labels, Series>,
}

#[derive(Clone)]
enum FamilyKind {
    Counter,
    Gauge,
    /// Every series of a histogram family shares the bucket bounds of the first registration.
    Histogram(Box<[f64]>),
}

impl FamilyKind {
    fn type_name(&self) -> &'static str {
        match self {
            FamilyKind::Counter => "counter",
            FamilyKind::Gauge => "gauge",
            FamilyKind::Histogram(_) => "histogram",
        }
    }

    fn new_series(&self) -> Series {
        match self {
            FamilyKind::Counter => Series::Counter(Counter(Arc::new(AtomicU64::new(0)))),
            FamilyKind::Gauge => Series::Gauge(Gauge(Arc::new(AtomicU64::new(0f64.to_bits())))),
            FamilyKind::Histogram(bounds) => Series::Histogram(Histogram::new(bounds)),
        }
    }
}

#[derive(Clone)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl Registry {
    /// The counter with this name and labels, created at zero the first time.
    ///
    /// # Panics
    /// If the name or a label name is not a valid Prometheus name, a label name repeats, or
    /// the name is already registered as another type. These are mistakes in the code, not in
    /// its input, and a test that touches the metric finds them.
    #[track_caller]
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        match self.series(name, help, labels, FamilyKind::Counter) {
            Series::Counter(counter) => counter,
            _ => unreachable!("series() checks the family's type"),
        }
    }

    /// The gauge with this name and labels, created at zero the first time.
    ///
    /// # Panics
    /// As [`Registry::counter`].
    #[track_caller]
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.series(name, help, labels, FamilyKind::Gauge) {
            Series::Gauge(gauge) => gauge,
            _ => unreachable!("series() checks the family's type"),
        }
    }

    /// The histogram with this name and labels, created empty the first time. `buckets` are
    /// upper bounds in any order; non-finite ones are dropped and `+Inf` is always added. The
    /// first registration of a name sets the buckets of every series of that name.
    ///
    /// # Panics
    /// As [`Registry::counter`], and also if a label is called `le`.
    #[track_caller]
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        buckets: &[f64],
    ) -> Histogram {
        let mut bounds: Vec<f64> = buckets.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        match self.series(name, help, labels, FamilyKind::Histogram(bounds.into())) {
            Series::Histogram(histogram) => histogram,
            _ => unreachable!("series() checks the family's type"),
        }
    }

    #[track_caller]
    fn series(&self, name: &str, help: &str, labels: &[(&str, &str)], kind: FamilyKind) -> Series {
        if !is_metric_name(name) {
            panic!("{name:?} is not a valid Prometheus metric name");
        }
        let is_histogram = matches!(kind, FamilyKind::Histogram(_));
        let labels = match label_key(labels, is_histogram) {
            Ok(labels) => labels,
            Err(problem) => panic!("metric {name}: {problem}"),
        };
        let mut families = lock(&self.families);
        let family = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind: kind.clone(),
            series: BTreeMap::new(),
        });
        if family.kind.type_name() != kind.type_name() {
            let existing = family.kind.type_name();
            drop(families);
            panic!(
                "metric {name} is already registered as a {existing}, not a {}",
                kind.type_name()
            );
        }
        family
            .series
            .entry(labels)
            .or_insert_with(|| family.kind.new_series())
            .clone()
    }

    /// Runs `collector` at every scrape and reports its samples, which must not use the name
    /// of a counter, gauge or histogram registered here (such samples are left out, with a
    /// warning). Registering under a name already used replaces that collector, so a service
    /// started again in the same process (as end-to-end tests do) does not report twice.
    ///
    /// Samples of the same name from any collectors form one family, with the first help
    /// text; a repeated name and label set keeps its first value.
    pub fn register_collector<F>(&self, name: &str, collector: F)
    where
        F: Fn() -> BoxFuture<'static, Vec<Sample>> + Send + Sync + 'static,
    {
        lock(&self.collectors).insert(name.to_owned(), Arc::new(collector));
    }

    /// Everything in text exposition format 0.0.4: families sorted by name, each with one
    /// `# HELP` and one `# TYPE` line followed by all its samples.
    ///
    /// Must run inside a Tokio runtime: collectors run as tasks, each with
    /// [`COLLECTOR_TIMEOUT`].
    pub async fn render(&self) -> String {
        let collected = self.collect().await;

        // name -> (help, type, sample lines)
        let mut out: BTreeMap<String, (String, &'static str, String)> = BTreeMap::new();
        {
            let families = lock(&self.families);
            for (name, family) in families.iter() {
                let mut body = String::new();
                for (labels, series) in &family.series {
                    write_series(&mut body, name, labels, series);
                }
                out.insert(
                    name.clone(),
                    (family.help.clone(), family.kind.type_name(), body),
                );
            }
        }
        for (name, family) in group_collected(collected) {
            if out.contains_key(&name) {
                tracing::warn!(metric = %name, "a collector reports a metric that is already registered; its samples are left out");
                continue;
            }
            let mut body = String::new();
            for (labels, value) in &family.series {
                write_sample(&mut body, &name, labels, None, &format_value(*value));
            }
            out.insert(name, (family.help, family.kind.type_name(), body));
        }

        let mut text = String::new();
        for (name, (help, type_name, body)) in out {
            let _ = writeln!(text, "# HELP {name} {}", escape_help(&help));
            let _ = writeln!(text, "# TYPE {name} {type_name}");
            text.push_str(&body);
        }
        text
    }

    /// Runs every collector concurrently; results come back in the collectors' name order so
    /// that "first value wins" does not depend on which query finished first.
    async fn collect(&self) -> Vec<Sample> {
        let collectors: Vec<(String, Collector)> = lock(&self.collectors)
            .iter()
            .map(|(name, c)| (name.clone(), c.clone()))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (index, (name, collector)) in collectors.into_iter().enumerate() {
            let work = collector();
            tasks.spawn(async move {
                (
                    index,
                    name,
                    tokio::time::timeout(COLLECTOR_TIMEOUT, work).await,
                )
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, _, Ok(samples))) => results.push((index, samples)),
                Ok((_, name, Err(_))) => {
                    tracing::warn!(collector = %name, timeout = ?COLLECTOR_TIMEOUT, "metrics collector timed out; this scrape goes on without it")
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics collector failed; this scrape goes on without it")
                }
            }
        }
        results.sort_by_key(|(index, _)| *index);
        results
            .into_iter()
            .flat_map(|(_, samples)| samples)
            .collect()
    }
}

struct CollectedFamily {
    help: String,
    kind: SampleKind,
    series: BTreeMap<Labels, f64>,
}

impl SampleKind {
    fn type_name(self) -> &'static str {
        match self {
            SampleKind::Gauge => "gauge",
            SampleKind::Counter => "counter",
        }
    }
}

/// Collected samples by family, dropping (with a warning) what cannot be rendered validly.
fn group_collected(samples: Vec<Sample>) -> BTreeMap<String, CollectedFamily> {
    let mut families: BTreeMap<String, CollectedFamily> = BTreeMap::new();
    for sample in samples {
        if !is_metric_name(&sample.name) {
            tracing::warn!(metric = %sample.name, "a collector reports an invalid metric name; the sample is left out");
            continue;
        }
        let pairs: Vec<(&str, &str)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let labels = match label_key(&pairs, false) {
            Ok(labels) => labels,
            Err(problem) => {
                tracing::warn!(metric = %sample.name, %problem, "a collector reports invalid labels; the sample is left out");
                continue;
            }
        };
        let family = families
            .entry(sample.name.clone())
            .or_insert_with(|| CollectedFamily {
                help: sample.help,
                kind: sample.kind,
                series: BTreeMap::new(),
            });
        if family.kind != sample.kind {
            tracing::warn!(metric = %sample.name, "collectors report this metric as both a gauge and a counter; the later samples are left out");
            continue;
        }
        family.series.entry(labels).or_insert(sample.value);
    }
    families
}

fn write_series(out: &mut String, name: &str, labels: &[(String, String)], series: &Series) {
    match series {
        Series::Counter(counter) => {
            write_sample(out, name, labels, None, &counter.get().to_string())
        }
        Series::Gauge(gauge) => write_sample(out, name, labels, None, &format_value(gauge.get())),
        Series::Histogram(histogram) => {
            let core = &histogram.0;
            let bucket_name = format!("{name}_bucket");
            let mut cumulative = 0u64;
            for (bound, count) in core.bounds.iter().zip(core.counts.iter()) {
                cumulative += count.load(Ordering::Relaxed);
                let le = format_value(*bound);
                write_sample(
                    out,
                    &bucket_name,
                    labels,
                    Some(("le", &le)),
                    &cumulative.to_string(),
                );
            }
            cumulative += core.counts[core.bounds.len()].load(Ordering::Relaxed);
            write_sample(
                out,
                &bucket_name,
                labels,
                Some(("le", "+Inf")),
                &cumulative.to_string(),
            );
            write_sample(
                out,
                &format!("{name}_sum"),
                labels,
                None,
                &format_value(histogram.sum()),
            );
            write_sample(
                out,
                &format!("{name}_count"),
                labels,
                None,
                &cumulative.to_string(),
            );
        }
    }
}

fn write_sample(
    out: &mut String,
    name: &str,
    labels: &[(String, String)],
    extra: Option<(&str, &str)>,
    value: &str,
) {
    out.push_str(name);
    let pairs = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra);
    let mut first = true;
    for (key, value) in pairs {
        out.push(if first { '{' } else { ',' });
        first = false;
        let _ = write!(out, "{key}=\"{}\"", escape_label_value(value));
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// A float as Prometheus (Go's ParseFloat) reads it. Rust would write `inf` and `NaN`.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        value.to_string()
    }
}

fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text escapes backslash and newline, but not the double quote.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// Labels checked and sorted by name.
fn label_key(labels: &[(&str, &str)], is_histogram: bool) -> Result<Labels, String> {
    let mut key: Labels = Vec::with_capacity(labels.len());
    for (name, value) in labels {
        if !is_label_name(name) {
            return Err(format!("{name:?} is not a valid label name"));
        }
        if is_histogram && *name == "le" {
            return Err("a histogram cannot have a label called le".to_owned());
        }
        key.push(((*name).to_owned(), (*value).to_owned()));
    }
    key.sort();
    if key.windows(2).any(|pair| pair[0].0 == pair[1].0) {
        return Err("a label name appears twice".to_owned());
    }
    Ok(key)
}

/// A poisoned lock only means a registration panicked, which happens before anything changes.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    /// Checks `text` line by line against text exposition format 0.0.4 as this module writes
    /// it, and returns every sample as `name{labels}` (labels as written) -> value.
    pub(crate) fn check_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
        let mut samples = BTreeMap::new();
        let mut seen_families = BTreeSet::new();
        let mut previous_family: Option<String> = None;
        // The family whose samples may follow: name, type, and whether TYPE was seen.
        let mut current: Option<(String, Option<String>)> = None;
        // Per histogram series (labels without le): last le, last cumulative count.
        let mut buckets: HashMap<String, (f64, f64)> = HashMap::new();
        let mut counts: HashMap<String, f64> = HashMap::new();

        if !text.is_empty() && !text.ends_with('\n') {
            return Err("text does not end with a newline".into());
        }
        for (number, line) in text.lines().enumerate() {
            let at = |problem: String| format!("line {}: {problem}: {line:?}", number + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default().to_owned();
                if !is_metric_name(&name) {
                    return Err(at("bad family name".into()));
                }
                if !seen_families.insert(name.clone()) {
                    return Err(at("second HELP for a family".into()));
                }
                if let Some(previous) = &previous_family {
                    if *previous >= name {
                        return Err(at("families are not sorted by name".into()));
                    }
                }
                previous_family = Some(name.clone());
                current = Some((name, None));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                );
                match &mut current {
                    Some((family, kind_seen @ None)) if family == name => {
                        if !["counter", "gauge", "histogram"].contains(&kind)
                            || parts.next().is_some()
                        {
                            return Err(at("bad TYPE".into()));
                        }
                        *kind_seen = Some(kind.to_owned());
                    }
                    _ => return Err(at("TYPE without its HELP just before it".into())),
                }
            } else if line.starts_with('#') {
                return Err(at("unexpected comment".into()));
            } else {
                let (name, labels, value) = parse_sample(line).map_err(at)?;
                let Some((family, Some(kind))) = &current else {
                    return Err(at("sample before its family's HELP and TYPE".into()));
                };
                let suffix = name.strip_prefix(family.as_str());
                let belongs = match kind.as_str() {
                    "histogram" => matches!(suffix, Some("_bucket" | "_sum" | "_count")),
                    _ => suffix == Some(""),
                };
                if !belongs {
                    return Err(at(format!("sample outside its family {family}")));
                }
                let key = format!(
                    "{name}{{{}}}",
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                if samples.insert(key, value).is_some() {
                    return Err(at("the same series twice".into()));
                }
                if kind == "histogram" {
                    let series: Vec<_> =
                        labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                    let series = format!("{family}{series:?}");
                    match suffix {
                        Some("_bucket") => {
                            let le = labels
                                .iter()
                                .find(|(k, _)| k == "le")
                                .ok_or_else(|| at("bucket without le".into()))?;
                            let le = parse_value(&le.1).map_err(&at)?;
                            if let Some((last_le, last_count)) = buckets.get(&series) {
                                if le <= *last_le || value < *last_count {
                                    return Err(at(
                                        "buckets are not ascending and cumulative".into()
                                    ));
                                }
                            }
                            buckets.insert(series, (le, value));
                        }
                        Some("_count") => {
                            counts.insert(series, value);
                        }
                        _ => {}
                    }
                }
            }
        }
        for (series, (last_le, last_count)) in &buckets {
            if *last_le != f64::INFINITY {
                return Err(format!("{series}: last bucket is not le=\"+Inf\""));
            }
            if counts.get(series) != Some(last_count) {
                return Err(format!("{series}: _count differs from the +Inf bucket"));
            }
        }
        Ok(samples)
    }

    type Parsed = (String, Vec<(String, String)>, f64);

    fn parse_sample(line: &str) -> Result<Parsed, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err("bad metric name".into());
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after_brace) = rest.strip_prefix('{') {
            let mut chars = after_brace.char_indices().peekable();
            loop {
                let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
                let eq = after_brace[start..].find('=').ok_or("label without =")? + start;
                let label = &after_brace[start..eq];
                if !is_label_name(label) {
                    return Err(format!("bad label name {label:?}"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err("label value not quoted".into());
                }
                let mut value = String::new();
                loop {
                    match chars.next().ok_or("unterminated label value")?.1 {
                        '"' => break,
                        '\\' => match chars.next().ok_or("dangling escape")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => return Err(format!("bad escape \\{other}")),
                        },
                        '\n' => return Err("raw newline in label value".into()),
                        c => value.push(c),
                    }
                }
                labels.push((label.to_owned(), value));
                match chars.next().ok_or("unterminated labels")? {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &after_brace[i + 1..];
                        break;
                    }
                    (_, c) => return Err(format!("unexpected {c:?} after a label")),
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        Ok((name.to_owned(), labels, parse_value(value)?))
    }

    fn parse_value(value: &str) -> Result<f64, String> {
        match value {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ if value
                .bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
                && !value.is_empty() =>
            {
                value.parse().map_err(|_| format!("bad value {value:?}"))
            }
            _ => Err(format!("bad value {value:?}")),
        }
    }

    fn collector_of(
        samples: Vec<Sample>,
    ) -> impl Fn() -> BoxFuture<'static, Vec<Sample>> + Send + Sync + 'static {
        move || {
            let samples = samples.clone();
            Box::pin(async move { samples })
        }
    }

    #[tokio::test]
    async fn rendered_text_is_valid_exposition_format() {
        let registry = Registry::default();
        registry
            .counter(
                "hodei_messages_total",
                "Messages handled.",
                &[("subject", "hodei.jobs.submit"), ("outcome", "ack")],
            )
            .add(3);
        registry
            .counter(
                "hodei_messages_total",
                "Messages handled.",
                &[("subject", "hodei.jobs.submit"), ("outcome", "nak")],
            )
            .inc();
        registry
            .gauge(
                "hodei_connections",
                "Open connections.\nOne line \\ more.",
                &[],
            )
            .set(2.5);
        let latency = registry.histogram(
            "hodei_handle_seconds",
            "Handling time.",
            &[("subject", "a")],
            DEFAULT_LATENCY_BUCKETS,
        );
        for seconds in [0.0001, 0.003, 0.003, 0.2, 42.0] {
            latency.observe(seconds);
        }
        registry.histogram(
            "hodei_handle_seconds",
            "Handling time.",
            &[("subject", "b")],
            DEFAULT_LATENCY_BUCKETS,
        );
        registry.register_collector(
            "jobs",
            collector_of(vec![
                Sample::gauge("hodei_jobs", "Jobs by state.", &[("state", "queued")], 4.0),
                Sample::gauge("hodei_jobs", "Jobs by state.", &[("state", "running")], 1.0),
                Sample::gauge("aaa_first", "Sorted first.", &[], f64::INFINITY),
            ]),
        );

        let text = registry.render().await;
        let samples = check_exposition(&text).unwrap_or_else(|problem| panic!("{problem}\n{text}"));

        assert_eq!(
            samples[r#"hodei_messages_total{outcome="ack",subject="hodei.jobs.submit"}"#],
            3.0
        );
        assert_eq!(samples[r#"hodei_jobs{state="queued"}"#], 4.0);
        assert_eq!(samples["aaa_first{}"], f64::INFINITY);
        assert!(
            text.contains("# HELP hodei_connections Open connections.\\nOne line \\\\ more.\n"),
            "{text}"
        );
        assert!(text.starts_with("# HELP aaa_first "), "{text}");
        assert_eq!(
            text.matches("# TYPE hodei_handle_seconds histogram\n")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn counters_gauges_and_histograms_move() {
        let registry = Registry::default();
        let counter = registry.counter("c_total", "c", &[]);
        counter.inc();
        counter.add(4);
        let gauge = registry.gauge("g", "g", &[]);
        gauge.set(10.0);
        gauge.inc();
        gauge.dec();
        gauge.dec();
        gauge.add(0.5);
        let histogram = registry.histogram("h_seconds", "h", &[], &[0.1, 1.0]);
        histogram.observe(0.05);
        histogram.observe(0.5);
        histogram.observe_duration(Duration::from_secs(3));
        drop(histogram.start_timer());

        assert_eq!(counter.get(), 5);
        assert_eq!(gauge.get(), 9.5);
        assert_eq!(histogram.count(), 4);
        let samples = check_exposition(&registry.render().await).unwrap();
        assert_eq!(samples["c_total{}"], 5.0);
        assert_eq!(samples["g{}"], 9.5);
        assert_eq!(
            samples[r#"h_seconds_bucket{le="0.1"}"#], 2.0,
            "0.05 and the timer's few microseconds"
        );
        assert_eq!(samples[r#"h_seconds_bucket{le="1"}"#], 3.0);
        assert_eq!(samples[r#"h_seconds_bucket{le="+Inf"}"#], 4.0);
        assert_eq!(samples["h_seconds_count{}"], 4.0);
        assert!((samples["h_seconds_sum{}"] - 3.55).abs() < 0.01);
    }

    #[tokio::test]
    async fn histogram_buckets_are_cumulative_and_end_with_inf_equal_to_count() {
        let registry = Registry::default();
        // Unsorted, repeated and infinite bounds are tidied; a value on a bound counts in it.
        let histogram =
            registry.histogram("h", "h", &[("kind", "x")], &[1.0, 0.5, f64::INFINITY, 0.5]);
        for value in [0.5, 0.75, 1.0, 2.0, f64::NAN] {
            histogram.observe(value);
        }
        let text = registry.render().await;
        check_exposition(&text).unwrap();
        let expected = concat!(
            "# HELP h h\n",
            "# TYPE h histogram\n",
            "h_bucket{kind=\"x\",le=\"0.5\"} 1\n",
            "h_bucket{kind=\"x\",le=\"1\"} 3\n",
            "h_bucket{kind=\"x\",le=\"+Inf\"} 4\n",
            "h_sum{kind=\"x\"} 4.25\n",
            "h_count{kind=\"x\"} 4\n",
        );
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn label_values_are_escaped() {
        let registry = Registry::default();
        registry
            .counter(
                "escaped_total",
                "e",
                &[("path", "C:\\dir \"quoted\"\nnext")],
            )
            .inc();
        let text = registry.render().await;
        assert!(
            text.contains(r#"escaped_total{path="C:\\dir \"quoted\"\nnext"} 1"#),
            "{text}"
        );
        let samples = check_exposition(&text).unwrap();
        assert_eq!(samples.len(), 1);
        assert!(samples.contains_key(&format!(
            "escaped_total{{path={:?}}}",
            "C:\\dir \"quoted\"\nnext"
        )));
    }

    #[test]
    fn the_same_name_and_labels_share_one_counter() {
        let registry = Registry::default();
        let a = registry.counter("shared_total", "s", &[("a", "1"), ("b", "2")]);
        let b = registry.counter("shared_total", "s", &[("b", "2"), ("a", "1")]);
        let other = registry.counter("shared_total", "s", &[("a", "1"), ("b", "3")]);
        a.inc();
        b.add(2);
        assert_eq!(a.get(), 3);
        assert_eq!(b.get(), 3);
        assert_eq!(other.get(), 0);
    }

    #[tokio::test]
    async fn the_global_registry_serves_the_free_functions() {
        counter(
            "hodei_runtime_metrics_test_total",
            "Test counter.",
            &[("t", "global")],
        )
        .inc();
        counter(
            "hodei_runtime_metrics_test_total",
            "Test counter.",
            &[("t", "global")],
        )
        .inc();
        let text = render().await;
        assert!(
            text.contains("hodei_runtime_metrics_test_total{t=\"global\"} 2\n"),
            "{text}"
        );
        check_exposition(&text).unwrap();
    }

    #[tokio::test]
    async fn collectors_run_at_every_scrape_and_a_new_one_replaces_its_namesake() {
        let registry = Registry::default();
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        registry.register_collector("queue", move || {
            let runs = counted.fetch_add(1, Ordering::Relaxed) + 1;
            Box::pin(async move { vec![Sample::gauge("queue_depth", "q", &[], runs as f64)] })
        });
        assert!(registry.render().await.contains("queue_depth 1\n"));
        assert!(registry.render().await.contains("queue_depth 2\n"));

        registry.register_collector(
            "queue",
            collector_of(vec![Sample::gauge("queue_depth", "q", &[], 7.0)]),
        );
        let text = registry.render().await;
        assert!(text.contains("queue_depth 7\n"), "{text}");
        assert_eq!(runs.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn collected_samples_that_cannot_be_rendered_validly_are_left_out() {
        let registry = Registry::default();
        registry.counter("registered_total", "r", &[]).inc();
        registry.register_collector(
            "a",
            collector_of(vec![
                Sample::gauge("registered_total", "clash", &[], 9.0),
                Sample::gauge("bad name", "b", &[], 1.0),
                Sample::gauge("bad_label", "b", &[("9x", "v")], 1.0),
                Sample::gauge("twice", "t", &[("k", "v")], 1.0),
                Sample::gauge("twice", "t", &[("k", "v")], 2.0),
                Sample::counter("twice", "t", &[("k", "w")], 3.0),
            ]),
        );
        registry.register_collector("b", || Box::pin(async { panic!("the query broke") }));
        let text = registry.render().await;
        let samples = check_exposition(&text).unwrap_or_else(|problem| panic!("{problem}\n{text}"));
        let expected: BTreeMap<String, f64> = [
            ("registered_total{}".to_owned(), 1.0),
            (r#"twice{k="v"}"#.to_owned(), 1.0),
        ]
        .into();
        assert_eq!(samples, expected, "{text}");
    }

    #[test]
    #[should_panic(expected = "already registered as a counter")]
    fn registering_one_name_as_two_types_is_a_mistake_in_the_code() {
        let registry = Registry::default();
        registry.counter("twice_total", "t", &[]);
        registry.gauge("twice_total", "t", &[]);
    }

    #[test]
    #[should_panic(expected = "cannot have a label called le")]
    fn a_histogram_cannot_have_an_le_label() {
        Registry::default().histogram("h", "h", &[("le", "1")], DEFAULT_LATENCY_BUCKETS);
    }

    #[test]
    fn the_checker_rejects_broken_exposition() {
        let broken = [
            "x 1\n",                                                     // no HELP/TYPE
            "# HELP x x\nx 1\n",                                         // no TYPE
            "# HELP x x\n# TYPE x gauge\nx{a=\"1} 1\n",                  // unterminated value
            "# HELP x x\n# TYPE x gauge\nx{a=\"\\t\"} 1\n",              // bad escape
            "# HELP x x\n# TYPE x gauge\nx one\n",                       // bad value
            "# HELP y y\n# TYPE y gauge\ny 1\n# HELP x x\n# TYPE x gauge\nx 1\n", // unsorted
            "# HELP x x\n# TYPE x gauge\nx 1\n# HELP y y\n# TYPE y gauge\nx 2\n", // not grouped
            "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
            "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
        ];
        for text in broken {
            assert!(check_exposition(text).is_err(), "accepted {text:?}");
        }
        check_exposition("# HELP x x\n# TYPE x gauge\nx{a=\"1\",b=\"\\\"\"} -1.5e3\n").unwrap();
    }
}
