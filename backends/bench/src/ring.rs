//! The driver's side of a split virtqueue.
//!
//! The benchmark plays the guest driver: it owns the descriptor table and the available ring,
//! and only reads the used ring, which the backend (an untrusted process) writes. Everything the
//! driver needs to remember about its own chains (free list, chain links, writable lengths) is
//! kept host-side, so a backend that scribbles over the descriptor table cannot corrupt the
//! driver's bookkeeping; every used element is checked against that shadow state.

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, Le32};

/// Largest queue size the virtio specification allows for a split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const DESC_SIZE: u64 = 16;
const AVAIL_HEADER: u64 = 4;
const USED_HEADER: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;

/// Errors of the split-ring driver.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is not a power of two between 1 and {MAX_QUEUE_SIZE}")]
    InvalidSize(u32),
    /// A chain was requested with no buffers.
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    /// Not enough free descriptors for a chain.
    #[error("descriptor chain of {needed} needs more than the {free} free descriptors")]
    NoFreeDescriptors {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors currently free.
        free: usize,
    },
    /// Reading or writing the ring in guest memory failed.
    #[error("ring access at {addr:#x} failed: {source}")]
    Memory {
        /// Guest address of the access.
        addr: u64,
        /// What vm-memory reported.
        source: GuestMemoryError,
    },
    /// The backend advanced the used index by more than the ring holds.
    #[error("backend moved the used index from {last} to {new}, more than the {size} entries the ring holds")]
    UsedIndexJump {
        /// Last used index the driver consumed.
        last: u16,
        /// Used index the backend published.
        new: u16,
        /// Queue size.
        size: u16,
    },
    /// The backend returned more chains than the driver has in flight.
    #[error("backend returned {pending} used entries but only {in_flight} chains are in flight")]
    TooManyUsed {
        /// Entries the backend published beyond what the driver consumed.
        pending: u16,
        /// Chains the driver made available and has not seen back.
        in_flight: u16,
    },
    /// A used element names a descriptor outside the table.
    #[error("backend returned used id {id}, outside the queue of {size} descriptors")]
    UsedIdOutOfRange {
        /// Id the backend wrote.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used element names a descriptor that is not the head of an in-flight chain.
    #[error("backend returned used id {0}, which is not the head of a chain in flight")]
    UsedIdNotInFlight(u16),
    /// A used element reports more bytes written than the chain's writable buffers hold.
    #[error("backend reported {len} bytes written to chain {id}, whose writable buffers hold {writable}")]
    UsedLenTooLong {
        /// Head of the chain.
        id: u16,
        /// Length the backend reported.
        len: u32,
        /// Bytes the chain's device-writable descriptors cover.
        writable: u64,
    },
}

type Result<T> = std::result::Result<T, RingError>;

fn mem_err(addr: GuestAddress) -> impl FnOnce(GuestMemoryError) -> RingError {
    move |source| RingError::Memory {
        addr: addr.raw_value(),
        source,
    }
}

/// Where the three parts of a split ring live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors (and ring entries).
    pub size: u16,
    /// Descriptor table (16-byte aligned).
    pub desc_table: GuestAddress,
    /// Available ring (2-byte aligned).
    pub avail_ring: GuestAddress,
    /// Used ring (4-byte aligned).
    pub used_ring: GuestAddress,
}

impl RingLayout {
    /// Lays out a ring of `size` entries contiguously from `base`, which must be 4 KiB aligned
    /// like the legacy layout; the used ring starts on its own page so the backend's writes do
    /// not share a cache line with the driver's.
    pub fn new(base: GuestAddress, size: u16) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(RingError::InvalidSize(size.into()));
        }
        let n = u64::from(size);
        let desc_table = base;
        let avail_ring = desc_table.unchecked_add(DESC_SIZE * n);
        let avail_end = avail_ring.raw_value() + AVAIL_HEADER + 2 * n + 2;
        let used_ring = GuestAddress(align_up(avail_end, 4096));
        Ok(Self {
            size,
            desc_table,
            avail_ring,
            used_ring,
        })
    }

    /// Bytes the ring occupies from `desc_table`, rounded up to whole pages.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let avail_end = DESC_SIZE * n + AVAIL_HEADER + 2 * n + 2;
        align_up(avail_end, 4096) + align_up(USED_HEADER + USED_ELEM_SIZE * n + 2, 4096)
    }

    fn avail_idx(&self) -> GuestAddress {
        self.avail_ring.unchecked_add(2)
    }

    fn avail_entry(&self, slot: u16) -> GuestAddress {
        self.avail_ring
            .unchecked_add(AVAIL_HEADER + 2 * u64::from(slot % self.size))
    }

    fn used_event(&self) -> GuestAddress {
        self.avail_ring
            .unchecked_add(AVAIL_HEADER + 2 * u64::from(self.size))
    }

    fn used_flags(&self) -> GuestAddress {
        self.used_ring
    }

    fn used_idx(&self) -> GuestAddress {
        self.used_ring.unchecked_add(2)
    }

    fn used_entry(&self, slot: u16) -> GuestAddress {
        self.used_ring
            .unchecked_add(USED_HEADER + USED_ELEM_SIZE * u64::from(slot % self.size))
    }

    fn avail_event(&self) -> GuestAddress {
        self.used_ring
            .unchecked_add(USED_HEADER + USED_ELEM_SIZE * u64::from(self.size))
    }

    fn desc(&self, index: u16) -> GuestAddress {
        self.desc_table.unchecked_add(DESC_SIZE * u64::from(index))
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (`VRING_DESC_F_WRITE`).
    pub device_writable: bool,
}

/// A chain the backend has finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor of the chain, as returned by [`SplitRing::add_chain`].
    pub head: u16,
    /// Bytes the backend says it wrote into the chain's writable buffers.
    pub len: u32,
}

/// The driver's state for one split virtqueue.
#[derive(Debug)]
pub struct SplitRing {
    layout: RingLayout,
    event_idx: bool,
    /// Free descriptor indices, used as a stack.
    free: Vec<u16>,
    /// Shadow of each descriptor's `next` link, valid while the descriptor is in a chain.
    next: Vec<u16>,
    /// Per head: number of descriptors in its chain; 0 when it is not the head of a live chain.
    chain_len: Vec<u16>,
    /// Per head: bytes covered by the chain's device-writable descriptors.
    writable: Vec<u64>,
    /// Next free slot in the available ring (the value `avail.idx` will take).
    next_avail: u16,
    /// `avail.idx` as of the last notification decision.
    avail_at_last_kick: u16,
    /// Next used-ring slot to consume.
    last_used: u16,
    /// Chains made available and not yet returned.
    in_flight: u16,
}

impl SplitRing {
    /// Creates the driver state and zeroes the ring's control fields in `mem`, as a driver
    /// does before handing the addresses to the device.
    pub fn new(mem: &GuestMemoryMmap, layout: RingLayout, event_idx: bool) -> Result<Self> {
        let size = usize::from(layout.size);
        for addr in [layout.avail_ring, layout.avail_idx(), layout.used_event()] {
            mem.write_obj(0u16, addr).map_err(mem_err(addr))?;
        }
        for addr in [layout.used_flags(), layout.used_idx(), layout.avail_event()] {
            mem.write_obj(0u16, addr).map_err(mem_err(addr))?;
        }
        Ok(Self {
            layout,
            event_idx,
            // Reversed so the first chains use low indices, which keeps them easy to read in
            // traces; the order has no effect on correctness.
            free: (0..layout.size).rev().collect(),
            next: vec![0; size],
            chain_len: vec![0; size],
            writable: vec![0; size],
            next_avail: 0,
            avail_at_last_kick: 0,
            last_used: 0,
            in_flight: 0,
        })
    }

    /// The ring's addresses.
    #[cfg(test)]
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Descriptors not currently in a chain.
    #[cfg(test)]
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains made available and not yet returned by the backend.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Writes `buffers` as a descriptor chain and places its head in the next available-ring
    /// slot. The backend does not see it until [`SplitRing::publish`].
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, buffers: &[Buffer]) -> Result<u16> {
        if buffers.is_empty() {
            return Err(RingError::EmptyChain);
        }
        if buffers.len() > self.free.len() {
            return Err(RingError::NoFreeDescriptors {
                needed: buffers.len(),
                free: self.free.len(),
            });
        }
        // The chain is the top of the free stack, head on top. It is read in place, not
        // collected, because this runs once per request of the measured I/O; it leaves the
        // stack only once every descriptor is written, so a failed write loses none.
        let start = self.free.len() - buffers.len();
        let chain = &self.free[start..];
        let head = chain[chain.len() - 1];
        let mut writable = 0u64;
        for (pos, buffer) in buffers.iter().enumerate() {
            let rest = chain.len() - 1 - pos;
            let index = chain[rest];
            let mut flags = 0u16;
            if buffer.device_writable {
                flags |= VRING_DESC_F_WRITE as u16;
                writable += u64::from(buffer.len);
            }
            let next = match rest.checked_sub(1) {
                Some(below) => {
                    flags |= VRING_DESC_F_NEXT as u16;
                    chain[below]
                }
                None => 0,
            };
            self.next[usize::from(index)] = next;
            let desc = Descriptor::new(buffer.addr.raw_value(), buffer.len, flags, next);
            let addr = self.layout.desc(index);
            mem.write_obj(desc, addr).map_err(mem_err(addr))?;
        }
        self.free.truncate(start);
        self.chain_len[usize::from(head)] = buffers.len() as u16;
        self.writable[usize::from(head)] = writable;

        let slot = self.layout.avail_entry(self.next_avail);
        mem.write_obj(head.to_le(), slot).map_err(mem_err(slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight += 1;
        Ok(head)
    }

    /// Makes every chain added since the last call visible to the backend and says whether
    /// the backend asked to be notified about them (the caller then kicks).
    pub fn publish(&mut self, mem: &GuestMemoryMmap) -> Result<bool> {
        let new = self.next_avail;
        let old = self.avail_at_last_kick;
        if new == old {
            return Ok(false);
        }
        let idx = self.layout.avail_idx();
        // Release: the descriptors and ring entries written above must be visible before the
        // index that tells the backend about them.
        mem.store(new.to_le(), idx, Ordering::Release)
            .map_err(mem_err(idx))?;
        // The index store must be ordered before reading the backend's suppression state, or
        // the backend could go to sleep without having seen it while we skip the kick.
        fence(Ordering::SeqCst);
        self.avail_at_last_kick = new;
        if self.event_idx {
            let addr = self.layout.avail_event();
            let event = u16::from_le(mem.load(addr, Ordering::Acquire).map_err(mem_err(addr))?);
            Ok(need_event(event, new, old))
        } else {
            let addr = self.layout.used_flags();
            let flags = u16::from_le(mem.load(addr, Ordering::Acquire).map_err(mem_err(addr))?);
            Ok(flags & VRING_USED_F_NO_NOTIFY as u16 == 0)
        }
    }

    /// Takes the next chain the backend returned, if any, after checking the used element
    /// against what is in flight. The chain's descriptors go back to the free list.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Completion>> {
        let idx_addr = self.layout.used_idx();
        // Acquire: the used element must be read after the index that published it.
        let used_idx = u16::from_le(
            mem.load(idx_addr, Ordering::Acquire)
                .map_err(mem_err(idx_addr))?,
        );
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.layout.size {
            return Err(RingError::UsedIndexJump {
                last: self.last_used,
                new: used_idx,
                size: self.layout.size,
            });
        }
        if pending > self.in_flight {
            return Err(RingError::TooManyUsed {
                pending,
                in_flight: self.in_flight,
            });
        }
        let entry = self.layout.used_entry(self.last_used);
        let id: u32 = mem.read_obj::<Le32>(entry).map_err(mem_err(entry))?.into();
        let len_addr = entry.unchecked_add(4);
        let len: u32 = mem
            .read_obj::<Le32>(len_addr)
            .map_err(mem_err(len_addr))?
            .into();
        if id >= u32::from(self.layout.size) {
            return Err(RingError::UsedIdOutOfRange {
                id,
                size: self.layout.size,
            });
        }
        let head = id as u16;
        let chain_len = self.chain_len[usize::from(head)];
        if chain_len == 0 {
            return Err(RingError::UsedIdNotInFlight(head));
        }
        let writable = self.writable[usize::from(head)];
        if u64::from(len) > writable {
            return Err(RingError::UsedLenTooLong {
                id: head,
                len,
                writable,
            });
        }
        self.free_chain(head, chain_len);
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Some(Completion { head, len }))
    }

    /// Asks the backend for a notification at its next completion and says whether
    /// completions arrived meanwhile (then the caller reaps instead of sleeping).
    pub fn arm_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool> {
        if self.event_idx {
            let addr = self.layout.used_event();
            mem.store(self.last_used.to_le(), addr, Ordering::Release)
                .map_err(mem_err(addr))?;
        }
        // The request must be visible before we look at the used index again, or a completion
        // landing in between could go unsignalled while we sleep.
        fence(Ordering::SeqCst);
        let addr = self.layout.used_idx();
        let used_idx = u16::from_le(mem.load(addr, Ordering::Acquire).map_err(mem_err(addr))?);
        Ok(used_idx != self.last_used)
    }

    fn free_chain(&mut self, head: u16, chain_len: u16) {
        let mut index = head;
        for _ in 0..chain_len {
            self.free.push(index);
            index = self.next[usize::from(index)];
        }
        self.chain_len[usize::from(head)] = 0;
        self.writable[usize::from(head)] = 0;
    }
}

/// The virtio `vring_need_event` test: whether moving an index from `old` to `new` crossed
/// the `event` index the other side asked to be told about.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: GuestAddress = GuestAddress(0x1_0000);

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn ring(mem: &GuestMemoryMmap, size: u16, event_idx: bool) -> SplitRing {
        SplitRing::new(mem, RingLayout::new(BASE, size).unwrap(), event_idx).unwrap()
    }

    fn blk_like_chain(n: u64) -> [Buffer; 3] {
        [
            Buffer {
                addr: GuestAddress(0x8_0000 + n * 0x100),
                len: 16,
                device_writable: false,
            },
            Buffer {
                addr: GuestAddress(0x9_0000 + n * 0x1000),
                len: 4096,
                device_writable: true,
            },
            Buffer {
                addr: GuestAddress(0x8_0010 + n * 0x100),
                len: 1,
                device_writable: true,
            },
        ]
    }

    /// Plays the device: reads the available ring like a backend would and returns `head`
    /// with `len` in the next used slot.
    struct FakeDevice {
        layout: RingLayout,
        next_avail: u16,
        next_used: u16,
    }

    impl FakeDevice {
        fn new(layout: RingLayout) -> Self {
            Self {
                layout,
                next_avail: 0,
                next_used: 0,
            }
        }

        fn take_avail(&mut self, mem: &GuestMemoryMmap) -> Option<u16> {
            let idx: u16 = mem
                .load(self.layout.avail_idx(), Ordering::Acquire)
                .unwrap();
            if idx == self.next_avail {
                return None;
            }
            let head: u16 = mem
                .read_obj(self.layout.avail_entry(self.next_avail))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            Some(head)
        }

        fn put_used(&mut self, mem: &GuestMemoryMmap, id: u32, len: u32) {
            let entry = self.layout.used_entry(self.next_used);
            mem.write_obj(id, entry).unwrap();
            mem.write_obj(len, entry.unchecked_add(4)).unwrap();
            self.next_used = self.next_used.wrapping_add(1);
            mem.store(self.next_used, self.layout.used_idx(), Ordering::Release)
                .unwrap();
        }

        fn chain(&self, mem: &GuestMemoryMmap, head: u16) -> Vec<Descriptor> {
            let mut out = Vec::new();
            let mut index = head;
            loop {
                let desc: Descriptor = mem.read_obj(self.layout.desc(index)).unwrap();
                out.push(desc);
                if !desc.has_next() {
                    return out;
                }
                index = desc.next();
            }
        }
    }

    #[test]
    fn layout_is_aligned_and_non_overlapping() {
        let layout = RingLayout::new(BASE, 256).unwrap();
        assert_eq!(layout.desc_table, BASE);
        assert_eq!(layout.avail_ring, BASE.unchecked_add(16 * 256));
        assert_eq!(layout.used_ring.raw_value() % 4096, 0);
        assert!(layout.used_event().raw_value() + 2 <= layout.used_ring.raw_value());
        let end = layout.avail_event().raw_value() + 2;
        assert!(end <= BASE.raw_value() + RingLayout::footprint(256));
    }

    #[test]
    fn rejects_bad_sizes() {
        for size in [0u16, 3, 100] {
            assert!(matches!(
                RingLayout::new(BASE, size),
                Err(RingError::InvalidSize(_))
            ));
        }
        assert!(RingLayout::new(BASE, MAX_QUEUE_SIZE).is_ok());
    }

    #[test]
    fn chain_is_written_as_linked_descriptors() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let bufs = blk_like_chain(0);
        let head = ring.add_chain(&mem, &bufs).unwrap();
        assert_eq!(ring.free_descriptors(), 5);
        assert!(ring.publish(&mem).unwrap());

        let mut dev = FakeDevice::new(ring.layout());
        assert_eq!(dev.take_avail(&mem), Some(head));
        let chain = dev.chain(&mem, head);
        assert_eq!(chain.len(), 3);
        for (desc, buf) in chain.iter().zip(&bufs) {
            assert_eq!(desc.addr(), buf.addr);
            assert_eq!(desc.len(), buf.len);
            assert_eq!(desc.is_write_only(), buf.device_writable);
        }
        assert!(!chain[2].has_next());
    }

    #[test]
    fn allocation_fails_cleanly_when_full_and_recovers_after_reap() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let a = ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.add_chain(&mem, &blk_like_chain(1)).unwrap();
        assert_eq!(ring.free_descriptors(), 2);
        let err = ring.add_chain(&mem, &blk_like_chain(2)).unwrap_err();
        assert!(matches!(
            err,
            RingError::NoFreeDescriptors { needed: 3, free: 2 }
        ));
        assert_eq!(ring.free_descriptors(), 2);
        assert!(matches!(
            ring.add_chain(&mem, &[]),
            Err(RingError::EmptyChain)
        ));

        ring.publish(&mem).unwrap();
        let mut dev = FakeDevice::new(ring.layout());
        dev.take_avail(&mem);
        dev.put_used(&mem, a.into(), 4097);
        assert_eq!(
            ring.pop_used(&mem).unwrap(),
            Some(Completion { head: a, len: 4097 })
        );
        assert_eq!(ring.free_descriptors(), 5);
        ring.add_chain(&mem, &blk_like_chain(2)).unwrap();
        assert_eq!(ring.free_descriptors(), 2);
    }

    #[test]
    fn out_of_order_completions_across_index_wraparound() {
        let mem = memory();
        let size = 16u16;
        let mut ring = ring(&mem, size, false);
        let mut dev = FakeDevice::new(ring.layout());
        let mut completed = 0u32;
        // Five chains of three descriptors in flight at once; run far past the 16-bit index
        // wraparound, completing each batch in reverse order.
        while completed < 70_000 {
            let mut heads = Vec::new();
            for n in 0..5 {
                heads.push(ring.add_chain(&mem, &blk_like_chain(n)).unwrap());
            }
            ring.publish(&mem).unwrap();
            let mut seen = Vec::new();
            while let Some(head) = dev.take_avail(&mem) {
                seen.push(head);
            }
            assert_eq!(seen, heads);
            for &head in heads.iter().rev() {
                dev.put_used(&mem, head.into(), 1);
            }
            for &head in heads.iter().rev() {
                let c = ring.pop_used(&mem).unwrap().unwrap();
                assert_eq!(c.head, head);
                completed += 1;
            }
            assert_eq!(ring.pop_used(&mem).unwrap(), None);
            assert_eq!(ring.in_flight(), 0);
            assert_eq!(ring.free_descriptors(), usize::from(size));
        }
        assert_eq!(ring.last_used, (completed % 65_536) as u16);
    }

    #[test]
    fn rejects_used_id_out_of_range() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.publish(&mem).unwrap();
        let mut dev = FakeDevice::new(ring.layout());
        dev.put_used(&mem, 8, 1);
        assert!(matches!(
            ring.pop_used(&mem),
            Err(RingError::UsedIdOutOfRange { id: 8, size: 8 })
        ));
    }

    #[test]
    fn rejects_used_id_that_is_not_a_live_head() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let head = ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.publish(&mem).unwrap();
        let mut dev = FakeDevice::new(ring.layout());
        // The second descriptor of the chain is in use but is not a head.
        let middle = dev.chain(&mem, head)[0].next();
        dev.put_used(&mem, middle.into(), 1);
        assert!(matches!(
            ring.pop_used(&mem),
            Err(RingError::UsedIdNotInFlight(m)) if m == middle
        ));
    }

    #[test]
    fn rejects_a_chain_returned_twice() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let a = ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.add_chain(&mem, &blk_like_chain(1)).unwrap();
        ring.publish(&mem).unwrap();
        let mut dev = FakeDevice::new(ring.layout());
        dev.put_used(&mem, a.into(), 1);
        dev.put_used(&mem, a.into(), 1);
        assert!(ring.pop_used(&mem).unwrap().is_some());
        assert!(matches!(
            ring.pop_used(&mem),
            Err(RingError::UsedIdNotInFlight(h)) if h == a
        ));
    }

    #[test]
    fn rejects_length_beyond_writable_buffers() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let head = ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.publish(&mem).unwrap();
        let mut dev = FakeDevice::new(ring.layout());
        dev.put_used(&mem, head.into(), 4098);
        assert!(matches!(
            ring.pop_used(&mem),
            Err(RingError::UsedLenTooLong {
                len: 4098,
                writable: 4097,
                ..
            })
        ));
    }

    #[test]
    fn rejects_used_index_jumps() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.publish(&mem).unwrap();
        let idx = ring.layout().used_idx();
        mem.store(9u16, idx, Ordering::Release).unwrap();
        assert!(matches!(
            ring.pop_used(&mem),
            Err(RingError::UsedIndexJump { new: 9, .. })
        ));
        mem.store(2u16, idx, Ordering::Release).unwrap();
        assert!(matches!(
            ring.pop_used(&mem),
            Err(RingError::TooManyUsed {
                pending: 2,
                in_flight: 1
            })
        ));
    }

    #[test]
    fn kick_follows_no_notify_flag_without_event_idx() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        assert!(!ring.publish(&mem).unwrap(), "nothing new, no kick");
        ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        assert!(ring.publish(&mem).unwrap());
        mem.write_obj(VRING_USED_F_NO_NOTIFY as u16, ring.layout().used_flags())
            .unwrap();
        ring.add_chain(&mem, &blk_like_chain(1)).unwrap();
        assert!(!ring.publish(&mem).unwrap());
    }

    #[test]
    fn kick_follows_avail_event_with_event_idx() {
        let mem = memory();
        let mut ring = ring(&mem, 16, true);
        let avail_event = ring.layout().avail_event();
        // The backend wants to hear when avail.idx passes 0: the first publish kicks.
        ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        assert!(ring.publish(&mem).unwrap());
        // It has not caught up (still asks for 0): publishing 1 -> 3 does not cross it.
        ring.add_chain(&mem, &blk_like_chain(1)).unwrap();
        ring.add_chain(&mem, &blk_like_chain(2)).unwrap();
        assert!(!ring.publish(&mem).unwrap());
        // It now asks to hear about index 3 being passed; 3 -> 4 crosses it.
        mem.write_obj(3u16, avail_event).unwrap();
        ring.add_chain(&mem, &blk_like_chain(3)).unwrap();
        assert!(ring.publish(&mem).unwrap());
    }

    #[test]
    fn arm_notification_publishes_used_event_and_reports_races() {
        let mem = memory();
        let mut ring = ring(&mem, 8, true);
        let head = ring.add_chain(&mem, &blk_like_chain(0)).unwrap();
        ring.publish(&mem).unwrap();
        assert!(!ring.arm_notification(&mem).unwrap());
        let mut dev = FakeDevice::new(ring.layout());
        dev.put_used(&mem, head.into(), 1);
        assert!(ring.arm_notification(&mem).unwrap());
        ring.pop_used(&mem).unwrap().unwrap();
        assert!(!ring.arm_notification(&mem).unwrap());
        let used_event: u16 = mem.read_obj(ring.layout().used_event()).unwrap();
        assert_eq!(used_event, 1);
    }

    #[test]
    fn need_event_matches_the_virtio_definition() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 5, 0));
        assert!(need_event(4, 5, 0));
        assert!(need_event(u16::MAX, 0, u16::MAX));
        assert!(!need_event(10, 3, 1));
    }
}
