//! Allowlist of the device launcher, which starts citadel-blk and citadel-net for the VMM.
//!
//! The launcher itself waits on its control socket and a signalfd, opens disk images (with
//! `openat2`, beneath its root) and `/dev/net/tun`, creates a socket pair per backend, connects
//! Unix sockets of backends the user started, creates and removes snapshot directories, forks,
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

use crate::{
    allow, arg_in, blk, descriptor_control, net, socket_options, thread_runtime, vfio, Error, Rules,
};

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
        // A snapshot's directory and files: created (openat), checked empty, removed again
        // when writing the snapshot failed.
        libc::SYS_mkdirat,
        libc::SYS_getdents64,
        libc::SYS_unlinkat,
    ]));
    // The vhost-user socket pair of each backend.
    rules.push(arg_in(
        ROLE,
        libc::SYS_socketpair,
        0,
        &[libc::AF_UNIX as u64],
    )?);
    // Connecting to a vhost-user backend the user started, with a bounded wait.
    rules.push(arg_in(ROLE, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?);
    rules.extend(allow(&[libc::SYS_connect]));
    rules.push(socket_options(ROLE, &[libc::SO_SNDTIMEO])?);
    // A plain fork, never a thread or a new namespace.
    rules.push(arg_in(ROLE, libc::SYS_clone, 0, &[FORK_FLAGS])?);
    // Attaching a tap by name; opening a VFIO device for the VMM: its container and group
    // checked and joined, the device's descriptor and its regions and interrupts read.
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[
            libc::TUNSETIFF,
            vfio::VFIO_GET_API_VERSION(),
            vfio::VFIO_CHECK_EXTENSION(),
            vfio::VFIO_SET_IOMMU(),
            vfio::VFIO_GROUP_GET_STATUS(),
            vfio::VFIO_GROUP_SET_CONTAINER(),
            vfio::VFIO_GROUP_UNSET_CONTAINER(),
            vfio::VFIO_GROUP_GET_DEVICE_FD(),
            vfio::VFIO_DEVICE_GET_INFO(),
            vfio::VFIO_DEVICE_GET_REGION_INFO(),
            vfio::VFIO_DEVICE_GET_IRQ_INFO(),
        ],
    )?);
    // The device's IOMMU group and driver, read from its sysfs links.
    rules.extend(allow(&[libc::SYS_readlink, libc::SYS_readlinkat]));
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

#[cfg(test)]
mod tests {
    use super::FORK_FLAGS;
    use crate::tests::run_confined;
    use crate::Role;

    fn killed(what: &str, body: fn() -> i32) {
        let status = run_confined(Role::Launcher, body);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{what}: expected death by SIGSYS, got status {status:#x}"
        );
    }

    fn allowed(what: &str, body: fn() -> i32) {
        let status = run_confined(Role::Launcher, body);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{what}: expected a normal exit, got status {status:#x}"
        );
    }

    /// A raw `clone` with `flags` and no new stack; a child, if one comes into being, leaves
    /// at once with status 0. Returns 0 in the parent once the child is reaped.
    fn clone_with(flags: u64) -> i32 {
        // SAFETY: a clone without CLONE_VM: the child runs on a copy of this stack and only
        // calls _exit.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: leaving the new child at once.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            return 1;
        }
        let mut status = 0;
        // SAFETY: reaping our own child with a valid status pointer.
        let waited = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        i32::from(waited != pid as i32 || status != 0)
    }

    #[test]
    fn the_launcher_connects_unix_sockets_with_a_send_timeout_only() {
        allowed("socket(AF_UNIX), SO_SNDTIMEO, connect", || {
            // SAFETY: socket takes no pointers; setsockopt gets a live timeval of the size
            // given; connect gets a live, zeroed sockaddr_un naming "/" (refused, not killed).
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                let tv = libc::timeval {
                    tv_sec: 1,
                    tv_usec: 0,
                };
                let set = libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
                addr.sun_path[0] = b'/' as libc::c_char;
                let rc = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                i32::from(fd < 0 || set != 0 || rc == 0)
            }
        });
        killed("setsockopt(SO_RCVBUF)", || {
            let size: libc::c_int = 1 << 20;
            // SAFETY: setsockopt on any number with a live int of the size given.
            unsafe {
                libc::setsockopt(
                    0,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            0
        });
    }

    #[test]
    fn the_launcher_forks_but_makes_no_namespace_and_no_foreign_socket() {
        allowed("fork", || clone_with(FORK_FLAGS));
        killed("clone with CLONE_NEWUSER", || {
            clone_with(FORK_FLAGS | libc::CLONE_NEWUSER as u64)
        });
        killed("clone with CLONE_NEWNS", || {
            clone_with(FORK_FLAGS | libc::CLONE_NEWNS as u64)
        });
        killed("clone with CLONE_NEWNET", || {
            clone_with(FORK_FLAGS | libc::CLONE_NEWNET as u64)
        });
        // The kernel would refuse a thread without CLONE_SIGHAND (EINVAL): only the filter
        // can make this one die.
        killed("thread with CLONE_NEWNET", || {
            clone_with((libc::CLONE_THREAD | libc::CLONE_NEWNET) as u64)
        });
        killed("vfork-style clone sharing memory", || {
            clone_with(FORK_FLAGS | libc::CLONE_VM as u64)
        });
        killed("socket(AF_INET)", || {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        });
        killed("socketpair(AF_INET)", || {
            let mut fds = [0; 2];
            // SAFETY: a valid two-descriptor array.
            unsafe { libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
            0
        });
        killed("ptrace", || {
            // SAFETY: PTRACE_TRACEME takes no pointers.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            0
        });
        killed("mount", || {
            // SAFETY: NUL-terminated strings; the filter decides first.
            unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    0,
                    std::ptr::null(),
                )
            };
            0
        });
        killed("mmap(PROT_EXEC)", || {
            // SAFETY: an anonymous mapping request; the result is not used.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            0
        });
        killed("prctl(PR_SET_DUMPABLE)", || {
            // SAFETY: integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
            0
        });
        killed("ioctl(TIOCSTI)", || {
            // SAFETY: invalid descriptor, no memory passed; the filter decides first.
            unsafe { libc::ioctl(-1, libc::TIOCSTI, 0) };
            0
        });
    }

    #[test]
    fn the_launcher_opens_images_and_starts_programs() {
        allowed(
            "openat2, socketpair(AF_UNIX), TUNSETIFF, kill, wait4",
            || {
                let mut fds = [0; 2];
                // SAFETY: raw syscalls with a valid descriptor array or invalid descriptors and
                // null pointers, which the kernel refuses after the filter let them through.
                unsafe {
                    if libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr())
                        != 0
                    {
                        return 1;
                    }
                    let calls = [
                        libc::syscall(libc::SYS_openat2, -1, c"x".as_ptr(), 0, 0),
                        libc::ioctl(-1, libc::TUNSETIFF, 0).into(),
                        libc::kill(0x7fff_fff0, 0).into(),
                        libc::syscall(libc::SYS_wait4, -1, 0, libc::WNOHANG, 0),
                    ];
                    i32::from(calls.iter().any(|&rc| rc != -1))
                }
            },
        );
    }
}
