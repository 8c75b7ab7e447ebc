//! Allowlist of the VMM's event loop and QMP thread once the VM is running.
//!
//! The thread multiplexes the QMP socket, the vhost-user frontends and device events with
//! epoll, raises interrupts, wires ioeventfds and irqfds for hotplugged devices, maps and
//! unmaps guest memory regions, writes snapshots and kicks vCPU threads with a signal. It
//! never creates a VM or a vCPU, never starts a program and never opens a network socket.

use crate::kvm;
use crate::{allow, arg_in, socket_options, thread_runtime, Error, Rules};

const ROLE: &str = "vmm";

/// Syscalls of the event loop and QMP thread.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = thread_runtime(ROLE)?;
    rules.extend(allow(&[
        // Event loop.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        // QMP clients and vhost-user frontends (descriptors travel in SCM_RIGHTS).
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_fcntl,
        libc::SYS_dup3,
        // Snapshots (`migrate` to `file:`), confined to the jail by the mount namespace and
        // Landlock; removal of the QMP socket at exit.
        libc::SYS_openat,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_unlink,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_ftruncate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        // Pausing vCPUs, and reaping device processes at shutdown.
        libc::SYS_tgkill,
        libc::SYS_wait4,
    ]));
    // External vhost-user backends are reached over Unix sockets only.
    rules.push(arg_in(ROLE, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?);
    // Send and receive timeouts on QMP connections, nothing else.
    rules.push(socket_options(
        ROLE,
        &[libc::SO_SNDTIMEO, libc::SO_RCVTIMEO],
    )?);
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[
            kvm::KVM_IRQ_LINE(),
            kvm::KVM_IRQFD(),
            kvm::KVM_IOEVENTFD(),
            kvm::KVM_SET_USER_MEMORY_REGION(),
            kvm::KVM_SET_GSI_ROUTING(),
            kvm::KVM_SIGNAL_MSI(),
            kvm::KVM_GET_DIRTY_LOG(),
            kvm::KVM_GET_CLOCK(),
            kvm::KVM_SET_CLOCK(),
            kvm::KVM_GET_IRQCHIP(),
            kvm::KVM_SET_IRQCHIP(),
            kvm::KVM_GET_PIT2(),
            kvm::KVM_SET_PIT2(),
            kvm::TCGETS,
            kvm::TCSETS,
            kvm::TIOCGWINSZ,
            kvm::FIONBIO,
            kvm::FIOCLEX,
        ],
    )?);
    Ok(rules)
}
