//! The frontend's memory table: validated, mapped, and able to translate the frontend's
//! virtual addresses (used for ring addresses) to guest physical addresses.

use std::fs::File;

use citadel_sandbox::memory_file::{check_memory_file, MemoryFileError, MemoryFilePolicy};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Most regions accepted in one table.
pub const MAX_REGIONS: usize = 8;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// More or fewer descriptors than regions, or too many regions.
    #[error("memory table has {regions} regions and {files} descriptors (at most {MAX_REGIONS})")]
    Count {
        /// Regions in the message.
        regions: usize,
        /// Descriptors attached.
        files: usize,
    },
    /// A region's numbers overflow or are empty.
    #[error("memory region {0}: empty or overflowing range")]
    Range(usize),
    /// The descriptor cannot back the region: not a regular file, too short, or not sealed
    /// against shrinking (any of which would let the frontend raise SIGBUS here).
    #[error("memory region {index}: {source}")]
    File {
        /// Region index.
        index: usize,
        /// What is wrong with it.
        source: MemoryFileError,
    },
    /// mmap failed.
    #[error("memory region {index}: mmap: {why}")]
    Map {
        /// Region index.
        index: usize,
        /// What failed.
        why: String,
    },
    /// The mapping could not be excluded from core dumps.
    #[error("memory region {index}: excluding it from core dumps: {source}")]
    DontDump {
        /// Region index.
        index: usize,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Regions overlap in guest physical space.
    #[error("memory regions overlap: {0}")]
    Overlap(String),
}

/// One region's placement in the frontend's address space.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    frontend_addr: u64,
    size: u64,
    guest_addr: u64,
}

/// A mapped memory table.
pub struct MemoryTable {
    /// The mapped guest memory.
    pub mem: GuestMemoryMmap,
    mappings: Vec<Mapping>,
}

impl MemoryTable {
    /// Validates and maps a SET_MEM_TABLE message; `policy` says which files may back it.
    pub fn new(
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        policy: MemoryFilePolicy,
    ) -> Result<Self, MemoryError> {
        if regions.len() != files.len() || regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(MemoryError::Count {
                regions: regions.len(),
                files: files.len(),
            });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            let size = region.memory_size;
            let (Some(_), Some(_), Some(needed)) = (
                region.guest_phys_addr.checked_add(size),
                region.user_addr.checked_add(size),
                region.mmap_offset.checked_add(size),
            ) else {
                return Err(MemoryError::Range(index));
            };
            if size == 0 || usize::try_from(size).is_err() || i64::try_from(needed).is_err() {
                return Err(MemoryError::Range(index));
            }
            check_memory_file(&file, needed, policy)
                .map_err(|source| MemoryError::File { index, source })?;
            let mmap = region
                .mmap_region::<()>(file)
                .map_err(|e| MemoryError::Map {
                    index,
                    why: e.to_string(),
                })?;
            citadel_sandbox::core_dump::exclude_from_core_dumps(mmap.as_ptr(), mmap.size())
                .map_err(|source| MemoryError::DontDump { index, source })?;
            let guest = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
                .ok_or(MemoryError::Range(index))?;
            mapped.push(guest);
            mappings.push(Mapping {
                frontend_addr: region.user_addr,
                size,
                guest_addr: region.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Overlap(e.to_string()))?;
        Ok(MemoryTable { mem, mappings })
    }

    /// Translates a frontend virtual address to a guest physical address.
    pub fn frontend_to_guest(&self, addr: u64) -> Option<u64> {
        self.mappings.iter().find_map(|m| {
            let off = addr.checked_sub(m.frontend_addr)?;
            (off < m.size).then(|| m.guest_addr + off)
        })
    }
}
