//! The vhost-user side of the benchmark: connects to a vhost-user-blk backend, negotiates
//! features, reads the disk geometry, and hands it the memory and the rings.

use std::path::Path;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::SharedMemory;
use crate::ring::RingLayout;

/// Bytes of `struct virtio_blk_config` read with GET_CONFIG: the fields up to and including
/// write-zeroes, which every vhost-user-blk backend in use serves.
const BLK_CONFIG_LEN: usize = 60;
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SIZE_MAX: usize = 8;
const CONFIG_BLK_SIZE: usize = 20;
const CONFIG_NUM_QUEUES: usize = 34;

/// Errors talking to the backend.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Connecting to the socket failed.
    #[error("connecting to vhost-user socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// What vhost reported.
        source: vhost::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {request} failed: {source}")]
    Request {
        /// The request that failed.
        request: &'static str,
        /// What vhost reported.
        source: vhost::Error,
    },
    /// The backend lacks a feature the job needs.
    #[error("the backend does not offer {0}")]
    MissingFeature(&'static str),
    /// The backend serves fewer queues than asked for.
    #[error("asked for {asked} queues but the backend serves {offered}")]
    TooFewQueues {
        /// `--queues`.
        asked: u16,
        /// What the backend reported.
        offered: u64,
    },
    /// The disk is read-only and the job writes.
    #[error("the backend exports the disk read-only but the job writes")]
    ReadOnly,
    /// The config space reply is shorter than asked for.
    #[error(
        "the backend returned {0} bytes of config space, fewer than the {BLK_CONFIG_LEN} asked for"
    )]
    ShortConfig(usize),
    /// The config space reported a zero capacity.
    #[error("the backend reports a disk of 0 sectors")]
    EmptyDisk,
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    /// A ring address is outside the shared memory.
    #[error("ring address {0:#x} is outside the shared memory")]
    RingOutsideMemory(u64),
    /// The shared memory could not be described.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

fn request(name: &'static str) -> impl FnOnce(vhost::Error) -> DeviceError {
    move |source| DeviceError::Request {
        request: name,
        source,
    }
}

/// What the job asks the device for.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRequest {
    /// Queues to set up.
    pub queues: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// The job writes to the disk.
    pub writes: bool,
}

/// What the backend told us about the disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size, when the backend reports one.
    pub block_size: Option<u32>,
    /// Most bytes one data descriptor may carry, when the backend reports it.
    pub size_max: Option<u32>,
    /// Virtio features acked.
    pub features: u64,
}

/// One queue's eventfds and ring addresses, as handed to the backend.
pub struct QueueSetup {
    /// Ring layout in guest memory.
    pub layout: RingLayout,
    /// The driver writes it to notify the backend of new requests.
    pub kick: EventFd,
    /// The backend writes it when it has completed requests.
    pub call: EventFd,
}

impl QueueSetup {
    /// Creates the eventfds for a ring.
    pub fn new(layout: RingLayout) -> Result<Self, DeviceError> {
        Ok(Self {
            layout,
            kick: EventFd::new(libc::EFD_CLOEXEC).map_err(DeviceError::EventFd)?,
            call: EventFd::new(libc::EFD_CLOEXEC).map_err(DeviceError::EventFd)?,
        })
    }
}

/// A negotiated connection to a vhost-user-blk backend.
pub struct BlkDevice {
    frontend: Frontend,
    info: DiskInfo,
    queues: u16,
}

impl BlkDevice {
    /// Connects and negotiates, as a VMM does when the device is created.
    pub fn connect(path: &Path, req: DeviceRequest) -> Result<Self, DeviceError> {
        let mut frontend = Frontend::connect(path, u64::from(req.queues)).map_err(|source| {
            DeviceError::Connect {
                path: path.display().to_string(),
                source,
            }
        })?;
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(request("GET_FEATURES"))?;
        let has = |bit: u32| offered & (1u64 << bit) != 0;
        if !has(VIRTIO_F_VERSION_1) {
            return Err(DeviceError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol_bit == 0 {
            return Err(DeviceError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | protocol_bit;
        if req.event_idx {
            if !has(VIRTIO_RING_F_EVENT_IDX) {
                return Err(DeviceError::MissingFeature("VIRTIO_RING_F_EVENT_IDX"));
            }
            features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if req.queues > 1 {
            if !has(VIRTIO_BLK_F_MQ) {
                return Err(DeviceError::MissingFeature("VIRTIO_BLK_F_MQ"));
            }
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if has(VIRTIO_BLK_F_SIZE_MAX) {
            features |= 1 << VIRTIO_BLK_F_SIZE_MAX;
        }
        if has(VIRTIO_BLK_F_BLK_SIZE) {
            features |= 1 << VIRTIO_BLK_F_BLK_SIZE;
        }
        if has(VIRTIO_BLK_F_RO) {
            if req.writes {
                return Err(DeviceError::ReadOnly);
            }
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        let protocol = frontend
            .get_protocol_features()
            .map_err(request("GET_PROTOCOL_FEATURES"))?;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(DeviceError::MissingFeature(
                "VHOST_USER_PROTOCOL_F_CONFIG (needed to read the capacity)",
            ));
        }
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        let acked = protocol & wanted;
        frontend
            .set_protocol_features(acked)
            .map_err(request("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request is acknowledged, so a backend that rejects one is reported
            // at that request rather than as a hang or a broken pipe later.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let offered_queues = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
            if offered_queues < u64::from(req.queues) {
                return Err(DeviceError::TooFewQueues {
                    asked: req.queues,
                    offered: offered_queues,
                });
            }
        } else if req.queues > 1 {
            return Err(DeviceError::MissingFeature("VHOST_USER_PROTOCOL_F_MQ"));
        }

        let (_, config) = frontend
            .get_config(
                0,
                BLK_CONFIG_LEN as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; BLK_CONFIG_LEN],
            )
            .map_err(request("GET_CONFIG"))?;
        if config.len() < BLK_CONFIG_LEN {
            return Err(DeviceError::ShortConfig(config.len()));
        }
        let capacity_sectors = u64::from_le_bytes(field(&config, CONFIG_CAPACITY));
        if capacity_sectors == 0 {
            return Err(DeviceError::EmptyDisk);
        }
        let size_max = (features & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0)
            .then(|| u32::from_le_bytes(field(&config, CONFIG_SIZE_MAX)));
        let block_size = (features & (1 << VIRTIO_BLK_F_BLK_SIZE) != 0)
            .then(|| u32::from_le_bytes(field(&config, CONFIG_BLK_SIZE)));
        if features & (1 << VIRTIO_BLK_F_MQ) != 0 {
            let num_queues = u16::from_le_bytes(field(&config, CONFIG_NUM_QUEUES));
            if num_queues < req.queues {
                return Err(DeviceError::TooFewQueues {
                    asked: req.queues,
                    offered: num_queues.into(),
                });
            }
        }
        frontend
            .set_features(features)
            .map_err(request("SET_FEATURES"))?;
        log::debug!(
            "features offered {offered:#x} acked {features:#x}, protocol {:#x} acked {:#x}, capacity {capacity_sectors} sectors",
            protocol.bits(),
            acked.bits()
        );
        Ok(Self {
            frontend,
            info: DiskInfo {
                capacity_sectors,
                block_size,
                size_max,
                features,
            },
            queues: req.queues,
        })
    }

    /// What the backend reported about the disk.
    pub fn info(&self) -> DiskInfo {
        self.info
    }

    /// Shares the memory and starts every queue: the same sequence a VMM sends when the
    /// guest driver sets DRIVER_OK.
    pub fn start(
        &mut self,
        shared: &SharedMemory,
        queues: &[QueueSetup],
    ) -> Result<(), DeviceError> {
        self.frontend
            .set_mem_table(&shared.regions()?)
            .map_err(request("SET_MEM_TABLE"))?;
        let host = |addr: vm_memory::GuestAddress| {
            shared
                .host_address(addr)
                .ok_or(DeviceError::RingOutsideMemory(addr.0))
        };
        for (index, queue) in queues.iter().enumerate() {
            let layout = queue.layout;
            self.frontend
                .set_vring_num(index, layout.size)
                .map_err(request("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_base(index, 0)
                .map_err(request("SET_VRING_BASE"))?;
            let config = VringConfigData {
                queue_max_size: layout.size,
                queue_size: layout.size,
                flags: 0,
                desc_table_addr: host(layout.desc_table)?,
                used_ring_addr: host(layout.used_ring)?,
                avail_ring_addr: host(layout.avail_ring)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(request("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_call(index, &queue.call)
                .map_err(request("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &queue.kick)
                .map_err(request("SET_VRING_KICK"))?;
            self.frontend
                .set_vring_enable(index, true)
                .map_err(request("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops every queue (GET_VRING_BASE), as a VMM does before it lets go of the memory.
    pub fn stop(&mut self) -> Result<(), DeviceError> {
        for index in 0..usize::from(self.queues) {
            self.frontend
                .get_vring_base(index)
                .map_err(request("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

/// The `N` bytes of a config-space field. Only called on a config buffer whose length was
/// checked against BLK_CONFIG_LEN, which covers every field read.
fn field<const N: usize>(config: &[u8], offset: usize) -> [u8; N] {
    let mut bytes = [0u8; N];
    bytes.copy_from_slice(&config[offset..offset + N]);
    bytes
}
