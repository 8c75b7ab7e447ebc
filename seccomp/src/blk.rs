//! Allowlist of the citadel-blk backend process once it serves frontends.
//!
//! By then the image is open, the listening socket is bound (or the connected socket adopted),
//! the epoll sets, eventfds and signalfd exist. The process accepts frontends one at a time,
//! receives their memory tables and eventfds over SCM_RIGHTS, maps guest memory, moves data
//! between the rings and the image with positioned reads and writes, creates the inflight
//! memfd, and starts one worker thread per queue. It never opens a path, never creates a
//! socket, never executes anything and issues no ioctl at all.

use crate::{
    allow, descriptor_control, peer_credentials, thread_names, thread_runtime, threads_only, Error,
    Rules,
};

const ROLE: &str = "blk";

/// Syscalls citadel-blk needs once it serves its frontend.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = thread_runtime(ROLE)?;
    rules.extend(allow(&[
        // Event loops of the main thread and the queue workers (created before lockdown).
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        // Worker threads start after lockdown, inheriting the filter.
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        // glibc installs its internal SIGSETXID handler when the first thread starts.
        libc::SYS_rt_sigaction,
        // glibc sizes its malloc arenas from the CPU count when a new thread first allocates.
        libc::SYS_sched_getaffinity,
        // Frontend connections and vhost-user messages with their descriptors.
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        // Kicks, calls, signalfd, logs.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        // The image.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        // Size checks of memory-table and inflight descriptors.
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        // The inflight area handed to the frontend.
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
    ]));
    // Sealing the inflight memfd handed to the frontend.
    rules.push(descriptor_control(ROLE, &[libc::F_ADD_SEALS])?);
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

    /// Runs `body` in a forked child under the blk filter; returns the wait status.
    fn confined(body: fn() -> i32) -> i32 {
        crate::tests::run_confined(Role::Blk, body)
    }

    fn killed(what: &str, body: fn() -> i32) {
        let status = confined(body);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{what}: expected death by SIGSYS, got status {status:#x}"
        );
    }

    fn allowed(what: &str, body: fn() -> i32) {
        let status = confined(body);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{what}: expected a normal exit, got status {status:#x}"
        );
    }

    #[test]
    fn blk_cannot_open_paths_make_sockets_ioctl_or_exec() {
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("openat", || unsafe {
            libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) as i32
        });
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("socket(AF_UNIX)", || unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) as i32
        });
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("ioctl(TCGETS)", || unsafe {
            libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, 0) as i32
        });
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("execve", || unsafe {
            libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
                std::ptr::null::<*const libc::c_char>(),
            ) as i32
        });
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("setsockopt(SO_RCVTIMEO)", || unsafe {
            libc::syscall(
                libc::SYS_setsockopt,
                -1,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                0,
                0,
            ) as i32
        });
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("fcntl(F_SETLK)", || unsafe {
            libc::syscall(libc::SYS_fcntl, -1, libc::F_SETLK, 0) as i32
        });
        // SAFETY: a raw syscall with constant or null arguments, run in the forked child.
        killed("clone without CLONE_THREAD", || unsafe {
            libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) as i32
        });
    }

    #[test]
    fn blk_keeps_its_data_path() {
        // Each call fails with EBADF on descriptor -1 but reaches the kernel.
        // SAFETY: raw syscalls on descriptor -1 with a valid one-byte buffer, in the child.
        allowed("pread64/pwrite64/fdatasync/fallocate", || unsafe {
            let mut b = [0u8; 1];
            let calls = [
                libc::syscall(libc::SYS_pread64, -1, b.as_mut_ptr(), 1, 0),
                libc::syscall(libc::SYS_pwrite64, -1, b.as_ptr(), 1, 0),
                libc::syscall(libc::SYS_fdatasync, -1),
                libc::syscall(libc::SYS_fallocate, -1, 0, 0, 512),
                libc::syscall(libc::SYS_fcntl, -1, libc::F_GETFL),
            ];
            i32::from(calls.iter().any(|&rc| rc != -1))
        });
    }
}
