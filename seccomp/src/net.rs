//! Allowlist of the citadel-net backend process once it serves frontends.
//!
//! By then the tap queues are open and the listening socket (if any) is bound and listening.
//! The process accepts frontends, reads their vhost-user messages (descriptors travel in
//! SCM_RIGHTS), maps the guest memory they send, moves frames between the rings and the tap
//! with plain reads and writes, and starts worker threads for each connection. Its only ioctls
//! are the two that re-tune the tap when the guest acknowledges features. It never opens a
//! file, never starts a program and never creates, binds or connects a socket.

use crate::{
    allow, arg_in, descriptor_control, peer_credentials, thread_names, thread_runtime,
    threads_only, Error, Rules,
};

const ROLE: &str = "net";

/// Syscalls citadel-net needs once it serves its frontend.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = thread_runtime(ROLE)?;
    rules.extend(allow(&[
        // Worker threads and their event loops.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigaction,
        // Frontend connections and vhost-user messages with their descriptors.
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        // Frames and eventfds.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        // Guest memory regions (their size is taken from the memfd).
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        // abort() on a fatal error raises SIGABRT through tgkill.
        libc::SYS_tgkill,
    ]));
    // The tap is re-tuned when the guest acknowledges features; nothing else.
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[libc::TUNSETOFFLOAD, libc::TUNSETVNETHDRSZ],
    )?);
    // Descriptor flags and close-on-exec duplicates, memfd seals of the memory table.
    rules.push(descriptor_control(ROLE, &[])?);
    rules.push(thread_names(ROLE)?);
    // Who connected: frontends are checked against the allowed uids and gids.
    rules.push(peer_credentials(ROLE)?);
    // Worker threads, never processes.
    rules.extend(threads_only(ROLE)?);
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use crate::Role;

    /// Runs `body` in a forked child under the net filter; returns the wait status.
    fn confined(body: fn() -> i32) -> i32 {
        crate::tests::run_confined(Role::Net, body)
    }

    /// A named body to run under the filter.
    type Case = (&'static str, fn() -> i32);

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn forbidden_syscalls_kill_the_backend() {
        let cases: [Case; 11] = [
            ("open", || {
                // SAFETY: raw syscall with a valid C string.
                unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
                0
            }),
            ("inet socket", || {
                // SAFETY: raw syscall without pointers.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                0
            }),
            ("unix socket", || {
                // SAFETY: raw syscall without pointers.
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                0
            }),
            ("bind", || {
                // SAFETY: the filter decides before the kernel reads the (null) address.
                unsafe { libc::bind(-1, std::ptr::null(), 0) };
                0
            }),
            ("connect", || {
                // SAFETY: the filter decides before the kernel reads the (null) address.
                unsafe { libc::connect(-1, std::ptr::null(), 0) };
                0
            }),
            ("sendto", || {
                // SAFETY: the filter decides before the kernel reads the (null) buffer.
                unsafe { libc::sendto(-1, std::ptr::null(), 0, 0, std::ptr::null(), 0) };
                0
            }),
            ("TUNSETIFF", || {
                // SAFETY: the filter decides before the kernel reads the (null) argument.
                unsafe { libc::ioctl(-1, libc::TUNSETIFF, 0) };
                0
            }),
            ("fork", || {
                // SAFETY: raw clone without CLONE_THREAD; a child, if any, exits at once.
                let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
                if pid == 0 {
                    // SAFETY: leaving the grandchild.
                    unsafe { libc::_exit(0) };
                }
                0
            }),
            ("prctl(PR_SET_DUMPABLE)", || {
                // SAFETY: integer arguments only; the filter decides first.
                unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
                0
            }),
            ("fcntl(F_SETLK)", || {
                // SAFETY: the filter decides before the kernel reads the (null) lock argument.
                unsafe { libc::fcntl(-1, libc::F_SETLK, 0) };
                0
            }),
            ("execve", || {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                // SAFETY: valid, null-terminated argv and null envp.
                unsafe { libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) };
                0
            }),
        ];
        for (what, body) in cases {
            let status = confined(body);
            assert!(killed_by_sigsys(status), "{what}: status {status:#x}");
        }
    }

    #[test]
    fn what_the_backend_needs_is_allowed() {
        let status = confined(|| {
            // SAFETY: the ioctl reaches the kernel and fails with EBADF on fd -1.
            let rc = unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD, 0) };
            // SAFETY: an eventfd (a worker's exit event), closed right away.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if rc != -1 || fd < 0 {
                return 1;
            }
            // SAFETY: F_GETFL takes no pointer; PR_SET_NAME reads a NUL-terminated name.
            let (flags, named) = unsafe {
                (
                    libc::fcntl(fd, libc::F_GETFL),
                    libc::prctl(libc::PR_SET_NAME, c"net-test".as_ptr(), 0, 0, 0),
                )
            };
            if flags < 0 || named != 0 {
                return 2;
            }
            // SAFETY: closing the eventfd we created.
            unsafe { libc::close(fd) };
            0
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }
}
