//! `-daemonize` and `-pidfile`.
//!
//! The process forks twice so the VMM is not a session leader and cannot reacquire a
//! terminal; the original process stays until the VMM reports that the VM is built, and exits
//! with 0 or with the VMM's one-line error, so the caller of `citadel -daemonize` learns
//! whether the VM came up, as with QEMU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors while daemonizing or writing the pid file.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A system call failed.
    #[error("daemonize: {what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The pid file could not be written.
    #[error("pid file {path}: {source}")]
    PidFile {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> DaemonError {
    DaemonError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// The daemon's end of the readiness pipe.
pub struct Readiness(File);

impl Readiness {
    /// Tells the waiting parent that the VM is up.
    pub fn ready(mut self) {
        if let Err(e) = self.0.write_all(b"\0") {
            log::warn!("reporting readiness: {e}");
        }
    }

    /// Tells the waiting parent why the VM could not start.
    pub fn failed(mut self, why: &str) {
        if let Err(e) = self.0.write_all(why.as_bytes()) {
            log::warn!("reporting failure: {e}");
        }
    }
}

/// Detaches from the terminal. Returns in the daemon only; the original process exits when
/// the daemon reports through [`Readiness`]. Must be called before any thread is created.
pub fn daemonize() -> Result<Readiness, DaemonError> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(sys("pipe"));
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (documented precondition), so fork cannot
    // leave another thread's locks held in the child.
    match unsafe { libc::fork() } {
        -1 => return Err(sys("fork")),
        0 => {}
        _ => {
            drop(write_end);
            wait_for_daemon(read_end);
        }
    }
    drop(read_end);
    // SAFETY: setsid has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(sys("setsid"));
    }
    // SAFETY: still single-threaded, as above.
    match unsafe { libc::fork() } {
        -1 => return Err(sys("second fork")),
        0 => {}
        // SAFETY: _exit ends the intermediate process without running any destructor that
        // could touch state shared with the daemon.
        _ => unsafe { libc::_exit(0) },
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| DaemonError::Sys {
            what: "opening /dev/null",
            source,
        })?;
    for fd in 0..3 {
        // SAFETY: both fds are open; dup2 onto the standard descriptors is the intent.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(sys("redirecting stdio"));
        }
    }
    Ok(Readiness(write_end))
}

fn wait_for_daemon(mut read_end: File) -> ! {
    let mut msg = Vec::new();
    let code = match read_end.read_to_end(&mut msg) {
        Ok(_) if msg.first() == Some(&0) => 0,
        Ok(0) => {
            eprintln!("citadel: the daemon exited before the VM was up");
            1
        }
        Ok(_) => {
            eprintln!("citadel: {}", String::from_utf8_lossy(&msg));
            1
        }
        Err(e) => {
            eprintln!("citadel: waiting for the daemon: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// A pid file removed when dropped, unless kept.
pub struct PidFile(Option<PathBuf>);

impl PidFile {
    /// Writes our pid to `path`.
    pub fn create(path: &Path) -> Result<PidFile, DaemonError> {
        let err = |source| DaemonError::PidFile {
            path: path.to_path_buf(),
            source,
        };
        let mut f = File::create(path).map_err(err)?;
        writeln!(f, "{}", std::process::id()).map_err(err)?;
        Ok(PidFile(Some(path.to_path_buf())))
    }

    /// Leaves the file in place at exit (a VMM that may not unlink anything).
    pub fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Duplicates stdout so the serial port writes unbuffered to the same place.
pub fn dup_stdout() -> std::io::Result<File> {
    // SAFETY: fd 1 is open for the life of the process; F_DUPFD_CLOEXEC returns a new fd we
    // own or -1.
    let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
