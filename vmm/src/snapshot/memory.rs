//! Guest RAM of a restored machine: the snapshot's memory file mapped privately, so that
//! pages are read from the file only when first touched (restoring costs the same whatever
//! the RAM size) and the guest's writes never reach the file.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use vm_memory::{
    Address, Bytes, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::boot::layout;
use crate::memory::{GuestRam, MemoryError};

/// Maps the checked memory file `file` of `size` bytes as guest RAM, in the regions a fresh
/// machine of that size has (the file holds them back to back, as the RAM memfd does).
///
/// The mapping is `MAP_PRIVATE`: no other process can share it, so a machine restored this
/// way cannot serve devices through vhost-user backends (see [`copy_snapshot_memory`]). The file must stay as it is
/// while the machine runs: pages not yet touched are read from it on demand, and a file cut
/// short under the mapping turns guest accesses to the lost pages into faults. With
/// `prefault` every page is read in now (`MAP_POPULATE`), so the guest never waits for the
/// file, at a cost that grows with the RAM size; the pages stay shared with the file's page
/// cache until the guest writes them.
pub fn map_snapshot_memory(
    file: &File,
    size: u64,
    prefault: bool,
) -> Result<GuestRam, MemoryError> {
    if !(layout::MIN_RAM_SIZE..=layout::MAX_RAM_SIZE).contains(&size) || !size.is_multiple_of(4096)
    {
        return Err(MemoryError::InvalidSize { size });
    }
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (addr, len) in layout::ram_regions(size) {
        let dup = file.try_clone().map_err(MemoryError::Dup)?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(dup, file_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE | if prefault { libc::MAP_POPULATE } else { 0 },
        )
        .map_err(|source| MemoryError::Mmap {
            addr: addr.raw_value(),
            len,
            source,
        })?;
        citadel_sandbox::core_dump::exclude_from_core_dumps(mapping.as_ptr(), mapping.size())
            .map_err(|source| MemoryError::DontDump {
                addr: addr.raw_value(),
                source,
            })?;
        let region =
            GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::InvalidSize { size })?;
        regions.push(region);
        file_offset += len as u64;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    log::debug!(
        "guest RAM: {} MiB mapped privately from the snapshot in {} region(s)",
        size >> 20,
        memory.num_regions()
    );
    Ok(GuestRam {
        memory,
        memfd: file.try_clone().map_err(MemoryError::Dup)?,
        size,
    })
}

/// Copies the checked memory file `file` of `size` bytes into fresh guest RAM, the sealed
/// memfd a booted machine has. For a machine whose devices are served by backend processes:
/// they map guest RAM from its memfd, which a private mapping of the file cannot give them
/// (they would see the file, not the guest's writes). Costs a read of the whole file, so it
/// grows with the RAM size.
pub fn copy_snapshot_memory(file: &File, size: u64) -> Result<GuestRam, MemoryError> {
    let ram = crate::memory::create_guest_ram(size)?;
    let mut source = file.try_clone().map_err(MemoryError::Dup)?;
    source
        .seek(SeekFrom::Start(0))
        .map_err(|e| MemoryError::SnapshotCopy {
            addr: 0,
            reason: e.to_string(),
        })?;
    // One read(2) moves at most 2 GiB less a page: a region is copied a chunk at a time.
    copy_regions(&ram.memory, &mut source, 64 << 20)?;
    log::debug!(
        "guest RAM: {} MiB copied from the snapshot into the shared memfd",
        size >> 20
    );
    Ok(ram)
}

/// Reads `memory`'s regions back to back, in address order, from `source`, `chunk` bytes
/// at a time.
fn copy_regions(
    memory: &GuestMemoryMmap,
    source: &mut File,
    chunk: u64,
) -> Result<(), MemoryError> {
    for region in memory.iter() {
        let mut offset = 0;
        while offset < region.len() {
            let addr = region.start_addr().unchecked_add(offset);
            let len = chunk.min(region.len() - offset);
            memory
                .read_exact_volatile_from(addr, source, len as usize)
                .map_err(|e| MemoryError::SnapshotCopy {
                    addr: addr.raw_value(),
                    reason: e.to_string(),
                })?;
            offset += len;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_guest_reads_the_file_and_its_writes_stay_private() {
        let path = std::env::temp_dir().join(format!("citadel-snapmem-{}", std::process::id()));
        let size: u64 = 32 << 20;
        {
            let mut f = File::create(&path).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(b"saved page", 0x20_0000).unwrap();
            f.flush().unwrap();
        }
        let file = File::open(&path).unwrap();
        let ram = map_snapshot_memory(&file, size, false).unwrap();
        let mut buf = [0u8; 10];
        ram.memory
            .read_slice(&mut buf, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(&buf, b"saved page");
        ram.memory
            .write_slice(b"guest data", GuestAddress(0x20_0000))
            .unwrap();
        let mut on_disk = [0u8; 10];
        file.read_exact_at(&mut on_disk, 0x20_0000).unwrap();
        assert_eq!(&on_disk, b"saved page");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            map_snapshot_memory(&file, size + 1, false),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn a_copy_is_shared_guest_ram_holding_the_file_and_the_guests_writes_stay_in_it() {
        let path = std::env::temp_dir().join(format!("citadel-snapcopy-{}", std::process::id()));
        let size: u64 = 32 << 20;
        {
            let f = File::create(&path).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(b"first page", 0).unwrap();
            f.write_all_at(b"middle", 0x123_4000).unwrap();
            f.write_all_at(b"last page", size - 4096).unwrap();
        }
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ram = copy_snapshot_memory(&file, size).unwrap();
        assert!(ram.memory.iter().all(|r| r.flags() & libc::MAP_SHARED != 0));
        let read = |addr: u64, len: usize| {
            let mut buf = vec![0u8; len];
            ram.memory.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        };
        assert_eq!(read(0, 10), b"first page");
        assert_eq!(read(0x123_4000, 6), b"middle");
        assert_eq!(read(size - 4096, 9), b"last page");
        ram.memory
            .write_slice(b"guest data", GuestAddress(0))
            .unwrap();
        let mut on_disk = [0u8; 10];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(&on_disk, b"first page");
        let mut in_memfd = [0u8; 10];
        ram.memfd.read_exact_at(&mut in_memfd, 0).unwrap();
        assert_eq!(&in_memfd, b"guest data");

        // In chunks smaller than a region, and from a file shorter than the RAM.
        let fresh = crate::memory::create_guest_ram(size).unwrap();
        let mut source = file.try_clone().unwrap();
        source.seek(SeekFrom::Start(0)).unwrap();
        copy_regions(&fresh.memory, &mut source, 4096 * 3).unwrap();
        let mut buf = [0u8; 9];
        fresh
            .memory
            .read_slice(&mut buf, GuestAddress(size - 4096))
            .unwrap();
        assert_eq!(&buf, b"last page");
        source.seek(SeekFrom::Start(4096)).unwrap();
        assert!(matches!(
            copy_regions(&fresh.memory, &mut source, 64 << 20),
            Err(MemoryError::SnapshotCopy { .. })
        ));
    }

    /// Resident bytes of this process's mapping that starts at `addr`, from /proc/self/smaps.
    fn resident(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .expect("the mapping in smaps")
            * 1024
    }

    #[test]
    fn prefault_reads_every_page_in_before_the_guest_runs() {
        let path = std::env::temp_dir().join(format!("citadel-prefault-{}", std::process::id()));
        let size: u64 = 32 << 20;
        File::create(&path).unwrap().set_len(size).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for (prefault, expected) in [(false, 0), (true, size)] {
            let ram = map_snapshot_memory(&file, size, prefault).unwrap();
            let region = ram.memory.iter().next().unwrap();
            let addr = region.as_ptr() as usize;
            assert_eq!(resident(addr), expected, "prefault {prefault}");
        }
    }
}
