//! Process structure of the jail: the user namespace, the PID namespace, daemonizing, the pid
//! file, and reporting a failure that happens after a fork back to the operator.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{check, Error, Step};

/// A close-on-exec pipe through which the process that will exec the VMM reports a failure.
/// End of file without a message means the exec happened.
pub struct StatusPipe {
    read: Option<File>,
    write: Option<File>,
}

impl StatusPipe {
    /// Creates the pipe.
    pub fn new() -> Result<StatusPipe, Error> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds points to two writable ints.
        check(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
            Step::Process,
            "create status pipe",
        )?;
        // SAFETY: pipe2 just returned these two descriptors; nothing else owns them.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        Ok(StatusPipe {
            read: Some(read),
            write: Some(write),
        })
    }

    /// In a process that waits: drops its write end and reads until every writer is gone.
    /// Returns the failure message, if one was sent.
    pub fn wait(&mut self) -> Option<String> {
        self.write = None;
        let mut message = String::new();
        if let Some(mut read) = self.read.take() {
            // A read error means the same as silence: nobody reported a failure.
            let _ = read.read_to_string(&mut message);
        }
        (!message.is_empty()).then_some(message)
    }

    /// In the process that goes on: drops the read end.
    pub fn become_writer(&mut self) {
        self.read = None;
    }

    /// In a process that neither reports nor waits: drops both ends.
    pub fn close(&mut self) {
        self.read = None;
        self.write = None;
    }

    /// Sends a failure message (best effort: the reader may already be gone).
    pub fn report(&mut self, message: &str) {
        if let Some(write) = self.write.as_mut() {
            let _ = write.write_all(message.as_bytes());
        }
    }
}

/// Forks. Returns the child's pid in the parent and 0 in the child.
pub fn fork() -> Result<libc::pid_t, Error> {
    // SAFETY: the jailer is single-threaded, so the child is a full copy with no lock held by
    // another thread.
    check(unsafe { libc::fork() }, Step::Process, "fork")
}

/// Makes the calling process the reaper of its orphaned descendants, so that the jailer can
/// wait for every process a failed jail started (a daemonized one is a grandchild).
pub fn become_subreaper() -> Result<(), Error> {
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        Step::Process,
        "become a child subreaper",
    )?;
    Ok(())
}

/// Waits until no child (nor orphaned descendant, as a subreaper) is left.
pub fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: waits for any child with a valid status pointer.
        let ret = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if ret < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
}

/// Waits for `pid` and returns its exit code (128 + signal number if it was killed).
pub fn wait_exit_code(pid: libc::pid_t) -> Result<i32, Error> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child with a valid status pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(Error::Sys {
                step: Step::Process,
                what: "wait for child",
                source: err,
            });
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// Detaches from the caller's session: fork, setsid, fork. Returns in the grandchild; the
/// original process returns `Some(first child)` so it can reap it and wait for the outcome.
pub fn daemonize() -> Result<Option<libc::pid_t>, Error> {
    let child = fork()?;
    if child > 0 {
        return Ok(Some(child));
    }
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() }, Step::Process, "setsid")?;
    if fork()? > 0 {
        // SAFETY: leaves the intermediate process without running destructors that belong to
        // the grandchild (the jail guards).
        unsafe { libc::_exit(0) };
    }
    Ok(None)
}

/// Points stdin, stdout and stderr at the jail's /dev/null.
pub fn stdio_to_null() -> Result<(), Error> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::path(Step::Process, "open", std::path::Path::new("/dev/null"), e))?;
    for fd in 0..3 {
        // SAFETY: dup2 between descriptors we own.
        check(
            unsafe { libc::dup2(null.as_raw_fd(), fd) },
            Step::Process,
            "redirect stdio",
        )?;
    }
    Ok(())
}

/// Writes `pid` into the pid file opened before the privileges were dropped.
pub fn write_pid(file: &mut File, pid: libc::pid_t) -> Result<(), Error> {
    file.write_all(format!("{pid}\n").as_bytes())
        .map_err(|e| Error::Sys {
            step: Step::Process,
            what: "write pid file",
            source: e,
        })
}

/// Moves the calling process into a new user namespace in which only `uid` and `gid` exist,
/// mapped to themselves. `proc_dir` is the host's /proc, opened before the pivot.
///
/// A process cannot map ids other than its own into its own new namespace, so a helper child
/// that stays in the parent namespace (and keeps its privileges there) writes the maps.
pub fn enter_user_namespace(proc_dir: &OwnedFd, uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Userns;
    let mut link = [0u8; 32];
    // SAFETY: readlinkat into a live buffer of the given length, relative to our /proc fd.
    let len = unsafe {
        libc::readlinkat(
            proc_dir.as_raw_fd(),
            c"self".as_ptr(),
            link.as_mut_ptr().cast(),
            link.len(),
        )
    };
    if len <= 0 {
        return Err(Error::last(step, "read /proc/self"));
    }
    let host_pid = String::from_utf8_lossy(&link[..len as usize]).into_owned();
    let mut go = StatusPipe::new()?;
    let helper = fork()?;
    if helper == 0 {
        go.write = None;
        let mut byte = [0u8; 1];
        let ok = matches!(go.read.as_mut().map(|r| r.read(&mut byte)), Some(Ok(1)))
            && write_map(proc_dir, &host_pid, "uid_map", uid)
            && write_map(proc_dir, &host_pid, "gid_map", gid);
        // SAFETY: the helper ends here without unwinding into the jailer's state.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    go.read = None;
    // SAFETY: unshare takes no pointers.
    let unshared = check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER) },
        step,
        "create user namespace",
    );
    if unshared.is_ok() {
        go.report("g");
    }
    go.write = None;
    let code = wait_exit_code(helper)?;
    unshared?;
    if code != 0 {
        return Err(Error::refused(
            step,
            format!("writing /proc/{host_pid}/uid_map and gid_map for {uid}:{gid} failed"),
        ));
    }
    Ok(())
}

fn write_map(proc_dir: &OwnedFd, pid: &str, file: &str, id: u32) -> bool {
    let Ok(path) = CString::new(format!("{pid}/{file}")) else {
        return false;
    };
    // SAFETY: openat relative to our /proc fd with a NUL-terminated path.
    let fd = unsafe {
        libc::openat(
            proc_dir.as_raw_fd(),
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: openat just returned this descriptor.
    let mut map = unsafe { File::from_raw_fd(fd) };
    map.write_all(format!("{id} {id} 1\n").as_bytes()).is_ok()
}

/// Opens the host's /proc as a path-only descriptor that survives the pivot.
pub fn open_proc() -> Result<OwnedFd, Error> {
    // SAFETY: NUL-terminated path; the result is checked before use.
    let fd = unsafe {
        libc::open(
            c"/proc".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd, Step::Userns, "open /proc")?;
    // SAFETY: open just returned this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The VMM that a foreground jailer forwards termination signals to.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

/// Signals an operator sends to the jailer to stop or poke the VMM.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes integers only.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Blocks (`hold`) or unblocks the signals a waiting jailer forwards. Held from before the
/// fork until [`forward_signals`] is in place, a signal sent to the jailer meanwhile waits
/// and is then passed on, instead of killing the jailer and leaving its VMM behind; the child
/// releases them at once, since a signal mask survives exec.
pub fn hold_forwarded_signals(hold: bool) -> Result<(), Error> {
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset initialise it before use,
    // and sigprocmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        let how = if hold {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        check(
            libc::sigprocmask(how, &set, std::ptr::null_mut()),
            Step::Process,
            "mask the forwarded signals",
        )?;
    }
    Ok(())
}

/// Makes the waiting jailer pass termination signals on to `child`, so that stopping the
/// jailer stops the VMM it waits for; a signal held since the fork (see
/// [`hold_forwarded_signals`]) is passed on now.
pub fn forward_signals(child: libc::pid_t) -> Result<(), Error> {
    FORWARD_TO.store(child, Ordering::SeqCst);
    for signal in FORWARDED {
        // SAFETY: installs a handler that only calls kill; the sigaction struct is fully
        // initialised (zeroed, then handler and empty mask set) and outlives the call.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            check(
                libc::sigaction(signal, &action, std::ptr::null_mut()),
                Step::Process,
                "install signal forwarding",
            )?;
        }
    }
    hold_forwarded_signals(false)
}
