//! The process provider: each worker is a `hodei-agent` process in a process group of its
//! own and, where the machine allows it, in a cgroup (v2) of its own named by the worker's
//! id, forked there by this service's agent spawner ([`spawner`]). Destroying the worker kills the whole cgroup (`cgroup.kill`), so everything
//! its job started ends, even after the agent died and this service restarted; without
//! cgroups the process group is killed, and a worker this instance does not know cannot be
//! confirmed gone.

mod spawner;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Provider, ProviderError, Teardown, WorkerSpec};

/// Variables of this service an agent may inherit (logging, tracing, the jobs' settings);
/// nothing else of the service's environment (its database URL, its credentials) reaches it.
const AGENT_ENV: [&str; 8] = [
    "PATH",
    "LANG",
    "TZ",
    "RUST_LOG",
    "HODEI_LOG_FORMAT",
    "HODEI_JOB_",
    "HODEI_AGENT_",
    "OTEL_",
];

pub struct ProcessProvider {
    agent_bin: PathBuf,
    nats_url: String,
    grace: Duration,
    /// Where each worker's credential file is written (owner-only) for its agent to read.
    creds_dir: PathBuf,
    /// The cgroup (v2) under which each worker gets `<worker id>/`; None without cgroups.
    cgroups: Option<PathBuf>,
    /// Forks the agents born in cgroups (started at the first); None: each agent is exec'd.
    spawner: Option<spawner::Spawner>,
    /// The kernel refused the spawner's `clone3` into a cgroup: it is not asked again.
    spawner_refused: AtomicBool,
    /// Live children of this instance: process group id, and whether the agent has exited.
    children: Arc<Mutex<HashMap<Uuid, (i32, watch::Receiver<bool>)>>>,
}

/// The cgroup v2 hierarchy under which workers get their cgroups: `setting` if given (`off`:
/// none), else `hodei` in the unified hierarchy when it is writable.
pub fn cgroup_root(setting: Option<&str>) -> Option<PathBuf> {
    match setting {
        Some("off") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|base| base.join("cgroup.controllers").is_file())
            .map(|base| base.join("hodei")),
    }
}

impl ProcessProvider {
    pub fn new(
        agent_bin: PathBuf,
        nats_url: String,
        grace: Duration,
        creds_dir: PathBuf,
        cgroups: Option<PathBuf>,
        spawner: bool,
    ) -> Result<Self, ProviderError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&creds_dir)
            .map_err(|e| ProviderError(format!("{}: {e}", creds_dir.display())))?;
        let cgroups = match cgroups {
            Some(root) => match std::fs::create_dir_all(&root) {
                Ok(()) => {
                    tracing::info!(cgroup = %root.display(), "each worker runs in a cgroup of its own");
                    Some(root)
                }
                Err(error) => {
                    tracing::warn!(cgroup = %root.display(), %error, "no cgroups: workers are tracked by process group only");
                    None
                }
            },
            None => None,
        };
        Ok(ProcessProvider {
            spawner: spawner.then(|| spawner::Spawner::new(agent_bin.clone(), inherited_env())),
            spawner_refused: AtomicBool::new(false),
            agent_bin,
            nats_url,
            grace,
            creds_dir,
            cgroups,
            children: Default::default(),
        })
    }

    fn cgroup_of(&self, worker_id: Uuid) -> Option<PathBuf> {
        self.cgroups
            .as_ref()
            .map(|root| root.join(worker_id.to_string()))
    }

    /// Whether this instance started the worker and has not destroyed it yet: it holds the
    /// agent's process group, and [`Self::destroy`] needs no resource id for it.
    pub fn holds(&self, worker_id: Uuid) -> bool {
        self.children
            .lock()
            .expect("children lock")
            .contains_key(&worker_id)
    }

    fn creds_path(&self, worker_id: Uuid) -> PathBuf {
        self.creds_dir.join(format!("{worker_id}.creds"))
    }

    /// Start the agent of `worker_id` with exactly `env`, in a process group of its own and,
    /// with cgroups, forked by the spawner into its own cgroup, so that nothing it starts
    /// escapes it. Without the spawner, or on a kernel without `CLONE_INTO_CGROUP`, the agent
    /// is exec'd and moved into its cgroup between fork and exec (slower: a migration takes a
    /// global lock).
    async fn start_agent(
        &self,
        worker_id: Uuid,
        env: &[(OsString, OsString)],
    ) -> std::io::Result<Started> {
        let mut command = Command::new(&self.agent_bin);
        command
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .process_group(0);
        let Some(cgroup) = self.cgroup_of(worker_id) else {
            return Ok(Started::Command(command.spawn()?));
        };
        std::fs::create_dir_all(&cgroup).map_err(|e| {
            std::io::Error::new(e.kind(), format!("creating {}: {e}", cgroup.display()))
        })?;
        let refused = &self.spawner_refused;
        if let Some(spawner) = self.spawner.as_ref().filter(|_| !refused.load(Relaxed)) {
            match spawner.spawn(&cgroup, env).await {
                Ok(agent) => return Ok(Started::Spawned(agent)),
                Err(error) if spawner::unsupported(&error) => {
                    tracing::warn!(%error, "no clone3 into a cgroup: agents are exec'd and moved into their cgroups");
                    refused.store(true, Relaxed);
                }
                Err(error) => return Err(error),
            }
        }
        let procs = std::ffi::CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "cgroup path with a NUL byte",
            )
        })?;
        // SAFETY: only open/write/close (async-signal-safe) between fork and exec; the
        // agent enters its cgroup before it runs, so nothing it starts escapes it.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Started::Command(command.spawn()?))
    }
}

/// The variables of this service's environment that an agent inherits ([`AGENT_ENV`]).
fn inherited_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(name, _)| {
            let name = name.to_string_lossy();
            AGENT_ENV.iter().any(|allowed| {
                name == *allowed || (allowed.ends_with('_') && name.starts_with(allowed))
            })
        })
        .collect()
}

/// An agent that was started, either way.
enum Started {
    Spawned(spawner::Agent),
    Command(tokio::process::Child),
}

impl Started {
    /// None if the agent has already been reaped (it exited at once).
    fn pid(&self) -> Option<u32> {
        match self {
            Started::Spawned(agent) => Some(agent.pid),
            Started::Command(child) => child.id(),
        }
    }

    /// How the agent ended, once it has.
    async fn wait(self) -> std::io::Result<String> {
        match self {
            Started::Spawned(agent) => agent.wait().await,
            Started::Command(mut child) => child.wait().await.map(|status| status.to_string()),
        }
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a group that is gone yields ESRCH, ignored.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Kill everything in a worker's cgroup and remove it: Ok once it is empty (or was never
/// there).
async fn kill_cgroup(cgroup: &Path) -> Result<(), ProviderError> {
    if !cgroup.is_dir() {
        return Ok(());
    }
    let err =
        |what: &str, e: std::io::Error| ProviderError(format!("{what} {}: {e}", cgroup.display()));
    for _ in 0..500 {
        let populated = std::fs::read_to_string(cgroup.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .map_err(|e| err("reading", e))?;
        if !populated {
            return match std::fs::remove_dir(cgroup) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(err("removing", e)),
            };
        }
        if let Err(error) = std::fs::write(cgroup.join("cgroup.kill"), "1") {
            // Kernels before 5.14 have no cgroup.kill: signal each member.
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))
                .map_err(|_| err("killing", error))?;
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) of a process in the worker's cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(ProviderError(format!(
        "processes of {} survived cgroup.kill for 5 s",
        cgroup.display()
    )))
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

/// Whether process `pid` is the agent of `worker_id`: its cgroup is named by the worker (an
/// agent forked by the spawner), or its environment names the worker (an exec'd agent; a
/// forked one shows the spawner's environment there).
fn is_agent_of(pid: i32, worker_id: Uuid) -> bool {
    let in_its_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
        c.lines()
            .filter_map(|line| line.strip_prefix("0::"))
            .any(|path| path.rsplit('/').next() == Some(worker_id.to_string().as_str()))
    });
    if in_its_cgroup {
        return true;
    }
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
        let worker_id = spec.worker_id;
        let mut env = inherited_env();
        let mut set = |name: &str, value: &str| env.push((name.into(), value.into()));
        set("HODEI_WORKER_ID", &worker_id.to_string());
        set("HODEI_BOOTSTRAP_TOKEN", &spec.token);
        set("HODEI_NATS_URL", &self.nats_url);
        set("HODEI_CORRELATION_ID", &spec.correlation_id);
        for (name, value) in &spec.trace_context {
            set(&name.to_ascii_uppercase(), value);
        }
        if let Some(creds) = &spec.creds {
            let path = self.creds_path(worker_id);
            hodei_auth::write_owner_only(&path, creds, false)
                .map_err(|e| ProviderError(e.to_string()))?;
            env.push(("HODEI_NATS_CREDS".into(), path.into()));
        }
        let started = self.start_agent(worker_id, &env).await.map_err(|e| {
            let _ = std::fs::remove_file(self.creds_path(worker_id));
            ProviderError(format!("cannot start {}: {e}", self.agent_bin.display()))
        })?;
        let pid = started
            .pid()
            .ok_or_else(|| ProviderError("the agent exited at once".into()))?;
        let (exited_tx, exited_rx) = watch::channel(false);
        self.children
            .lock()
            .expect("children lock")
            .insert(worker_id, (pid as i32, exited_rx));
        tokio::spawn(async move {
            match started.wait().await {
                Ok(status) => tracing::info!(%worker_id, pid, %status, "agent exited"),
                Err(error) => tracing::warn!(%worker_id, pid, %error, "cannot wait for the agent"),
            }
            // The entry stays until the worker is destroyed: its job's processes may outlive
            // the agent in its process group, and destroy ends them.
            exited_tx.send_replace(true);
        });
        tracing::info!(%worker_id, pid, "agent started");
        Ok(pid.to_string())
    }

    async fn destroy(
        &self,
        worker_id: Uuid,
        resource_id: Option<&str>,
    ) -> Result<Teardown, ProviderError> {
        let _ = std::fs::remove_file(self.creds_path(worker_id));
        let known = self
            .children
            .lock()
            .expect("children lock")
            .get(&worker_id)
            .cloned();
        if let Some((pgid, mut exited)) = known.clone() {
            // Ask the agent first: it kills its job and reports how it ended.
            if !*exited.borrow() {
                signal_group(pgid, libc::SIGTERM);
                if !exited_within(&mut exited, self.grace).await {
                    tracing::warn!(%worker_id, pgid, "agent ignored SIGTERM; killing it");
                }
            }
        }
        let teardown = match self.cgroup_of(worker_id) {
            // Every process of the worker is in its cgroup, whoever started it and whatever
            // became of the agent: once it is empty, nothing of the worker runs.
            Some(cgroup) => {
                kill_cgroup(&cgroup).await?;
                Teardown::Confirmed
            }
            None => match &known {
                Some((pgid, exited)) => {
                    let mut exited = exited.clone();
                    if !*exited.borrow() {
                        signal_group(*pgid, libc::SIGKILL);
                    }
                    let died = exited_within(&mut exited, Duration::from_secs(5)).await;
                    kill_orphans(*pgid);
                    if !died {
                        return Err(ProviderError(format!(
                            "agent of worker {worker_id} (pid {pgid}) did not die"
                        )));
                    }
                    Teardown::Unconfirmed(
                        "without cgroups, processes that left the agent's process group cannot be found"
                            .into(),
                    )
                }
                None => {
                    // Not ours (another instance, or before a restart): end its process
                    // group, but only if that pid is still this worker's agent.
                    if let Some(pgid) = resource_id
                        .and_then(|r| r.parse::<i32>().ok())
                        .filter(|p| *p > 1)
                    {
                        if is_agent_of(pgid, worker_id) {
                            signal_group(pgid, libc::SIGKILL);
                        }
                    }
                    Teardown::Unconfirmed(format!(
                        "worker {worker_id} was not started by this instance and there are no cgroups"
                    ))
                }
            },
        };
        self.children
            .lock()
            .expect("children lock")
            .remove(&worker_id);
        Ok(teardown)
    }

    fn leftovers(&self) -> Vec<Uuid> {
        let Some(root) = &self.cgroups else {
            return Vec::new();
        };
        std::fs::read_dir(root)
            .map(|dir| {
                dir.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}
