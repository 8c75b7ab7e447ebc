//! How a virtio device notifies its driver, whatever the transport: the device says which
//! queue's used ring moved or that its configuration changed, and hands a backend process the
//! eventfd that signals a queue by itself. A virtio-mmio transport has one line for everything
//! and an InterruptStatus register saying why; a virtio-pci transport has MSI-X vectors the
//! driver assigns to queues. Devices see only [`VirtioInterrupt`], so a new transport needs no
//! change in them; transports read the shared state back through [`TransportInterrupt`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bit: a queue's used ring was updated (virtio-mmio's `VRING`, bit 0 of
/// virtio-pci's ISR).
pub const STATUS_QUEUE: u32 = 1;
/// Interrupt status bit: the device configuration changed (virtio-mmio's `CONFIG`, bit 1 of
/// virtio-pci's ISR).
pub const STATUS_CONFIG: u32 = 2;

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

/// What a transport reads back from the interrupt state it shares with its device: the
/// [`InterruptStatus`] every transport keeps the same way.
pub trait TransportInterrupt: VirtioInterrupt + 'static {
    /// The shared status bits and configuration generation.
    fn interrupt_status(&self) -> &InterruptStatus;
    /// The interrupt status: virtio-mmio's InterruptStatus, virtio-pci's ISR (bit 0 a
    /// queue, bit 1 the configuration).
    fn isr_status(&self) -> u32 {
        self.interrupt_status().status()
    }
    /// Clears the acknowledged status bits.
    fn acknowledge(&self, bits: u32) {
        self.interrupt_status().acknowledge(bits);
    }
    /// The configuration generation.
    fn config_generation(&self) -> u32 {
        self.interrupt_status().config_generation()
    }
    /// (status bits, configuration generation), for a snapshot.
    fn saved(&self) -> (u32, u32) {
        self.interrupt_status().saved()
    }
    /// Puts saved status bits and generation back.
    fn restore(&self, status: u32, config_generation: u32) {
        self.interrupt_status().restore(status, config_generation);
    }
    /// Device reset: no interrupt pending, no external signaller.
    fn reset(&self) {
        self.interrupt_status().reset();
    }
}

/// Why a transport's interrupts were raised, and the configuration generation: the state both
/// transports keep the same way, whatever carries the interrupt itself.
#[derive(Debug, Default)]
pub struct InterruptStatus {
    status: AtomicU32,
    vring_external: AtomicBool,
    config_generation: AtomicU32,
}

impl InterruptStatus {
    /// Records a used-ring update; the bit goes first, so a handler reading it finds it.
    pub fn queue_raised(&self) {
        self.status.fetch_or(STATUS_QUEUE, Ordering::SeqCst);
    }

    /// Records a configuration change, bumping the generation first, so a driver that was
    /// reading the configuration across the change sees a different generation and reads it
    /// again.
    pub fn config_raised(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status.fetch_or(STATUS_CONFIG, Ordering::SeqCst);
    }

    /// While set, the status always reports [`STATUS_QUEUE`]: interrupts raised by a backend
    /// process writing the irqfd never set it, and a status without it would make the driver
    /// skip its used rings. Cleared by [`InterruptStatus::reset`].
    pub fn set_vring_external(&self, external: bool) {
        self.vring_external.store(external, Ordering::SeqCst);
    }

    /// The status bits, as the driver reads them.
    pub fn status(&self) -> u32 {
        let external = if self.vring_external.load(Ordering::SeqCst) {
            STATUS_QUEUE
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | external
    }

    /// Clears the acknowledged bits; unknown ones are ignored.
    pub fn acknowledge(&self, bits: u32) {
        self.status
            .fetch_and(!(bits & (STATUS_QUEUE | STATUS_CONFIG)), Ordering::SeqCst);
    }

    /// The configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// (status bits, configuration generation), for a snapshot.
    pub fn saved(&self) -> (u32, u32) {
        (
            self.status.load(Ordering::SeqCst),
            self.config_generation.load(Ordering::SeqCst),
        )
    }

    /// Puts saved status bits (unknown ones dropped) and generation back.
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status
            .store(status & (STATUS_QUEUE | STATUS_CONFIG), Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// Device reset: nothing pending, no external signaller. The generation keeps counting,
    /// so it never repeats a value a driver may still hold.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.vring_external.store(false, Ordering::SeqCst);
    }
}
