//! What a snapshot keeps of a virtio-mmio transport: the registers the driver wrote, the
//! pending interrupt bits and the configuration generation.
//!
//! Nothing of a started device's own ring positions: only devices the VMM serves itself are
//! snapshotted started, and they complete every chain they take before the machine pauses, so
//! each ring's position is its used index, in the saved guest memory.

use serde::{Deserialize, Serialize};

/// One queue as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNum.
    pub size: u16,
    /// Descriptor area address.
    pub desc: u64,
    /// Driver area address.
    pub avail: u64,
    /// Device area address.
    pub used: u64,
    /// QueueReady.
    pub ready: bool,
}

/// A transport's driver-visible state. Read back from an untrusted file: the transport
/// checks it against its device before taking any of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// The device type behind the transport (checked on restore).
    pub device_type: u32,
    /// The Status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Every queue, in order.
    pub queues: Vec<QueueSnapshot>,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}
