//! Allowlist of a vCPU thread once its vCPU is configured.
//!
//! The thread runs `KVM_RUN`, emulates port and MMIO exits of the legacy devices (the serial
//! port writes to its output descriptor, exits are signalled to the event loop through an
//! eventfd), saves and restores its own register state for snapshots and takes the kick
//! signal. It opens nothing, creates no socket and starts no program. When the guest driver
//! resets a vhost-user device, the vCPU that wrote the Status register stops the backend's
//! rings over the socket connected at startup (starting a device is the event loop's job).

use crate::{allow, arg_in, thread_runtime, Error, Rules};
use crate::{kvm, vfio};

const ROLE: &str = "vcpu";

/// Syscalls of a vCPU thread.
pub fn rules() -> Result<Rules, Error> {
    let mut rules = thread_runtime(ROLE)?;
    rules.extend(allow(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_rt_sigtimedwait,
        // vhost-user requests sent on the backend's already connected socket when the driver
        // resets a device: the reset is complete only once the backend stopped its rings.
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        // The deadline on those requests: a per-thread timer whose signal handler shuts the
        // socket of a backend that does not answer down.
        libc::SYS_timer_create,
        libc::SYS_timer_settime,
        libc::SYS_timer_delete,
        libc::SYS_shutdown,
        // q35: a passed-through VFIO device's configuration space, and the BARs that could
        // not be mapped into the guest, read and written at their offsets in the device file.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
    ]));
    // Rust's standard library checks with F_GETFD that a descriptor is still open before it
    // closes it (debug builds), which a vCPU thread does with its vCPU fd when it exits.
    rules.push(arg_in(ROLE, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])?);
    rules.push(arg_in(
        ROLE,
        libc::SYS_ioctl,
        1,
        &[
            kvm::KVM_RUN(),
            kvm::KVM_GET_REGS(),
            kvm::KVM_SET_REGS(),
            kvm::KVM_GET_SREGS(),
            kvm::KVM_SET_SREGS(),
            kvm::KVM_GET_FPU(),
            kvm::KVM_SET_FPU(),
            kvm::KVM_GET_MSRS(),
            kvm::KVM_SET_MSRS(),
            kvm::KVM_GET_LAPIC(),
            kvm::KVM_SET_LAPIC(),
            kvm::KVM_GET_CPUID2(),
            kvm::KVM_GET_MP_STATE(),
            kvm::KVM_SET_MP_STATE(),
            kvm::KVM_GET_VCPU_EVENTS(),
            kvm::KVM_SET_VCPU_EVENTS(),
            kvm::KVM_GET_DEBUGREGS(),
            kvm::KVM_SET_DEBUGREGS(),
            kvm::KVM_GET_XSAVE(),
            kvm::KVM_SET_XSAVE(),
            kvm::KVM_GET_XCRS(),
            kvm::KVM_SET_XCRS(),
            kvm::KVM_KVMCLOCK_CTRL(),
            // q35: a guest's PCI configuration writes move a card's BAR (its notification
            // ioeventfds follow), enable or mask MSI-X vectors (their routes and irqfds follow)
            // and enable a root port's interrupt with an event pending (one MSI).
            kvm::KVM_IOEVENTFD(),
            kvm::KVM_IRQFD(),
            kvm::KVM_SET_GSI_ROUTING(),
            kvm::KVM_SIGNAL_MSI(),
            // VFIO: a guest enabling or disabling a passed-through device's MSI has the
            // device's interrupt signal an irqfd's eventfd or stop; enabling memory decoding
            // maps its BARs into the guest as memory slots.
            vfio::VFIO_DEVICE_SET_IRQS(),
            kvm::KVM_SET_USER_MEMORY_REGION(),
        ],
    )?);
    Ok(rules)
}
