//! Starting one backend: fork, hand it its descriptors as 3, 4, ..., execute its binary.
//!
//! Everything the child needs is prepared before the fork, so that the child only makes
//! plain syscalls. An exec failure comes back to the launcher through a close-on-exec pipe:
//! end of file means the binary runs, four bytes are the errno of `execve`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The first descriptor number a backend receives; the next ones follow in order.
pub(crate) const FIRST_FD: RawFd = 3;

/// Most descriptors a backend is handed: its vhost-user socket and up to 16 tap queues.
const MAX_DESCRIPTORS: usize = crate::protocol::MAX_FDS + 1;

/// Why a backend could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A syscall of the launcher itself failed.
    #[error("starting {binary}: {what}: {source}")]
    Sys {
        /// The backend binary.
        binary: String,
        /// The step.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// `execve` of the backend failed.
    #[error("executing {binary}: {source}")]
    Exec {
        /// The backend binary.
        binary: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// An argument contained a NUL byte.
    #[error("starting {binary}: an argument contains a NUL byte")]
    Nul {
        /// The backend binary.
        binary: String,
    },
}

/// Starts `binary` with `args` (after its own name) and `environment`, its descriptors
/// `FIRST_FD..` being `fds` in order, with the launcher's death as its own. Returns its pid.
pub(crate) fn spawn(
    binary: &Path,
    args: &[String],
    environment: &[CString],
    fds: &[RawFd],
) -> Result<i32, SpawnError> {
    let name = || binary.display().to_string();
    let sys = |what| {
        move |source| SpawnError::Sys {
            binary: name(),
            what,
            source,
        }
    };
    let path = CString::new(binary.as_os_str().as_bytes())
        .map_err(|_| SpawnError::Nul { binary: name() })?;
    let argv: Vec<CString> = std::iter::once(Ok(path.clone()))
        .chain(args.iter().map(|a| CString::new(a.as_str())))
        .collect::<Result<_, _>>()
        .map_err(|_| SpawnError::Nul { binary: name() })?;
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = environment
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    if fds.len() > MAX_DESCRIPTORS {
        return Err(sys("handing over descriptors")(
            io::Error::from_raw_os_error(libc::E2BIG),
        ));
    }
    let (status_read, status_write) = pipe().map_err(sys("creating the status pipe"))?;
    // SAFETY: getpid has no preconditions.
    let launcher = unsafe { libc::getpid() };
    // SAFETY: the launcher is single-threaded; the child only makes the syscalls of
    // `exec_child`, on memory prepared above, and leaves through execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(sys("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the forked child; the pointers come from the vectors above, alive and
        // NULL-terminated, and the descriptors are open.
        unsafe {
            exec_child(
                launcher,
                &path,
                &argv_ptrs,
                &envp_ptrs,
                fds,
                status_write.as_raw_fd(),
            )
        }
    }
    drop(status_write);
    let mut errno = [0u8; 4];
    let read = loop {
        // SAFETY: reads at most four bytes into a live four-byte buffer.
        let n = unsafe { libc::read(status_read.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if read == 0 {
        return Ok(pid);
    }
    let source = if read == 4 {
        io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
    } else {
        io::Error::other("the child left before executing")
    };
    let mut status = 0;
    // SAFETY: reaping our own child, which has exited or is about to.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(SpawnError::Exec {
        binary: name(),
        source,
    })
}

/// The forked child: its parent's death kills it, its signal mask is emptied, `fds` become
/// `FIRST_FD..`, every other descriptor above stderr closes on exec, then `execve`.
///
/// # Safety
/// Must run in a freshly forked child of a single-threaded process; the pointer arrays must be
/// NULL-terminated and point to NUL-terminated strings.
unsafe fn exec_child(
    launcher: libc::pid_t,
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    fds: &[RawFd],
    status: RawFd,
) -> ! {
    let fail = |status: RawFd| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let bytes = errno.to_ne_bytes();
        // SAFETY: writes four bytes from a live buffer, then leaves the child.
        unsafe {
            libc::write(status, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    };
    // SAFETY (whole block): plain syscalls with integer arguments or pointers to live locals,
    // in the child only.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(status);
        }
        // The launcher died between fork and prctl: the signal will never come.
        if libc::getppid() != launcher {
            libc::_exit(127);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(status);
        }
        // First every descriptor to a number above the targets, then each onto its target:
        // a source may well sit on another's target number.
        let above = FIRST_FD + fds.len() as RawFd;
        let status = libc::fcntl(status, libc::F_DUPFD_CLOEXEC, above);
        if status < 0 {
            libc::_exit(127);
        }
        let mut moved = [0 as RawFd; MAX_DESCRIPTORS];
        for (slot, &fd) in moved.iter_mut().zip(fds) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above);
            if *slot < 0 {
                fail(status);
            }
        }
        for (i, &fd) in moved.iter().take(fds.len()).enumerate() {
            // dup2 leaves the target without close-on-exec: the backend keeps it.
            if libc::dup2(fd, FIRST_FD + i as RawFd) < 0 {
                fail(status);
            }
        }
        // Everything else the launcher holds closes at exec (the status pipe only then).
        if libc::syscall(
            libc::SYS_close_range,
            above,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            fail(status);
        }
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(status)
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
