//! Guest memory for the benchmark: one memfd-backed region that the backend maps through
//! SET_MEM_TABLE, exactly as it would map a VM's RAM.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Largest guest memory the benchmark will allocate; the rings and buffers of any sensible
/// job fit in a small fraction of it.
pub const MAX_MEMORY: u64 = 1 << 30;

/// Errors while creating the shared guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The layout needs more memory than allowed.
    #[error("the job needs {0} bytes of guest memory, more than the {MAX_MEMORY} allowed: lower --iodepth, --bs or --queues")]
    TooLarge(u64),
    /// memfd_create failed.
    #[error("memfd_create failed: {0}")]
    Memfd(io::Error),
    /// Sizing the memfd failed.
    #[error("sizing the guest memory memfd to {size} bytes failed: {source}")]
    Resize {
        /// Requested size.
        size: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// Sealing the memfd failed.
    #[error("sealing the guest memory memfd failed: {0}")]
    Seal(io::Error),
    /// Mapping the memfd failed.
    #[error("mapping the guest memory failed: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    /// The region could not be described to the backend.
    #[error("describing the guest memory to the backend failed: {0}")]
    Describe(vhost::Error),
}

/// Guest memory shared with the backend.
pub struct SharedMemory {
    mem: GuestMemoryMmap,
}

impl SharedMemory {
    /// Creates `size` bytes of zeroed memory at guest address 0, backed by a memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size > MAX_MEMORY {
            return Err(MemoryError::TooLarge(size));
        }
        let name: &CStr = c"citadel-vu-bench";
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call, and the
        // flags are a valid combination; the call has no other memory effects.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(MemoryError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else,
        // so the File takes sole ownership and closes it exactly once.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        // Citadel's backends map only memory sealed against shrinking, as a VMM's guest RAM is.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_ADD_SEALS with constant flags on the memfd this function owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(MemoryError::Seal(io::Error::last_os_error()));
        }
        // `size` is at most MAX_MEMORY, so it fits in usize on the 64-bit hosts Citadel runs on.
        let len = size as usize;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(MemoryError::Map)?;
        Ok(Self { mem })
    }

    /// The mapped memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The SET_MEM_TABLE description of every region, with its memfd.
    pub fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, MemoryError> {
        self.mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(MemoryError::Describe)
            })
            .collect()
    }

    /// The frontend's virtual address of guest address `addr`: vhost-user ring addresses are
    /// given in the frontend's address space and translated by the backend through the
    /// region table.
    pub fn host_address(&self, addr: GuestAddress) -> Option<u64> {
        let region = self.mem.find_region(addr)?;
        let offset = addr.0.checked_sub(region.start_addr().0)?;
        Some(region.as_ptr() as u64 + offset)
    }
}
