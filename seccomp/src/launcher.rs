//! Allowlist of the device launcher, which starts citadel-blk and citadel-net for the VMM.
//!
//! The launcher itself waits on its control socket and a signalfd, opens disk images (with
//! `openat2`, beneath its root) and `/dev/net/tun`, creates a socket pair per backend, forks,
//! executes one of two binaries (Landlock decides which), signals and reaps its children.
//!
//! Seccomp filters are inherited across `execve` and stack: a backend runs under the
//! launcher's filter and then under its own, and a syscall passes only if every filter lets it
//! through. So this role is the launcher's own needs merged with what each backend does from
//! its first instruction to its own lockdown (loading, parsing arguments, dropping
//! capabilities, Landlock, installing its filter) and with the `blk` and `net` roles
//! themselves: a syscall any of them allows outright is allowed outright, argument conditions
//! of the same syscall are alternatives. The backends' own filters then narrow them down
//! again.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::{allow, arg_in, blk, descriptor_control, net, thread_runtime, Error, Rules};

const ROLE: &str = "launcher";

/// The flags glibc's `fork` passes to `clone`: a new process sharing nothing, no namespace,
/// no thread.
pub const FORK_FLAGS: u64 =
    (libc::CLONE_CHILD_CLEARTID | libc::CLONE_CHILD_SETTID | libc::SIGCHLD) as u64;

/// Syscalls of the launcher, of its backends before their lockdown, and of the `blk` and
/// `net` roles.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = own()?;
    rules.extend(backend_startup()?);
    rules.extend(blk::rules()?);
    rules.extend(net::rules()?);
    Ok(rules)
}

/// What the launcher process does itself.
fn own() -> Result<Rules, Error> {
    let mut rules = thread_runtime(ROLE)?;
    rules.extend(allow(&[
        // Requests and replies with their descriptors; SIGCHLD through a signalfd.
        libc::SYS_poll,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_read,
        libc::SYS_write,
        // Images beneath the root, /dev/net/tun, their type.
        libc::SYS_openat2,
        libc::SYS_openat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        // The exec-status pipe, the descriptors a backend is handed as 3, 4, ...
        libc::SYS_pipe2,
        libc::SYS_dup2,
        libc::SYS_close_range,
        libc::SYS_getppid,
        // Starting backends (Landlock limits what may be executed).
        libc::SYS_execve,
        // Stopping and reaping them.
        libc::SYS_kill,
        libc::SYS_wait4,
    ]));
    // The vhost-user socket pair of each backend.
    rules.push(arg_in(
        ROLE,
        libc::SYS_socketpair,
        0,
        &[libc::AF_UNIX as u64],
    )?);
    // A plain fork, never a thread or a new namespace.
    rules.push(arg_in(ROLE, libc::SYS_clone, 0, &[FORK_FLAGS])?);
    // Attaching a tap by name.
    rules.push(arg_in(ROLE, libc::SYS_ioctl, 1, &[libc::TUNSETIFF])?);
    rules.push(arg_in(
        ROLE,
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_PDEATHSIG as u64],
    )?);
    rules.push(descriptor_control(ROLE, &[])?);
    Ok(rules)
}

/// What a backend does between `execve` and installing its own filter, measured with
/// `strace -f` on citadel-blk and citadel-net started by the launcher.
fn backend_startup() -> Result<Rules, Error> {
    let mut rules = allow(&[
        // The C library's start-up in a static binary: thread pointer, its own path, the
        // standard descriptors checked open, the stack limit.
        libc::SYS_arch_prctl,
        libc::SYS_set_tid_address,
        libc::SYS_readlink,
        libc::SYS_poll,
        libc::SYS_prlimit64,
        // The Rust runtime finds the main thread's stack guard in /proc/self/maps (openat,
        // allowed above, where Landlock confines it).
        libc::SYS_newfstatat,
        // Image size, signals, event loops.
        libc::SYS_lseek,
        libc::SYS_signalfd4,
        libc::SYS_epoll_create1,
        libc::SYS_eventfd2,
        // Whose frontends are accepted.
        libc::SYS_geteuid,
        // Their own sandbox: capabilities dropped, Landlock, then their own filter on top of
        // this one (a filter can only take syscalls away).
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_restrict_self,
        libc::SYS_seccomp,
    ]);
    rules.push(arg_in(
        ROLE,
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NO_NEW_PRIVS as u64,
            libc::PR_CAPBSET_READ as u64,
            libc::PR_CAPBSET_DROP as u64,
            libc::PR_CAP_AMBIENT as u64,
        ],
    )?);
    // env_logger asks whether stderr is a terminal; citadel-net checks a tap descriptor.
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[libc::TCGETS, libc::TUNGETIFF],
    )?);
    // The inherited vhost-user descriptor is checked to be a Unix stream socket.
    rules.push(socket_queries(&[libc::SO_DOMAIN, libc::SO_TYPE])?);
    Ok(rules)
}

/// `getsockopt` of the `SOL_SOCKET` options in `options` only. Level and option name are C
/// `int`s, so only their low 32 bits are compared.
fn socket_queries(options: &[libc::c_int]) -> Result<(i64, Vec<SeccompRule>), Error> {
    let int_eq = |arg: u8, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
    };
    let rules = options
        .iter()
        .map(|&option| {
            int_eq(1, libc::SOL_SOCKET)
                .and_then(|level| Ok(vec![level, int_eq(2, option)?]))
                .and_then(SeccompRule::new)
                .map_err(|source| Error::Rule { role: ROLE, source })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((libc::SYS_getsockopt, rules))
}
