//! Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
//!
//! The backend creates a shared-memory area at GET_INFLIGHT_FD; the frontend keeps the
//! descriptor and hands it back with SET_INFLIGHT_FD to a restarted backend. The layout is
//! private to citadel-blk (the frontend never interprets it). Queues are processed one request
//! at a time, in ring order, so one record per queue is enough:
//!
//! ```text
//! offset 0  u32 magic "CBIF"      offset 8  u16 avail position of the request
//! offset 4  u16 1 = in flight     offset 10 u16 used index when it was taken
//! offset 6  u16 descriptor head
//! ```
//!
//! A restarted backend resumes at the recorded avail position when the used index shows the
//! request was never completed, and just after it when it was, whatever base the frontend
//! sends.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use citadel_sandbox::memory_file::{check_memory_file, MemoryFileError, MemoryFilePolicy};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const MAGIC: u32 = u32::from_le_bytes(*b"CBIF");
const RECORD_LEN: usize = 64;
const MAX_QUEUES: usize = 64;

/// Errors while creating or mapping the inflight area.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// memfd_create / ftruncate / seals failed.
    #[error("creating inflight area: {0}")]
    Create(std::io::Error),
    /// The frontend's numbers do not describe a usable area.
    #[error("inflight area of {size} bytes at offset {offset} for {queues} queues is invalid")]
    Geometry {
        /// mmap_size from the message.
        size: u64,
        /// mmap_offset from the message.
        offset: u64,
        /// num_queues from the message.
        queues: usize,
    },
    /// The descriptor cannot back the area (not a regular file, too short, or not sealed
    /// against shrinking).
    #[error("inflight descriptor: {0}")]
    File(#[from] MemoryFileError),
    /// mmap failed.
    #[error("mapping inflight area: {0}")]
    Map(String),
}

/// The mapped inflight area.
pub struct InflightRegion {
    map: Arc<MmapRegion>,
    queues: usize,
}

/// One queue's record.
pub struct InflightQueue {
    map: Arc<MmapRegion>,
    base: usize,
}

impl InflightRegion {
    /// Creates a zeroed area for `queues` queues and returns it with the descriptor to give
    /// the frontend.
    pub fn create(queues: usize) -> Result<(InflightRegion, File), InflightError> {
        let len = area_len(queues);
        // SAFETY: the name is a valid NUL-terminated string; flags are constants.
        let fd = unsafe {
            libc::memfd_create(
                c"citadel-blk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(InflightError::Create)?;
        // SAFETY: F_ADD_SEALS with constant flags on our own memfd.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        let dup = file.try_clone().map_err(InflightError::Create)?;
        let region = Self::map(dup, 0, len as u64, queues, MemoryFilePolicy::SealedOnly)?;
        Ok((region, file))
    }

    /// Maps an area handed back by the frontend; `policy` says which files may back it.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        queues: usize,
        policy: MemoryFilePolicy,
    ) -> Result<InflightRegion, InflightError> {
        let geometry = InflightError::Geometry {
            size,
            offset,
            queues,
        };
        if queues == 0 || queues > MAX_QUEUES || size < area_len(queues) as u64 {
            return Err(geometry);
        }
        let Some(end) = offset
            .checked_add(size)
            .filter(|e| i64::try_from(*e).is_ok())
        else {
            return Err(geometry);
        };
        check_memory_file(&file, end, policy)?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), area_len(queues))
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(InflightRegion {
            map: Arc::new(map),
            queues,
        })
    }

    /// Bytes of the area.
    pub fn len(&self) -> usize {
        area_len(self.queues)
    }

    /// The record of queue `index`, if the area covers it.
    pub fn queue(&self, index: usize) -> Option<InflightQueue> {
        (index < self.queues).then(|| InflightQueue {
            map: Arc::clone(&self.map),
            base: index * RECORD_LEN,
        })
    }
}

fn area_len(queues: usize) -> usize {
    (queues * RECORD_LEN).next_multiple_of(4096)
}

impl InflightQueue {
    fn put16(&self, off: usize, v: u16) {
        // The record lies inside the mapping by construction; a failed store only loses
        // crash-recovery information, never correctness of the running queue.
        let _ = self.map.as_volatile_slice().write_obj(v, self.base + off);
    }

    fn get16(&self, off: usize) -> u16 {
        self.map
            .as_volatile_slice()
            .get_ref::<u16>(self.base + off)
            .map(|r| r.load())
            .unwrap_or(0)
    }

    /// Records that the request at avail position `avail` with descriptor `head` is taken.
    pub fn begin(&mut self, head: u16, avail: u16, used: u16) {
        let _ = self.map.as_volatile_slice().write_obj(MAGIC, self.base);
        self.put16(6, head);
        self.put16(8, avail);
        self.put16(10, used);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put16(4, 1);
    }

    /// Records that the request taken last is completed.
    pub fn end(&mut self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put16(4, 0);
    }

    /// Where a restarted backend resumes, given the used index now in the ring; `None` when
    /// no request was in flight.
    pub fn resume_point(&self, ring_used: u16) -> Option<u16> {
        let magic = self
            .map
            .as_volatile_slice()
            .get_ref::<u32>(self.base)
            .map(|r| r.load())
            .unwrap_or(0);
        if magic != MAGIC || self.get16(4) != 1 {
            return None;
        }
        let avail = self.get16(8);
        if ring_used == self.get16(10) {
            Some(avail)
        } else {
            Some(avail.wrapping_add(1))
        }
    }

    /// Descriptor head of the request recorded last.
    pub fn head(&self) -> u16 {
        self.get16(6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEALED: MemoryFilePolicy = MemoryFilePolicy::SealedOnly;

    #[test]
    fn records_survive_a_remap() {
        let (region, file) = InflightRegion::create(2).unwrap();
        let mut q1 = region.queue(1).unwrap();
        assert!(region.queue(2).is_none());
        assert_eq!(q1.resume_point(0), None);
        q1.begin(7, 40, 39);
        let again = InflightRegion::map(file, 0, region.len() as u64, 2, SEALED).unwrap();
        let r1 = again.queue(1).unwrap();
        assert_eq!(r1.head(), 7);
        assert_eq!(r1.resume_point(39), Some(40));
        assert_eq!(r1.resume_point(40), Some(41));
        assert_eq!(again.queue(0).unwrap().resume_point(0), None);
        q1.end();
        assert_eq!(r1.resume_point(39), None);
    }

    #[test]
    fn bad_geometry_is_refused() {
        let (_region, file) = InflightRegion::create(1).unwrap();
        assert!(InflightRegion::map(file.try_clone().unwrap(), 0, 4096, 0, SEALED).is_err());
        assert!(InflightRegion::map(file.try_clone().unwrap(), 4096, 4096, 1, SEALED).is_err());
        assert!(InflightRegion::map(file.try_clone().unwrap(), u64::MAX, 4096, 1, SEALED).is_err());
        assert!(InflightRegion::map(file, 0, 64, 100, SEALED).is_err());
    }

    #[test]
    fn an_unsealed_area_is_refused_unless_allowed() {
        let (region, sealed) = InflightRegion::create(1).unwrap();
        // SAFETY: valid name and flags; the result is checked and then owned.
        let fd = unsafe { libc::memfd_create(c"inflight-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nobody else.
        let plain = unsafe { File::from_raw_fd(fd) };
        plain.set_len(region.len() as u64).unwrap();
        let len = region.len() as u64;
        assert!(matches!(
            InflightRegion::map(plain.try_clone().unwrap(), 0, len, 1, SEALED),
            Err(InflightError::File(MemoryFileError::Unsealed))
        ));
        assert!(InflightRegion::map(plain, 0, len, 1, MemoryFilePolicy::AllowUnsealed).is_ok());
        assert!(InflightRegion::map(sealed, 0, len, 1, SEALED).is_ok());
    }
}
