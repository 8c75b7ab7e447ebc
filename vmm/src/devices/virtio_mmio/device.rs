//! What a virtio device offers to a transport, and what the transport hands it when the
//! driver starts it.
//!
//! Nothing here is specific to MMIO: a device (a vhost-user frontend, the balloon) implements
//! [`VirtioDevice`] once and the transport decodes the registers around it.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::interrupt::VirtioInterrupt;

/// A virtio device behind a transport.
///
/// The transport serialises every call (it holds the device behind its own lock), validates
/// the driver's side of the negotiation, and only calls [`VirtioDevice::activate`] with
/// features the device offered and queues that passed its checks. Configuration accesses come
/// straight from the guest: offsets and lengths are untrusted.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 network, 2 block, 5 balloon…).
    fn device_type(&self) -> u32;

    /// Largest size of each queue; the length is the number of queues. Each size is a power
    /// of two between 1 and 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device feature bits. The transport adds `VIRTIO_F_VERSION_1` and removes the
    /// transport features it does not implement.
    fn features(&self) -> u64;

    /// Reads `data.len()` bytes of device configuration at `offset`. Bytes outside the
    /// configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes `data` to the device configuration at `offset`. Writes to read-only or absent
    /// fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with what the driver negotiated. On error the transport reports
    /// DEVICE_NEEDS_RESET to the driver.
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError>;

    /// Whether the device can start again on a machine restored from a snapshot, its rings
    /// resuming at the used indices in guest memory ([`ActivateParams::resume`]). Only a
    /// device that completes every chain it takes before the machine pauses can: its ring
    /// positions are then in guest memory, saved with it, and so can one whose backend
    /// process was stopped at the used indices before the machine was saved (the disk and
    /// NIC slots). Any other device a backend serves cannot, and a snapshot in which its
    /// driver had started it is refused.
    fn resumable(&self) -> bool {
        false
    }

    /// Returns the device to its initial state: stops the queues (a vhost-user frontend stops
    /// its backend's rings) and forgets configuration the driver wrote. Called on every reset
    /// the driver asks for, whether or not the device was active.
    fn reset(&mut self);
}

/// Lets one transport type hold any device, chosen at run time (a hotplugged disk or NIC).
impl<T: VirtioDevice + ?Sized> VirtioDevice for Box<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        (**self).activate(params)
    }
    fn resumable(&self) -> bool {
        (**self).resumable()
    }
    fn reset(&mut self) {
        (**self).reset()
    }
}

/// One queue as the driver configured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Number of entries.
    pub size: u16,
    /// Guest address of the descriptor area.
    pub desc: u64,
    /// Guest address of the driver area (available ring).
    pub avail: u64,
    /// Guest address of the device area (used ring).
    pub used: u64,
    /// Whether the driver enabled the queue. Disabled queues carry no usable addresses.
    pub ready: bool,
}

/// Everything a device needs to run: handed over once, when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateParams {
    /// Features the driver accepted: a subset of those offered, including VERSION_1.
    pub features: u64,
    /// Every queue of the device, in order, ready or not.
    pub queues: Vec<QueueConfig>,
    /// Per queue, the eventfd signalled when the driver notifies it (a KVM ioeventfd on the
    /// QueueNotify register, or the transport itself without one). A vhost-user frontend
    /// passes these to its backend as kick fds.
    pub notify: Vec<EventFd>,
    /// The transport's interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver started the device before the machine was saved to the snapshot it was
    /// restored from: each ring goes on from the used index in guest memory rather than
    /// from the start. Only ever set for a [`VirtioDevice::resumable`] device.
    pub resume: bool,
}

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a queue the device cannot use.
    #[error("queue {index} is unusable: {reason}")]
    InvalidQueue {
        /// Queue index.
        index: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The per-queue notify eventfds could not be duplicated for the device.
    #[error("cannot duplicate the queue notify eventfds: {0}")]
    NotifyEventFd(#[source] std::io::Error),
    /// The device itself failed to start (its backend refused the configuration, died…).
    #[error("the device failed to start: {0}")]
    Device(String),
}

/// Copies the bytes of `config` at `offset` into `data`, reading zero past its end: the
/// bounds-checked read every device configuration space needs.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let n = available.len().min(data.len());
        data[..n].copy_from_slice(&available[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_are_bounds_checked() {
        let config = [1u8, 2, 3, 4, 5, 6];
        let mut data = [0xaa; 4];
        read_config_bytes(&config, 1, &mut data);
        assert_eq!(data, [2, 3, 4, 5]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [5, 6, 0, 0]);
        read_config_bytes(&config, 6, &mut data);
        assert_eq!(data, [0; 4]);
        data = [0xaa; 4];
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
