//! A virtio-blk device served by an external vhost-user backend process (`citadel-blk`, or
//! any vhost-user-blk backend), on the shared frontend of [`super::vhost_user`].
//!
//! What is block-specific: the feature allowlist, and the disk's configuration space, read
//! once at connection time and checked (a capacity that would overflow the guest's size
//! computations is refused, request limits no driver should act on drop their features).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;

use super::vhost_user::{DeviceSpec, VhostUserConnection, VhostUserError};
use super::virtio_mmio::{read_config_bytes, ActivateError, ActivateParams, VirtioDevice};

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

/// What a virtio-blk device asks of its backend.
const SPEC: DeviceSpec = DeviceSpec {
    name: "vhost-user-blk",
    allowed_features: GUEST_FEATURES,
    config_len: Some(BLK_CONFIG_LEN),
    queues: 1,
    queue_max_size: QUEUE_MAX_SIZE,
};

/// A virtio-blk device whose queue a vhost-user backend serves.
#[derive(Debug)]
pub struct VhostUserBlk {
    conn: VhostUserConnection,
    /// Features offered to the driver: the backend's, through [`GUEST_FEATURES`] and the
    /// configuration checks.
    features: u64,
    /// The configuration space as the backend reported it at connection time.
    config: Vec<u8>,
    queue_max_sizes: [u16; 1],
}

impl VhostUserBlk {
    /// Connects to the backend at `path` and reads the disk's configuration, waiting at most
    /// `timeout` for the backend at this step and every later start or stop.
    pub fn connect(path: &Path, timeout: Duration) -> Result<VhostUserBlk, VhostUserError> {
        Self::checked(VhostUserConnection::connect(path, SPEC, timeout)?)
    }

    /// As [`VhostUserBlk::connect`], over an already connected socket (a backend the
    /// launcher started); `peer` names the backend in logs and errors.
    pub fn from_stream(
        stream: UnixStream,
        peer: PathBuf,
        timeout: Duration,
    ) -> Result<VhostUserBlk, VhostUserError> {
        Self::checked(VhostUserConnection::from_stream(
            stream, peer, SPEC, timeout,
        )?)
    }

    fn checked(conn: VhostUserConnection) -> Result<VhostUserBlk, VhostUserError> {
        let (features, config) = check_config(conn.features(), conn.config().to_vec())
            .map_err(|why| conn.backend(why))?;
        let dev = VhostUserBlk {
            conn,
            features,
            config,
            queue_max_sizes: [QUEUE_MAX_SIZE],
        };
        log::info!(
            "vhost-user-blk {}: {} sectors, offered to the guest {features:#x}",
            dev.conn.peer().display(),
            dev.capacity()
        );
        Ok(dev)
    }

    /// Capacity of the disk in 512-byte sectors, as the backend reported it.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(field(&self.config, CONFIG_CAPACITY))
    }

    /// Gives the device guest RAM (see [`VhostUserConnection::set_memory`]).
    pub fn set_memory(&mut self, memory: &GuestMemoryMmap) -> Result<(), VhostUserError> {
        self.conn.set_memory(memory)
    }

    /// The backend's socket, watched for a hang-up (see [`VhostUserConnection::socket`]).
    pub fn socket(&self) -> std::os::fd::RawFd {
        self.conn.socket()
    }

    /// The connection to the backend, to start and stop its rings.
    pub fn connection(&mut self) -> &mut VhostUserConnection {
        &mut self.conn
    }

    /// Whether the disk can serve a hot-replace slot, whose driver negotiated the slot's
    /// features and limits before the disk existed: the backend must offer every one of
    /// them and accept requests as large as the slot allows.
    pub fn check_fits_slot(&self) -> Result<(), String> {
        fits_slot(self.features, &self.config)
    }
}

/// [`VhostUserBlk::check_fits_slot`] on the backend's offered `features` and `config`. The
/// request limits are features too: a backend that offers `size_max` or `seg_max` must take
/// at least the slot's, and one that offers neither sets no such limit (the virtio
/// specification bounds segments only through them), so the slot's own is within it.
fn fits_slot(features: u64, config: &[u8]) -> Result<(), String> {
    use super::blk_slot::{SLOT_BLK_SIZE, SLOT_FEATURES, SLOT_SEG_MAX, SLOT_SIZE_MAX};
    let limits = (1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX);
    let missing = SLOT_FEATURES & !limits & !features;
    if missing != 0 {
        return Err(format!(
            "the disk's backend lacks features the slot offers ({missing:#x})"
        ));
    }
    let u32_at = |offset| u32::from_le_bytes(field(config, offset));
    let offered = |bit: u32| features & (1 << bit) != 0;
    if offered(VIRTIO_BLK_F_SIZE_MAX) && u32_at(CONFIG_SIZE_MAX) < SLOT_SIZE_MAX {
        return Err(format!(
            "the disk's backend takes segments of at most {} bytes (size_max), the slot allows {SLOT_SIZE_MAX}",
            u32_at(CONFIG_SIZE_MAX)
        ));
    }
    if offered(VIRTIO_BLK_F_SEG_MAX) && u32_at(CONFIG_SEG_MAX) < SLOT_SEG_MAX {
        return Err(format!(
            "the disk's backend takes at most {} segments per request (seg_max), the slot allows {SLOT_SEG_MAX}",
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
        self.conn
            .start_at(&params, &[])
            .map_err(|e| ActivateError::Device(e.to_string()))
    }

    fn reset(&mut self) {
        self.conn.reset();
    }
}

/// Checks the configuration space the backend returned and drops the features whose fields
/// hold values no driver should act on. Returns the features and the configuration to offer.
fn check_config(mut features: u64, config: Vec<u8>) -> Result<(u64, Vec<u8>), String> {
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

/// The `N` bytes of a configuration field; zeros past the end of a short `config`.
fn field<const N: usize>(config: &[u8], offset: usize) -> [u8; N] {
    let mut bytes = [0u8; N];
    if let Some(src) = config.get(offset..offset + N) {
        bytes.copy_from_slice(src);
    }
    bytes
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
    }

    #[test]
    fn a_slot_takes_backends_whose_limits_are_at_least_its_own_or_absent() {
        use crate::devices::blk_slot::{SLOT_FEATURES, SLOT_SEG_MAX, SLOT_SIZE_MAX};
        let fits = |features, size_max, seg_max, blk_size| {
            fits_slot(features, &config(2048, size_max, seg_max, blk_size))
        };
        // citadel-blk with its default 256-entry ring.
        assert_eq!(fits(GUEST_FEATURES, 65536, 254, 512), Ok(()));
        // qemu-storage-daemon: size_max 0 (no limit: the feature is dropped), seg_max 126.
        let (qsd, config) = check_config(GUEST_FEATURES, config(2048, 0, 126, 512)).unwrap();
        assert_eq!(fits_slot(qsd, &config), Ok(()));
        assert_eq!(
            fits(SLOT_FEATURES, SLOT_SIZE_MAX, SLOT_SEG_MAX, 512),
            Ok(())
        );
        let no_limits =
            SLOT_FEATURES & !(1 << VIRTIO_BLK_F_SIZE_MAX) & !(1 << VIRTIO_BLK_F_SEG_MAX);
        assert_eq!(fits(no_limits, 0, 0, 512), Ok(()));
        // Each limit below the slot's is named.
        let e = fits(GUEST_FEATURES, 4096, 254, 512).unwrap_err();
        assert!(e.contains("(size_max)") && e.contains("4096"), "{e}");
        let e = fits(GUEST_FEATURES, 65536, SLOT_SEG_MAX - 1, 512).unwrap_err();
        assert!(e.contains("(seg_max)"), "{e}");
        let e = fits(GUEST_FEATURES, 65536, 254, 4096).unwrap_err();
        assert!(e.contains("logical block size is 4096"), "{e}");
        let e = fits(GUEST_FEATURES & !(1 << VIRTIO_BLK_F_FLUSH), 65536, 254, 512).unwrap_err();
        assert!(e.contains("lacks features"), "{e}");
    }

    #[test]
    fn backend_features_outside_the_allowlist_never_reach_the_guest() {
        // Multiqueue, writeback, packed rings, the protocol-features bit, an IOMMU.
        let foreign = (1u64 << 12) | (1 << 11) | (1 << 34) | (1 << 30) | (1 << 33);
        assert_eq!(foreign & GUEST_FEATURES, 0);
    }
}
