//! The virtio-net device served over vhost-user: feature negotiation, config space, and the
//! data path between the guest's rings and the tap.
//!
//! Queue pair `i` (RX ring `2i`, TX ring `2i+1`) is served by worker thread `i` and owns tap
//! queue `i`. Everything the frontend or guest hands us (descriptor chains, headers, lengths)
//! is checked; a bad element is counted and returned to the guest unused, never trusted.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use citadel_sandbox::memory_file::MemoryFilePolicy;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};

use crate::stats::Stats;
use crate::tap::{Offloads, TapQueue};

/// Largest frame the tap can hand us or we hand it: a 64 KiB GSO frame plus its Ethernet
/// header, after the virtio-net header.
const MAX_FRAME: usize = 65535 + 14;
/// Largest virtio-net header (virtio_net_hdr_v1).
const MAX_HDR: usize = 12;
/// Largest ring size accepted from the frontend.
pub const QUEUE_SIZE: u16 = 1024;

/// Guest memory as the rings and the data path see it; replaced on each memory table.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
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

impl NetConfig {
    /// A one-queue device whose tap is `frames`, a descriptor that passes frames whole (one
    /// end of a socket pair), for tests without a tap device.
    #[cfg(test)]
    pub fn over_frame_socket(frames: std::os::fd::OwnedFd) -> Arc<NetConfig> {
        Arc::new(NetConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            taps: vec![TapQueue::from_frame_socket(std::fs::File::from(frames))],
            stats: Arc::new(Stats::default()),
            memory_files: MemoryFilePolicy::SealedOnly,
        })
    }
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
    mem: Mem,
    acked: AtomicU64,
    event_idx: AtomicBool,
    hdr_len: AtomicUsize,
    pairs: Vec<Mutex<Pair>>,
}

/// Why handling an event failed; ends the worker thread, so only for broken invariants of our
/// own (the guest's mistakes are counted, not returned).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The queue structures themselves are unusable.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Interrupting the guest failed.
    #[error("signalling the guest: {0}")]
    Signal(#[source] io::Error),
}

/// Outcome of trying to hand one frame to the guest.
enum Delivery {
    Delivered,
    NoBuffers,
    Dropped,
}

impl NetBackend {
    /// A fresh device state for a new frontend connection, seeing guest memory through `mem`.
    pub fn new(config: Arc<NetConfig>, mem: Mem) -> Self {
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
            mem,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            hdr_len: AtomicUsize::new(10),
            pairs,
        }
    }

    /// The tap fd of queue pair `i`, for registration with worker `i`'s epoll.
    pub fn tap_fd(&self, i: usize) -> std::os::fd::RawFd {
        self.config.taps[i].as_raw_fd()
    }

    /// Number of queue pairs.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
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

    fn has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    /// Runs `work` on a ring until it says how it stopped. With EVENT_IDX, a ring that ran dry
    /// gets notifications back with the re-check that catches a buffer the guest added
    /// meanwhile, and a ring that is short of buffers for the next frame asks for a notification
    /// at the guest's next buffer; either way the pass repeats only when the guest has added
    /// buffers since, so a ring that cannot make progress never spins the worker.
    fn drive(
        &self,
        vring: &VringRwLock<Mem>,
        mut work: impl FnMut(&mut VringState<Mem>, &MemGuard) -> Result<Pass, DeviceError>,
    ) -> Result<(), DeviceError> {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if self.event_idx.load(Ordering::Acquire) {
            loop {
                state.disable_notification()?;
                let again = match work(&mut state, &mem)? {
                    Pass::Dry => state.enable_notification()?,
                    Pass::Short => notify_at_next_buffer(state.get_queue(), &mem)?,
                    Pass::Done => false,
                };
                if !again {
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
            while let Some(chain) = pop(state, mem)? {
                let head = chain.head_index();
                transmit(chain, mem, buf, hdr_len, tap, stats);
                // Only now: once the used entry is published the guest may reuse the buffers.
                state.add_used(head, 0)?;
                used_any = true;
            }
            if used_any && state.needs_notification()? {
                state.signal_used_queue().map_err(DeviceError::Signal)?;
            }
            Ok(Pass::Dry)
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
            let mut pass = Pass::Done;
            loop {
                let len = match pair.pending.take() {
                    Some(len) => len,
                    None => {
                        let queue = state.get_queue();
                        let avail = queue.avail_idx(&**mem, Ordering::Acquire)?;
                        if avail.0 == queue.next_avail() {
                            pass = Pass::Dry;
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
                        pass = Pass::Short;
                        break;
                    }
                }
            }
            if used_any && state.needs_notification()? {
                state.signal_used_queue().map_err(DeviceError::Signal)?;
            }
            Ok(pass)
        })
    }
}

/// How a pass over a ring stopped.
enum Pass {
    /// The ring has no buffers left.
    Dry,
    /// The ring's buffers are too few for the frame in hand.
    Short,
    /// Something other than the ring stopped it (the tap has no frame).
    Done,
}

/// The next chain on the ring, if any. A guest announcing more new buffers than the ring holds
/// has broken it: that is an error, which stops the queue pair, where virtio-queue's own pop
/// would answer "nothing" (and log) at every attempt.
fn pop(
    state: &mut VringState<Mem>,
    mem: &MemGuard,
) -> Result<Option<DescriptorChain<MemGuard>>, DeviceError> {
    Ok(state.get_queue_mut().iter(mem.clone())?.next())
}

/// Asks the guest (EVENT_IDX) to notify when it adds a buffer after those already on the ring,
/// by moving the used ring's `avail_event` to the ring's current available index; virtio-queue
/// only re-enables notifications at its next unprocessed entry, which the guest has passed
/// already. Says whether the guest added buffers before the request was visible, in which case
/// no notification will come and the ring must be looked at again.
fn notify_at_next_buffer(queue: &Queue, mem: &MemGuard) -> Result<bool, DeviceError> {
    let avail = queue.avail_idx(&**mem, Ordering::Acquire)?;
    let avail_event = GuestAddress(queue.used_ring())
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    mem.store(avail.0.to_le(), avail_event, Ordering::Relaxed)
        .map_err(virtio_queue::Error::GuestMemory)?;
    // The guest reads avail_event after publishing its index; order our write before our read.
    fence(Ordering::SeqCst);
    Ok(queue.avail_idx(&**mem, Ordering::Relaxed)? != avail)
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
        let Some(chain) = pop(state, mem)? else {
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

/// What the frontend's message handler asks of the device.
impl NetBackend {
    /// Number of rings: an RX and a TX ring per pair.
    pub fn num_queues(&self) -> usize {
        self.pairs.len() * 2
    }

    /// Virtio and vhost-user feature bits offered.
    pub fn features(&self) -> u64 {
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

    /// Takes the features the frontend acked, and re-tunes the taps for them.
    pub fn acked_features(&self, features: u64) {
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

    /// vhost-user protocol features offered.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    /// Whether the rings use EVENT_IDX notification suppression.
    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// `size` bytes of the virtio-net config space from `offset`.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
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
}

/// Events of a queue pair's worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairEvent {
    /// The RX ring was kicked: the guest added receive buffers.
    RxKick,
    /// The TX ring was kicked: the guest has frames to send.
    TxKick,
    /// The tap has frames for the guest.
    Tap,
}

impl NetBackend {
    /// Serves one event of queue pair `pair` (below [`Self::pairs`]), whose rings are `rx` and
    /// `tx`. An error means the pair cannot go on for the rest of the connection.
    pub fn handle_event(
        &self,
        event: PairEvent,
        pair: usize,
        rx: &VringRwLock<Mem>,
        tx: &VringRwLock<Mem>,
    ) -> Result<(), DeviceError> {
        self.dispatch(event, pair, rx, tx).inspect_err(|e| {
            // The worker of this pair stops for the rest of the connection; say so.
            log::error!("queue pair {pair} stopped: {e}");
            Stats::bump(&self.config.stats.errors);
        })
    }

    fn dispatch(
        &self,
        event: PairEvent,
        thread_id: usize,
        rx: &VringRwLock<Mem>,
        tx: &VringRwLock<Mem>,
    ) -> Result<(), DeviceError> {
        match event {
            PairEvent::RxKick => self.process_rx(thread_id, rx),
            PairEvent::TxKick => {
                self.process_tx(thread_id, tx)?;
                // The guest may have been waiting on RX buffers filled meanwhile.
                self.process_rx(thread_id, rx)
            }
            PairEvent::Tap => {
                if rx.get_ref().is_enabled() && rx.get_ref().get_queue().ready() {
                    self.process_rx(thread_id, rx)
                } else {
                    Ok(())
                }
            }
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

    /// A device with event-index notifications and mergeable RX buffers over one queue pair,
    /// whose tap is one end of a datagram pair (which keeps frames whole, as a tap does); the
    /// other end is returned.
    fn event_idx_backend(mem: &Mem) -> (NetBackend, std::os::unix::net::UnixDatagram) {
        let (tap, net) = std::os::unix::net::UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        let config = NetConfig::over_frame_socket(tap.into());
        let backend = NetBackend::new(config, mem.clone());
        backend.acked.store(
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_NET_F_MRG_RXBUF,
            Ordering::Release,
        );
        backend.hdr_len.store(HDR, Ordering::Release);
        backend.set_event_idx(true);
        (backend, net)
    }

    /// Runs `f` on its own thread and fails the test if it has not returned within 10 s, so a
    /// worker that spins is reported instead of hanging the test run.
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the ring pass never returned")
    }

    #[test]
    fn a_ring_announcing_more_buffers_than_it_holds_stops_the_pair_instead_of_spinning() {
        let (mem, vring, (_, avail_ring, _)) = rx_ring(&[(0x4_0000, 1000)]);
        vring.set_queue_event_idx(true);
        mem.memory()
            .write_obj(QSIZE + 5, GuestAddress(avail_ring + 2))
            .unwrap();
        let (backend, _net) = event_idx_backend(&mem);
        let result = returns(move || backend.process_tx(0, &vring));
        assert!(
            matches!(
                result,
                Err(DeviceError::Queue(
                    virtio_queue::Error::InvalidAvailRingIndex
                ))
            ),
            "{result:?}"
        );
    }

    #[test]
    fn an_rx_ring_short_of_buffers_asks_for_the_next_buffer_and_returns() {
        let (mem, vring, (_, _, used_ring)) = rx_ring(&[(0x4_0000, 1000), (0x5_0000, 1000)]);
        vring.set_queue_event_idx(true);
        let (backend, net) = event_idx_backend(&mem);
        net.send(&frame(3000)).unwrap();
        let (backend, vring) = returns(move || {
            backend.process_rx(0, &vring).unwrap();
            (backend, vring)
        });
        assert!(used(&mem, used_ring).is_empty(), "no buffer was used");
        let avail_event: u16 = mem
            .memory()
            .read_obj(GuestAddress(used_ring + 4 + 8 * u64::from(QSIZE)))
            .unwrap();
        assert_eq!(
            avail_event, 2,
            "the guest is asked to notify at its next buffer"
        );
        assert!(backend.pairs[0].lock().unwrap().pending.is_some());
        drop(vring);
    }
}
