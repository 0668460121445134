//! The agent spawner (`hodei-agent --spawner`): a process the process provider starts once,
//! which forks every new agent from itself instead of the provider exec'ing the agent anew.
//!
//! An exec costs a new agent its dynamic loading and glibc's start-up, which on a virtual
//! machine asks the CPU for its features and caches about a hundred times (`cpuid`, a trap to
//! the hypervisor, 7 µs each here): about 1.3 ms of CPU per agent. The spawner paid it once;
//! a fork of this small, single-threaded process copies little, and the new agent goes on
//! from `main` with its own environment, as if it had been exec'd with it.
//!
//! The protocol is `hodei_protocol::spawner`'s; the socket is file descriptor 3.
//!
//! The fork is a raw `clone3`, not glibc's `fork`: glibc's fork handlers do not run in the
//! agent, and its main thread's record of its own thread id is still the spawner's. The
//! agent must call no pthread function aimed at its main thread (`pthread_kill`, affinity,
//! scheduling); threads it creates are whole.
//!
//! Each agent is born in its cgroup (`clone3` with `CLONE_INTO_CGROUP`) and process group,
//! with no signal blocked. The spawner holds no secret between requests: a request's bytes
//! (the agent's bootstrap token among them) are zeroed once its agent is forked. It exits
//! when the provider's end of the socket closes.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use hodei_protocol::spawner::{Notice, MAX_REQUEST, SOCKET_FD};

/// `CLONE_INTO_CGROUP` (Linux 5.7; the libc crate's constant has the wrong type on glibc).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Serve requests until the provider closes the socket, then exit. Returns only in a new
/// agent, with its environment set: the caller goes on as `hodei-agent` started with it.
pub fn serve() -> anyhow::Result<()> {
    // SAFETY: fstat into a zeroed struct; fd 3 is checked to be a socket before it is owned.
    let is_socket = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(SOCKET_FD, &mut stat) == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        anyhow::bail!(
            "{} is for the process provider, which passes its socket as descriptor {SOCKET_FD}",
            hodei_protocol::spawner::FLAG
        );
    }
    // SAFETY: descriptor 3 is a socket handed to this process, owned by nothing else here.
    let mut socket = unsafe { UnixStream::from_raw_fd(SOCKET_FD) };
    set_cloexec(SOCKET_FD)?;
    let children = sigchld_fd()?;
    // The CPU's features, asked of `cpuid` once here rather than in every agent: std, the
    // NATS client's random numbers (ChaCha) and its signing and hashing each cache them, and a
    // fork inherits the caches. (A seeded generator, not the thread's: that one's state would
    // be inherited too, and every agent would draw the same numbers.)
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::is_x86_feature_detected!("avx2");
    let mut chacha = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let _ = rand::Rng::next_u64(&mut chacha);
    hodei_auth::detect_cpu_features();
    let mut request = vec![0u8; MAX_REQUEST];
    loop {
        let mut polled = [
            libc::pollfd {
                fd: SOCKET_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: children.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two descriptors we own, in a local array.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) } < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.into());
        }
        if polled[1].revents != 0 {
            reap(&children, &mut socket)?;
        }
        if polled[0].revents == 0 {
            continue;
        }
        let mut len = [0u8; 4];
        match socket.read_exact(&mut len) {
            Ok(()) => {}
            // The provider is gone: so is every reason to fork.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => std::process::exit(0),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_REQUEST {
            anyhow::bail!("a spawn request of {len} bytes (at most {MAX_REQUEST})");
        }
        let body = &mut request[..len];
        socket.read_exact(body)?;
        let forked = fork_agent(body);
        body.fill(0);
        let notice = match forked {
            Ok(0) => {
                drop(children);
                // The child: its environment is set; the socket is the provider's business.
                std::mem::forget(socket);
                // SAFETY: closing our own copy of the socket, in the one thread there is.
                unsafe { libc::close(SOCKET_FD) };
                return Ok(());
            }
            Ok(pid) => Notice::Started(pid),
            Err(error) => Notice::Failed(error.raw_os_error().unwrap_or(libc::EIO)),
        };
        socket.write_all(&notice.encode())?;
    }
}

/// Fork a new agent into the cgroup the request names: its pid here, 0 in the agent (with
/// the request's environment set).
fn fork_agent(request: &mut [u8]) -> io::Result<i32> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let end = request
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| invalid("a request without its cgroup"))?;
    let cgroup = std::ffi::CStr::from_bytes_with_nul(&request[..=end])
        .map_err(|_| invalid("a cgroup path with a NUL byte"))?;
    // SAFETY: open(2) of a NUL-terminated path; the descriptor is owned at once.
    let dir = unsafe { libc::open(cgroup.as_ptr(), libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dir < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: dir.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork; this process has one thread, so the child
    // may do anything the parent could.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(dir);
        become_agent(&request[end + 1..]);
        request.fill(0);
    } else {
        // Here as well as in the child (whichever runs first): the group exists once the
        // provider hears of the agent, so a signal to it reaches the agent.
        // SAFETY: setpgid(2) of our own child.
        unsafe { libc::setpgid(pid as i32, pid as i32) };
    }
    Ok(pid as i32)
}

/// In the new agent: a process group of its own, no signal blocked, and exactly the
/// request's environment.
fn become_agent(environment: &[u8]) {
    // SAFETY: the one thread of a new process: setpgid, sigprocmask and clearenv touch only
    // it.
    unsafe {
        libc::setpgid(0, 0);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::clearenv();
    }
    for entry in environment.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        use std::os::unix::ffi::OsStrExt;
        if let Some(eq) = entry.iter().position(|b| *b == b'=').filter(|eq| *eq > 0) {
            std::env::set_var(
                std::ffi::OsStr::from_bytes(&entry[..eq]),
                std::ffi::OsStr::from_bytes(&entry[eq + 1..]),
            );
        }
    }
}

/// Reap every agent that has ended and tell the provider how it ended.
fn reap(children: &OwnedFd, socket: &mut UnixStream) -> io::Result<()> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: read(2) of the signalfd (non-blocking) into a local buffer of its record size.
    while unsafe { libc::read(children.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {}
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) for any child, without blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return Ok(());
        }
        socket.write_all(&Notice::Exited(pid, status).encode())?;
    }
}

/// SIGCHLD blocked and delivered to a descriptor instead (non-blocking, closed on exec).
fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset operations on a local set; signalfd returns a new descriptor.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
