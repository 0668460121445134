//! Start a program directly inside a cgroup (v2) with `clone3(CLONE_INTO_CGROUP)`.
//!
//! Moving a new process into a cgroup after its fork (writing its pid to `cgroup.procs`)
//! takes the write side of the kernel's global `cgroup_threadgroup_rwsem`, which waits for an
//! RCU grace period: about 10 ms of every cold job's start on a busy machine. A process
//! cloned into its cgroup never migrates, so it takes only the read side. The child does
//! nothing between the clone and `execve` but `setpgid`, reset its signal mask and SIGPIPE,
//! `open`/`dup2` /dev/null and, when exec fails, write its errno to a pipe: all
//! async-signal-safe, as a child of a multi-threaded parent must be.

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use tokio::io::unix::AsyncFd;

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

/// A child started in its cgroup: its pid and a pidfd to wait for it with.
pub struct Child {
    pub pid: u32,
    pidfd: OwnedFd,
}

/// Whether `error` from [`spawn`] means `clone3` itself was refused: this kernel (or a
/// seccomp filter) has no `clone3`/`CLONE_INTO_CGROUP`, so the caller should start the
/// process another way. A failed exec is never such an error (it carries no OS code).
pub fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::E2BIG)
    )
}

/// Run `program` (no arguments) with exactly `env`, stdin from /dev/null, stdout and stderr
/// inherited, in a process group of its own, born inside `cgroup`.
pub fn spawn(program: &Path, env: &[(OsString, OsString)], cgroup: &Path) -> io::Result<Child> {
    let nul = |_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in a path or the environment",
        )
    };
    let program = CString::new(program.as_os_str().as_encoded_bytes()).map_err(nul)?;
    let env: Vec<CString> = env
        .iter()
        .map(|(name, value)| {
            let mut pair = name.clone();
            pair.push("=");
            pair.push(value);
            CString::new(pair.into_vec()).map_err(nul)
        })
        .collect::<io::Result<_>>()?;
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let argv: [*const libc::c_char; 2] = [program.as_ptr(), std::ptr::null()];
    let dev_null: &CStr = c"/dev/null";
    let cgroup_dir = std::fs::File::open(cgroup)?;
    let (exec_failed_rx, exec_failed_tx) = pipe()?;

    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP | libc::CLONE_PIDFD as u64,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_dir.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork; the child below only makes async-signal-safe
    // calls on memory prepared before the clone, then execs or exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: the child: async-signal-safe calls only (see above), never returns.
        unsafe {
            libc::setpgid(0, 0);
            // As std's spawn does: no blocked signals, and SIGPIPE (which Rust ignores)
            // back to its default.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let null = libc::open(dev_null.as_ptr(), libc::O_RDONLY);
            if null > 0 {
                libc::dup2(null, 0);
                libc::close(null);
            }
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(
                exec_failed_tx.as_raw_fd(),
                std::ptr::addr_of!(errno).cast(),
                std::mem::size_of::<i32>(),
            );
            libc::_exit(127);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(exec_failed_tx);
    // SAFETY: clone3 wrote a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The pipe closes on exec (EOF: the program runs) or carries the errno of its failure.
    let mut errno = [0u8; 4];
    let read = loop {
        // SAFETY: read(2) into a local buffer from the pipe's read end, which we own.
        let n = unsafe { libc::read(exec_failed_rx.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if read > 0 {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: reap the child that failed to exec, through its pidfd.
        unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as u32,
                &mut info,
                libc::WEXITED,
            )
        };
        let error = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
        return Err(io::Error::new(error.kind(), format!("exec: {error}")));
    }
    Ok(Child {
        pid: pid as u32,
        pidfd,
    })
}

impl Child {
    /// Wait for the child to end and reap it: how it ended, as `exit status: N` or
    /// `signal: N`.
    pub async fn wait(self) -> io::Result<String> {
        // A pidfd becomes readable when its process ends.
        // SAFETY: the OwnedFd stays open and the same descriptor for the AsyncFd's life.
        let fd =
            unsafe { AsyncFd::register_with_interest(self.pidfd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        let _ready = fd.readable().await?;
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) on our own pidfd into a zeroed siginfo.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd.as_raw_fd() as u32,
                &mut info,
                libc::WEXITED,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled in a SIGCHLD siginfo.
        let status = unsafe { info.si_status() };
        Ok(match info.si_code {
            libc::CLD_EXITED => format!("exit status: {status}"),
            _ => format!("signal: {status}"),
        })
    }
}

/// A pipe whose ends close on exec: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
