//! Guest pages given to the balloon, turned into ranges of guest RAM and returned to the host.
//!
//! Guest RAM is a shared memfd, so `MADV_DONTNEED` would only drop the monitor's view of the
//! pages and leave them allocated in the file; `MADV_REMOVE` punches a hole in the file
//! itself (the kernel runs `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` on the
//! range), freeing the host memory for every mapping at once: the monitor's, KVM's and a
//! vhost-user backend's. A page read or written afterwards is allocated again, zeroed.
//!
//! Every address comes from the guest: ranges are checked against the RAM regions, and what
//! lies outside them (the MMIO gap, past the end of RAM) is counted and left alone.

use std::io;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// log2 of the page size the balloon speaks in, whatever the guest's own page size.
pub const PAGE_SHIFT: u32 = 12;
/// The balloon's page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// `count` pages from page frame number `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// The first page frame number.
    pub first: u64,
    /// Number of pages, at least one.
    pub count: u64,
}

/// Sorts `pfns`, drops duplicates and joins consecutive frames into ranges, so that a run of
/// pages costs one system call however the guest ordered it.
pub fn coalesce(pfns: &mut [u32]) -> Vec<PageRange> {
    pfns.sort_unstable();
    let mut ranges: Vec<PageRange> = Vec::new();
    for &pfn in pfns.iter() {
        let pfn = u64::from(pfn);
        match ranges.last_mut() {
            Some(last) if last.first + last.count == pfn => last.count += 1,
            Some(last) if last.first + last.count > pfn => {}
            _ => ranges.push(PageRange {
                first: pfn,
                count: 1,
            }),
        }
    }
    ranges
}

/// What [`discard`] did with a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Bytes of guest RAM returned to the host.
    pub bytes: u64,
    /// Bytes of the range that are not guest RAM, left alone.
    pub outside: u64,
}

impl std::ops::AddAssign for Discarded {
    fn add_assign(&mut self, other: Discarded) {
        self.bytes += other.bytes;
        self.outside += other.outside;
    }
}

/// Returns the guest RAM in the `len` bytes at guest address `start` to the host. Both are
/// rounded inwards to whole pages, so a partial page is never discarded. Parts of the range
/// outside guest RAM are counted in [`Discarded::outside`]; a range wrapping the address
/// space counts entirely as outside.
pub fn discard(memory: &GuestMemoryMmap, start: u64, len: u64) -> io::Result<Discarded> {
    let mut done = Discarded::default();
    let Some(end) = start.checked_add(len) else {
        done.outside = len;
        return Ok(done);
    };
    let Some(first) = start.checked_next_multiple_of(PAGE_SIZE) else {
        return Ok(done);
    };
    let end = end & !(PAGE_SIZE - 1);
    let mut at = first;
    while at < end {
        match memory.find_region(GuestAddress(at)) {
            Some(region) => {
                let region_end = region.start_addr().raw_value() + region.len();
                let stop = end.min(region_end);
                let offset = at - region.start_addr().raw_value();
                let host = region
                    .get_host_address(MemoryRegionAddress(offset))
                    .map_err(|e| io::Error::other(e.to_string()))?;
                remove(host, stop - at, region.flags() & libc::MAP_SHARED != 0)?;
                done.bytes += stop - at;
                at = stop;
            }
            None => {
                // Up to the next region, or to the end when none follows.
                let next = memory
                    .iter()
                    .map(|r| r.start_addr().raw_value())
                    .filter(|&s| s > at)
                    .min()
                    .unwrap_or(end)
                    .min(end);
                done.outside += next - at;
                at = next;
            }
        }
    }
    Ok(done)
}

/// Returns the pages of [`PageRange`] `range` to the host.
pub fn discard_pages(memory: &GuestMemoryMmap, range: PageRange) -> io::Result<Discarded> {
    // Page frame numbers are 32-bit: the products cannot overflow.
    discard(memory, range.first << PAGE_SHIFT, range.count << PAGE_SHIFT)
}

/// Frees the `len` bytes of guest RAM mapped at `host`: the file pages behind a `shared`
/// mapping (the RAM memfd), or the guest's own copies of the pages of a private one (a
/// snapshot's memory file mapped copy-on-write, which MADV_REMOVE refuses; those pages read
/// back as the snapshot had them, which a balloon's guest does not rely on).
fn remove(host: *mut u8, len: u64, shared: bool) -> io::Result<()> {
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: `host..host + len` lies inside one guest RAM mapping (checked against its
    // region by the caller), page aligned. Either advice frees the pages behind it; the
    // mapping stays valid and reads back zeroes or the file's pages, so no reference into
    // guest memory held by the monitor, KVM or a backend can dangle. Guest memory is never
    // borrowed as a Rust object, so nothing assumes its contents stay put.
    let rc = unsafe { libc::madvise(host.cast(), len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vm_memory::Bytes;

    use super::*;
    use crate::boot::layout;
    use crate::memory::create_guest_ram;

    #[test]
    fn frames_are_sorted_deduplicated_and_joined() {
        let mut pfns = [7, 3, 4, 5, 5, 9, 8, 100, 0, u32::MAX];
        assert_eq!(
            coalesce(&mut pfns),
            vec![
                PageRange { first: 0, count: 1 },
                PageRange { first: 3, count: 3 },
                PageRange { first: 7, count: 3 },
                PageRange {
                    first: 100,
                    count: 1
                },
                PageRange {
                    first: u64::from(u32::MAX),
                    count: 1
                },
            ]
        );
        assert!(coalesce(&mut []).is_empty());
    }

    fn allocated_bytes(file: &std::fs::File) -> u64 {
        // SAFETY: an all-zero stat is a valid out buffer; the descriptor is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; fstat writes only into `st`.
        assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }, 0);
        st.st_blocks as u64 * 512
    }

    #[test]
    fn discarded_pages_leave_the_memfd_and_read_back_zero() {
        let ram = create_guest_ram(16 << 20).unwrap();
        let fill = vec![0xa5u8; 8 << 20];
        ram.memory.write_slice(&fill, GuestAddress(0)).unwrap();
        let before = allocated_bytes(&ram.memfd);
        assert!(before >= 8 << 20, "{before}");
        // 4 MiB from page 256 (1 MiB), given as scattered frames.
        let mut pfns: Vec<u32> = (256..1280).rev().collect();
        let ranges = coalesce(&mut pfns);
        assert_eq!(
            ranges,
            vec![PageRange {
                first: 256,
                count: 1024
            }]
        );
        let done = discard_pages(&ram.memory, ranges[0]).unwrap();
        assert_eq!(
            done,
            Discarded {
                bytes: 4 << 20,
                outside: 0
            }
        );
        let after = allocated_bytes(&ram.memfd);
        assert_eq!(before - after, 4 << 20, "before {before}, after {after}");
        let mut page = [0xffu8; 4096];
        ram.memory
            .read_slice(&mut page, GuestAddress(2 << 20))
            .unwrap();
        assert_eq!(page, [0u8; 4096]);
        ram.memory
            .read_slice(&mut page, GuestAddress((1 << 20) - 4096))
            .unwrap();
        assert_eq!(page, [0xa5u8; 4096]);
    }

    /// Private bytes of this process's mapping that starts at `addr`, from /proc/self/smaps.
    fn private_dirty(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&start))
            .find_map(|l| l.strip_prefix("Private_Dirty:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .expect("the mapping in smaps")
            * 1024
    }

    /// A machine restored from a snapshot maps the memory file privately: the balloon drops
    /// the guest's own copies of the pages, which then read back as the snapshot had them.
    #[test]
    fn discarded_pages_of_a_restored_machine_go_back_to_the_snapshot() {
        let path =
            std::env::temp_dir().join(format!("citadel-discard-snap-{}", std::process::id()));
        let size: u64 = 16 << 20;
        std::fs::write(&path, vec![0x5au8; size as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ram = crate::snapshot::memory::map_snapshot_memory(&file, size, false).unwrap();
        let fill = vec![0xa5u8; 8 << 20];
        ram.memory.write_slice(&fill, GuestAddress(0)).unwrap();
        let host = ram.memory.iter().next().unwrap().as_ptr() as usize;
        let before = private_dirty(host);
        assert!(before >= 8 << 20, "{before}");
        let done = discard_pages(
            &ram.memory,
            PageRange {
                first: 256,
                count: 1024,
            },
        )
        .unwrap();
        assert_eq!(done.bytes, 4 << 20);
        let after = private_dirty(host);
        assert_eq!(before - after, 4 << 20, "before {before}, after {after}");
        let mut page = [0u8; 4096];
        ram.memory
            .read_slice(&mut page, GuestAddress(2 << 20))
            .unwrap();
        assert_eq!(page, [0x5au8; 4096]);
        ram.memory
            .read_slice(&mut page, GuestAddress((1 << 20) - 4096))
            .unwrap();
        assert_eq!(page, [0xa5u8; 4096]);
    }

    #[test]
    fn ranges_outside_ram_are_counted_and_left_alone() {
        let ram = create_guest_ram(16 << 20).unwrap();
        ram.memory
            .write_slice(&[1u8; 8192], GuestAddress((16 << 20) - 8192))
            .unwrap();
        // The last two pages of RAM and two past its end.
        let done = discard(&ram.memory, (16 << 20) - 8192, 16384).unwrap();
        assert_eq!(
            done,
            Discarded {
                bytes: 8192,
                outside: 8192
            }
        );
        // Entirely outside: the MMIO gap, the top of the address space, a wrapping range.
        let gap = discard(&ram.memory, layout::MMIO_GAP_START, 1 << 20).unwrap();
        assert_eq!(gap.bytes, 0);
        assert_eq!(gap.outside, 1 << 20);
        let top = discard_pages(
            &ram.memory,
            PageRange {
                first: u64::from(u32::MAX),
                count: 1,
            },
        )
        .unwrap();
        assert_eq!(top.bytes, 0);
        let wrapping = discard(&ram.memory, u64::MAX - 4095, 8192).unwrap();
        assert_eq!(wrapping.bytes, 0);
        assert_eq!(wrapping.outside, 8192);
        // Partial pages are never discarded.
        ram.memory.write_slice(&[2u8; 3], GuestAddress(5)).unwrap();
        let partial = discard(&ram.memory, 1, 8190).unwrap();
        assert_eq!(partial.bytes, 0);
        let mut head = [0u8; 3];
        ram.memory.read_slice(&mut head, GuestAddress(5)).unwrap();
        assert_eq!(head, [2; 3]);
    }

    #[test]
    fn ranges_above_the_mmio_gap_are_discarded_in_the_high_region() {
        let size = layout::MMIO_GAP_START + (16 << 20);
        let ram = create_guest_ram(size).unwrap();
        let high = layout::MMIO_GAP_END;
        ram.memory
            .write_slice(&vec![3u8; 1 << 20], GuestAddress(high))
            .unwrap();
        let before = allocated_bytes(&ram.memfd);
        // From the last low page across the gap into the high region.
        let start = layout::MMIO_GAP_START - 4096;
        let done = discard(&ram.memory, start, high + (1 << 20) - start).unwrap();
        assert_eq!(done.bytes, 4096 + (1 << 20));
        assert_eq!(done.outside, layout::MMIO_GAP_SIZE);
        assert_eq!(before - allocated_bytes(&ram.memfd), 1 << 20);
    }
}
