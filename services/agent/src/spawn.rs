//! Starting a job's process without copying the agent.
//!
//! `std::process::Command` forks when the child must change its user or its limits (it can
//! use `posix_spawn` only when it need not): the kernel copies the agent's page tables, the
//! child's `exec` throws them away, and the agent then takes a copy-on-write fault on every
//! page it writes, about a tenth of a warm job's CPU (measured with perf). Here the child is
//! a `clone(CLONE_VM | CLONE_VFORK)`, as glibc's `posix_spawn` makes it: it runs on a stack
//! of its own in the agent's memory while the agent's thread waits, until its `execve` (or
//! its exit). Everything it needs is prepared before the clone; between clone and exec it
//! makes system calls only: no allocation, no lock, and none of glibc's calls that act for
//! the whole process (glibc's `setuid` would signal the agent's other threads).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// The child's stack: its few calls need a few KiB; the rest is never touched.
const STACK_BYTES: usize = 256 * 1024;

/// What a job's process is started with.
pub struct Spawn {
    pub program: String,
    pub args: Vec<String>,
    /// The whole environment (a name given twice keeps its last value).
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// uid and gid to drop to (the agent runs as root); `None` keeps the agent's.
    pub user: Option<(u32, u32)>,
    /// RLIMIT_NOFILE and RLIMIT_NPROC, 0 for the agent's own.
    pub max_open_files: u64,
    pub max_processes: u64,
}

/// A started job's process: its pipes, and its exit once waited for. Dropped before it was
/// waited for, it is killed.
pub struct Process {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

/// What the child reads, all of it made before the clone, and where it leaves the error of
/// the step that failed.
struct ChildArgs {
    /// The program's paths to try in turn, as `execvp` tries PATH.
    candidates: Vec<*const libc::c_char>,
    argv: Vec<*const libc::c_char>,
    /// For each candidate, the arguments that run it with /bin/sh, as `execvp` does with a
    /// file the kernel cannot execute (a script without `#!`).
    with_shell: Vec<Vec<*const libc::c_char>>,
    envp: Vec<*const libc::c_char>,
    dir: Option<*const libc::c_char>,
    user: Option<(libc::uid_t, libc::gid_t)>,
    max_open_files: u64,
    max_processes: u64,
    stdio: [RawFd; 3],
    error: AtomicI32,
}

/// The kernel's signals (`_NSIG - 1` on Linux), and the size of its signal sets.
const KERNEL_SIGNALS: libc::c_int = 64;
const KERNEL_SIGSET_BYTES: libc::size_t = 8;

/// The kernel's `struct sigaction` (x86_64 and aarch64), for `rt_sigaction` itself.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

fn c_string(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    match result {
        -1 => Err(io::Error::last_os_error()),
        n => Ok(n),
    }
}

/// `fd` moved above the standard descriptors (an agent started with one of them closed
/// would otherwise get it for a pipe, and the child's `dup2` onto it would be lost).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own; the new one is ours.
    let moved = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which are then ours.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(read)?, above_stdio(write)?))
}

impl Spawn {
    /// Start the process: stdin from /dev/null, stdout and stderr piped, in a process group
    /// of its own, as the given user, with the limits, no core dumps and the highest OOM
    /// score (the kernel kills the job, never its agent).
    pub fn start(&self) -> io::Result<Process> {
        let env: BTreeMap<&str, &str> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let candidates: Vec<CString> = if self.program.contains('/') {
            vec![c_string(&self.program)?]
        } else {
            let path = env.get("PATH").copied().unwrap_or(crate::job::DEFAULT_PATH);
            path.split(':')
                .map(|dir| match dir {
                    "" => c_string(&self.program),
                    dir => c_string(&format!("{dir}/{}", self.program)),
                })
                .collect::<io::Result<_>>()?
        };
        let argv: Vec<CString> = std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| c_string(a))
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| c_string(&format!("{k}={v}")))
            .collect::<io::Result<_>>()?;
        let dir = self.working_dir.as_deref().map(c_string).transpose()?;
        let pointers = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };

        // SAFETY: open(2) of a fixed path; the descriptor is then ours.
        let null = above_stdio(unsafe {
            OwnedFd::from_raw_fd(check(libc::open(
                c"/dev/null".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            ))?)
        })?;
        let (stdout_read, stdout_write) = pipe_pair()?;
        let (stderr_read, stderr_write) = pipe_pair()?;
        let with_shell = candidates
            .iter()
            .map(|candidate| {
                std::iter::once(c"/bin/sh".as_ptr())
                    .chain(std::iter::once(candidate.as_ptr()))
                    .chain(argv[1..].iter().map(|a| a.as_ptr()))
                    .chain(std::iter::once(std::ptr::null()))
                    .collect()
            })
            .collect();
        let args = ChildArgs {
            candidates: pointers(&candidates),
            argv: pointers(&argv),
            with_shell,
            envp: pointers(&envp),
            dir: dir.as_ref().map(|d| d.as_ptr()),
            user: self.user,
            max_open_files: self.max_open_files,
            max_processes: self.max_processes,
            stdio: [
                null.as_raw_fd(),
                stdout_write.as_raw_fd(),
                stderr_write.as_raw_fd(),
            ],
            error: AtomicI32::new(0),
        };

        let (pid, pidfd) = clone_and_exec(&args)?;
        let error = args.error.load(Ordering::Acquire);
        // The child has exec'd or exited: its ends of the pipes are the parent's to close.
        drop((null, stdout_write, stderr_write));
        if error != 0 {
            // It exited: reap it (at once: with CLONE_VFORK it has already ended).
            let mut status = 0;
            // SAFETY: waitpid of our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(io::Error::from_raw_os_error(error));
        }
        let watched = || -> io::Result<Process> {
            // SAFETY: an OwnedFd is valid and open until it is dropped with the AsyncFd.
            let pidfd =
                unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                    .map_err(|error| error.into_parts().1)?;
            Ok(Process {
                pid,
                pidfd,
                status: None,
                stdout: Some(pipe::Receiver::from_owned_fd(stdout_read)?),
                stderr: Some(pipe::Receiver::from_owned_fd(stderr_read)?),
            })
        };
        watched().inspect_err(|_| {
            // A process nobody could wait for must not run: end and reap it.
            // SAFETY: kill and waitpid of our own child, not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        })
    }
}

/// Clone the child onto a stack of its own, every signal blocked meanwhile (a handler of the
/// agent's must never run in the child, which shares its memory); back once the child has
/// exec'd or exited. Its pid and pidfd.
fn clone_and_exec(args: &ChildArgs) -> io::Result<(libc::pid_t, OwnedFd)> {
    // SAFETY: an anonymous private mapping, unmapped below; the child runs on it only until
    // its exec or exit, both before clone returns here (CLONE_VFORK).
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut pidfd: libc::c_int = -1;
    // SAFETY: rt_sigprocmask on local sets; clone with a stack of our own, the
    // child function reading `args` (alive until this returns) and making system calls only.
    let pid = unsafe {
        // By the system call itself: glibc's pthread_sigmask leaves two of its own signals
        // unblocked.
        let (all, mut before) = (u64::MAX, 0u64);
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all,
            &mut before,
            KERNEL_SIGSET_BYTES,
        );
        let pid = libc::clone(
            child,
            stack.cast::<u8>().add(STACK_BYTES).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            (args as *const ChildArgs).cast_mut().cast(),
            &mut pidfd as *mut libc::c_int,
        );
        let error = io::Error::last_os_error();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &before,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_BYTES,
        );
        libc::munmap(stack, STACK_BYTES);
        if pid == -1 {
            return Err(error);
        }
        pid
    };
    if pidfd < 0 {
        // A kernel older than 5.2 ignores CLONE_PIDFD: the child cannot be watched.
        // SAFETY: kill and waitpid of our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel gives no pidfd (Linux 5.3 or later is needed)",
        ));
    }
    // SAFETY: CLONE_PIDFD gave us a new close-on-exec descriptor of the child.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

/// The child: from the clone to its exec. System calls only; on failure, the error goes to
/// `args.error` and the child exits.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive while the parent waits for this exec.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: each call is a system call on values prepared by the parent.
    let error = unsafe { prepare_and_exec(args) };
    args.error.store(error.max(1), Ordering::Release);
    // SAFETY: _exit(2) ends this child only.
    unsafe { libc::_exit(127) }
}

/// The errno of the step that failed (exec returns only on failure).
unsafe fn prepare_and_exec(args: &ChildArgs) -> libc::c_int {
    let errno = || unsafe { *libc::__errno_location() };
    macro_rules! sys {
        ($call:expr) => {
            if $call == -1 {
                return errno();
            }
        };
    }
    unsafe {
        for (fd, target) in args.stdio.iter().zip(0..) {
            sys!(libc::dup2(*fd, target));
        }
        // While still the agent's user: over a memory limit the kernel kills the job, never
        // its agent (the score is this process's own, kept across setuid and exec). Best
        // effort: a kernel without the file still runs the job. (Written after dropping
        // root it would need the process made dumpable again, and this process shares the
        // agent's memory until its exec: its memory must never be dumpable by the jobs'
        // user.)
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::syscall(libc::SYS_write, fd, b"1000".as_ptr(), 4usize);
            libc::syscall(libc::SYS_close, fd);
        }
        let limit = |resource, value: u64| {
            let rlimit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            libc::setrlimit(resource, &rlimit)
        };
        sys!(limit(libc::RLIMIT_CORE, 0));
        if let Some((uid, gid)) = args.user {
            // Raw system calls: they change this process's credentials only.
            sys!(libc::syscall(libc::SYS_setgid, gid) as libc::c_int);
            // No supplementary group of the agent's is kept (without CAP_SETGID there is
            // none to drop, as std's Command has it).
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
                && errno() != libc::EPERM
            {
                return errno();
            }
            sys!(libc::syscall(libc::SYS_setuid, uid) as libc::c_int);
        }
        if let Some(dir) = args.dir {
            sys!(libc::chdir(dir));
        }
        sys!(libc::setpgid(0, 0));
        // The agent's signal dispositions are not the job's (its handlers would run in the
        // agent's memory; Rust ignores SIGPIPE): every signal to its default, by the system
        // call itself (glibc's sigaction refuses the signals it keeps for itself).
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for signal in 1..=KERNEL_SIGNALS {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                sys!(libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default,
                    std::ptr::null_mut::<KernelSigaction>(),
                    KERNEL_SIGSET_BYTES,
                ) as libc::c_int);
            }
        }
        if args.max_open_files > 0 {
            sys!(limit(libc::RLIMIT_NOFILE, args.max_open_files));
        }
        if args.max_processes > 0 {
            sys!(limit(libc::RLIMIT_NPROC, args.max_processes));
        }
        // Nothing blocked (the parent blocked everything around the clone).
        sys!(libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &0u64,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_BYTES,
        ) as libc::c_int);
        // As execvp: each candidate in turn; a path that exists but may not be run is what
        // is reported if no other runs.
        let mut error = libc::ENOENT;
        let mut denied = false;
        for (candidate, with_shell) in args.candidates.iter().zip(&args.with_shell) {
            libc::execve(*candidate, args.argv.as_ptr(), args.envp.as_ptr());
            error = errno();
            match error {
                libc::ENOEXEC => {
                    libc::execve(c"/bin/sh".as_ptr(), with_shell.as_ptr(), args.envp.as_ptr());
                    return errno();
                }
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return error,
            }
        }
        if denied {
            libc::EACCES
        } else {
            error
        }
    }
}

impl Process {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Wait for the process to end (its pidfd is readable then), and reap it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = reaped(self.pid, &self.pidfd).await?;
        self.status = Some(status);
        Ok(status)
    }

    /// SIGKILL the process (through its pidfd: never a process that took its pid since) and
    /// wait for it.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        if self.status.is_none() {
            send_kill(&self.pidfd)?;
        }
        self.wait().await
    }
}

/// SIGKILL the process of `pidfd`.
fn send_kill(pidfd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) on our child's pidfd.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    check(sent as libc::c_int).map(drop)
}

/// The exit of our child `pid` (not reaped yet: we hold its pidfd, so its pid is no one
/// else's), once its pidfd says it ended; reaped.
async fn reaped(pid: libc::pid_t, pidfd: &AsyncFd<OwnedFd>) -> io::Result<ExitStatus> {
    loop {
        let mut raw = 0;
        // SAFETY: a non-blocking waitpid of our own child.
        if check(unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) })? != 0 {
            return Ok(ExitStatus::from_raw(raw));
        }
        let mut ready = pidfd.readable().await?;
        ready.clear_ready();
    }
}

impl Drop for Process {
    /// A process dropped before it was waited for (the job's run given up) is killed and
    /// reaped: SIGKILL cannot be caught, so the wait is for the kernel to end it.
    fn drop(&mut self) {
        if self.status.is_none() && send_kill(&self.pidfd).is_ok() {
            // SAFETY: a blocking waitpid of our own child, which was just sent SIGKILL.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    async fn read_all(pipe: &mut Option<pipe::Receiver>) -> String {
        let mut text = String::new();
        pipe.take()
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        text
    }

    fn spawn(program: &str, args: &[&str]) -> Spawn {
        Spawn {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![("PATH".into(), "/nonexistent:/usr/bin:/bin".into())],
            working_dir: None,
            user: None,
            max_open_files: 0,
            max_processes: 0,
        }
    }

    #[tokio::test]
    async fn a_process_found_on_path_runs_with_its_arguments_output_and_exit_code() {
        let mut process = spawn("sh", &["-c", "echo out; echo err >&2; exit 3"])
            .start()
            .unwrap();
        let out = read_all(&mut process.stdout).await;
        let err = read_all(&mut process.stderr).await;
        assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
        assert_eq!(process.wait().await.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn a_program_that_is_not_there_or_may_not_run_is_an_error_of_its_own() {
        let missing = spawn("no-such-program-hodei", &[]).start().err().unwrap();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        let dir = std::env::temp_dir().join(format!("hodei-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_executable = dir.join("not-executable");
        std::fs::write(&not_executable, "echo never\n").unwrap();
        let denied = spawn(not_executable.to_str().unwrap(), &[])
            .start()
            .err()
            .unwrap();
        assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
        std::fs::remove_dir_all(&dir).unwrap();
        let mut in_missing_dir = spawn("true", &[]);
        in_missing_dir.working_dir = Some("/no/such/dir".into());
        assert_eq!(
            in_missing_dir.start().err().unwrap().raw_os_error(),
            Some(libc::ENOENT)
        );
    }

    #[tokio::test]
    async fn a_script_without_an_interpreter_line_runs_with_the_shell() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hodei-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("script");
        std::fs::write(&script, "echo \"from the shell: $1\"\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut process = spawn(script.to_str().unwrap(), &["arg"]).start().unwrap();
        let out = read_all(&mut process.stdout).await;
        assert_eq!(out, "from the shell: arg\n");
        assert_eq!(process.wait().await.unwrap().code(), Some(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_process_dropped_before_its_end_is_killed_and_reaped() {
        let process = spawn("sleep", &["30"]).start().unwrap();
        let proc_dir = std::path::PathBuf::from(format!("/proc/{}", process.id()));
        assert!(proc_dir.exists());
        drop(process);
        // Reaped, its /proc entry is gone (a zombie's stays).
        assert!(!proc_dir.exists(), "{} is still there", proc_dir.display());
    }

    #[tokio::test]
    async fn a_killed_process_ends_by_its_signal() {
        let mut process = spawn("sleep", &["30"]).start().unwrap();
        let status = process.kill().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
