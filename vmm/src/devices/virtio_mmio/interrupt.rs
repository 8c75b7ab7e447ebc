//! The device-to-driver notification state of one transport: the irqfd that raises the guest
//! interrupt, the InterruptStatus bits that tell the driver why, and the configuration
//! generation that lets it read a consistent configuration.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::interrupt::{TransportInterrupt, VirtioInterrupt};

/// InterruptStatus bit: a queue's used ring was updated.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

/// Interrupt line of one virtio-mmio transport, shared by the transport (which exposes the
/// status to the driver) and the device (which raises it).
///
/// The irqfd is registered with KVM against the slot's GSI, so signalling it injects the guest
/// interrupt without the vCPU threads being involved.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
    vring_external: AtomicBool,
    config_generation: AtomicU32,
}

impl Interrupt {
    /// Wraps the eventfd that the VMM registers as a KVM irqfd for this transport's GSI.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            irqfd,
            status: AtomicU32::new(0),
            vring_external: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
        }
    }
}

/// One line for every queue: the queue number only matters to transports with a vector per
/// queue.
impl VirtioInterrupt for Interrupt {
    fn signal_used_queue(&self, _queue: usize) -> io::Result<()> {
        // The bit goes first: the driver's handler reads it as soon as the interrupt lands.
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Bumps the configuration generation first, so a driver that was reading the
    /// configuration across the change sees a different generation and reads it again.
    fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    fn queue_irqfd(&self, _queue: usize) -> &EventFd {
        &self.irqfd
    }

    /// While set, InterruptStatus always reports [`INT_VRING`]: the driver then checks its
    /// used rings on every interrupt of the line. A check that finds nothing costs a little; a
    /// status without the bit would make the driver ignore the interrupt and lose
    /// completions. Cleared by a device reset.
    fn set_vring_signalled_externally(&self, external: bool) {
        self.vring_external.store(external, Ordering::SeqCst);
    }
}

impl TransportInterrupt for Interrupt {
    /// The InterruptStatus register.
    fn isr_status(&self) -> u32 {
        let external = if self.vring_external.load(Ordering::SeqCst) {
            INT_VRING
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | external
    }

    /// InterruptACK: clears the acknowledged bits. Unknown bits are ignored.
    fn acknowledge(&self, bits: u32) {
        self.status
            .fetch_and(!(bits & (INT_VRING | INT_CONFIG)), Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The pending status bits and the configuration generation, for a snapshot.
    fn saved(&self) -> (u32, u32) {
        (
            self.status.load(Ordering::SeqCst),
            self.config_generation.load(Ordering::SeqCst),
        )
    }

    /// Puts saved status bits (unknown ones dropped) and generation back.
    fn restore(&self, status: u32, config_generation: u32) {
        self.status
            .store(status & (INT_VRING | INT_CONFIG), Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// Device reset: no interrupt pending, no external signaller. The generation keeps
    /// counting, so it never repeats a value a driver may still hold.
    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.vring_external.store(false, Ordering::SeqCst);
    }
}
