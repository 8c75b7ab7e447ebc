//! Guest RAM: one sealed memfd, mapped shared, split into regions around the 32-bit MMIO gap.
//!
//! Backing all of RAM with a single memfd lets vhost-user backends map guest memory from the
//! fd and an offset, and lets snapshots write it out, without the monitor copying anything.
//! The seals stop anyone holding the fd (a backend included) from shrinking it under the
//! monitor's mapping, which would turn guest accesses into SIGBUS in the monitor.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::boot::layout;

/// Errors while creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside the accepted range or not page-aligned.
    #[error(
        "guest RAM size {size} bytes is invalid: it must be a multiple of 4 KiB between {} MiB and {} GiB",
        layout::MIN_RAM_SIZE >> 20,
        layout::MAX_RAM_SIZE >> 30
    )]
    InvalidSize {
        /// The refused size.
        size: u64,
    },
    /// `memfd_create` failed.
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(#[source] io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest RAM memfd to {size} bytes: {source}")]
    Truncate {
        /// The size asked for.
        size: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sealing the memfd failed.
    #[error("cannot seal the guest RAM memfd: {0}")]
    Seal(#[source] io::Error),
    /// Duplicating the memfd for a region failed.
    #[error("cannot duplicate the guest RAM memfd: {0}")]
    Dup(#[source] io::Error),
    /// Copying a snapshot's memory file into guest RAM failed.
    #[error("cannot copy the snapshot's memory into guest RAM at {addr:#x}: {reason}")]
    SnapshotCopy {
        /// Guest address of the region being copied.
        addr: u64,
        /// What went wrong.
        reason: String,
    },
    /// Mapping a region failed.
    #[error("cannot map guest RAM at {addr:#x} ({len} bytes): {source}")]
    Mmap {
        /// Guest address of the region.
        addr: u64,
        /// Length of the region.
        len: usize,
        /// The underlying error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Excluding a region from core dumps failed.
    #[error("cannot exclude guest RAM at {addr:#x} from core dumps: {source}")]
    DontDump {
        /// Guest address of the region.
        addr: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The regions could not be assembled into guest memory.
    #[error("cannot assemble guest RAM regions: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} at {addr:#x} ({len} bytes): {source}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Guest address of the region.
        addr: u64,
        /// Length of the region.
        len: u64,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM in one sealed memfd (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), mapped
/// `MAP_SHARED`, so vhost-user backends can map it by fd and offset. Regions follow
/// [`layout::ram_regions`]; region `i` starts at the sum of the lengths of regions `0..i` in the
/// file.
#[derive(Debug)]
pub struct GuestRam {
    /// The guest's physical memory as the monitor sees it.
    pub memory: GuestMemoryMmap,
    /// The file behind guest RAM: the sealed memfd, or for a machine restored lazily from a
    /// snapshot, the snapshot's memory file, mapped privately (the guest's writes are only in
    /// [`GuestRam::memory`], never in the file).
    pub memfd: File,
    /// Total RAM size in bytes.
    pub size: u64,
}

impl GuestRam {
    /// Each region as (guest address, length, offset in [`GuestRam::memfd`]), in guest address
    /// order. This is what a vhost-user `SET_MEM_TABLE` or a snapshot needs.
    pub fn regions(&self) -> Vec<(GuestAddress, u64, u64)> {
        self.memory
            .iter()
            .map(|r| {
                let offset = r.file_offset().map_or(0, FileOffset::start);
                (r.start_addr(), r.len(), offset)
            })
            .collect()
    }
}

/// Creates `size_bytes` of guest RAM. Nothing is touched: pages are allocated by the host
/// kernel on first access, so start-up cost does not grow with the RAM size.
///
/// Refuses sizes below [`layout::MIN_RAM_SIZE`], above [`layout::MAX_RAM_SIZE`] or not a
/// multiple of 4 KiB.
pub fn create_guest_ram(size_bytes: u64) -> Result<GuestRam, MemoryError> {
    if !(layout::MIN_RAM_SIZE..=layout::MAX_RAM_SIZE).contains(&size_bytes)
        || !size_bytes.is_multiple_of(4096)
    {
        return Err(MemoryError::InvalidSize { size: size_bytes });
    }

    let memfd = sealed_memfd(size_bytes)?;

    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (addr, len) in layout::ram_regions(size_bytes) {
        let file = memfd.try_clone().map_err(MemoryError::Dup)?;
        let mapping =
            MmapRegion::from_file(FileOffset::new(file, file_offset), len).map_err(|source| {
                MemoryError::Mmap {
                    addr: addr.raw_value(),
                    len,
                    source,
                }
            })?;
        // Guest RAM never reaches a core file, whatever the limits of the process.
        citadel_sandbox::core_dump::exclude_from_core_dumps(mapping.as_ptr(), mapping.size())
            .map_err(|source| MemoryError::DontDump {
                addr: addr.raw_value(),
                source,
            })?;
        // `from_file` refuses nothing about the guest base; an overflowing base is impossible
        // with sizes capped at MAX_RAM_SIZE, but it is still reported rather than assumed.
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or(MemoryError::InvalidSize { size: size_bytes })?;
        regions.push(region);
        file_offset += len as u64;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    log::debug!(
        "guest RAM: {} MiB in {} region(s)",
        size_bytes >> 20,
        memory.num_regions()
    );
    Ok(GuestRam {
        memory,
        memfd,
        size: size_bytes,
    })
}

fn sealed_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the call
    // creates a new descriptor and touches no memory of ours.
    let fd = unsafe {
        libc::memfd_create(
            c"citadel-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own takes an integer argument and touches no
    // memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Seal(io::Error::last_os_error()));
    }
    Ok(file)
}

/// Registers every region of `ram` with KVM, region `i` in slot `i`. Registered RAM stays
/// mapped until the process exits, even if `ram` is dropped.
///
/// Call it right after creating the VM, before `KVM_SET_TSS_ADDR`, `KVM_CREATE_IRQCHIP` and
/// `KVM_CREATE_PIT2`: measured on a nested host, registering RAM once the in-kernel irqchip
/// exists costs 7-10 ms per slot, before it about 0.1 ms.
pub fn register(vm: &VmFd, ram: &GuestRam) -> Result<(), MemoryError> {
    // KVM keeps using these host addresses for as long as the VM exists, and the VM (held
    // alive by its fd and every vCPU fd) can outlive `ram`. Unmapping them then would let the
    // guest reach whatever the monitor maps there next, so registered RAM is never unmapped:
    // one reference to each region is leaked here and the mappings last until the process
    // exits. A monitor process runs one VM, so nothing is lost.
    std::mem::forget(ram.memory.clone());
    for (slot, region) in ram.memory.iter().enumerate() {
        let slot = slot as u32;
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a mapping of exactly `memory_size` bytes that stays
        // mapped until the process exits (its reference was leaked above), so KVM can never
        // reach memory that is not guest RAM through it.
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(|source| {
            MemoryError::Register {
                slot,
                addr: mem_region.guest_phys_addr,
                len: mem_region.memory_size,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn refuses_bad_sizes() {
        for size in [
            0,
            layout::MIN_RAM_SIZE - 4096,
            layout::MIN_RAM_SIZE + 1,
            layout::MAX_RAM_SIZE + 4096,
            u64::MAX,
        ] {
            let err = create_guest_ram(size).unwrap_err();
            assert!(matches!(err, MemoryError::InvalidSize { .. }), "{size}");
            assert!(err.to_string().contains(&size.to_string()));
        }
    }

    #[test]
    fn ram_is_one_sealed_shared_memfd() {
        let ram = create_guest_ram(32 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        assert_eq!(ram.memfd.metadata().unwrap().len(), 32 << 20);

        // SAFETY: F_GET_SEALS on an owned descriptor takes no argument.
        let seals = unsafe { libc::fcntl(ram.memfd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        );
        assert!(ram.memfd.set_len(16 << 20).is_err());
        assert!(ram.memfd.set_len(64 << 20).is_err());

        // A guest write is visible through the fd, as a backend mapping it would see it.
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(0x12_3450))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd.read_exact_at(&mut buf, 0x12_3450).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn ram_above_three_gib_skips_the_gap() {
        let size = (4u64 << 30) + (8 << 20);
        let ram = create_guest_ram(size).unwrap();
        assert_eq!(
            ram.regions(),
            vec![
                (GuestAddress(0), layout::MMIO_GAP_START, 0),
                (
                    GuestAddress(layout::MMIO_GAP_END),
                    size - layout::MMIO_GAP_START,
                    layout::MMIO_GAP_START
                ),
            ]
        );
        assert!(ram
            .memory
            .address_in_range(GuestAddress(layout::MMIO_GAP_START - 1)));
        assert!(!ram
            .memory
            .address_in_range(GuestAddress(layout::MMIO_GAP_START)));
        assert!(!ram
            .memory
            .address_in_range(GuestAddress(layout::MMIO_GAP_END - 1)));
        assert!(ram
            .memory
            .address_in_range(GuestAddress(layout::MMIO_GAP_END)));
        assert!(!ram.memory.address_in_range(GuestAddress(
            layout::MMIO_GAP_END + size - layout::MMIO_GAP_START
        )));

        // The first byte above 4 GiB is the file byte right after low RAM.
        ram.memory
            .write_obj(0x5au8, GuestAddress(layout::MMIO_GAP_END))
            .unwrap();
        let mut byte = [0u8];
        ram.memfd
            .read_exact_at(&mut byte, layout::MMIO_GAP_START)
            .unwrap();
        assert_eq!(byte[0], 0x5a);
    }

    #[test]
    fn kvm_accepts_the_regions() {
        let Some(kvm) = crate::test_kvm::kvm_or_skip("memory::kvm_accepts_the_regions") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let ram = create_guest_ram((3u64 << 30) + (16 << 20)).unwrap();
        register(&vm, &ram).unwrap();
        // Slot 0 is taken now: re-registering it with a different size must be refused,
        // which proves the first registration happened.
        let region = ram.memory.iter().next().unwrap();
        let clash = kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is part of a live mapping owned by `ram`.
        assert!(unsafe { vm.set_user_memory_region(clash) }.is_err());
    }
}
