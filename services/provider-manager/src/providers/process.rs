//! The process provider: each worker is a `hodei-agent` child process in a process group of
//! its own, so destroying the worker also ends whatever its job started.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Provider, ProviderError, WorkerSpec};

pub struct ProcessProvider {
    agent_bin: PathBuf,
    nats_url: String,
    grace: Duration,
    /// Live children of this instance: process group id, and whether the agent has exited.
    children: Arc<Mutex<HashMap<Uuid, (i32, watch::Receiver<bool>)>>>,
}

impl ProcessProvider {
    pub fn new(agent_bin: PathBuf, nats_url: String, grace: Duration) -> Self {
        ProcessProvider {
            agent_bin,
            nats_url,
            grace,
            children: Default::default(),
        }
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a group that is gone yields ESRCH, ignored.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// SIGKILL what is left of a reaped agent's process group (its job's processes). The kernel
/// does not hand out a pid while a process group of that number has members, so if a
/// process with the agent's old pid exists, the number was reused by someone else after the
/// group emptied: that group is not ours and is left alone.
fn kill_orphans(pgid: i32) {
    if !std::path::Path::new(&format!("/proc/{pgid}")).exists() {
        signal_group(pgid, libc::SIGKILL);
    }
}

/// Whether process `pid` is the agent of `worker_id` (its environment names the worker).
fn is_agent_of(pid: i32, worker_id: Uuid) -> bool {
    let needle = format!("HODEI_WORKER_ID={worker_id}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| {
            environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
        })
        .unwrap_or(false)
}

async fn exited_within(exited: &mut watch::Receiver<bool>, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, exited.wait_for(|done| *done)).await,
        Ok(Ok(_))
    )
}

impl Provider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn create(&self, spec: WorkerSpec) -> Result<String, ProviderError> {
        let mut child = Command::new(&self.agent_bin)
            .env("HODEI_WORKER_ID", spec.worker_id.to_string())
            .env("HODEI_BOOTSTRAP_TOKEN", &spec.token)
            .env("HODEI_NATS_URL", &self.nats_url)
            .env("HODEI_CORRELATION_ID", &spec.correlation_id)
            .envs(
                spec.trace_context
                    .iter()
                    .map(|(name, value)| (name.to_ascii_uppercase(), value)),
            )
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                ProviderError(format!("cannot start {}: {e}", self.agent_bin.display()))
            })?;
        let pid = child
            .id()
            .ok_or_else(|| ProviderError("the agent exited at once".into()))?;
        let (exited_tx, exited_rx) = watch::channel(false);
        self.children
            .lock()
            .expect("children lock")
            .insert(spec.worker_id, (pid as i32, exited_rx));
        let worker_id = spec.worker_id;
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => tracing::info!(%worker_id, pid, %status, "agent exited"),
                Err(error) => tracing::warn!(%worker_id, pid, %error, "cannot wait for the agent"),
            }
            // The entry stays until the worker is destroyed: its job's processes may outlive
            // the agent in its process group, and destroy ends them.
            exited_tx.send_replace(true);
        });
        tracing::info!(worker_id = %spec.worker_id, pid, "agent started");
        Ok(pid.to_string())
    }

    async fn destroy(
        &self,
        worker_id: Uuid,
        resource_id: Option<&str>,
    ) -> Result<(), ProviderError> {
        let known = self
            .children
            .lock()
            .expect("children lock")
            .get(&worker_id)
            .cloned();
        let Some((pgid, mut exited)) = known else {
            // Not ours (or already reaped): end whatever is left of its process group, but
            // only if that pid is still this worker's agent (pids are reused).
            if let Some(pgid) = resource_id
                .and_then(|r| r.parse::<i32>().ok())
                .filter(|p| *p > 1)
            {
                if is_agent_of(pgid, worker_id) {
                    signal_group(pgid, libc::SIGKILL);
                }
            }
            return Ok(());
        };
        if !*exited.borrow() {
            signal_group(pgid, libc::SIGTERM);
            if !exited_within(&mut exited, self.grace).await {
                tracing::warn!(%worker_id, pgid, "agent ignored SIGTERM; killing it");
            }
        }
        // The agent is gone or going; nothing its job started may outlive the worker.
        if !*exited.borrow() {
            signal_group(pgid, libc::SIGKILL);
        }
        let died = exited_within(&mut exited, Duration::from_secs(5)).await;
        kill_orphans(pgid);
        self.children
            .lock()
            .expect("children lock")
            .remove(&worker_id);
        if !died {
            return Err(ProviderError(format!(
                "agent of worker {worker_id} (pid {pgid}) did not die"
            )));
        }
        Ok(())
    }
}
