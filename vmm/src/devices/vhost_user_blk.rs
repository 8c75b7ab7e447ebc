//! A virtio-blk device served by an external vhost-user backend process (`citadel-blk`, or
//! any vhost-user-blk backend).
//!
//! The monitor only negotiates: it connects to the backend's socket at startup, reads the
//! disk's configuration space once, and, when the guest driver starts the device, hands the
//! backend the guest RAM memfd, the ring addresses, the queue notify eventfds (KVM
//! ioeventfds: a guest kick goes KVM → backend) and the slot's irqfd as the call fd (a
//! completion goes backend → KVM → guest). No guest I/O passes through the monitor.
//!
//! Interrupt status: the backend signals the irqfd directly, so the transport never learns of
//! a completion. Instead of relaying every completion through the monitor (a poll of the call
//! eventfd, a status update and an irqfd write: a wakeup and two syscalls in the monitor per
//! interrupt), the transport reports VRING in InterruptStatus for as long as the device runs
//! (see [`Interrupt::set_vring_signalled_externally`]); each slot has an edge-triggered line
//! of its own, so the only cost is a used-ring check by the driver on a configuration
//! interrupt. A resample irqfd would need a level-triggered line and a monitor thread to
//! handle the resample.
//!
//! The backend is a peer, not a part of the monitor: every reply is checked (feature bits
//! against an allowlist, the configuration size and values) and every request is bounded by
//! a deadline (see [`super::deadline`]), so a stuck backend fails the device instead of
//! blocking the thread that talks to it forever: the event loop when the device starts (the
//! device manager defers starts there), the vCPU that resets it, the main thread at startup. A backend that fails a request is not used again: its connection is
//! in an unknown state, and the driver sees DEVICE_NEEDS_RESET.
//!
//! [`Interrupt::set_vring_signalled_externally`]: super::virtio_mmio::Interrupt::set_vring_signalled_externally

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::deadline::Deadline;
use super::virtio_mmio::{read_config_bytes, ActivateError, ActivateParams, VirtioDevice};

/// How long the requests of one step (connection, start, stop) may wait for the backend in
/// all.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// QueueNumMax offered to the driver: the default of citadel-blk's `--queue-size`. A backend
/// accepting less refuses SET_VRING_NUM for larger rings, which fails the activation.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Bytes of `struct virtio_blk_config` read from the backend: every field up to and
/// including the write-zeroes limits.
const BLK_CONFIG_LEN: usize = 60;
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SIZE_MAX: usize = 8;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;

/// Device features passed on to the driver when the backend offers them. Everything else the
/// backend offers is dropped: features the monitor would have to take part in (multiqueue,
/// which needs a queue count it does not track; the writeback toggle, a config write it does
/// not forward; packed rings, which the transport's ring checks do not cover), transport
/// features for an IOMMU it does not have, and bits nobody defined yet.
const GUEST_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);

/// Why a vhost-user-blk device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// The socket could not be reached.
    #[error("vhost-user socket {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// What connect() or setsockopt() said.
        source: std::io::Error,
    },
    /// A request failed.
    #[error("vhost-user backend at {path}: {request} failed: {source}")]
    Request {
        /// The socket.
        path: String,
        /// The request.
        request: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// The deadline on the backend's answers could not be armed.
    #[error("vhost-user backend at {path}: cannot arm the reply deadline: {source}")]
    Deadline {
        /// The socket.
        path: String,
        /// What timer_create() or timer_settime() said.
        source: std::io::Error,
    },
    /// The backend's answers are unusable.
    #[error("vhost-user backend at {path}: {why}")]
    Backend {
        /// The socket.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// A virtio-blk device whose queues a vhost-user backend serves.
pub struct VhostUserBlk {
    path: PathBuf,
    frontend: Frontend,
    /// The connected socket, owned by `frontend`: what a deadline shuts down.
    socket: RawFd,
    timeout: Duration,
    /// Features offered to the driver: the backend's, through [`GUEST_FEATURES`].
    features: u64,
    /// The configuration space as the backend reported it at connection time.
    config: Vec<u8>,
    queue_max_sizes: [u16; 1],
    /// Guest RAM as the monitor maps it: ring addresses are given to the backend in the
    /// monitor's address space.
    memory: Option<GuestMemoryMmap>,
    /// Queues handed to the backend by the last activation.
    started: Vec<usize>,
    /// A request failed: the connection is in an unknown state and is not used again.
    broken: bool,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .field("started", &self.started)
            .field("broken", &self.broken)
            .finish()
    }
}

impl VhostUserBlk {
    /// Connects to the backend at `path` and negotiates what does not depend on the guest:
    /// ownership, features, protocol features and the disk's configuration. This step, and
    /// every later start or stop of the device, waits at most `timeout` for the backend
    /// (the deadline signal handler must be registered, see
    /// [`super::deadline::register_handler`]).
    pub fn connect(path: &Path, timeout: Duration) -> Result<VhostUserBlk, VhostUserBlkError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserBlkError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_stream(stream, path.to_path_buf(), timeout)
    }

    /// Negotiates as [`VhostUserBlk::connect`] does over an already connected socket (a
    /// backend the launcher started); `peer` names the backend in logs and errors.
    pub fn from_stream(
        stream: UnixStream,
        peer: PathBuf,
        timeout: Duration,
    ) -> Result<VhostUserBlk, VhostUserBlkError> {
        let socket = stream.as_raw_fd();
        let mut dev = VhostUserBlk {
            path: peer,
            frontend: Frontend::from_stream(stream, 1),
            socket,
            timeout,
            features: 0,
            config: Vec::new(),
            queue_max_sizes: [QUEUE_MAX_SIZE],
            memory: None,
            started: Vec::new(),
            broken: false,
        };
        let deadline = dev.deadline()?;
        dev.negotiate()?;
        drop(deadline);
        Ok(dev)
    }

    fn deadline(&self) -> Result<Deadline, VhostUserBlkError> {
        Deadline::arm(self.socket, self.timeout).map_err(|source| VhostUserBlkError::Deadline {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn negotiate(&mut self) -> Result<(), VhostUserBlkError> {
        self.frontend
            .set_owner()
            .map_err(self.request("SET_OWNER"))?;
        let offered = self
            .frontend
            .get_features()
            .map_err(self.request("GET_FEATURES"))?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(self.backend("it does not offer VIRTIO_F_VERSION_1"));
        }
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(self.backend(
                "it does not offer protocol features (needed to read the disk configuration)",
            ));
        }
        // Acked now so that the protocol features can be negotiated; the virtio features are
        // set again when the driver has chosen.
        self.frontend
            .set_features(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(self.request("SET_FEATURES"))?;
        let protocol = self
            .frontend
            .get_protocol_features()
            .map_err(self.request("GET_PROTOCOL_FEATURES"))?;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(self.backend(
                "it does not offer VHOST_USER_PROTOCOL_F_CONFIG (needed to read the disk configuration)",
            ));
        }
        let acked =
            protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
        self.frontend
            .set_protocol_features(acked)
            .map_err(self.request("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // A request the backend refuses is then reported at that request, not as a hang
            // or a broken pipe later.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let (_, config) = self
            .frontend
            .get_config(
                0,
                BLK_CONFIG_LEN as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; BLK_CONFIG_LEN],
            )
            .map_err(self.request("GET_CONFIG"))?;
        let (features, config) =
            check_config(offered & GUEST_FEATURES, config).map_err(|why| self.backend(why))?;
        self.features = features;
        self.config = config;
        log::info!(
            "vhost-user-blk {}: {} sectors, backend features {offered:#x}, offered to the guest {features:#x}",
            self.path.display(),
            self.capacity()
        );
        Ok(())
    }

    /// Capacity of the disk in 512-byte sectors, as the backend reported it.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(field(&self.config, CONFIG_CAPACITY))
    }

    /// Gives the device guest RAM, which it shares with the backend (by its memfd) when the
    /// driver starts the device. Every region must be file-backed.
    pub fn set_memory(&mut self, memory: &GuestMemoryMmap) -> Result<(), VhostUserBlkError> {
        memory_regions(memory).map_err(|e| self.backend(format!("guest RAM: {e}")))?;
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn request(&self, request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserBlkError {
        let path = self.path.display().to_string();
        move |source| VhostUserBlkError::Request {
            path,
            request,
            source,
        }
    }

    fn backend(&self, why: impl Into<String>) -> VhostUserBlkError {
        VhostUserBlkError::Backend {
            path: self.path.display().to_string(),
            why: why.into(),
        }
    }

    /// Whether the disk can serve a hot-replace slot, whose driver negotiated the slot's
    /// features and limits before the disk existed: the backend must offer every one of
    /// them and accept requests as large as the slot allows.
    pub fn check_fits_slot(&self) -> Result<(), String> {
        use super::blk_slot::{SLOT_BLK_SIZE, SLOT_FEATURES, SLOT_SEG_MAX, SLOT_SIZE_MAX};
        let missing = SLOT_FEATURES & !self.features;
        if missing != 0 {
            return Err(format!(
                "the disk's backend lacks features the slot offers ({missing:#x})"
            ));
        }
        let u32_at = |offset| u32::from_le_bytes(field(&self.config, offset));
        if u32_at(CONFIG_SIZE_MAX) < SLOT_SIZE_MAX || u32_at(CONFIG_SEG_MAX) < SLOT_SEG_MAX {
            return Err(format!(
                "the disk's backend takes smaller requests (size_max {}, seg_max {}) than the slot allows ({SLOT_SIZE_MAX}, {SLOT_SEG_MAX})",
                u32_at(CONFIG_SIZE_MAX),
                u32_at(CONFIG_SEG_MAX)
            ));
        }
        if u32_at(CONFIG_BLK_SIZE) != SLOT_BLK_SIZE {
            return Err(format!(
                "the disk's logical block size is {}, the slot's {SLOT_BLK_SIZE}",
                u32_at(CONFIG_BLK_SIZE)
            ));
        }
        Ok(())
    }

    /// Starts the backend on the rings of `params`, each queue at the next available index
    /// given in `bases` (0 for a ring the driver just set up), within the deadline. A failure
    /// leaves the connection unusable.
    pub fn start_at(
        &mut self,
        params: &ActivateParams,
        bases: &[u16],
    ) -> Result<(), VhostUserBlkError> {
        if self.broken {
            return Err(self.backend("it failed earlier and is not used again"));
        }
        let result = self
            .deadline()
            .and_then(|_deadline| self.start(params, bases));
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Stops the backend's rings within the deadline and returns, per queue index, where each
    /// stopped: the next available index the backend would have read.
    pub fn stop_rings(&mut self) -> Result<Vec<(usize, u16)>, VhostUserBlkError> {
        if self.broken {
            return Err(self.backend("it failed earlier and is not used again"));
        }
        let result = self.deadline().and_then(|_deadline| self.stop());
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn start(&mut self, params: &ActivateParams, bases: &[u16]) -> Result<(), VhostUserBlkError> {
        let memory = self
            .memory
            .as_ref()
            .ok_or_else(|| self.backend("the device has no guest memory"))?;
        let regions = memory_regions(memory).map_err(|e| self.backend(e.to_string()))?;
        let host = |addr: u64, len: u64| {
            host_address(memory, addr, len)
                .ok_or_else(|| self.backend(format!("ring at {addr:#x} is not in guest RAM")))
        };
        let mut rings = Vec::new();
        for (index, queue) in params.queues.iter().enumerate() {
            if !queue.ready {
                continue;
            }
            let n = u64::from(queue.size);
            rings.push((
                index,
                VringConfigData {
                    queue_max_size: QUEUE_MAX_SIZE,
                    queue_size: queue.size,
                    flags: 0,
                    desc_table_addr: host(queue.desc, 16 * n)?,
                    used_ring_addr: host(queue.used, 6 + 8 * n)?,
                    avail_ring_addr: host(queue.avail, 6 + 2 * n)?,
                    log_addr: None,
                },
            ));
        }
        // The protocol-features bit stays acked: without it the backend would forget the
        // protocol features negotiated at connection time.
        let features = params.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(self.request("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.request("SET_MEM_TABLE"))?;
        let irqfd = params.interrupt.irqfd();
        // The transport reports VRING from the first kick on: completions come straight from
        // the backend through the irqfd.
        params.interrupt.set_vring_signalled_externally(true);
        for (index, ring) in rings {
            let kick = params
                .notify
                .get(index)
                .ok_or_else(|| self.backend(format!("queue {index} has no notify eventfd")))?;
            self.started.push(index);
            self.frontend
                .set_vring_num(index, ring.queue_size)
                .map_err(self.request("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &ring)
                .map_err(self.request("SET_VRING_ADDR"))?;
            let base = bases.get(index).copied().unwrap_or(0);
            self.frontend
                .set_vring_base(index, base)
                .map_err(self.request("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, irqfd)
                .map_err(self.request("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(self.request("SET_VRING_KICK"))?;
            self.frontend
                .set_vring_enable(index, true)
                .map_err(self.request("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<Vec<(usize, u16)>, VhostUserBlkError> {
        let mut bases = Vec::new();
        for index in std::mem::take(&mut self.started) {
            self.frontend
                .set_vring_enable(index, false)
                .map_err(self.request("SET_VRING_ENABLE"))?;
            // Returns once the backend stopped the ring: no access to guest memory after it.
            let base = self
                .frontend
                .get_vring_base(index)
                .map_err(self.request("GET_VRING_BASE"))?;
            // A ring index is 16 bits wide; a backend saying more is not believed.
            let base = u16::try_from(base)
                .map_err(|_| self.backend(format!("GET_VRING_BASE returned {base}")))?;
            bases.push((index, base));
        }
        Ok(bases)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The only writable virtio-blk field (writeback) is not offered.
        log::debug!(
            "vhost-user-blk: {}-byte configuration write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        if self.broken {
            return Err(ActivateError::Device(format!(
                "vhost-user backend at {} failed earlier and is not used again",
                self.path.display()
            )));
        }
        self.start_at(&params, &[])
            .map_err(|e| ActivateError::Device(e.to_string()))
    }

    fn reset(&mut self) {
        if self.broken {
            self.started.clear();
            return;
        }
        if let Err(e) = self.stop_rings() {
            log::warn!("vhost-user-blk: stopping the backend's rings: {e}");
        }
    }
}

/// Checks the configuration space the backend returned and drops the features whose fields
/// hold values no driver should act on. Returns the features and the configuration to offer.
fn check_config(mut features: u64, config: Vec<u8>) -> Result<(u64, Vec<u8>), String> {
    if config.len() != BLK_CONFIG_LEN {
        return Err(format!(
            "GET_CONFIG returned {} bytes instead of {BLK_CONFIG_LEN}",
            config.len()
        ));
    }
    let capacity = u64::from_le_bytes(field(&config, CONFIG_CAPACITY));
    if capacity == 0 {
        return Err("it reports a disk of 0 sectors".into());
    }
    // Capacity in bytes must fit in 64 bits, or the guest's size computations wrap.
    if capacity > u64::MAX >> 9 {
        return Err(format!(
            "it reports an impossible capacity of {capacity} sectors"
        ));
    }
    let u32_at = |offset| u32::from_le_bytes(field(&config, offset));
    let mut drop = |bit: u32, ok: bool, what: &str| {
        if features & (1 << bit) != 0 && !ok {
            log::warn!(
                "vhost-user-blk: backend reports an invalid {what}; not offered to the guest"
            );
            features &= !(1 << bit);
        }
    };
    drop(
        VIRTIO_BLK_F_SIZE_MAX,
        u32_at(CONFIG_SIZE_MAX) >= 512,
        "size_max",
    );
    drop(VIRTIO_BLK_F_SEG_MAX, u32_at(CONFIG_SEG_MAX) != 0, "seg_max");
    let blk_size = u32_at(CONFIG_BLK_SIZE);
    drop(
        VIRTIO_BLK_F_BLK_SIZE,
        blk_size.is_power_of_two() && (512..=65536).contains(&blk_size),
        "block size",
    );
    Ok((features, config))
}

/// The `N` bytes of a configuration field; `config` is [`BLK_CONFIG_LEN`] bytes long, which
/// covers every field read.
fn field<const N: usize>(config: &[u8], offset: usize) -> [u8; N] {
    let mut bytes = [0u8; N];
    if let Some(src) = config.get(offset..offset + N) {
        bytes.copy_from_slice(src);
    }
    bytes
}

/// The SET_MEM_TABLE description of guest RAM: one entry per region, each with the memfd.
fn memory_regions(
    memory: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, vhost::Error> {
    memory
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect()
}

/// The monitor's address of the `len` guest bytes at `addr`, which must lie in one region.
fn host_address(memory: &GuestMemoryMmap, addr: u64, len: u64) -> Option<u64> {
    let region = memory.find_region(GuestAddress(addr))?;
    let offset = addr.checked_sub(region.start_addr().0)?;
    (offset.checked_add(len)? <= region.len()).then(|| region.as_ptr() as u64 + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(capacity: u64, size_max: u32, seg_max: u32, blk_size: u32) -> Vec<u8> {
        let mut c = vec![0u8; BLK_CONFIG_LEN];
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[8..12].copy_from_slice(&size_max.to_le_bytes());
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&blk_size.to_le_bytes());
        c
    }

    #[test]
    fn sane_configuration_keeps_every_feature() {
        let (features, c) = check_config(GUEST_FEATURES, config(2048, 65536, 126, 512)).unwrap();
        assert_eq!(features, GUEST_FEATURES);
        assert_eq!(field::<8>(&c, 0), 2048u64.to_le_bytes());
    }

    #[test]
    fn invalid_fields_drop_their_features_and_bad_sizes_are_refused() {
        let (features, _) = check_config(GUEST_FEATURES, config(8, 0, 0, 1000)).unwrap();
        for bit in [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ] {
            assert_eq!(features & (1 << bit), 0, "feature {bit} kept");
        }
        assert_eq!(
            features & (1 << VIRTIO_BLK_F_FLUSH),
            1 << VIRTIO_BLK_F_FLUSH
        );
        assert!(check_config(GUEST_FEATURES, config(0, 0, 0, 0))
            .unwrap_err()
            .contains("0 sectors"));
        assert!(check_config(GUEST_FEATURES, config(u64::MAX, 0, 0, 0))
            .unwrap_err()
            .contains("impossible capacity"));
        assert!(check_config(GUEST_FEATURES, vec![0; 8])
            .unwrap_err()
            .contains("8 bytes"));
    }

    #[test]
    fn backend_features_outside_the_allowlist_never_reach_the_guest() {
        // Multiqueue, writeback, packed rings, the protocol-features bit, an IOMMU.
        let foreign = (1u64 << 12) | (1 << 11) | (1 << 34) | (1 << 30) | (1 << 33);
        assert_eq!(foreign & GUEST_FEATURES, 0);
    }

    #[test]
    fn ring_addresses_must_lie_inside_one_ram_region() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap();
        let base = memory.find_region(GuestAddress(0)).unwrap().as_ptr() as u64;
        assert_eq!(host_address(&memory, 0x1000, 0x100), Some(base + 0x1000));
        assert_eq!(host_address(&memory, 0xff00, 0x100), Some(base + 0xff00));
        assert_eq!(host_address(&memory, 0xff00, 0x101), None);
        assert_eq!(host_address(&memory, 0x18000, 1), None);
        assert_eq!(host_address(&memory, u64::MAX, 2), None);
    }

    #[test]
    fn a_refusing_socket_is_one_readable_error() {
        let err =
            VhostUserBlk::connect(Path::new("/nonexistent/blk.sock"), BACKEND_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vhost-user socket /nonexistent/blk.sock: No such file or directory (os error 2)"
        );
    }
}
