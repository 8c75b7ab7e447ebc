//! The device-to-driver notification state of one transport: the irqfd that raises the guest
//! interrupt, the InterruptStatus bits that tell the driver why, and the configuration
//! generation that lets it read a consistent configuration.

use std::io;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::interrupt::{
    InterruptStatus, TransportInterrupt, VirtioInterrupt, STATUS_CONFIG, STATUS_QUEUE,
};

/// InterruptStatus bit: a queue's used ring was updated.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

// The shared status keeps virtio-mmio's bits.
const _: () = assert!(INT_VRING == STATUS_QUEUE && INT_CONFIG == STATUS_CONFIG);

/// Interrupt line of one virtio-mmio transport, shared by the transport (which exposes the
/// status to the driver) and the device (which raises it).
///
/// The irqfd is registered with KVM against the slot's GSI, so signalling it injects the guest
/// interrupt without the vCPU threads being involved.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: EventFd,
    status: InterruptStatus,
}

impl Interrupt {
    /// Wraps the eventfd that the VMM registers as a KVM irqfd for this transport's GSI.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            irqfd,
            status: InterruptStatus::default(),
        }
    }
}

/// One line for every queue: the queue number only matters to transports with a vector per
/// queue.
impl VirtioInterrupt for Interrupt {
    fn signal_used_queue(&self, _queue: usize) -> io::Result<()> {
        self.status.queue_raised();
        self.irqfd.write(1)
    }

    fn signal_config_change(&self) -> io::Result<()> {
        self.status.config_raised();
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
        self.status.set_vring_external(external);
    }
}

impl TransportInterrupt for Interrupt {
    /// The InterruptStatus register, InterruptACK and ConfigGeneration read and clear it.
    fn interrupt_status(&self) -> &InterruptStatus {
        &self.status
    }
}
