//! The virtio-net device served over vhost-user: feature negotiation, config space, and the
//! data path between the guest's rings and the tap.
//!
//! Queue pair `i` (RX ring `2i`, TX ring `2i+1`) is served by worker thread `i` and owns tap
//! queue `i`. Everything the frontend or guest hands us (descriptor chains, headers, lengths)
//! is checked; a bad element is counted and returned to the guest unused, never trusted.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use citadel_sandbox::memory_file::MemoryFilePolicy;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::stats::Stats;
use crate::tap::{Offloads, TapQueue};

/// Largest frame the tap can hand us or we hand it: a 64 KiB GSO frame plus its Ethernet
/// header, after the virtio-net header.
const MAX_FRAME: usize = 65535 + 14;
/// Largest virtio-net header (virtio_net_hdr_v1).
const MAX_HDR: usize = 12;
/// Ring size offered to the frontend.
const QUEUE_SIZE: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// What the device is: its MAC and its tap queues, which outlive frontend connections.
#[derive(Debug)]
pub struct NetConfig {
    /// MAC address shown in the config space.
    pub mac: [u8; 6],
    /// One tap queue per queue pair.
    pub taps: Vec<TapQueue>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Which files may back guest memory.
    pub memory_files: MemoryFilePolicy,
}

/// Per queue pair state kept between events.
struct Pair {
    /// A frame read from the tap that did not fit into the RX buffers available at the time.
    pending: Option<usize>,
    /// Frame read from the tap (the pending one, if any).
    rx_buf: Vec<u8>,
    /// Frame gathered from a TX chain.
    tx_buf: Vec<u8>,
}

/// The vhost-user-net device for one frontend connection.
pub struct NetBackend {
    config: Arc<NetConfig>,
    mem: Mutex<Option<Mem>>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    hdr_len: AtomicUsize,
    pairs: Vec<Mutex<Pair>>,
    /// Exit-event descriptors handed to vhost-user-backend, which never closes them.
    exit_consumers: Mutex<Vec<RawFd>>,
}

/// Why handling an event failed; ends the worker thread, so only for broken invariants of our
/// own (the guest's mistakes are counted, not returned).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An event id we never registered.
    #[error("unexpected event {0} on queue pair {1}")]
    UnknownEvent(u16, usize),
    /// Guest memory is not mapped yet.
    #[error("queue event before the memory table")]
    NoMemory,
    /// The queue structures themselves are unusable.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Interrupting the guest failed.
    #[error("signalling the guest: {0}")]
    Signal(#[source] io::Error),
}

impl From<DeviceError> for io::Error {
    fn from(e: DeviceError) -> io::Error {
        io::Error::other(e.to_string())
    }
}

/// Outcome of trying to hand one frame to the guest.
enum Delivery {
    Delivered,
    NoBuffers,
    Dropped,
}

impl NetBackend {
    /// A fresh device state for a new frontend connection.
    pub fn new(config: Arc<NetConfig>) -> Self {
        let pairs = (0..config.taps.len())
            .map(|_| {
                Mutex::new(Pair {
                    pending: None,
                    rx_buf: vec![0; MAX_HDR + MAX_FRAME],
                    tx_buf: vec![0; MAX_HDR + MAX_FRAME],
                })
            })
            .collect();
        NetBackend {
            config,
            mem: Mutex::new(None),
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            hdr_len: AtomicUsize::new(10),
            pairs,
            exit_consumers: Mutex::new(Vec::new()),
        }
    }

    /// Event id of the tap of each worker thread (ids up to the number of queues are taken by
    /// the rings and the exit event).
    pub fn tap_event_id(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// The tap fd of queue pair `i`, for registration with worker `i`'s epoll.
    pub fn tap_fd(&self, i: usize) -> std::os::fd::RawFd {
        self.config.taps[i].as_raw_fd()
    }

    /// Closes the exit-event descriptors of this connection's workers. vhost-user-backend 0.24
    /// registers each in its worker's epoll set as a raw descriptor and never closes it, so
    /// without this every frontend connection would leak one descriptor per queue pair, until
    /// the backend, whose descriptor limit is small, could accept no frontend at all.
    ///
    /// # Safety
    /// The daemon serving this backend must have been dropped (its worker threads joined) and
    /// its epoll handlers too: then nothing uses those descriptors any more.
    pub unsafe fn close_exit_events(&self) {
        let mut consumers = self
            .exit_consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for fd in consumers.drain(..) {
            // SAFETY: vhost-user-backend gave up the descriptor with `into_raw_fd` and keeps
            // only its number in an epoll set that, by the caller's contract, is closed;
            // nothing else owns it, so taking ownership here closes it exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Counts the frames still waiting for guest buffers as dropped when the frontend leaves.
    pub fn discard_pending(&self) {
        for pair in &self.pairs {
            let mut pair = pair.lock().unwrap_or_else(|e| e.into_inner());
            if pair.pending.take().is_some() {
                Stats::bump(&self.config.stats.rx_drops);
            }
        }
    }

    fn memory(&self) -> Result<MemGuard, DeviceError> {
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        mem.as_ref()
            .map(|m| m.memory())
            .ok_or(DeviceError::NoMemory)
    }

    fn has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    /// Runs `work` on a ring. `work` says whether it stopped because the ring ran dry; only
    /// then are notifications re-enabled with EVENT_IDX's re-check, so that no buffer the guest
    /// adds meanwhile is missed.
    fn drive(
        &self,
        vring: &VringRwLock<Mem>,
        mut work: impl FnMut(&mut VringState<Mem>, &MemGuard) -> Result<bool, DeviceError>,
    ) -> Result<(), DeviceError> {
        let mem = self.memory()?;
        let mut state = vring.get_mut();
        if self.event_idx.load(Ordering::Acquire) {
            loop {
                state.disable_notification()?;
                if !work(&mut state, &mem)? || !state.enable_notification()? {
                    break;
                }
            }
        } else {
            work(&mut state, &mem)?;
        }
        Ok(())
    }

    fn process_tx(&self, index: usize, vring: &VringRwLock<Mem>) -> Result<(), DeviceError> {
        let tap = &self.config.taps[index];
        let stats = &self.config.stats;
        let hdr_len = self.hdr_len.load(Ordering::Acquire);
        let mut pair = self.pairs[index].lock().unwrap_or_else(|e| e.into_inner());
        let buf = &mut pair.tx_buf;
        self.drive(vring, |state, mem| {
            let mut used_any = false;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                transmit(chain, mem, buf, hdr_len, tap, stats);
                // Only now: once the used entry is published the guest may reuse the buffers.
                state.add_used(head, 0)?;
                used_any = true;
            }
            if used_any && state.needs_notification()? {
                state.signal_used_queue().map_err(DeviceError::Signal)?;
            }
            Ok(true)
        })
    }

    fn process_rx(&self, index: usize, vring: &VringRwLock<Mem>) -> Result<(), DeviceError> {
        let mut pair = self.pairs[index].lock().unwrap_or_else(|e| e.into_inner());
        let pair = &mut *pair;
        let tap = &self.config.taps[index];
        let stats = &self.config.stats;
        let hdr_len = self.hdr_len.load(Ordering::Acquire);
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        self.drive(vring, |state, mem| {
            let mut used_any = false;
            let mut dry = false;
            loop {
                let len = match pair.pending.take() {
                    Some(len) => len,
                    None => {
                        let queue = state.get_queue();
                        let avail = queue.avail_idx(&**mem, Ordering::Acquire)?;
                        if avail.0 == queue.next_avail() {
                            dry = true;
                            break;
                        }
                        match tap.read_frame(&mut pair.rx_buf) {
                            Ok(Some(n)) if n >= hdr_len => n,
                            Ok(Some(n)) => {
                                log::debug!("rx: short frame of {n} bytes from the tap");
                                Stats::bump(&stats.errors);
                                continue;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                log::warn!("rx: tap read: {e}");
                                Stats::bump(&stats.errors);
                                break;
                            }
                        }
                    }
                };
                match deliver(
                    state,
                    mem,
                    &mut pair.rx_buf[..len],
                    hdr_len,
                    mergeable,
                    stats,
                )? {
                    Delivery::Delivered => {
                        used_any = true;
                        Stats::bump(&stats.rx_packets);
                        Stats::add(&stats.rx_bytes, (len - hdr_len) as u64);
                    }
                    Delivery::Dropped => {
                        used_any = true;
                        Stats::bump(&stats.rx_drops);
                    }
                    Delivery::NoBuffers => {
                        pair.pending = Some(len);
                        dry = true;
                        break;
                    }
                }
            }
            if used_any && state.needs_notification()? {
                state.signal_used_queue().map_err(DeviceError::Signal)?;
            }
            Ok(dry)
        })
    }
}

/// Copies the frame of one TX chain out of guest memory into `buf` and writes it to the tap.
/// A chain that is malformed or of an impossible length is counted and skipped.
fn transmit(
    chain: DescriptorChain<MemGuard>,
    mem: &MemGuard,
    buf: &mut [u8],
    hdr_len: usize,
    tap: &TapQueue,
    stats: &Stats,
) {
    let head = chain.head_index();
    let mut reader = match chain.reader(mem) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("tx: bad descriptor chain {head}: {e}");
            Stats::bump(&stats.errors);
            return;
        }
    };
    let len = reader.available_bytes();
    if len < hdr_len || len > hdr_len + MAX_FRAME {
        log::debug!("tx: frame of {len} bytes dropped (header {hdr_len})");
        Stats::bump(&stats.tx_drops);
        return;
    }
    if let Err(e) = reader.read_exact(&mut buf[..len]) {
        log::debug!("tx: reading chain {head}: {e}");
        Stats::bump(&stats.errors);
        return;
    }
    match tap.write_frame(&buf[..len]) {
        Ok(true) => {
            Stats::bump(&stats.tx_packets);
            Stats::add(&stats.tx_bytes, (len - hdr_len) as u64);
        }
        Ok(false) => Stats::bump(&stats.tx_drops),
        // The tap is down: the frame is lost as on a cable without link.
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Stats::bump(&stats.tx_drops),
        Err(e) => {
            log::debug!("tx: tap write: {e}");
            Stats::bump(&stats.errors);
        }
    }
}

/// Copies one frame (with its header) into the guest's RX buffers.
fn deliver(
    state: &mut VringState<Mem>,
    mem: &MemGuard,
    frame: &mut [u8],
    hdr_len: usize,
    mergeable: bool,
    stats: &Stats,
) -> Result<Delivery, DeviceError> {
    let start = state.get_queue().next_avail();
    let mut chains = Vec::new();
    let mut room = 0usize;
    let mut bad = false;
    while room < frame.len() {
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
            if chains.is_empty() || mergeable {
                // Give the buffers back untouched; the frame waits for more.
                state.get_queue_mut().set_next_avail(start);
                return Ok(Delivery::NoBuffers);
            }
            break;
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= hdr_len => {
                room = room.saturating_add(w.available_bytes());
                chains.push((head, Some(w)));
            }
            Ok(_) | Err(_) => {
                log::debug!("rx: unusable descriptor chain {head}");
                Stats::bump(&stats.errors);
                chains.push((head, None));
                bad = true;
                break;
            }
        }
        if !mergeable {
            break;
        }
    }
    if bad || room < frame.len() {
        for (head, _) in &chains {
            state.add_used(*head, 0)?;
        }
        return Ok(Delivery::Dropped);
    }
    if hdr_len >= 12 {
        let count = chains.len() as u16;
        frame[10..12].copy_from_slice(&count.to_le_bytes());
    }
    let mut rest: &[u8] = frame;
    for (head, writer) in chains {
        let mut written = 0usize;
        if let Some(mut w) = writer {
            let n = w.available_bytes().min(rest.len());
            if w.write_all(&rest[..n]).is_ok() {
                written = n;
            } else {
                Stats::bump(&stats.errors);
            }
            rest = &rest[n..];
        }
        // Bounded by MAX_HDR + MAX_FRAME, so it fits into u32.
        state.add_used(head, written as u32)?;
    }
    Ok(Delivery::Delivered)
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        self.pairs.len() * 2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut bits = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_UFO
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_UFO
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.pairs.len() > 1 {
            bits |= 1 << VIRTIO_NET_F_MQ;
        }
        bits
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        let hdr_len = if features & (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
            12
        } else {
            10
        };
        self.hdr_len.store(hdr_len, Ordering::Release);
        let offloads = Offloads {
            csum: self.has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: self.has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: self.has(VIRTIO_NET_F_GUEST_TSO6),
            ufo: self.has(VIRTIO_NET_F_GUEST_UFO),
        };
        for tap in &self.config.taps {
            if let Err(e) = tap
                .set_vnet_hdr_len(hdr_len)
                .and_then(|()| tap.set_offloads(offloads))
            {
                log::error!("{e}");
            }
        }
        log::info!("features acked {features:#x}: header {hdr_len} bytes, offloads {offloads:?}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = [0u8; 10];
        space[..6].copy_from_slice(&self.config.mac);
        space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        space[8..10].copy_from_slice(&(self.pairs.len() as u16).to_le_bytes());
        // Reads past the end of the structure see zeroes, as on a real device.
        let mut out = vec![0u8; size as usize];
        let offset = offset as usize;
        if offset < space.len() {
            let n = (space.len() - offset).min(out.len());
            out[..n].copy_from_slice(&space[offset..offset + n]);
        }
        out
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        // The request handler mapped the frontend's regions; guest memory stays out of core
        // files whatever the limits of the process.
        for region in mem.memory().iter() {
            citadel_sandbox::core_dump::exclude_from_core_dumps(region.as_ptr(), region.size())?;
        }
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len()).map(|i| 0b11u64 << (2 * i)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                // vhost-user-backend 0.24 turns the consumer into a raw descriptor for its
                // worker's epoll set and never closes it; see `close_exit_events`.
                self.exit_consumers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                log::error!("creating a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.dispatch(device_event, vrings, thread_id).map_err(|e| {
            // The worker of this pair stops for the rest of the connection; say so.
            log::error!("queue pair {thread_id} stopped: {e}");
            Stats::bump(&self.config.stats.errors);
            e.into()
        })
    }
}

impl NetBackend {
    fn dispatch(
        &self,
        device_event: u16,
        vrings: &[VringRwLock<Mem>],
        thread_id: usize,
    ) -> Result<(), DeviceError> {
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Err(DeviceError::UnknownEvent(device_event, thread_id));
        };
        if thread_id >= self.pairs.len() {
            return Err(DeviceError::UnknownEvent(device_event, thread_id));
        }
        match u64::from(device_event) {
            0 => self.process_rx(thread_id, rx),
            1 => {
                self.process_tx(thread_id, tx)?;
                // The guest may have been waiting on RX buffers filled meanwhile.
                self.process_rx(thread_id, rx)
            }
            id if id == self.tap_event_id() => {
                if rx.get_ref().is_enabled() && rx.get_ref().get_queue().ready() {
                    self.process_rx(thread_id, rx)
                } else {
                    Ok(())
                }
            }
            _ => Err(DeviceError::UnknownEvent(device_event, thread_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const QSIZE: u16 = 16;
    const HDR: usize = 12;

    /// A guest with 1 MiB of memory and an RX ring whose available buffers are `bufs`.
    fn rx_ring(bufs: &[(u64, u32)]) -> (Mem, VringRwLock<Mem>, (u64, u64, u64)) {
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let guard = mem.memory();
        let mock = MockSplitQueue::create(&*guard, GuestAddress(0), QSIZE);
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .map(|&(addr, len)| {
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let addrs = (
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        );
        let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(addrs.0, addrs.1, addrs.2).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (mem, vring, addrs)
    }

    fn used(mem: &Mem, used_ring: u64) -> Vec<(u32, u32)> {
        let m = mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(used_ring + 2)).unwrap();
        (0..idx as u64)
            .map(|i| {
                let at = used_ring + 4 + 8 * i;
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..HDR + len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn mergeable_frame_spreads_over_buffers_and_counts_them() {
        let (mem, vring, (_, _, used_ring)) =
            rx_ring(&[(0x4_0000, 1500), (0x5_0000, 1500), (0x6_0000, 1500)]);
        let stats = Stats::default();
        let mut f = frame(3000);
        let guard = mem.memory();
        let r = deliver(&mut vring.get_mut(), &guard, &mut f, HDR, true, &stats).unwrap();
        assert!(matches!(r, Delivery::Delivered));
        assert_eq!(used(&mem, used_ring), [(0, 1500), (1, 1500), (2, 12)]);
        let mut got = vec![0u8; 3012];
        guard
            .read_slice(&mut got[..1500], GuestAddress(0x4_0000))
            .unwrap();
        guard
            .read_slice(&mut got[1500..3000], GuestAddress(0x5_0000))
            .unwrap();
        guard
            .read_slice(&mut got[3000..], GuestAddress(0x6_0000))
            .unwrap();
        assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[HDR..], &f[HDR..]);
    }

    #[test]
    fn too_few_mergeable_buffers_leave_the_ring_untouched() {
        let (mem, vring, (_, _, used_ring)) = rx_ring(&[(0x4_0000, 1000), (0x5_0000, 1000)]);
        let stats = Stats::default();
        let mut f = frame(3000);
        let guard = mem.memory();
        let r = deliver(&mut vring.get_mut(), &guard, &mut f, HDR, true, &stats).unwrap();
        assert!(matches!(r, Delivery::NoBuffers));
        assert!(used(&mem, used_ring).is_empty());
        assert_eq!(vring.queue_next_avail(), 0, "buffers given back");
    }

    #[test]
    fn oversized_frame_without_merging_is_dropped() {
        let (mem, vring, (_, _, used_ring)) = rx_ring(&[(0x4_0000, 1000), (0x5_0000, 4000)]);
        let stats = Stats::default();
        let mut f = frame(3000);
        let guard = mem.memory();
        let r = deliver(&mut vring.get_mut(), &guard, &mut f, HDR, false, &stats).unwrap();
        assert!(matches!(r, Delivery::Dropped));
        assert_eq!(used(&mem, used_ring), [(0, 0)]);
        // The next frame takes the next buffer whole.
        let r = deliver(&mut vring.get_mut(), &guard, &mut f, HDR, false, &stats).unwrap();
        assert!(matches!(r, Delivery::Delivered));
        assert_eq!(used(&mem, used_ring), [(0, 0), (1, 3012)]);
        let mut hdr = [0u8; HDR];
        guard.read_slice(&mut hdr, GuestAddress(0x5_0000)).unwrap();
        assert_eq!(&hdr[10..12], &1u16.to_le_bytes(), "num_buffers");
    }

    #[test]
    fn buffer_outside_guest_memory_is_returned_unused() {
        let (mem, vring, (_, _, used_ring)) = rx_ring(&[(0xdead_0000, 4000)]);
        let stats = Stats::default();
        let mut f = frame(100);
        let guard = mem.memory();
        let r = deliver(&mut vring.get_mut(), &guard, &mut f, HDR, true, &stats).unwrap();
        assert!(matches!(r, Delivery::Dropped));
        assert_eq!(used(&mem, used_ring), [(0, 0)]);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
    }
}
