//! A circuit breaker: after `threshold` consecutive failures it opens, and the work it guards
//! waits (its messages are redelivered later) instead of failing; after the open window one
//! probe is let through (half-open): success closes it, failure opens it again for twice as
//! long (up to a minute). Used per provider (creating workers) and on dispatch.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use crate::metrics::Metrics;

/// The `hodei_circuit_state{circuit}` gauges of a process's breakers: 0 closed, 1 half-open,
/// 2 open. Register once, hand a clone to each [`Breaker::new`].
#[derive(Debug, Clone)]
pub struct CircuitGauges(Family<CircuitLabels, Gauge>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CircuitLabels {
    circuit: String,
}

impl CircuitGauges {
    pub fn register(metrics: &mut Metrics) -> CircuitGauges {
        CircuitGauges(metrics.gauge_family(
            "hodei_circuit_state",
            "Circuit breakers (providers, dispatch): 0 closed, 1 half-open, 2 open",
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    consecutive_failures: u32,
    open_until: Option<Instant>,
    open_for: Duration,
    probing: bool,
}

#[derive(Debug)]
pub struct Breaker {
    name: String,
    /// This breaker's series of `hodei_circuit_state`.
    state_gauge: Gauge,
    threshold: u32,
    base_open: Duration,
    max_open: Duration,
    inner: Mutex<Inner>,
}

/// What the breaker shows operators.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    pub name: String,
    pub circuit: CircuitState,
    pub consecutive_failures: u32,
    /// Milliseconds until a probe is let through, while open.
    pub retry_in_ms: Option<u64>,
}

impl Breaker {
    /// `name` labels logs and this breaker's series of `gauges` (closed, 0, from now on).
    pub fn new(name: &str, threshold: u32, base_open: Duration, gauges: &CircuitGauges) -> Self {
        Breaker {
            name: name.to_owned(),
            state_gauge: gauges.0.get_or_create_owned(&CircuitLabels {
                circuit: name.to_owned(),
            }),
            threshold: threshold.max(1),
            base_open,
            max_open: Duration::from_secs(60).max(base_open),
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                open_until: None,
                open_for: base_open,
                probing: false,
            }),
        }
    }

    /// May a create be tried now? If not, how long to wait.
    pub fn allow(&self) -> Result<(), Duration> {
        self.allow_at(Instant::now())
    }

    /// [`Breaker::allow`] at `now` (tests step the clock instead of sleeping).
    fn allow_at(&self, now: Instant) -> Result<(), Duration> {
        let mut inner = self.inner.lock().expect("breaker lock");
        match inner.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open => match inner.open_until {
                Some(until) if until > now => Err(until - now),
                _ => {
                    inner.state = CircuitState::HalfOpen;
                    inner.probing = true;
                    tracing::warn!(circuit = %self.name, "circuit half-open: probing");
                    self.gauge(CircuitState::HalfOpen);
                    Ok(())
                }
            },
            CircuitState::HalfOpen if inner.probing => Err(Duration::from_millis(200)),
            CircuitState::HalfOpen => {
                inner.probing = true;
                Ok(())
            }
        }
    }

    /// Count a success or a failure; whether the circuit opened or closed by it.
    pub fn record(&self, success: bool) -> bool {
        self.record_at(success, Instant::now())
    }

    /// [`Breaker::record`] at `now`.
    fn record_at(&self, success: bool, now: Instant) -> bool {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.probing = false;
        let before = inner.state;
        if success {
            if inner.state != CircuitState::Closed {
                tracing::info!(circuit = %self.name, "circuit closed: it works again");
            }
            inner.state = CircuitState::Closed;
            inner.consecutive_failures = 0;
            inner.open_for = self.base_open;
            inner.open_until = None;
            self.gauge(CircuitState::Closed);
            return before != CircuitState::Closed;
        }
        inner.consecutive_failures += 1;
        let reopen = inner.state == CircuitState::HalfOpen;
        if reopen || inner.consecutive_failures >= self.threshold {
            if reopen {
                inner.open_for = (inner.open_for * 2).min(self.max_open);
            }
            inner.state = CircuitState::Open;
            inner.open_until = Some(now + inner.open_for);
            tracing::error!(
                circuit = %self.name,
                failures = inner.consecutive_failures,
                open_for_ms = inner.open_for.as_millis() as u64,
                "circuit open: work waits until it recovers"
            );
            self.gauge(CircuitState::Open);
        }
        before != inner.state
    }

    fn gauge(&self, state: CircuitState) {
        self.state_gauge.set(match state {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        });
    }

    pub fn view(&self) -> BreakerView {
        let inner = self.inner.lock().expect("breaker lock");
        BreakerView {
            name: self.name.clone(),
            circuit: inner.state,
            consecutive_failures: inner.consecutive_failures,
            retry_in_ms: inner
                .open_until
                .filter(|_| inner.state == CircuitState::Open)
                .map(|until| until.saturating_duration_since(Instant::now()).as_millis() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_opens_after_the_threshold_probes_once_and_closes_on_success() {
        let mut metrics = Metrics::new();
        let gauges = CircuitGauges::register(&mut metrics);
        let breaker = Breaker::new("p", 3, Duration::from_millis(30), &gauges);
        let gauge = |breaker: &Breaker| breaker.state_gauge.get();
        assert_eq!(gauge(&breaker), 0);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for _ in 0..2 {
            assert!(breaker.allow_at(t0).is_ok());
            breaker.record_at(false, t0);
        }
        assert_eq!(breaker.view().circuit, CircuitState::Closed);
        breaker.record_at(false, t0);
        assert_eq!(breaker.view().circuit, CircuitState::Open);
        assert_eq!(gauge(&breaker), 2);
        assert_eq!(
            breaker.allow_at(at(10)),
            Err(Duration::from_millis(20)),
            "requests wait while open, told how long"
        );
        assert!(
            breaker.allow_at(at(30)).is_ok(),
            "one probe after the window"
        );
        assert!(breaker.allow_at(at(30)).is_err(), "and only one");
        assert_eq!(gauge(&breaker), 1);
        breaker.record_at(false, at(30));
        assert_eq!(breaker.view().circuit, CircuitState::Open);
        assert!(
            breaker.allow_at(at(30 + 59)).is_err(),
            "the window doubles: still open 59 ms after the failed probe"
        );
        assert!(breaker.allow_at(at(30 + 60)).is_ok());
        breaker.record_at(true, at(30 + 60));
        assert_eq!(breaker.view().circuit, CircuitState::Closed);
        assert_eq!(breaker.view().consecutive_failures, 0);
        assert_eq!(gauge(&breaker), 0);
    }
}
