//! A hot-replace NIC slot of the lightweight machine: a virtio-net device that exists from
//! boot with its link down until a NIC served by a vhost-user backend (`citadel-net`) is
//! plugged into it.
//!
//! The guest's driver binds to the slot at boot (`eth0` for the first slot) and stays bound.
//! Plugging hands the backend both rings where the slot left them, sets
//! `VIRTIO_NET_S_LINK_UP` and raises a configuration change: Linux brings the carrier up.
//! Unplugging stops the backend's rings, takes them back, clears the link bit and raises
//! another change: the carrier goes down.
//!
//! What the driver reads at probe never changes: the features (what citadel-net always offers
//! with one queue pair: no multiqueue, no control queue) and the MAC address, fixed per slot
//! and locally administered. A NIC plugs only into a slot whose features its backend offers;
//! the backend's own MAC is not shown to the guest.
//!
//! While empty and started, the slot consumes the frames the driver queues for transmission
//! and drops them (the event loop learns of TX kicks through [`SlotKicks`]), so the driver's
//! TX ring never fills up; the RX ring is left as the driver filled it, for the next backend.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::backend_hangups::Replaceable;
use super::slot_ring::{
    answer_chains, empty_ring, restart_index, start_index, used_index, KickWatch, SlotKicks,
};
use super::vhost_user::{DeviceSpec, VhostUserConnection};
use super::virtio_mmio::{read_config_bytes, ActivateError, ActivateParams, VirtioDevice};

/// Features every NIC slot offers: what citadel-net always offers with one queue pair.
pub const SLOT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_UFO)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS);

/// QueueNumMax of both rings; citadel-net takes rings up to 1024 entries.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// What a NIC slot asks of a vhost-user-net backend: one queue pair, the slot's features, no
/// configuration (the slot shows its own).
pub const NET_SPEC: DeviceSpec = DeviceSpec {
    name: "vhost-user-net",
    allowed_features: SLOT_FEATURES,
    config_len: None,
    queues: 2,
    queue_max_size: QUEUE_MAX_SIZE,
};

/// Bytes of `struct virtio_net_config` shown: `mac`, `status`, `max_virtqueue_pairs`.
const CONFIG_LEN: usize = 10;
const CONFIG_STATUS: usize = 6;

const RX: usize = 0;
const TX: usize = 1;

/// The MAC address of NIC slot `index`: locally administered, one per slot.
pub fn slot_mac(index: u64) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xc1, 0x7a, index as u8]
}

/// A NIC ready to be plugged: a connected vhost-user-net frontend and the names QMP knows it
/// by.
#[derive(Debug)]
pub struct PluggedNic {
    /// The `device_add` id.
    pub device_id: String,
    /// The `netdev_add` id.
    pub netdev_id: String,
    /// The frontend.
    pub conn: VhostUserConnection,
}

/// Why a NIC could not be plugged. The NIC comes back when it is still usable.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct NicSlotError {
    /// What went wrong, one line.
    pub why: String,
    /// The NIC that was to be plugged, when the slot did not take it.
    pub nic: Option<Box<PluggedNic>>,
}

/// The rings while the slot holds them: RX only to hand on, TX answered.
struct EmptyRings {
    rx: Queue,
    tx: Queue,
}

/// What the driver started.
struct Running {
    params: ActivateParams,
    /// The rings, while no backend serves them.
    empty: Option<EmptyRings>,
}

/// A hot-replace virtio-net slot.
pub struct NetSlot {
    index: u64,
    /// What logs and errors call it: "NIC slot N", or "NIC card in PORT".
    name: String,
    memory: GuestMemoryMmap,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 2],
    nic: Option<PluggedNic>,
    running: Option<Running>,
    /// The TX queue's kicks while the slot answers the ring itself.
    watched: KickWatch,
    /// The plugged NIC lost its backend and none could replace it: the link is down and the
    /// slot drops the TX frames until the NIC is unplugged.
    failed: bool,
    /// Where the backend stopped each ring for a snapshot (see [`NetSlot::quiesce`]).
    quiesced: Option<Vec<(usize, u16)>>,
}

impl NetSlot {
    /// An empty slot, NIC number `index`, whose driver rings live in `memory`; its TX kicks
    /// are reported under `token`.
    pub fn new(index: u64, memory: GuestMemoryMmap, kicks: Arc<SlotKicks>, token: u64) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&slot_mac(index));
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        NetSlot {
            index,
            name: format!("NIC slot {index}"),
            memory,
            config,
            queue_max_sizes: [QUEUE_MAX_SIZE; 2],
            nic: None,
            running: None,
            watched: KickWatch::new(kicks, token),
            failed: false,
            quiesced: None,
        }
    }

    /// The MAC address the driver reads at probe.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.config[..6]);
        mac
    }

    /// Makes this the device of a PCI NIC card in root port `bus` with MAC address `mac`,
    /// before any driver has read it.
    pub fn make_card(&mut self, bus: &str, mac: [u8; 6]) {
        self.name = format!("NIC card in {bus}");
        self.config[..6].copy_from_slice(&mac);
    }

    /// The plugged NIC, if any.
    pub fn nic(&self) -> Option<&PluggedNic> {
        self.nic.as_ref()
    }

    fn set_link(&mut self, up: bool) {
        let status = if up { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        self.config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&status.to_le_bytes());
    }

    /// Puts `nic` behind the slot and sets the link up. If the driver has started the slot,
    /// the backend takes both rings over where the slot left them. The caller raises the
    /// configuration change.
    pub fn plug(&mut self, mut nic: PluggedNic) -> Result<(), NicSlotError> {
        let refuse = |why: String, nic| NicSlotError {
            why,
            nic: Some(Box::new(nic)),
        };
        if self.nic.is_some() {
            return Err(refuse(
                format!("The slot {} is occupied already.", self.index),
                nic,
            ));
        }
        let missing = SLOT_FEATURES & !nic.conn.features();
        if missing != 0 {
            return Err(refuse(
                format!("the NIC's backend lacks features the slot offers ({missing:#x})"),
                nic,
            ));
        }
        if let Err(e) = nic.conn.set_memory(&self.memory) {
            return Err(refuse(e.to_string(), nic));
        }
        if let Some(running) = self.running.as_mut() {
            if let Some(rings) = running.empty.as_ref() {
                let bases = [rings.rx.next_avail(), rings.tx.next_avail()];
                // From here on TX kicks belong to the backend; one written meanwhile stays in
                // the eventfd and the backend sees it as soon as it polls.
                self.watched.unwatch();
                if let Err(e) = nic.conn.start_at(&running.params, &bases) {
                    // The slot answers the rings again, and raises its own interrupts.
                    running
                        .params
                        .interrupt
                        .set_vring_signalled_externally(false);
                    if let Some(fd) = running.params.notify.get(TX) {
                        self.watched.watch(fd);
                    }
                    // The connection is unusable after a failed start: the NIC is not given
                    // back.
                    return Err(NicSlotError {
                        why: format!("starting the NIC's backend: {e}"),
                        nic: None,
                    });
                }
                running.empty = None;
            }
        }
        self.set_link(true);
        log::info!(
            "{}: {} ({}) plugged, link up",
            self.name,
            nic.device_id,
            nic.netdev_id
        );
        self.nic = Some(nic);
        Ok(())
    }

    /// Puts `conn`, a fresh backend for the plugged NIC's tap, in place of the plugged NIC's
    /// backend, which died. If the driver has started the slot, the new backend takes both
    /// rings from their used indices (a frame the dead one took but did not complete is sent
    /// again, a receive buffer it filled but did not return is filled again), then both queues
    /// get a kick and the driver an interrupt. On a refusal `conn` is dropped and the old
    /// backend stays in place.
    pub fn replace_backend(&mut self, mut conn: VhostUserConnection) -> Result<(), String> {
        let Some(nic) = self.nic.as_mut() else {
            return Err(format!("{} is empty", self.name));
        };
        if self.failed {
            return Err(format!("{}: its NIC has failed already", self.name));
        }
        let missing = SLOT_FEATURES & !conn.features();
        if missing != 0 {
            return Err(format!(
                "the new backend lacks features the slot offers ({missing:#x})"
            ));
        }
        conn.set_memory(&self.memory).map_err(|e| e.to_string())?;
        if let Some(running) = self.running.as_ref().filter(|r| r.empty.is_none()) {
            let used = |ring| used_index(&self.memory, &running.params, ring);
            let (Some(rx), Some(tx)) = (used(RX), used(TX)) else {
                return Err("the rings do not lie in guest RAM".into());
            };
            conn.start_at(&running.params, &[rx, tx])
                .map_err(|e| e.to_string())?;
            for kick in &running.params.notify {
                let _ = kick.write(1);
            }
            for queue in 0..running.params.queues.len() {
                if let Err(e) = running.params.interrupt.signal_used_queue(queue) {
                    log::warn!("{}: raising its interrupt: {e}", self.name);
                }
            }
        }
        nic.conn = conn;
        Ok(())
    }

    /// Gives up on the plugged NIC's backend: the link goes down and the slot drops the TX
    /// frames from the used index on, until the NIC is unplugged. The caller tells the driver
    /// the device needs a reset.
    pub fn fail_backend(&mut self) {
        if self.nic.is_none() || self.failed {
            return;
        }
        self.failed = true;
        self.set_link(false);
        self.hold_rings(&[]);
    }

    /// Stops the plugged NIC's backend for a snapshot of the paused machine: once stopped it
    /// no longer touches guest memory. A slot restored from that memory resumes each ring at
    /// its used index: a frame the backend took and did not complete is sent again, a
    /// receive buffer it took and did not fill is offered again. `Err` when it cannot be
    /// stopped: the caller gives up on it. Nothing to do for an empty, failed or not yet
    /// started slot.
    pub fn quiesce(&mut self) -> Result<(), String> {
        if self.running.as_ref().is_none_or(|r| r.empty.is_some()) {
            return Ok(());
        }
        let Some(nic) = self.nic.as_mut().filter(|_| !self.failed) else {
            return Ok(());
        };
        let bases = nic
            .conn
            .stop_rings()
            .map_err(|e| format!("stopping {}: {e}", nic.device_id))?;
        self.quiesced = Some(bases);
        Ok(())
    }

    /// Starts the backend [`NetSlot::quiesce`] stopped again where it stopped, with a kick
    /// on each queue. `Err` when it cannot be started: the caller gives up on it.
    pub fn unquiesce(&mut self) -> Result<(), String> {
        let Some(stopped) = self.quiesced.take() else {
            return Ok(());
        };
        let (Some(running), Some(nic)) = (self.running.as_ref(), self.nic.as_mut()) else {
            return Ok(());
        };
        // The backend's own word on where it stopped, within what the driver offered.
        let base = |ring| {
            let stopped = stopped.iter().find(|b| b.0 == ring).map(|b| b.1);
            restart_index(&self.memory, &running.params, ring, stopped).ok_or_else(|| {
                format!("starting {} again: its rings left guest RAM", nic.device_id)
            })
        };
        let bases = [base(RX)?, base(TX)?];
        nic.conn
            .start_at(&running.params, &bases)
            .map_err(|e| format!("starting {} again: {e}", nic.device_id))?;
        for kick in &running.params.notify {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// Takes the NIC out and sets the link down, stopping its backend's rings first; the
    /// slot holds the rings from where the backend stopped. The caller raises the
    /// configuration change.
    pub fn unplug(&mut self) -> Option<PluggedNic> {
        let mut nic = self.nic.take()?;
        self.set_link(false);
        let served = self.running.as_ref().is_some_and(|r| r.empty.is_none());
        if served {
            // A backend that cannot say where it stopped leaves each ring at its used
            // index: nothing the driver queued past it waits forever.
            let bases = nic.conn.stop_rings().unwrap_or_else(|e| {
                log::warn!("{}: stopping {}'s rings: {e}", self.name, nic.device_id);
                Vec::new()
            });
            self.hold_rings(&bases);
        }
        self.failed = false;
        log::info!(
            "{}: {} ({}) unplugged, link down",
            self.name,
            nic.device_id,
            nic.netdev_id
        );
        Some(nic)
    }

    /// Takes the rings back from a backend that stopped at `bases` (each ring missing there
    /// from its used index): the slot drops what the driver transmits from then on.
    fn hold_rings(&mut self, bases: &[(usize, u16)]) {
        let mut kick = None;
        if let Some(running) = self.running.as_mut() {
            if running.empty.is_none() {
                let base = |ring| bases.iter().find(|b| b.0 == ring).map(|b| b.1);
                let ring = |index| {
                    empty_ring(
                        &self.memory,
                        &running.params,
                        index,
                        QUEUE_MAX_SIZE,
                        Some(base(index)),
                    )
                };
                running.empty = ring(RX).zip(ring(TX)).map(|(rx, tx)| EmptyRings { rx, tx });
                running
                    .params
                    .interrupt
                    .set_vring_signalled_externally(false);
                kick = running
                    .params
                    .notify
                    .get(TX)
                    .and_then(|fd| fd.try_clone().ok());
            }
        }
        if let Some(fd) = kick {
            self.watched.watch(&fd);
            // Frames queued while the backend stopped.
            let _ = fd.write(1);
        }
    }

    /// Drops the frames the driver queued for transmission on an empty slot. Called by the
    /// event loop when the slot's TX queue was kicked.
    pub fn drop_tx(&mut self) {
        let answering = self.running.as_ref().is_some_and(|r| r.empty.is_some());
        if !answering {
            // Reset (or plugged) since the kick: nothing to drop, and nothing to watch until
            // the driver starts the slot again.
            self.watched.unwatch();
            return;
        }
        let (Some(kick), Some(running)) = (self.watched.fd(), self.running.as_mut()) else {
            return;
        };
        let Some(rings) = running.empty.as_mut() else {
            return;
        };
        // A TX chain is device-readable only: nothing is written, the used length is 0.
        answer_chains(
            &mut rings.tx,
            &self.memory,
            kick,
            &*running.params.interrupt,
            1,
            |_| 0,
        );
    }
}

impl VirtioDevice for NetSlot {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        SLOT_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The slot's MAC never changes: the driver read it at probe, and a modern driver
        // without VIRTIO_NET_F_CTRL_MAC_ADDR does not write it.
        log::debug!(
            "{}: {}-byte configuration write at {offset:#x} ignored",
            self.name,
            data.len()
        );
    }

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        self.watched.unwatch();
        match self.nic.as_mut().filter(|_| !self.failed) {
            Some(nic) => {
                // A NIC restored with the machine goes on from the used indices (see
                // `quiesce`).
                let bases = [
                    start_index(&self.memory, &params, RX)?,
                    start_index(&self.memory, &params, TX)?,
                ];
                nic.conn
                    .start_at(&params, &bases)
                    .map_err(|e| ActivateError::Device(e.to_string()))?;
                self.running = Some(Running {
                    params,
                    empty: None,
                });
            }
            None => {
                // A slot restored from a snapshot goes on from the used indices: it had dropped
                // every frame it took, and left RX alone, before the machine was saved.
                let resume = params.resume.then_some(None);
                let ring = |index: usize, reason| {
                    empty_ring(&self.memory, &params, index, QUEUE_MAX_SIZE, resume).ok_or(
                        ActivateError::InvalidQueue {
                            index: index as u16,
                            reason,
                        },
                    )
                };
                let rx = ring(RX, "the RX ring does not lie in guest RAM")?;
                let tx = ring(TX, "the TX ring does not lie in guest RAM")?;
                params.interrupt.set_vring_signalled_externally(false);
                if let Some(fd) = params.notify.get(TX) {
                    self.watched.watch(fd);
                }
                self.running = Some(Running {
                    params,
                    empty: Some(EmptyRings { rx, tx }),
                });
            }
        }
        Ok(())
    }

    /// An empty slot drops TX frames on the event loop as soon as it is kicked and leaves RX
    /// alone; a plugged NIC's backend was stopped before the machine was saved.
    fn resumable(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        if let Some(nic) = self.nic.as_mut() {
            if self.running.as_ref().is_some_and(|r| r.empty.is_none()) {
                nic.conn.reset();
            }
        }
        self.running = None;
        self.quiesced = None;
    }
}

impl Replaceable for NetSlot {
    type Backend = VhostUserConnection;

    fn socket_of(conn: &VhostUserConnection) -> RawFd {
        conn.socket()
    }

    fn backend_socket(&self) -> Option<RawFd> {
        self.nic().map(|nic| nic.conn.socket())
    }

    fn replace(&mut self, conn: VhostUserConnection) -> Result<(), String> {
        self.replace_backend(conn)
    }

    fn fail(&mut self) {
        self.fail_backend();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_mmio::{Interrupt, QueueConfig};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const RX_RING: u64 = 0x1000;
    const TX_RING: u64 = 0x4000;
    const FRAME: u64 = 0x8000;

    struct Setup {
        slot: NetSlot,
        kicks: Arc<SlotKicks>,
        memory: GuestMemoryMmap,
        notify: [EventFd; 2],
        irqfd: EventFd,
    }

    /// Descriptor table, avail and used rings of an 8-entry ring at `base`.
    fn ring(base: u64) -> QueueConfig {
        QueueConfig {
            size: 8,
            desc: base,
            avail: base + 0x800,
            used: base + 0x1000,
            ready: true,
        }
    }

    /// An empty slot whose driver started both rings in fresh memory.
    fn started() -> Setup {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        started_in(memory, false)
    }

    /// An empty slot started on both rings in `memory`, resumed from a snapshot when
    /// `resume` is set.
    fn started_in(memory: GuestMemoryMmap, resume: bool) -> Setup {
        let kicks = Arc::new(SlotKicks::new().unwrap());
        let mut slot = NetSlot::new(1, memory.clone(), Arc::clone(&kicks), 7);
        let notify = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let params = ActivateParams {
            features: SLOT_FEATURES,
            queues: vec![ring(RX_RING), ring(TX_RING)],
            notify: vec![
                notify[0].try_clone().unwrap(),
                notify[1].try_clone().unwrap(),
            ],
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

    /// Queues one device-readable frame as the driver's `n`-th buffer of the ring at `base`.
    fn offer(s: &Setup, base: u64, n: u16) {
        let head = u64::from(n % 8);
        let at = base + 16 * head;
        s.memory.write_obj(FRAME, GuestAddress(at)).unwrap();
        s.memory.write_obj(64u32, GuestAddress(at + 8)).unwrap();
        s.memory.write_obj(0u16, GuestAddress(at + 12)).unwrap();
        s.memory
            .write_obj(head as u16, GuestAddress(base + 0x800 + 4 + 2 * head))
            .unwrap();
        s.memory
            .write_obj(n + 1, GuestAddress(base + 0x800 + 2))
            .unwrap();
    }

    fn used_idx(s: &Setup, base: u64) -> u16 {
        s.memory.read_obj(GuestAddress(base + 0x1002)).unwrap()
    }

    #[test]
    fn an_empty_slot_shows_its_mac_with_the_link_down() {
        let s = started();
        let mut config = [0xffu8; CONFIG_LEN];
        s.slot.read_config(0, &mut config);
        assert_eq!(&config[..6], &[0x52, 0x54, 0x00, 0xc1, 0x7a, 0x01]);
        assert_eq!(&config[6..8], &[0, 0], "link status");
        assert_eq!(&config[8..10], &[1, 0], "queue pairs");
        assert_eq!(s.slot.device_type(), 1);
        assert_eq!(s.slot.queue_max_sizes(), &[256, 256]);
        // One queue pair: no control queue, no multiqueue, no control-queue MAC setting.
        use virtio_bindings::virtio_net::{
            VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ,
        };
        for bit in [
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ] {
            assert_eq!(s.slot.features() & (1 << bit), 0, "feature {bit}");
        }
        assert_eq!(NET_SPEC.allowed_features, s.slot.features());
    }

    #[test]
    fn an_empty_slot_drops_transmitted_frames_and_leaves_rx_alone() {
        let mut s = started();
        offer(&s, RX_RING, 0);
        s.notify[RX].write(1).unwrap();
        offer(&s, TX_RING, 0);
        offer(&s, TX_RING, 1);
        s.notify[TX].write(1).unwrap();
        assert_eq!(s.kicks.ready(), vec![7]);
        s.slot.drop_tx();
        assert_eq!(used_idx(&s, TX_RING), 2);
        assert_eq!(used_idx(&s, RX_RING), 0);
        assert_eq!(s.irqfd.read().unwrap(), 1);
        // The TX kick was consumed, the RX kick left for a backend.
        assert!(s.notify[TX].read().is_err());
        assert_eq!(s.notify[RX].read().unwrap(), 1);
    }

    /// A slot restored from a snapshot goes on from the used indices in guest memory: the
    /// frames it dropped before the machine was saved are not taken again, the one the
    /// driver queued after them is, and RX is left as it was.
    #[test]
    fn a_resumed_slot_drops_tx_frames_from_the_used_index_on() {
        const ANSWERED: u32 = 0x77;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for (ring, used) in [(RX_RING, 2u16), (TX_RING, 3)] {
            memory.write_obj(used, GuestAddress(ring + 0x1002)).unwrap();
            for entry in 0..8 {
                memory
                    .write_obj(ANSWERED, GuestAddress(ring + 0x1004 + 8 * entry))
                    .unwrap();
            }
        }
        let mut s = started_in(memory, true);
        offer(&s, TX_RING, 3);
        s.notify[TX].write(1).unwrap();
        s.slot.drop_tx();
        assert_eq!(used_idx(&s, TX_RING), 4);
        assert_eq!(used_idx(&s, RX_RING), 2);
        for entry in 0..3 {
            let id: u32 = s
                .memory
                .read_obj(GuestAddress(TX_RING + 0x1004 + 8 * entry))
                .unwrap();
            assert_eq!(id, ANSWERED, "TX used entry {entry} was written again");
        }
    }

    #[test]
    fn a_kick_after_a_reset_is_drained_and_the_rings_left_alone() {
        let mut s = started();
        offer(&s, TX_RING, 0);
        s.notify[TX].write(1).unwrap();
        s.slot.reset();
        s.slot.drop_tx();
        assert_eq!(used_idx(&s, TX_RING), 0);
        assert!(s.slot.watched.fd().is_none());
        assert!(s.kicks.ready().is_empty());
    }
}
