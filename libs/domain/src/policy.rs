//! What a job asks of the platform beyond its command: how long it may wait to start, how
//! long it may run, whether and how failed attempts are retried, and its priority. Given at
//! submission; every field has a default, so `{}` is a valid policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Result};

/// How long a placed job may wait for its worker to acknowledge it before it is requeued.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobPolicy {
    /// From submission (or a retry's release) to the process starting; then Timeout.
    pub schedule_to_start_timeout_ms: u64,
    /// From the process starting to its end; then the process is killed.
    pub execution_timeout_ms: u64,
    /// Higher runs first when jobs wait for workers; -1000 ..= 1000.
    pub priority: i32,
    pub retry: RetryPolicy,
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy {
            schedule_to_start_timeout_ms: 5 * 60 * 1000,
            execution_timeout_ms: 60 * 60 * 1000,
            priority: 0,
            retry: RetryPolicy::default(),
        }
    }
}

/// Which endings of an attempt start another one (while attempts are left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetryOn {
    /// The process exited with a non-zero code, or could not start.
    Failed,
    /// The attempt ran past its execution timeout.
    Timeout,
    /// Its worker stopped answering.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 1 means no retry.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    pub retry_on: Vec<RetryOn>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff_ms: 1000,
            max_backoff_ms: 60_000,
            multiplier: 2.0,
            retry_on: vec![RetryOn::Failed, RetryOn::Lost],
        }
    }
}

impl RetryPolicy {
    /// Whether an attempt (numbered from 1) that ended in `how` is followed by another.
    pub fn retries(&self, attempt: u32, how: RetryOn) -> bool {
        attempt < self.max_attempts && self.retry_on.contains(&how)
    }

    /// The pause after failed attempt `attempt`: exponential, capped, with "equal jitter"
    /// (half fixed, half random); `jitter` is a random number in [0, 1).
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(63) as i32;
        let full = (self.initial_backoff_ms as f64 * self.multiplier.powi(exponent))
            .min(self.max_backoff_ms as f64);
        let ms = full / 2.0 + full / 2.0 * jitter.clamp(0.0, 1.0);
        Duration::from_millis(ms.round() as u64)
    }
}

impl JobPolicy {
    pub fn validate(&self) -> Result<()> {
        let invalid = |why: &str| Err(DomainError::InvalidJobSpec(format!("policy: {why}")));
        const WEEK_MS: u64 = 7 * 24 * 3600 * 1000;
        if !(1..=WEEK_MS).contains(&self.schedule_to_start_timeout_ms) {
            return invalid("schedule_to_start_timeout_ms must be between 1 ms and 7 days");
        }
        if !(1..=WEEK_MS).contains(&self.execution_timeout_ms) {
            return invalid("execution_timeout_ms must be between 1 ms and 7 days");
        }
        if !(-1000..=1000).contains(&self.priority) {
            return invalid("priority must be between -1000 and 1000");
        }
        let r = &self.retry;
        if !(1..=100).contains(&r.max_attempts) {
            return invalid("retry.max_attempts must be between 1 and 100");
        }
        if r.initial_backoff_ms > r.max_backoff_ms || r.max_backoff_ms > WEEK_MS {
            return invalid(
                "retry backoffs must satisfy initial_backoff_ms <= max_backoff_ms <= 7 days",
            );
        }
        if !(r.multiplier.is_finite() && (1.0..=10.0).contains(&r.multiplier)) {
            return invalid("retry.multiplier must be between 1 and 10");
        }
        Ok(())
    }

    pub fn schedule_to_start(&self) -> Duration {
        Duration::from_millis(self.schedule_to_start_timeout_ms)
    }

    pub fn execution(&self) -> Duration {
        Duration::from_millis(self.execution_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_policy_takes_every_default() {
        let policy: JobPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(policy, JobPolicy::default());
        assert!(policy.validate().is_ok());
        assert!(
            !policy.retry.retries(1, RetryOn::Failed),
            "no retry unless asked"
        );
        assert!(serde_json::from_str::<JobPolicy>(r#"{"surprise":1}"#).is_err());
    }

    #[test]
    fn backoff_grows_exponentially_is_capped_and_jittered_within_half() {
        let r = RetryPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            multiplier: 2.0,
            ..Default::default()
        };
        assert_eq!(r.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(r.backoff(1, 0.0), Duration::from_millis(50));
        assert_eq!(r.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(r.backoff(10, 1.0), Duration::from_millis(1000));
        assert_eq!(r.backoff(60, 0.5), Duration::from_millis(750));
    }

    #[test]
    fn retries_follow_the_outcomes_and_the_attempts_left() {
        let r = RetryPolicy {
            max_attempts: 3,
            retry_on: vec![RetryOn::Failed],
            ..Default::default()
        };
        assert!(r.retries(1, RetryOn::Failed) && r.retries(2, RetryOn::Failed));
        assert!(!r.retries(3, RetryOn::Failed));
        assert!(!r.retries(1, RetryOn::Timeout));
    }

    #[test]
    fn out_of_range_policies_are_refused() {
        for bad in [
            JobPolicy {
                schedule_to_start_timeout_ms: 0,
                ..Default::default()
            },
            JobPolicy {
                priority: 5000,
                ..Default::default()
            },
            JobPolicy {
                retry: RetryPolicy {
                    max_attempts: 0,
                    ..Default::default()
                },
                ..Default::default()
            },
            JobPolicy {
                retry: RetryPolicy {
                    multiplier: f64::NAN,
                    ..Default::default()
                },
                ..Default::default()
            },
            JobPolicy {
                retry: RetryPolicy {
                    initial_backoff_ms: 10,
                    max_backoff_ms: 5,
                    ..Default::default()
                },
                ..Default::default()
            },
        ] {
            assert_eq!(bad.validate().unwrap_err().code(), "INVALID_JOB_SPEC");
        }
    }
}
