//! The frontend's memory table: validated, mapped, and able to translate the frontend's
//! virtual addresses (used for ring addresses) to guest physical addresses.

use std::fs::File;
use std::os::fd::AsRawFd;

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
    /// The descriptor is not a regular file or memfd.
    #[error("memory region {0}: descriptor is not a regular file or memfd")]
    NotRegular(usize),
    /// The file is shorter than the region claims; touching it would raise SIGBUS.
    #[error("memory region {index}: file is {file_len} bytes but the region needs {needed}")]
    Short {
        /// Region index.
        index: usize,
        /// File size.
        file_len: u64,
        /// Offset + size of the region.
        needed: u64,
    },
    /// fstat failed.
    #[error("memory region {index}: fstat: {source}")]
    Stat {
        /// Region index.
        index: usize,
        /// What the kernel said.
        source: std::io::Error,
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
    /// Validates and maps a SET_MEM_TABLE message.
    pub fn new(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MemoryError> {
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
            check_backing(index, &file, needed)?;
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

/// Refuses descriptors whose size cannot back the region: mapping past the end of a file
/// would turn later guest accesses into SIGBUS in the backend.
fn check_backing(index: usize, file: &File, needed: u64) -> Result<(), MemoryError> {
    // SAFETY: `st` is a properly sized out-buffer for fstat and `file` is open.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the kernel fills `st`.
    if unsafe { libc::fstat64(file.as_raw_fd(), &mut st) } != 0 {
        return Err(MemoryError::Stat {
            index,
            source: std::io::Error::last_os_error(),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MemoryError::NotRegular(index));
    }
    let file_len = st.st_size as u64;
    if file_len < needed {
        return Err(MemoryError::Short {
            index,
            file_len,
            needed,
        });
    }
    // SAFETY: F_GET_SEALS only reads the seal set of an open descriptor.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        log::debug!("memory region {index} is not sealed against shrinking");
    }
    Ok(())
}
