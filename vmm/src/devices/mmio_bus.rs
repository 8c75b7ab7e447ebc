//! MMIO address space dispatch.
//!
//! The bus maps guest-physical ranges to the devices the monitor emulates (today the
//! virtio-mmio transports). Every vCPU thread shares one bus, and QMP hotplug inserts and
//! removes devices while the vCPUs run, so the map sits behind a lock and devices use interior
//! mutability. The lock is never held while a device handles an access: a slow device (one
//! that talks to a backend process while activating) blocks only the vCPU touching it, never
//! the lookups of the others or a concurrent unplug.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A device that decodes guest accesses to an MMIO range.
///
/// `offset` is relative to the base the device was inserted at, and the access lies entirely
/// inside the range (the bus guarantees it). Implementations are called concurrently from
/// several vCPU threads and must never panic on what the guest writes.
pub trait MmioDevice: Send + Sync {
    /// Handles a guest read of `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Why a change to the MMIO map was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioBusError {
    /// The range is empty or runs past the end of the 64-bit address space.
    #[error(
        "MMIO range at {base:#x} of length {len:#x} is empty or wraps around the address space"
    )]
    InvalidRange {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error(
        "MMIO range {base:#x}..{end:#x} overlaps the device already mapped at {other_base:#x}..{other_end:#x}"
    )]
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested end (exclusive).
        end: u64,
        /// Base of the device in the way.
        other_base: u64,
        /// End (exclusive) of the device in the way.
        other_end: u64,
    },
    /// No device starts at this address.
    #[error("no MMIO device is mapped at {base:#x}")]
    NotMapped {
        /// The base that was asked for.
        base: u64,
    },
}

struct Mapping {
    len: u64,
    device: Arc<dyn MmioDevice>,
}

/// The guest's MMIO address space: non-overlapping ranges, each decoded by one device.
#[derive(Default)]
pub struct MmioBus {
    /// Keyed by base address; ranges never overlap, so the candidate for an address is the
    /// last mapping starting at or below it.
    map: RwLock<BTreeMap<u64, Mapping>>,
}

impl MmioBus {
    /// An empty bus: every access reads all-ones and writes are dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `base..base + len`. Refuses empty or wrapping ranges and any overlap
    /// with a device already mapped.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), MmioBusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(MmioBusError::InvalidRange { base, len });
        }
        let end = base + len;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        // Only two neighbours can overlap: the last mapping starting below `end` covers every
        // mapping that starts inside the new range or contains its start.
        if let Some((&other_base, other)) = map.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(MmioBusError::Overlap {
                    base,
                    end,
                    other_base,
                    other_end: other_base + other.len,
                });
            }
        }
        map.insert(base, Mapping { len, device });
        Ok(())
    }

    /// Unmaps the device whose range starts at `base` and hands it back.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn MmioDevice>, MmioBusError> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|m| m.device)
            .ok_or(MmioBusError::NotMapped { base })
    }

    /// The device decoding `addr`, with the base of its range.
    pub fn lookup(&self, addr: u64) -> Option<(u64, Arc<dyn MmioDevice>)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let (&base, mapping) = map.range(..=addr).next_back()?;
        (addr - base < mapping.len).then(|| (base, Arc::clone(&mapping.device)))
    }

    /// The device that decodes the whole access `addr..addr + len`, with the offset of the
    /// access in its range. An access straddling the end of a range, or one that wraps, belongs
    /// to no device.
    fn target(&self, addr: u64, len: usize) -> Option<(u64, Arc<dyn MmioDevice>)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let (&base, mapping) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        (end <= mapping.len).then(|| (offset, Arc::clone(&mapping.device)))
    }

    /// Dispatches a guest read. Returns whether a device decoded it; reads nobody decodes
    /// return all-ones, like an open bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.target(addr, data.len()) {
            Some((offset, device)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest write. Returns whether a device decoded it; writes nobody decodes
    /// are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.target(addr, data.len()) {
            Some((offset, device)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Remembers every access and answers reads with the low byte of the offset.
    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
        reads: Mutex<Vec<(u64, usize)>>,
    }

    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            self.reads.lock().unwrap().push((offset, data.len()));
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_offsets_relative_to_its_base() {
        let bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();

        let mut data = [0u8; 4];
        assert!(bus.read(0xd000_0070, &mut data));
        assert_eq!(data, [0x70; 4]);
        assert!(bus.write(0xd000_0ffc, &[1, 2, 3, 4]));
        assert!(bus.write(0xd000_0000, &[9]));

        assert_eq!(*dev.reads.lock().unwrap(), vec![(0x70, 4)]);
        assert_eq!(
            *dev.writes.lock().unwrap(),
            vec![(0xffc, vec![1, 2, 3, 4]), (0, vec![9])]
        );
    }

    #[test]
    fn unmapped_reads_are_all_ones_and_writes_are_dropped() {
        let bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();

        for addr in [0, 0xfff, 0x1100, u64::MAX - 3] {
            let mut data = [0u8; 4];
            assert!(!bus.read(addr, &mut data), "{addr:#x}");
            assert_eq!(data, [0xff; 4]);
            assert!(!bus.write(addr, &[0; 4]), "{addr:#x}");
        }
        assert!(dev.reads.lock().unwrap().is_empty());
        assert!(dev.writes.lock().unwrap().is_empty());
    }

    #[test]
    fn accesses_straddling_the_end_of_a_range_are_not_decoded() {
        let bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        let mut data = [0u8; 8];
        assert!(!bus.read(0x10fc, &mut data));
        assert_eq!(data, [0xff; 8]);
        assert!(!bus.write(0x10fd, &[0; 4]));
        // The same access one byte lower fits and is decoded.
        assert!(bus.write(0x10fc, &[0; 4]));
        assert_eq!(dev.writes.lock().unwrap().len(), 1);
    }

    #[test]
    fn access_at_the_top_of_the_address_space_does_not_wrap() {
        let bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(u64::MAX - 0xff, 0xff, dev.clone()).unwrap();
        let mut data = [0u8; 8];
        assert!(!bus.read(u64::MAX - 3, &mut data));
        assert!(bus.read(u64::MAX - 8, &mut data));
        assert_eq!(*dev.reads.lock().unwrap(), vec![(0xf7, 8)]);
    }

    #[test]
    fn overlapping_and_invalid_ranges_are_refused() {
        let bus = MmioBus::new();
        bus.insert(0x2000, 0x1000, Arc::new(Recorder::default()))
            .unwrap();
        for (base, len) in [
            (0x2000, 0x1000),
            (0x1800, 0x1000),
            (0x2800, 0x1000),
            (0x2400, 0x10),
            (0x1000, 0x4000),
        ] {
            assert_eq!(
                bus.insert(base, len, Arc::new(Recorder::default())),
                Err(MmioBusError::Overlap {
                    base,
                    end: base + len,
                    other_base: 0x2000,
                    other_end: 0x3000
                }),
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(
            bus.insert(0x5000, 0, Arc::new(Recorder::default())),
            Err(MmioBusError::InvalidRange {
                base: 0x5000,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, Arc::new(Recorder::default())),
            Err(MmioBusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        // Touching neighbours on both sides are fine.
        bus.insert(0x1000, 0x1000, Arc::new(Recorder::default()))
            .unwrap();
        bus.insert(0x3000, 0x1000, Arc::new(Recorder::default()))
            .unwrap();
    }

    #[test]
    fn overlap_error_names_both_ranges() {
        let err = MmioBusError::Overlap {
            base: 0x1800,
            end: 0x2800,
            other_base: 0x2000,
            other_end: 0x3000,
        };
        assert_eq!(
            err.to_string(),
            "MMIO range 0x1800..0x2800 overlaps the device already mapped at 0x2000..0x3000"
        );
    }

    #[test]
    fn lookup_and_remove() {
        let bus = MmioBus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(0xd000_0000, 0x1000, a.clone()).unwrap();
        bus.insert(0xd000_1000, 0x1000, b.clone()).unwrap();

        let (base, found) = bus.lookup(0xd000_1abc).unwrap();
        assert_eq!(base, 0xd000_1000);
        let b_dyn: Arc<dyn MmioDevice> = b.clone();
        assert!(Arc::ptr_eq(&found, &b_dyn));
        assert!(bus.lookup(0xd000_2000).is_none());
        assert!(bus.lookup(0xcfff_ffff).is_none());

        assert_eq!(
            bus.remove(0xd000_1004).err(),
            Some(MmioBusError::NotMapped { base: 0xd000_1004 })
        );
        let removed = bus.remove(0xd000_1000).unwrap();
        assert!(Arc::ptr_eq(&removed, &b_dyn));
        let mut data = [0u8; 4];
        assert!(!bus.read(0xd000_1000, &mut data));
        assert_eq!(data, [0xff; 4]);
        // The slot is free again for the next hotplug.
        bus.insert(0xd000_1000, 0x1000, Arc::new(Recorder::default()))
            .unwrap();
        assert!(bus.read(0xd000_0000, &mut data));
    }

    #[test]
    fn shared_between_threads() {
        let bus = Arc::new(MmioBus::new());
        let dev = Arc::new(Recorder::default());
        bus.insert(0x1000, 0x1000, dev.clone()).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|i| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert!(bus.write(0x1000 + u64::from(i) * 4, &[i]));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(dev.writes.lock().unwrap().len(), 400);
    }
}
