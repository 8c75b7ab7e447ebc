//! Allowlists of the VMM's event loop and QMP thread once the VM is running.
//!
//! The thread multiplexes the QMP socket, serial input and vCPU events with epoll, resets the
//! interrupt controllers and timer on `system_reset`, kicks vCPU threads with a signal, and
//! removes its QMP socket and pid file at exit. It never creates a VM or a vCPU, never starts
//! a program, never opens a file or a socket of its own (the listening QMP socket and every
//! descriptor it reads are made before the filter is installed) and never signals another
//! process. The table was measured with `strace -f` on a VM taken through QMP `stop`, `cont`,
//! `query-*`, `system_reset` and `quit`; features that need more add their syscalls: a QMP
//! `migrate` reads the interrupt controllers, timer and clock of the paused VM, copies guest
//! RAM from its mapping into files the device launcher created, and syncs them. vhost-user devices add `sendmsg`/`recvmsg` on sockets
//! connected before the filter; their KVM ioeventfds and irqfds are registered at startup,
//! so no KVM routing ioctl is allowed here. Descriptors QMP clients pass (`getfd`, `add-fd`)
//! arrive by the same `recvmsg`, and a `/dev/fdset/N` image is a close-on-exec duplicate
//! (`fcntl(F_DUPFD_CLOEXEC)`) chosen by its access mode (`F_GETFL`): nothing is opened. The
//! balloon, served here, returns guest pages to the host with `madvise(MADV_REMOVE)` on the
//! shared guest RAM mapping (`MADV_DONTNEED` on a restored VM's private one), which the thread
//! runtime's `madvise` already covers: it adds no syscall, and `fallocate` stays out.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::{allow, arg_in, descriptor_control, socket_options, thread_runtime, Error, Rules};
use crate::{kvm, vfio};

const ROLE: &str = "vmm";
const ROLE_WITHOUT_LANDLOCK: &str = "vmm-without-landlock";

/// Syscalls of the event loop and QMP thread under the VMM's Landlock ruleset, which confines
/// `unlink` to the directories of the QMP socket and the pid file.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = event_loop(ROLE)?;
    rules.extend(allow(&[libc::SYS_unlink]));
    Ok(rules)
}

/// Syscalls of the event loop when the operator turned Landlock off: no syscall that takes a
/// path at all, so the files it created are left behind at exit.
pub fn rules_without_landlock() -> Result<Rules, Error> {
    event_loop(ROLE_WITHOUT_LANDLOCK)
}

fn event_loop(role: &'static str) -> Result<Rules, Error> {
    let mut rules = thread_runtime(role)?;
    rules.extend(allow(&[
        // Event loop.
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        // QMP clients, serial input, eventfds, the log.
        libc::SYS_accept4,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        // q35: a hot-plugged PCI card's queue notifications and MSI-X vectors.
        libc::SYS_eventfd2,
        // vhost-user devices start here when their driver sets DRIVER_OK (memory table,
        // rings, kick and call eventfds), and system_reset stops their rings: requests on the
        // backends' sockets, connected before the filter.
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        // Their deadline: a per-thread timer whose signal handler shuts a mute backend's
        // socket down.
        libc::SYS_timer_create,
        libc::SYS_timer_settime,
        libc::SYS_timer_delete,
        libc::SYS_shutdown,
        // The kernel and initrd, held open since start, read again by `system_reset`.
        libc::SYS_lseek,
        libc::SYS_fstat,
        // QMP `migrate`: the snapshot's files and their directory synced (the launcher
        // creates them; nothing is opened).
        libc::SYS_fsync,
        // q35: a VFIO device's configuration space, read when it is plugged.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
    ]));
    rules.push(descriptor_control(role, &[])?);
    rules.push(own_threads_only(role)?);
    // Reaping the device launcher at exit, never blocking: the VMM's only child.
    rules.push(arg_in(role, libc::SYS_wait4, 2, &[libc::WNOHANG as u64])?);
    // Send and receive timeouts on QMP connections, nothing else.
    rules.push(socket_options(
        role,
        &[libc::SO_SNDTIMEO, libc::SO_RCVTIMEO],
    )?);
    rules.push(arg_in(
        role,
        libc::SYS_ioctl,
        1,
        &[
            // system_reset puts the PICs, IOAPIC and PIT back as built.
            kvm::KVM_SET_IRQCHIP(),
            kvm::KVM_SET_PIT2(),
            // A snapshot reads them, and the kvmclock, from the paused VM.
            kvm::KVM_GET_IRQCHIP(),
            kvm::KVM_GET_PIT2(),
            kvm::KVM_GET_CLOCK(),
            // Accepted QMP connections are made non-blocking.
            kvm::FIONBIO,
            // q35: a root port's hotplug interrupt, and a PCI card plugged or ejected, its
            // MSI-X routes, irqfds and notification ioeventfds set up or torn down.
            kvm::KVM_SIGNAL_MSI(),
            kvm::KVM_SET_GSI_ROUTING(),
            kvm::KVM_IRQFD(),
            kvm::KVM_IOEVENTFD(),
            // VFIO: a passed-through device's guest RAM mappings for DMA, made when it is
            // plugged and undone when it leaves, with its interrupts, its reset and its BARs'
            // memory slots.
            vfio::VFIO_IOMMU_MAP_DMA(),
            vfio::VFIO_IOMMU_UNMAP_DMA(),
            vfio::VFIO_DEVICE_SET_IRQS(),
            vfio::VFIO_DEVICE_RESET(),
            kvm::KVM_SET_USER_MEMORY_REGION(),
        ],
    )?);
    Ok(rules)
}

/// `tgkill` only to threads of this process (the vCPU kicks): another process cannot be
/// signalled even on kernels whose Landlock cannot scope signals (before ABI 6). The process
/// id is read when the rules are built, in the process that installs them.
fn own_threads_only(role: &'static str) -> Result<(i64, Vec<SeccompRule>), Error> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // pid_t is a C int: only the low 32 bits are compared (see `socket_options`).
    let rule = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid as u64)
        .and_then(|condition| SeccompRule::new(vec![condition]))
        .map_err(|source| Error::Rule { role, source })?;
    Ok((libc::SYS_tgkill, vec![rule]))
}
