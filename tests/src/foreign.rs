//! A client running as another user, forked from the test, for checks that a socket keeps
//! other users out.

use std::path::Path;

/// The uid and gid of `nobody`, the foreign user of these tests.
pub const NOBODY: u32 = 65534;

/// A process of another user that connects to a Unix socket and sends one request, to see
/// whether a foreign uid can reach the server behind it (a backend, the QMP monitor).
pub struct ForeignClient {
    pid: libc::pid_t,
}

/// What happened to a [`ForeignClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignOutcome {
    /// `connect` failed with this errno (e.g. EACCES from the socket file's mode).
    ConnectFailed(i32),
    /// The server closed the connection without sending a single byte.
    ClosedWithoutReply,
    /// The server sent something: the foreign process got through.
    Answered,
}

impl ForeignClient {
    /// Forks a child that drops to `uid`:`gid` (no supplementary groups), connects to `path`,
    /// sends `request` and waits up to 30 s for the first byte of an answer. A backend that
    /// serves one frontend at a time leaves it in the listen backlog until the current one
    /// leaves, so the outcome is collected later with [`ForeignClient::outcome`].
    pub fn spawn(path: &Path, uid: u32, gid: u32, request: &[u8]) -> ForeignClient {
        use std::os::unix::ffi::OsStrExt;
        // Everything the child needs is prepared before the fork: it then makes raw
        // syscalls only and leaves with _exit.
        // SAFETY: sockaddr_un is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let request = request.to_vec();
        let timeout = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: the child below only makes async-signal-safe libc calls on data prepared
        // above, then _exits; the parent keeps the pid to reap it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: raw syscalls on stack data of this frame, in the forked child; every
            // path ends in _exit.
            unsafe {
                // The test's own connections must not stay open through this child.
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    libc::_exit(202);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    libc::_exit(202);
                }
                if libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) != 0
                {
                    libc::_exit(*libc::__errno_location());
                }
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                // A refused peer may be closed before or after this write; either way the
                // read below tells.
                libc::send(
                    fd,
                    request.as_ptr().cast(),
                    request.len(),
                    libc::MSG_NOSIGNAL,
                );
                let mut b = [0u8; 1];
                match libc::read(fd, b.as_mut_ptr().cast(), 1) {
                    0 => libc::_exit(200),
                    1 => libc::_exit(201),
                    _ if *libc::__errno_location() == libc::ECONNRESET => libc::_exit(200),
                    _ => libc::_exit(203),
                }
            }
        }
        ForeignClient { pid }
    }

    /// Waits for the child and reports what it saw.
    pub fn outcome(mut self) -> ForeignOutcome {
        let pid = std::mem::replace(&mut self.pid, 0);
        let mut status = 0;
        // SAFETY: reaping our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid");
        assert!(
            libc::WIFEXITED(status),
            "foreign client: status {status:#x}"
        );
        match libc::WEXITSTATUS(status) {
            200 => ForeignOutcome::ClosedWithoutReply,
            201 => ForeignOutcome::Answered,
            202 => panic!("foreign client could not drop to the other uid"),
            203 => panic!("foreign client saw neither an answer nor a close in 30 s"),
            errno => ForeignOutcome::ConnectFailed(errno),
        }
    }
}

impl Drop for ForeignClient {
    /// A test that fails before collecting the outcome leaves no child behind.
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: killing and reaping our own, not yet reaped, child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
