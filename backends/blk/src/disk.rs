//! The raw disk image and the aligned buffer every transfer bounces through.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::cli::ImageSource;

/// Size of a virtio-blk sector, the unit of every request's address.
pub const SECTOR_SIZE: u64 = 512;

/// Errors while opening the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image path could not be opened.
    #[error("opening image {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The inherited image descriptor is not usable.
    #[error("image descriptor {fd}: {why}")]
    BadFd {
        /// The descriptor number.
        fd: i32,
        /// What is wrong with it.
        why: String,
    },
    /// The image size could not be read.
    #[error("finding the size of the image: {0}")]
    Size(std::io::Error),
    /// The image is smaller than one sector.
    #[error("image is {0} bytes, smaller than one 512-byte sector")]
    TooSmall(u64),
}

/// A raw image served to the guest.
#[derive(Debug)]
pub struct Disk {
    file: File,
    readonly: bool,
    capacity: u64,
}

impl Disk {
    /// Opens (or adopts) the image. With an inherited descriptor, `direct` switches it to
    /// O_DIRECT and a read-only descriptor is refused unless `readonly`.
    pub fn open(source: &ImageSource, readonly: bool, direct: bool) -> Result<Disk, DiskError> {
        let mut file = match source {
            ImageSource::Path(path) => {
                let mut opts = OpenOptions::new();
                opts.read(true).write(!readonly);
                let mut flags = libc::O_CLOEXEC;
                if direct {
                    flags |= libc::O_DIRECT;
                }
                opts.custom_flags(flags);
                opts.open(path).map_err(|source| DiskError::Open {
                    path: path.clone(),
                    source,
                })?
            }
            ImageSource::Fd(fd) => adopt_fd(*fd, readonly, direct)?,
        };
        let size = file.seek(SeekFrom::End(0)).map_err(DiskError::Size)?;
        if size < SECTOR_SIZE {
            return Err(DiskError::TooSmall(size));
        }
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "image size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not served",
                size % SECTOR_SIZE
            );
        }
        Ok(Disk {
            file,
            readonly,
            capacity: size / SECTOR_SIZE,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a byte range; it reads back as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes a byte range, deallocating it when `unmap` allows and the filesystem can.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        if unmap {
            return self.discard(offset, len);
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.discard(offset, len),
            other => other,
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only takes integers and our own valid descriptor.
        let rc = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, off, len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn adopt_fd(fd: i32, readonly: bool, direct: bool) -> Result<File, DiskError> {
    let bad = |why: String| DiskError::BadFd { fd, why };
    // SAFETY: F_GETFL only inspects the descriptor table entry.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(bad(format!(
            "not an open descriptor ({})",
            std::io::Error::last_os_error()
        )));
    }
    let accmode = flags & libc::O_ACCMODE;
    if accmode == libc::O_WRONLY {
        return Err(bad(
            "opened write-only; reads need O_RDONLY or O_RDWR".into()
        ));
    }
    if !readonly && accmode != libc::O_RDWR {
        return Err(bad(
            "opened read-only; pass --readonly or open it read-write".into(),
        ));
    }
    if direct && flags & libc::O_DIRECT == 0 {
        // SAFETY: F_SETFL with integer flags on a descriptor checked above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
            return Err(bad(format!(
                "cannot switch to O_DIRECT ({})",
                std::io::Error::last_os_error()
            )));
        }
    }
    // SAFETY: F_SETFD with FD_CLOEXEC on a valid descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open (F_GETFL succeeded) and was handed to this process for
    // it to own; nothing else in the process refers to it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A page-aligned heap buffer, so that O_DIRECT transfers can use it unchanged.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain owned memory with no thread affinity.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Alignment of every buffer: enough for O_DIRECT on any common device.
    pub const ALIGN: usize = 4096;

    /// Allocates `len` zeroed bytes (`len` > 0) aligned to [`Self::ALIGN`].
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .expect("buffer layout with a constant power-of-two alignment");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    /// The buffer's bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by `self`, and the
        // returned borrow keeps `self` mutably borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with exactly `layout` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("disk.img");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0xabu8; len]).unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "citadel-blk-disk-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn capacity_read_write_discard() {
        let (_d, path) = image(8192 + 100);
        let disk = Disk::open(&ImageSource::Path(path.clone()), false, false).unwrap();
        assert_eq!(disk.capacity(), 16);
        disk.write_at(&[1, 2, 3, 4], 512).unwrap();
        let mut b = [0u8; 4];
        disk.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        disk.discard(4096, 4096).unwrap();
        disk.write_zeroes(0, 512, false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..512].iter().all(|&x| x == 0));
        assert_eq!(&bytes[512..516], &[1, 2, 3, 4]);
        assert!(bytes[4096..8192].iter().all(|&x| x == 0));
        assert_eq!(bytes[8191 + 1], 0xab);
    }

    #[test]
    fn readonly_and_too_small() {
        let (_d, path) = image(4096);
        let disk = Disk::open(&ImageSource::Path(path), true, false).unwrap();
        assert!(disk.readonly());
        assert!(disk.write_at(&[1], 0).is_err());
        let (_d2, small) = image(100);
        assert!(matches!(
            Disk::open(&ImageSource::Path(small), false, false),
            Err(DiskError::TooSmall(100))
        ));
    }

    #[test]
    fn aligned_buffer() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.as_mut_slice().len(), 8192);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % AlignedBuf::ALIGN, 0);
    }
}
