//! The loop of a state-timeout monitor: find what is overdue (one cheap, indexed query),
//! handle each, then sleep until the next known deadline (at most `max_sleep`, so that
//! deadlines written by other instances are seen too), until `wake` is notified (a deadline
//! this process wrote), or until shutdown.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::Shutdown;

/// How a sweep goes: at most `batch` items per look, at most `max_sleep` between looks, and
/// what wakes it sooner.
#[derive(Clone, Copy)]
pub struct Pace<'a> {
    pub batch: usize,
    pub max_sleep: Duration,
    pub wake: Option<&'a tokio::sync::Notify>,
}

pub async fn run<T, Due, DueFut, Next, NextFut, Handle, HandleFut>(
    what: &'static str,
    Pace {
        batch,
        max_sleep,
        wake,
    }: Pace<'_>,
    shutdown: Shutdown,
    due: Due,
    next_due: Next,
    handle: Handle,
) where
    T: std::fmt::Display,
    Due: Fn() -> DueFut,
    DueFut: Future<Output = Result<Vec<T>, String>>,
    Next: Fn() -> NextFut,
    NextFut: Future<Output = Result<Option<DateTime<Utc>>, String>>,
    Handle: Fn(T) -> HandleFut,
    HandleFut: Future<Output = Result<(), String>>,
{
    // Passes in a row in which nothing due could be handled: an overdue item that keeps
    // failing (the database away, ...) is tried again after a growing pause, not at once.
    let mut failed_passes: u32 = 0;
    while !shutdown.is_cancelled() {
        match due().await {
            Ok(items) => {
                let full = items.len() >= batch;
                let (mut handled, mut failed) = (0, 0);
                for item in items {
                    let name = item.to_string();
                    match handle(item).await {
                        Ok(()) => handled += 1,
                        Err(error) => {
                            failed += 1;
                            tracing::warn!(what, item = %name, %error, "cannot apply a state timeout; it is tried again");
                        }
                    }
                }
                failed_passes = match (handled, failed) {
                    (0, 0) => 0,
                    (0, _) => failed_passes.saturating_add(1),
                    _ => 0,
                };
                if full && failed_passes == 0 {
                    continue;
                }
            }
            Err(error) => {
                failed_passes = failed_passes.saturating_add(1);
                tracing::warn!(what, %error, "cannot look for overdue deadlines")
            }
        }
        let sleep = match next_due().await {
            Ok(Some(at)) => (at - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(max_sleep),
            _ => max_sleep,
        };
        let sleep = match failed_passes {
            0 => sleep,
            n => sleep
                .max(Duration::from_millis(50) * 2u32.saturating_pow(n.min(10) - 1))
                .min(max_sleep),
        };
        let sleep = tokio::time::sleep(sleep.max(Duration::from_millis(5)));
        match wake {
            Some(wake) => {
                shutdown
                    .run_until_cancelled(async {
                        tokio::select! {
                            () = sleep => {}
                            () = wake.notified() => {}
                        }
                    })
                    .await
            }
            None => shutdown.run_until_cancelled(sleep).await,
        };
    }
}
