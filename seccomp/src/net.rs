//! Allowlist of the citadel-net backend process once it serves frontends.
//!
//! By then the tap queues are open and the listening socket (if any) is bound. The process
//! accepts frontends, relays their vhost-user messages (descriptors travel in SCM_RIGHTS),
//! maps the guest memory they send, moves frames between the rings and the tap with plain
//! reads and writes, and starts worker threads for each connection. Its only ioctls are the
//! two that re-tune the tap when the guest acknowledges features. It never opens a file,
//! never starts a program and never opens anything but Unix sockets.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::{allow, arg_in, thread_runtime, Error, Rules};

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
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigaction,
        // Frontends, the relay and its internal channel to the request handler.
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_getsockname,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_fcntl,
        libc::SYS_dup,
        // Frames and eventfds.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        // Guest memory regions (their size is taken from the memfd).
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        // Stats line on exit.
        libc::SYS_tgkill,
    ]));
    // Unix sockets only: the internal channel between the relay and the request handler.
    rules.push(arg_in(ROLE, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?);
    // The tap is re-tuned when the guest acknowledges features; nothing else.
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[libc::TUNSETOFFLOAD, libc::TUNSETVNETHDRSZ],
    )?);
    // Threads only: a clone without CLONE_THREAD would be a new process. clone3 passes its
    // flags in memory, where seccomp cannot look, so it stays allowed for the Rust runtime.
    let thread_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|source| Error::Rule { role: ROLE, source })?;
    rules.push((libc::SYS_clone, vec![thread_only]));
    rules.extend(allow(&[libc::SYS_clone3]));
    Ok(rules)
}
