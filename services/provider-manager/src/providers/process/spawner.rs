//! The process provider's agent spawner: one `hodei-agent --spawner` process, started at the
//! first agent, which forks every agent from itself into the agent's cgroup (see the agent's
//! `spawner` module for why: an exec costs each agent about 1.3 ms of CPU here). The protocol
//! is `hodei_protocol::spawner`'s.
//!
//! The spawner is this service's child and ends with it (its socket closes and it exits); a
//! spawner that died is started again by the next agent's request. It forks the agent binary
//! it was started from: a new binary on disk takes effect when this service restarts.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use hodei_protocol::spawner::{Notice, FLAG, MAX_REQUEST, SOCKET_FD};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

/// How long the spawner may take to answer a request (it forks at once; the first request
/// also waits for its exec).
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Spawner {
    program: PathBuf,
    /// The spawner's own environment (the agents' settings, no secret of this service).
    env: Vec<(OsString, OsString)>,
    running: tokio::sync::Mutex<Option<Running>>,
}

/// A spawner that runs: the socket's writing half, and who waits for what it tells.
struct Running {
    writer: OwnedWriteHalf,
    waiting: Arc<Mutex<Waiting>>,
    _process: tokio::process::Child,
}

#[derive(Default)]
struct Waiting {
    /// The spawner is gone (its socket closed, or it spoke nonsense).
    gone: bool,
    /// Requests sent and not yet answered, in order.
    started: VecDeque<oneshot::Sender<io::Result<Agent>>>,
    /// Agents started and not yet ended, by pid.
    exits: HashMap<i32, oneshot::Sender<i32>>,
}

/// An agent the spawner started.
pub struct Agent {
    pub pid: u32,
    exit: oneshot::Receiver<i32>,
    /// The agent's pidfd, taken when the spawner said it started (the spawner has not reaped
    /// it then, so the pid is still the agent's): how its end is seen if the spawner ends
    /// first, since only the spawner can reap it.
    pidfd: Option<OwnedFd>,
}

impl Agent {
    /// How the agent ended, once it has: `exit status: N` or `signal: N` (or, its spawner
    /// gone before it, only that it ended).
    pub async fn wait(self) -> io::Result<String> {
        let status = match self.exit.await {
            Ok(status) => status,
            Err(_) => {
                let pidfd = self.pidfd.ok_or_else(|| {
                    io::Error::other("the agent spawner ended first, and the agent has no pidfd")
                })?;
                // A pidfd becomes readable when its process ends, whoever its parent is.
                // SAFETY: the OwnedFd stays open and the same descriptor for the AsyncFd's
                // life.
                let pidfd = unsafe {
                    AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
                }
                .map_err(io::Error::from)?;
                let _ended = pidfd.readable().await?;
                return Ok("ended (after its spawner: how is not known)".into());
            }
        };
        Ok(if libc::WIFEXITED(status) {
            format!("exit status: {}", libc::WEXITSTATUS(status))
        } else {
            format!("signal: {}", libc::WTERMSIG(status))
        })
    }
}

/// A pidfd of `pid` (Linux 5.3), None where the kernel has none.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether `error` from [`Spawner::spawn`] means `clone3` into a cgroup was refused: this
/// kernel (or a seccomp filter) has none, so the caller should start the agent another way.
pub fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::E2BIG)
    )
}

impl Spawner {
    pub fn new(program: PathBuf, env: Vec<(OsString, OsString)>) -> Spawner {
        Spawner {
            program,
            env,
            running: Default::default(),
        }
    }

    /// Start an agent with exactly `env`, in a process group of its own, born in `cgroup`.
    /// A spawner found gone when the request is written (it died since the last one, and
    /// read nothing of this one) is started again and asked once more.
    pub async fn spawn(&self, cgroup: &Path, env: &[(OsString, OsString)]) -> io::Result<Agent> {
        let mut request = encode(cgroup, env)?;
        let asked = self.ask(&request).await;
        let asked = match asked {
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                tracing::warn!(%error, "the agent spawner was gone; starting another");
                self.ask(&request).await
            }
            asked => asked,
        };
        request.fill(0);
        match tokio::time::timeout(ANSWER_WITHIN, asked?).await {
            Ok(answer) => answer
                .map_err(|_| io::Error::other("the agent spawner ended before it answered"))?,
            Err(_) => {
                // A spawner that does not answer (a wrapper in front of the agent that never
                // runs it, say) is let go: the next request starts another.
                *self.running.lock().await = None;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the agent spawner did not answer within {ANSWER_WITHIN:?}"),
                ))
            }
        }
    }

    /// Write the request to the spawner (started first if there is none): its answer to come.
    async fn ask(&self, request: &[u8]) -> io::Result<oneshot::Receiver<io::Result<Agent>>> {
        let (started_tx, started) = oneshot::channel();
        let mut running = self.running.lock().await;
        let gone = running
            .as_ref()
            .is_none_or(|r| r.waiting.lock().expect("spawner lock").gone);
        if gone {
            *running = Some(self.start()?);
        }
        // Until the whole request is written, the spawner's answers and the waiters queued
        // here may not match: if this future is dropped before (or the write fails), the
        // spawner is let go, and everyone waiting on it learns that it is gone.
        let mut unfinished = Unfinished(Some(&mut running));
        let spawner = unfinished.running().as_mut().expect("started above");
        spawner
            .waiting
            .lock()
            .expect("spawner lock")
            .started
            .push_back(started_tx);
        spawner.writer.write_all(request).await?;
        unfinished.0 = None;
        Ok(started)
    }

    fn start(&self) -> io::Result<Running> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg(FLAG)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: dup2/fcntl only (async-signal-safe) between fork and exec: the spawner
        // finds its end of the socket as SOCKET_FD, open across the exec.
        unsafe {
            command.pre_exec(move || {
                let rc = if theirs_fd == SOCKET_FD {
                    libc::fcntl(SOCKET_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(theirs_fd, SOCKET_FD)
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = command.spawn()?;
        drop(theirs);
        tracing::info!(pid = process.id(), "agent spawner started");
        ours.set_nonblocking(true)?;
        let (reader, writer) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(read_notices(reader, waiting.clone()));
        Ok(Running {
            writer,
            waiting,
            _process: process,
        })
    }
}

/// The spawner, while a request to it is being written: dropped before the write is done,
/// it lets the spawner go (see [`Spawner::ask`]).
struct Unfinished<'a, 'b>(Option<&'a mut tokio::sync::MutexGuard<'b, Option<Running>>>);

impl<'b> Unfinished<'_, 'b> {
    fn running(&mut self) -> &mut Option<Running> {
        self.0.as_mut().expect("not finished")
    }
}

impl Drop for Unfinished<'_, '_> {
    fn drop(&mut self) {
        if let Some(running) = self.0.take() {
            **running = None;
        }
    }
}

/// A request: its length, the cgroup, a NUL, then `NAME=value` entries each ended by a NUL.
fn encode(cgroup: &Path, env: &[(OsString, OsString)]) -> io::Result<Vec<u8>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let mut request = vec![0u8; 4];
    let mut text = |bytes: &[u8], end: u8| {
        if bytes.contains(&0) {
            return Err(invalid("a NUL byte in a path or the environment"));
        }
        request.extend_from_slice(bytes);
        request.push(end);
        Ok(())
    };
    text(cgroup.as_os_str().as_bytes(), 0)?;
    for (name, value) in env {
        if name.is_empty() || name.as_bytes().contains(&b'=') {
            return Err(invalid(
                "an environment variable's name is empty or has '='",
            ));
        }
        text(name.as_bytes(), b'=')?;
        text(value.as_bytes(), 0)?;
    }
    let len = request.len() - 4;
    if len > MAX_REQUEST {
        return Err(invalid(
            "an agent's environment larger than the spawner takes",
        ));
    }
    request[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(request)
}

/// Read the spawner's notices until its socket closes, handing each to whoever waits for it;
/// then everyone still waiting learns that it is gone.
async fn read_notices(mut reader: OwnedReadHalf, waiting: Arc<Mutex<Waiting>>) {
    let mut bytes = [0u8; Notice::SIZE];
    let error = loop {
        if let Err(error) = reader.read_exact(&mut bytes).await {
            break error;
        }
        let mut waiting = waiting.lock().expect("spawner lock");
        match Notice::decode(bytes) {
            Some(Notice::Started(pid)) => {
                if let Some(started) = waiting.started.pop_front() {
                    let (exit_tx, exit) = oneshot::channel();
                    waiting.exits.insert(pid, exit_tx);
                    let _ = started.send(Ok(Agent {
                        pid: pid as u32,
                        exit,
                        pidfd: pidfd_open(pid),
                    }));
                }
            }
            Some(Notice::Failed(errno)) => {
                if let Some(started) = waiting.started.pop_front() {
                    let _ = started.send(Err(io::Error::from_raw_os_error(errno)));
                }
            }
            Some(Notice::Exited(pid, status)) => {
                if let Some(exit) = waiting.exits.remove(&pid) {
                    let _ = exit.send(status);
                }
            }
            None => break io::Error::new(io::ErrorKind::InvalidData, "an unknown notice"),
        }
    };
    let mut waiting = waiting.lock().expect("spawner lock");
    waiting.gone = true;
    waiting.started.clear();
    let agents = std::mem::take(&mut waiting.exits).len();
    tracing::info!(%error, agents, "agent spawner gone (the next agent starts another)");
}

#[cfg(test)]
mod tests {
    use super::encode;
    use std::ffi::OsString;
    use std::path::Path;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn a_request_is_its_length_the_cgroup_and_the_environment() {
        let request = encode(Path::new("/cg/w"), &env(&[("A", "1"), ("B", "x=y")])).unwrap();
        let body = b"/cg/w\0A=1\0B=x=y\0";
        assert_eq!(request[..4], (body.len() as u32).to_le_bytes());
        assert_eq!(&request[4..], body);
    }

    #[test]
    fn what_the_spawner_could_misread_is_refused() {
        for bad in [
            env(&[("A", "1\0B=2")]),
            env(&[("A=B", "1")]),
            env(&[("", "1")]),
            env(&[("A", &"x".repeat(hodei_protocol::spawner::MAX_REQUEST))]),
        ] {
            let error = encode(Path::new("/cg/w"), &bad).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        }
        assert!(encode(Path::new("/cg\0/w"), &[]).is_err());
    }
}
