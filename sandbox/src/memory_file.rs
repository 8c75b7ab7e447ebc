//! Checks on a file a peer hands over to be mapped as shared memory.
//!
//! A vhost-user frontend passes the files behind guest memory (and, for citadel-blk, the
//! inflight area) for the backend to map. If the frontend later shrinks such a file, the
//! backend's next access to a page past the new end raises SIGBUS and kills it. A file sealed
//! with `F_SEAL_SHRINK` cannot shrink, whoever holds it; seals exist only on memfds (tmpfs or
//! hugetlbfs), so requiring the seal also keeps disk files out. Frontends that share memory
//! through a plain tmpfs or hugetlbfs file can be allowed explicitly, at the price of that
//! SIGBUS.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Which memory files a backend maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFilePolicy {
    /// Only files sealed against shrinking (`F_SEAL_SHRINK`). The default.
    #[default]
    SealedOnly,
    /// Any regular file long enough: a frontend that truncates it kills the backend.
    AllowUnsealed,
}

/// Why a memory file is refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// fstat failed.
    #[error("fstat: {0}")]
    Stat(std::io::Error),
    /// Not a regular file (a memfd is one).
    #[error("not a regular file or memfd")]
    NotRegular,
    /// Shorter than the mapping needs; touching the missing part would raise SIGBUS.
    #[error("file is {file_len} bytes but the mapping needs {needed}")]
    Short {
        /// File size.
        file_len: u64,
        /// Offset + size of the mapping.
        needed: u64,
    },
    /// Not sealed against shrinking.
    #[error(
        "not sealed against shrinking (F_SEAL_SHRINK): a peer truncating it would kill this \
         process with SIGBUS (--allow-unsealed-memory accepts such files)"
    )]
    Unsealed,
}

/// Checks that `file` can back a shared mapping that ends `needed` bytes into it, under
/// `policy`.
pub fn check_memory_file(
    file: &File,
    needed: u64,
    policy: MemoryFilePolicy,
) -> Result<(), MemoryFileError> {
    // SAFETY: `st` is a properly sized out-buffer for fstat and `file` is open.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the kernel fills `st`.
    if unsafe { libc::fstat64(file.as_raw_fd(), &mut st) } != 0 {
        return Err(MemoryFileError::Stat(std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MemoryFileError::NotRegular);
    }
    if policy == MemoryFilePolicy::SealedOnly {
        // SAFETY: F_GET_SEALS only reads the seal set of an open descriptor; files that cannot
        // carry seals answer -1 (EINVAL).
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(MemoryFileError::Unsealed);
        }
    }
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    if file_len < needed {
        return Err(MemoryFileError::Short { file_len, needed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64, seals: libc::c_int) -> File {
        // SAFETY: valid name and flags; the result is checked and then owned.
        let fd = unsafe {
            libc::memfd_create(
                c"citadel-sandbox-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        if seals != 0 {
            // SAFETY: F_ADD_SEALS with constant flags on our own memfd.
            assert_eq!(
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) },
                0
            );
        }
        file
    }

    #[test]
    fn only_files_sealed_against_shrinking_pass_by_default() {
        use MemoryFilePolicy::*;
        let sealed = memfd(8192, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        assert!(check_memory_file(&sealed, 8192, SealedOnly).is_ok());
        assert!(matches!(
            check_memory_file(&sealed, 8193, SealedOnly),
            Err(MemoryFileError::Short { .. })
        ));
        let grow_only = memfd(8192, libc::F_SEAL_GROW);
        assert!(matches!(
            check_memory_file(&grow_only, 4096, SealedOnly),
            Err(MemoryFileError::Unsealed)
        ));
        let plain = memfd(8192, 0);
        assert!(matches!(
            check_memory_file(&plain, 4096, SealedOnly),
            Err(MemoryFileError::Unsealed)
        ));
        assert!(check_memory_file(&plain, 4096, AllowUnsealed).is_ok());
        let dir = File::open("/").unwrap();
        assert!(matches!(
            check_memory_file(&dir, 0, AllowUnsealed),
            Err(MemoryFileError::NotRegular)
        ));
    }
}
