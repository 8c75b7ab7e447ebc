//! How a virtio device notifies its driver, whatever the transport: the device says which
//! queue's used ring moved or that its configuration changed, and hands a backend process the
//! eventfd that signals a queue by itself. A virtio-mmio transport has one line for everything
//! and an InterruptStatus register saying why; a PCI transport would have an MSI-X vector per
//! queue. Devices see only this trait, so a new transport needs no change in them.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// The device side of a transport's interrupts.
pub trait VirtioInterrupt: Send + Sync + std::fmt::Debug {
    /// Tells the driver that queue `queue`'s used ring was updated.
    fn signal_used_queue(&self, queue: usize) -> io::Result<()>;

    /// Tells the driver that the device configuration changed (disk capacity, link state,
    /// balloon target…), so that it reads the configuration again.
    fn signal_config_change(&self) -> io::Result<()>;

    /// The eventfd (a KVM irqfd) whose write signals queue `queue` to the guest: what a
    /// vhost-user frontend hands its backend as the queue's call fd, after
    /// [`VirtioInterrupt::set_vring_signalled_externally`].
    fn queue_irqfd(&self, queue: usize) -> &EventFd;

    /// Declares whether used-ring interrupts are raised by someone writing the queue irqfds
    /// directly (a backend process), which the transport then never learns of.
    fn set_vring_signalled_externally(&self, external: bool);
}
