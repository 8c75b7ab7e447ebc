//! A hot-replace disk slot of the lightweight machine: a virtio-blk device that exists from
//! boot, empty (capacity 0) until a disk served by a vhost-user backend is plugged into it.
//!
//! The guest's driver binds to the slot at boot and stays bound. Plugging hands the backend
//! the rings the driver already set up, starting where the slot left them, and raises a
//! configuration change: Linux reads the new capacity (`[vdb] new size: …`). Unplugging stops
//! the backend's rings, takes them back and raises another change to capacity 0.
//!
//! Everything the driver reads at probe time is the slot's own and never changes: the
//! features and the request limits (`size_max`, `seg_max`, `blk_size`). A disk plugs only
//! into a slot whose limits its backend can honour (see
//! [`VhostUserBlk::check_fits_slot`]). A read-only disk keeps the slot's features (the driver
//! negotiated them once); its backend fails the guest's writes.
//!
//! While empty and started, the slot answers the requests on its ring itself, each with
//! VIRTIO_BLK_S_IOERR: a driver reading an empty disk's serial number (udev does for every
//! virtio disk) gets an error instead of waiting forever. Those kicks reach the event loop
//! through [`SlotKicks`] (under the slot's index); while a backend serves the ring they go to the backend only.
//!
//! A backend that dies is replaced without the driver noticing ([`BlkSlot::replace_backend`]):
//! the new one inherits the inflight area, takes the ring from the used index in guest memory
//! (its inflight record moves it back to the request the dead one had in hand, if any), and
//! gets a kick and an interrupt for whatever happened while nobody served the ring. When no
//! backend can replace it ([`BlkSlot::fail_backend`]), the disk stays in the slot for
//! `device_del` to take out, the slot answers every request with an I/O error from the used
//! index on, and the caller tells the driver the device needs a reset.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend_hangups::Replaceable;
use super::slot_ring::{
    answer_chains, empty_ring, restart_index, start_index, used_index, KickWatch, SlotKicks,
};
use super::vhost_user_blk::{VhostUserBlk, QUEUE_MAX_SIZE};
use super::virtio_mmio::{read_config_bytes, ActivateError, ActivateParams, VirtioDevice};

/// Features every slot offers: what citadel-blk always offers, minus what would need the
/// configuration to change after probe.
pub const SLOT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH);

/// Most data bytes in one descriptor (`size_max`): citadel-blk's bound.
pub const SLOT_SIZE_MAX: u32 = 64 << 10;
/// Most data descriptors in one request (`seg_max`): what both citadel-blk (254 for a
/// 256-entry ring) and qemu-storage-daemon (126, whatever the ring size) take, so that either
/// can serve a slot. A Linux guest still sends requests of up to 504 KiB with 4 KiB pages.
pub const SLOT_SEG_MAX: u32 = 126;
/// Logical block size (`blk_size`).
pub const SLOT_BLK_SIZE: u32 = 512;

/// Bytes of the slot's configuration space: up to and including `blk_size`'s neighbours.
const CONFIG_LEN: usize = 36;
/// Bytes of a card's configuration space: all of virtio-blk's, discard and write-zeroes
/// limits included.
const CARD_CONFIG_LEN: usize = 60;

const S_IOERR: u8 = 1;

/// Why a backend could not be stopped for a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// It stopped with requests in hand and serves the ring again.
    #[error("{0}")]
    Busy(String),
    /// It could not be stopped or started again: the device has lost its backend.
    #[error("{0}")]
    Failed(String),
}

/// A disk ready to be plugged: a connected vhost-user-blk frontend and the names QMP knows
/// it by.
#[derive(Debug)]
pub struct PluggedDisk {
    /// The `device_add` id.
    pub device_id: String,
    /// The `blockdev-add` node name.
    pub node_name: String,
    /// The frontend.
    pub disk: VhostUserBlk,
}

/// What the driver started.
struct Running {
    params: ActivateParams,
    /// The ring, while the slot answers it itself.
    empty: Option<Queue>,
}

/// A hot-replace virtio-blk slot.
pub struct BlkSlot {
    index: u64,
    /// What logs and errors call it: "disk slot N", or "disk card in PORT".
    name: String,
    memory: GuestMemoryMmap,
    /// What the driver reads: the slot's own, or a card's disk's.
    config: Vec<u8>,
    /// What the driver is offered: [`SLOT_FEATURES`], or a card's disk's.
    features: u64,
    /// A PCI disk card's device rather than a hot-replace slot: see [`BlkSlot::card`].
    card: bool,
    queue_max_sizes: [u16; 1],
    disk: Option<PluggedDisk>,
    running: Option<Running>,
    /// The queue's kicks while the slot answers the ring itself.
    watched: KickWatch,
    /// The plugged disk lost its backend and none could replace it: the slot answers the
    /// ring itself until the disk is unplugged.
    failed: bool,
    /// The backend is stopped for a snapshot (see [`BlkSlot::quiesce`]).
    quiesced: bool,
}

/// Why a disk could not be plugged or unplugged. The disk comes back when it is still usable.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct SlotError {
    /// What went wrong, one line.
    pub why: String,
    /// The disk that was to be plugged, when the slot did not take it.
    pub disk: Option<Box<PluggedDisk>>,
}

impl BlkSlot {
    /// An empty slot, number `index`, whose driver rings live in `memory`.
    pub fn new(index: u64, memory: GuestMemoryMmap, kicks: Arc<SlotKicks>) -> Self {
        let mut config = vec![0u8; CONFIG_LEN];
        config[8..12].copy_from_slice(&SLOT_SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SLOT_SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&SLOT_BLK_SIZE.to_le_bytes());
        BlkSlot {
            index,
            name: format!("disk slot {index}"),
            memory,
            config,
            features: SLOT_FEATURES,
            card: false,
            queue_max_sizes: [QUEUE_MAX_SIZE],
            disk: None,
            running: None,
            watched: KickWatch::new(kicks, index),
            failed: false,
            quiesced: false,
        }
    }

    /// The device of a PCI disk card (q35) in root port `bus`, number `index`, holding
    /// `plugged` from the start until the card leaves: no slot existed before the disk, so the
    /// driver is offered the disk's own features and limits, and its kicks, while the card
    /// answers the ring itself (a failed backend), are reported under `token`. A backend that
    /// dies is replaced as in a slot, by one that offers exactly the same.
    pub fn card(
        bus: &str,
        index: u64,
        memory: GuestMemoryMmap,
        kicks: Arc<SlotKicks>,
        token: u64,
        plugged: PluggedDisk,
    ) -> Result<Self, SlotError> {
        let mut config = vec![0u8; CARD_CONFIG_LEN];
        plugged.disk.read_config(0, &mut config);
        let mut card = BlkSlot {
            index,
            name: format!("disk card in {bus}"),
            memory,
            config,
            features: plugged.disk.features(),
            card: true,
            queue_max_sizes: [QUEUE_MAX_SIZE],
            disk: None,
            running: None,
            watched: KickWatch::new(kicks, token),
            failed: false,
            quiesced: false,
        };
        card.plug(plugged)?;
        Ok(card)
    }

    /// Whether `disk` can serve this device: a slot's limits, or a card's original disk's
    /// features and configuration.
    fn check_fits(&self, disk: &VhostUserBlk) -> Result<(), String> {
        if !self.card {
            return disk.check_fits_slot();
        }
        let mut config = vec![0u8; self.config.len()];
        disk.read_config(0, &mut config);
        if disk.features() != self.features || config != self.config {
            return Err(format!(
                "the new backend offers other features or limits than the disk's first ({:#x}, {:#x})",
                disk.features(),
                self.features
            ));
        }
        Ok(())
    }

    /// The plugged disk, if any.
    pub fn disk(&self) -> Option<&PluggedDisk> {
        self.disk.as_ref()
    }

    /// Puts `plugged` behind the slot. If the driver has started the slot, the backend takes
    /// the ring over where the slot left it. The caller raises the configuration change.
    pub fn plug(&mut self, mut plugged: PluggedDisk) -> Result<(), SlotError> {
        let refuse = |why: String, plugged| SlotError {
            why,
            disk: Some(Box::new(plugged)),
        };
        if self.disk.is_some() {
            return Err(refuse(
                format!("The slot {} is occupied already.", self.index),
                plugged,
            ));
        }
        if let Err(why) = self.check_fits(&plugged.disk) {
            return Err(refuse(why, plugged));
        }
        if let Err(e) = plugged.disk.set_memory(&self.memory) {
            return Err(refuse(e.to_string(), plugged));
        }
        let capacity = plugged.disk.capacity();
        if let Some(running) = self.running.as_mut() {
            if let Some(queue) = running.empty.as_ref() {
                let base = queue.next_avail();
                // From here on kicks belong to the backend; one written meanwhile stays in
                // the eventfd and the backend sees it as soon as it polls.
                self.watched.unwatch();
                if let Err(e) = plugged.disk.connection().start_at(&running.params, &[base]) {
                    // The slot answers the ring again, and raises its own interrupts.
                    running
                        .params
                        .interrupt
                        .set_vring_signalled_externally(false);
                    if let Some(fd) = running.params.notify.first() {
                        self.watched.watch(fd);
                    }
                    // The connection is unusable after a failed start: the disk is not
                    // given back.
                    return Err(SlotError {
                        why: format!("starting the disk's backend: {e}"),
                        disk: None,
                    });
                }
                running.empty = None;
            }
        }
        self.config[..8].copy_from_slice(&capacity.to_le_bytes());
        log::info!(
            "{}: {} ({}) plugged, {capacity} sectors",
            self.name,
            plugged.device_id,
            plugged.node_name
        );
        self.disk = Some(plugged);
        Ok(())
    }

    /// Takes the disk out, stopping its backend's rings first; the slot answers the ring
    /// itself from where the backend stopped. The caller raises the configuration change.
    pub fn unplug(&mut self) -> Option<PluggedDisk> {
        let mut plugged = self.disk.take()?;
        self.config[..8].fill(0);
        let served = !self.failed && self.running.as_ref().is_some_and(|r| r.empty.is_none());
        if served {
            // A backend that cannot say where it stopped is killed right after; the slot
            // then answers everything it did not complete, from the used index on, so that
            // no request of the driver waits forever.
            let base = match plugged.disk.connection().stop_rings() {
                Ok(bases) => bases.first().map(|b| b.1),
                Err(e) => {
                    log::warn!("{}: stopping {}'s rings: {e}", self.name, plugged.device_id);
                    None
                }
            };
            self.hold_ring(base);
        }
        self.failed = false;
        log::info!(
            "{}: {} ({}) unplugged",
            self.name,
            plugged.device_id,
            plugged.node_name
        );
        Some(plugged)
    }

    /// Puts `disk`, a fresh backend for the plugged disk's image, in place of the plugged
    /// disk's backend, which died. If the driver has started the slot, the new backend takes
    /// the ring from the used index with the old one's inflight area; then the queue gets a
    /// kick (requests the driver queued meanwhile) and the driver an interrupt (a completion
    /// the old backend published but did not signal). On a refusal `disk` is dropped and the
    /// old backend stays in place.
    pub fn replace_backend(&mut self, mut disk: VhostUserBlk) -> Result<(), String> {
        if self.disk.is_none() {
            return Err(format!("{} is empty", self.name));
        }
        if self.failed {
            return Err(format!("{}: its disk has failed already", self.name));
        }
        self.check_fits(&disk)?;
        let Some(plugged) = self.disk.as_mut() else {
            return Err(format!("{} is empty", self.name));
        };
        let capacity = u64::from_le_bytes(self.config[..8].try_into().unwrap_or_default());
        if disk.capacity() != capacity {
            return Err(format!(
                "the new backend reports {} sectors, the disk had {capacity}",
                disk.capacity()
            ));
        }
        disk.set_memory(&self.memory).map_err(|e| e.to_string())?;
        let running = self.running.as_ref().filter(|r| r.empty.is_none());
        let base = match running {
            Some(running) => Some(
                used_index(&self.memory, &running.params, 0)
                    .ok_or_else(|| "the ring does not lie in guest RAM".to_string())?,
            ),
            None => None,
        };
        disk.connection()
            .inherit_inflight(plugged.disk.connection());
        let result = match running.zip(base) {
            Some((running, base)) => {
                let started = disk
                    .connection()
                    .start_at(&running.params, &[base])
                    .map_err(|e| e.to_string());
                if started.is_ok() {
                    if let Some(kick) = running.params.notify.first() {
                        let _ = kick.write(1);
                    }
                    if let Err(e) = running.params.interrupt.signal_used_queue(0) {
                        log::warn!("{}: raising its interrupt: {e}", self.name);
                    }
                }
                started
            }
            None => Ok(()),
        };
        if let Err(why) = result {
            // The area goes back with the old backend for the next attempt.
            plugged
                .disk
                .connection()
                .inherit_inflight(disk.connection());
            return Err(why);
        }
        plugged.disk = disk;
        Ok(())
    }

    /// Gives up on the plugged disk's backend: the slot answers every request not completed,
    /// from the used index on, with an I/O error, until the disk is unplugged. The caller
    /// tells the driver the device needs a reset.
    pub fn fail_backend(&mut self) {
        if self.disk.is_none() || self.failed {
            return;
        }
        self.failed = true;
        self.hold_ring(None);
    }

    /// Takes the ring back from a backend that stopped at `base` (the used index when it
    /// could not say, or named a point outside the outstanding requests): the slot answers
    /// the driver's requests from then on.
    fn hold_ring(&mut self, base: Option<u16>) {
        let mut notify = None;
        if let Some(running) = self.running.as_mut() {
            if running.empty.is_none() {
                running.empty =
                    empty_ring(&self.memory, &running.params, 0, QUEUE_MAX_SIZE, Some(base));
                running
                    .params
                    .interrupt
                    .set_vring_signalled_externally(false);
                notify = running
                    .params
                    .notify
                    .first()
                    .and_then(|fd| fd.try_clone().ok());
            }
        }
        if let Some(fd) = notify {
            self.watched.watch(&fd);
            // Kicks that came while the backend stopped.
            let _ = fd.write(1);
        }
    }

    /// Stops the plugged disk's backend for a snapshot of the paused machine. Once stopped,
    /// a backend that completed every request it took (it stopped at the used index) leaves
    /// the whole state of the ring in guest memory, and a slot restored from that memory
    /// resumes at the used index. One that stopped with requests in hand is started again
    /// and the snapshot refused ([`QuiesceError::Busy`]); one that cannot be stopped or
    /// started again has lost its backend ([`QuiesceError::Failed`]: the caller gives up on
    /// it). Nothing to do for an empty, failed or not yet started slot.
    pub fn quiesce(&mut self) -> Result<(), QuiesceError> {
        let Some(running) = self.running.as_ref().filter(|r| r.empty.is_none()) else {
            return Ok(());
        };
        let Some(plugged) = self.disk.as_mut().filter(|_| !self.failed) else {
            return Ok(());
        };
        let stopped =
            plugged.disk.connection().stop_rings().map_err(|e| {
                QuiesceError::Failed(format!("stopping {}: {e}", plugged.device_id))
            })?;
        let used = used_index(&self.memory, &running.params, 0);
        let base = stopped.first().map(|b| b.1);
        if base.is_some() && base == used {
            self.quiesced = true;
            return Ok(());
        }
        let why = format!(
            "disk {} stopped at {base:?} with requests in flight (used index {used:?})",
            plugged.device_id
        );
        let restart = restart_index(&self.memory, &running.params, 0, base)
            .ok_or_else(|| QuiesceError::Failed(format!("{why}; its ring left guest RAM")))?;
        plugged
            .disk
            .connection()
            .start_at(&running.params, &[restart])
            .map_err(|e| QuiesceError::Failed(format!("{why}; starting it again: {e}")))?;
        Err(QuiesceError::Busy(why))
    }

    /// Starts the backend [`BlkSlot::quiesce`] stopped again where it stopped, with a kick
    /// for anything queued meanwhile. `Err` when it cannot be started: the caller gives up
    /// on it.
    pub fn unquiesce(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.quiesced) {
            return Ok(());
        }
        let (Some(running), Some(plugged)) = (self.running.as_ref(), self.disk.as_mut()) else {
            return Ok(());
        };
        let base = used_index(&self.memory, &running.params, 0)
            .ok_or_else(|| "the ring does not lie in guest RAM".to_string())?;
        plugged
            .disk
            .connection()
            .start_at(&running.params, &[base])
            .map_err(|e| format!("starting {} again: {e}", plugged.device_id))?;
        if let Some(kick) = running.params.notify.first() {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// Answers what the driver queued on an empty slot. Called by the event loop when the
    /// slot's queue was kicked.
    pub fn serve_empty_ring(&mut self) {
        let answering = self.running.as_ref().is_some_and(|r| r.empty.is_some());
        if !answering {
            // Reset (or plugged) since the kick: nothing to answer, and nothing to watch
            // until the driver starts the slot again.
            self.watched.unwatch();
            return;
        }
        let (Some(kick), Some(running)) = (self.watched.fd(), self.running.as_mut()) else {
            return;
        };
        let Some(queue) = running.empty.as_mut() else {
            return;
        };
        let mem = &self.memory;
        answer_chains(queue, mem, kick, &*running.params.interrupt, 0, |chain| {
            let status = chain
                .filter(|d| d.is_write_only() && d.len() > 0)
                .last()
                .and_then(|d| d.addr().0.checked_add(u64::from(d.len()) - 1));
            let written =
                status.is_some_and(|addr| mem.write_obj(S_IOERR, GuestAddress(addr)).is_ok());
            u32::from(written)
        });
    }
}

impl VirtioDevice for BlkSlot {
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
        log::debug!(
            "{}: {}-byte configuration write at {offset:#x} ignored",
            self.name,
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        let served = self.disk.as_mut().filter(|_| !self.failed);
        if served.is_some() {
            self.watched.unwatch();
        }
        match served {
            Some(plugged) => {
                // A disk restored with the machine: its backend was stopped at the used index
                // before the machine was saved (see `quiesce`).
                let base = start_index(&self.memory, &params, 0)?;
                plugged
                    .disk
                    .connection()
                    .start_at(&params, &[base])
                    .map_err(|e| ActivateError::Device(e.to_string()))?;
                self.running = Some(Running {
                    params,
                    empty: None,
                });
            }
            None => {
                // A slot restored from a snapshot goes on where it stopped, which is the used
                // index: it answered every request it took before the machine was saved.
                let resume = params.resume.then_some(None);
                let queue = empty_ring(&self.memory, &params, 0, QUEUE_MAX_SIZE, resume).ok_or(
                    ActivateError::InvalidQueue {
                        index: 0,
                        reason: "the ring does not lie in guest RAM",
                    },
                )?;
                params.interrupt.set_vring_signalled_externally(false);
                if let Some(fd) = params.notify.first() {
                    self.watched.watch(fd);
                }
                self.running = Some(Running {
                    params,
                    empty: Some(queue),
                });
            }
        }
        Ok(())
    }

    /// An empty slot answers every request on the event loop as soon as it is kicked; a
    /// plugged disk's backend was stopped at the used index before the machine was saved.
    fn resumable(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        if let Some(plugged) = self.disk.as_mut() {
            if self.running.as_ref().is_some_and(|r| r.empty.is_none()) {
                plugged.disk.reset();
            }
        }
        self.running = None;
        self.quiesced = false;
    }
}

impl Replaceable for BlkSlot {
    type Backend = VhostUserBlk;

    fn socket_of(disk: &VhostUserBlk) -> RawFd {
        disk.socket()
    }

    fn backend_socket(&self) -> Option<RawFd> {
        self.disk().map(|plugged| plugged.disk.socket())
    }

    fn replace(&mut self, disk: VhostUserBlk) -> Result<(), String> {
        self.replace_backend(disk)
    }

    fn fail(&mut self) {
        self.fail_backend();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_mmio::{Interrupt, QueueConfig};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x4000;
    const STATUS: u64 = 0x5000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    struct Setup {
        slot: BlkSlot,
        kicks: Arc<SlotKicks>,
        memory: GuestMemoryMmap,
        notify: EventFd,
        irqfd: EventFd,
    }

    /// An empty slot whose driver started a 8-entry ring in fresh memory.
    fn started() -> Setup {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        started_in(memory, false)
    }

    /// An empty slot started on a 8-entry ring in `memory`, resumed from a snapshot when
    /// `resume` is set.
    fn started_in(memory: GuestMemoryMmap, resume: bool) -> Setup {
        let kicks = Arc::new(SlotKicks::new().unwrap());
        let mut slot = BlkSlot::new(0, memory.clone(), Arc::clone(&kicks));
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let params = ActivateParams {
            features: 1 << VIRTIO_F_VERSION_1,
            queues: vec![QueueConfig {
                size: 8,
                desc: DESC,
                avail: AVAIL,
                used: USED,
                ready: true,
            }],
            notify: vec![notify.try_clone().unwrap()],
            interrupt: Arc::new(Interrupt::new(irqfd.try_clone().unwrap())),
            resume,
        };
        slot.activate(params).unwrap();
        Setup {
            slot,
            kicks,
            memory,
            notify,
            irqfd,
        }
    }

    fn descriptor(
        memory: &GuestMemoryMmap,
        index: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = DESC + 16 * index;
        memory.write_obj(addr, GuestAddress(at)).unwrap();
        memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        memory.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Offers the chain starting at `head` as the driver's `n`-th request and kicks.
    fn offer(s: &Setup, n: u16, head: u16) {
        s.memory
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 8)))
            .unwrap();
        s.memory.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
        s.notify.write(1).unwrap();
    }

    fn used(s: &Setup) -> (u16, u32, u32) {
        let idx: u16 = s.memory.read_obj(GuestAddress(USED + 2)).unwrap();
        let last = u64::from(idx.wrapping_sub(1) % 8);
        let id: u32 = s
            .memory
            .read_obj(GuestAddress(USED + 4 + 8 * last))
            .unwrap();
        let len: u32 = s
            .memory
            .read_obj(GuestAddress(USED + 8 + 8 * last))
            .unwrap();
        (idx, id, len)
    }

    #[test]
    fn an_empty_slot_answers_every_request_with_an_io_error() {
        let mut s = started();
        let mut capacity = [0xffu8; 8];
        s.slot.read_config(0, &mut capacity);
        assert_eq!(capacity, [0; 8]);
        descriptor(&s.memory, 0, HEADER, 16, F_NEXT, 1);
        descriptor(&s.memory, 1, STATUS, 1, F_WRITE, 0);
        s.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        offer(&s, 0, 0);
        s.slot.serve_empty_ring();
        assert_eq!(used(&s), (1, 0, 1));
        let status: u8 = s.memory.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, S_IOERR);
        assert_eq!(s.irqfd.read().unwrap(), 1);
        // The kick was consumed.
        assert!(s.notify.read().is_err());
    }

    /// A slot restored from a snapshot goes on from the used index in guest memory: the
    /// requests it answered before the machine was saved are not answered again, the one the
    /// driver queued after them is.
    #[test]
    fn a_resumed_slot_answers_from_the_used_index_on() {
        const ANSWERED: u32 = 0x77;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        memory.write_obj(5u16, GuestAddress(USED + 2)).unwrap();
        for entry in 0..8 {
            memory
                .write_obj(ANSWERED, GuestAddress(USED + 4 + 8 * entry))
                .unwrap();
        }
        let mut s = started_in(memory, true);
        descriptor(&s.memory, 0, HEADER, 16, F_NEXT, 1);
        descriptor(&s.memory, 1, STATUS, 1, F_WRITE, 0);
        offer(&s, 5, 0);
        s.slot.serve_empty_ring();
        assert_eq!(used(&s), (6, 0, 1));
        let status: u8 = s.memory.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, S_IOERR);
        for entry in 0..5 {
            let id: u32 = s
                .memory
                .read_obj(GuestAddress(USED + 4 + 8 * entry))
                .unwrap();
            assert_eq!(id, ANSWERED, "used entry {entry} was written again");
        }
    }

    #[test]
    fn a_request_without_a_writable_status_is_used_without_a_write() {
        let mut s = started();
        // Device-readable only, and a second chain whose status would wrap the address space.
        descriptor(&s.memory, 0, STATUS, 1, 0, 0);
        descriptor(&s.memory, 2, u64::MAX, 2, F_WRITE, 0);
        s.memory.write_obj(0x7au8, GuestAddress(STATUS)).unwrap();
        offer(&s, 0, 0);
        s.slot.serve_empty_ring();
        assert_eq!(used(&s), (1, 0, 0));
        let status: u8 = s.memory.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 0x7a);
        offer(&s, 1, 2);
        s.slot.serve_empty_ring();
        assert_eq!(used(&s).0, 2);
    }

    #[test]
    fn a_kick_after_a_reset_is_drained_and_the_queue_left_alone() {
        let mut s = started();
        descriptor(&s.memory, 0, HEADER, 16, F_NEXT, 1);
        descriptor(&s.memory, 1, STATUS, 1, F_WRITE, 0);
        offer(&s, 0, 0);
        s.slot.reset();
        s.slot.serve_empty_ring();
        assert_eq!(used(&s).0, 0);
        assert!(s.slot.watched.fd().is_none());
        assert!(s.kicks.ready().is_empty());
    }
}
