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
        libc::SYS_execveat,
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

/// What a backend does between `execve` and installing its own filter.
fn backend_startup() -> Result<Rules, Error> {
    let rules = allow(&[]);
    Ok(rules)
}
