//! Allowlist of the device launcher, the process the VMM forks before it locks itself down.
//!
//! On request from the VMM it opens a disk image or a tap, creates the socket pair of a
//! vhost-user connection, forks and execs `citadel-blk` or `citadel-net` with those
//! descriptors, and later stops and reaps them.
//!
//! A program started with `execve` keeps every seccomp filter of the process that started it,
//! so the backends run under this filter as well as their own. This table therefore also
//! contains what a freshly started static binary needs before its own filter is in place, and
//! the backend tables are merged in: a backend can never do more than the launcher could.

use crate::kvm;
use crate::{allow, arg_in, blk, net, socket_options, thread_runtime, Error, Rules};

const ROLE: &str = "launcher";

/// Syscalls of the launcher and everything it starts.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = thread_runtime(ROLE)?;
    rules.extend(allow(&[
        // Requests from the VMM, descriptors handed over with SCM_RIGHTS.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_fcntl,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_close_range,
        libc::SYS_pipe2,
        // Disks and /dev/net/tun.
        libc::SYS_openat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        // Starting, stopping and reaping the backends.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_vfork,
        libc::SYS_execve,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_kill,
        libc::SYS_rt_sigaction,
        libc::SYS_setsid,
        libc::SYS_prctl,
        // What a static binary does before main().
        libc::SYS_arch_prctl,
        libc::SYS_set_tid_address,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prlimit64,
        libc::SYS_readlink,
        libc::SYS_getuid,
        libc::SYS_sched_getaffinity,
        // What a backend does before its own filter: event sources, then sandboxing itself.
        libc::SYS_epoll_create1,
        libc::SYS_eventfd2,
        libc::SYS_signalfd4,
        libc::SYS_getsockopt,
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_restrict_self,
        libc::SYS_seccomp,
    ]));
    rules.push(socket_options(
        ROLE,
        &[libc::SO_SNDTIMEO, libc::SO_RCVTIMEO],
    )?);
    rules.push(arg_in(
        ROLE,
        libc::SYS_socketpair,
        0,
        &[libc::AF_UNIX as u64],
    )?);
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[
            kvm::TUNSETIFF,
            kvm::TUNSETOFFLOAD,
            kvm::TUNSETVNETHDRSZ,
            kvm::TUNGETIFF,
            kvm::FIONBIO,
            kvm::FIOCLEX,
            kvm::TCGETS,
        ],
    )?);
    rules.extend(blk::rules()?);
    rules.extend(net::rules()?);
    Ok(rules)
}
