//! How a virtio device notifies its driver, whatever the transport: the device says which
//! queue's used ring moved or that its configuration changed, and hands a backend process the
//! eventfd that signals a queue by itself. A virtio-mmio transport has one line for everything
//! and an InterruptStatus register saying why; a virtio-pci transport has MSI-X vectors the
//! driver assigns to queues. Devices see only [`VirtioInterrupt`], so a new transport needs no
//! change in them; transports read the shared state back through [`TransportInterrupt`].

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

/// What a transport reads back from the interrupt state it shares with its device.
pub trait TransportInterrupt: VirtioInterrupt + 'static {
    /// The interrupt status: virtio-mmio's InterruptStatus, virtio-pci's ISR (bit 0 a
    /// queue, bit 1 the configuration).
    fn isr_status(&self) -> u32;
    /// Clears the acknowledged status bits.
    fn acknowledge(&self, bits: u32);
    /// The configuration generation.
    fn config_generation(&self) -> u32;
    /// (status bits, configuration generation), for a snapshot.
    fn saved(&self) -> (u32, u32);
    /// Puts saved status bits and generation back.
    fn restore(&self, status: u32, config_generation: u32);
    /// Device reset: no interrupt pending, no external signaller.
    fn reset(&self);
}
