//! Opening a disk image by path on the VMM's behalf, without letting the path leave a root.
//!
//! The path is resolved by `openat2` with `RESOLVE_IN_ROOT` against a directory taken as the
//! root: `..` stops at it and absolute symlinks restart from it, so in a jail (where the
//! launcher's "/" is the jail's root) no path reaches outside the jail. Magic links
//! (`/proc/<pid>/fd/*` and friends) are refused, since they point at files without going
//! through the root at all. Only regular files and block devices are served; anything else
//! (directories, FIFOs, sockets, character devices) is refused before it is handed on.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why an image could not be opened. The text is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The kernel refused to open the path.
    #[error("Could not open '{path}': {source}")]
    Open {
        /// The path as the VMM gave it.
        path: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// The path names something that cannot hold a disk.
    #[error("Could not open '{path}': not a regular file or block device")]
    NotADisk {
        /// The path as the VMM gave it.
        path: String,
    },
    /// The root directory could not be opened.
    #[error("opening the image root {root}: {source}")]
    Root {
        /// The root.
        root: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// How the image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageAccess {
    /// Open for reading only (else reading and writing).
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
}

/// Opens `path` as a disk image, resolving it with `root` as the root directory (a relative
/// `path` is taken from `root` too). The descriptor is close-on-exec.
pub fn open_beneath(root: &Path, path: &str, access: ImageAccess) -> Result<File, ImageError> {
    let root_dir = open_how(
        libc::AT_FDCWD,
        root.as_os_str().as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )
    .map_err(|source| ImageError::Root {
        root: root.display().to_string(),
        source,
    })?;
    let open_error = |source| ImageError::Open {
        path: path.to_string(),
        source,
    };
    let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY;
    flags |= if access.read_only {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    if access.direct {
        flags |= libc::O_DIRECT;
    }
    // Non-blocking for the open itself, so that a FIFO on the path cannot hang the launcher
    // before the type check refuses it.
    let file = open_how(
        root_dir.as_raw_fd(),
        path.as_bytes(),
        flags | libc::O_NONBLOCK,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(open_error)?;
    let kind = file.metadata().map_err(open_error)?.mode() & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFBLK {
        return Err(ImageError::NotADisk {
            path: path.to_string(),
        });
    }
    // SAFETY: F_SETFL with integer flags on a descriptor this function owns.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & libc::O_DIRECT) } < 0 {
        return Err(open_error(io::Error::last_os_error()));
    }
    Ok(file)
}

/// `openat2(dir, path, {flags, mode 0, resolve})`.
pub(crate) fn open_how(
    dir: libc::c_int,
    path: &[u8],
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<File> {
    let path = std::ffi::CString::new(path)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: open_how is plain data; the fields that matter are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    loop {
        // SAFETY: a NUL-terminated path and an open_how of the size passed, both live for the
        // call; the kernel returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: openat2 just returned this descriptor and nothing else owns it.
            return Ok(unsafe { File::from_raw_fd(fd as libc::c_int) });
        }
        let err = io::Error::last_os_error();
        // EAGAIN: a rename raced with RESOLVE_IN_ROOT's lookup; the kernel asks for a retry.
        if !matches!(err.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const READ: ImageAccess = ImageAccess {
        read_only: true,
        direct: false,
    };

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "citadel-launcher-image-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/sub")).unwrap();
        std::fs::write(dir.join("root/disk.raw"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.join("outside.raw"), vec![7u8; 4096]).unwrap();
        dir
    }

    #[test]
    fn a_file_in_the_root_opens_with_the_asked_mode() {
        let dir = scratch("ok");
        let root = dir.join("root");
        let file = open_beneath(&root, "/disk.raw", READ).unwrap();
        // SAFETY: F_GETFL on a descriptor the test owns.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        // SAFETY: as above.
        let fd_flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let rw = ImageAccess {
            read_only: false,
            direct: false,
        };
        let file = open_beneath(&root, "sub/../disk.raw", rw).unwrap();
        // SAFETY: as above.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dot_dot_and_symlinks_stay_inside_the_root() {
        let dir = scratch("escape");
        let root = dir.join("root");
        // `..` above the root is the root itself: outside.raw is not found there.
        let err = open_beneath(&root, "../outside.raw", READ).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Could not open '../outside.raw': No such file or directory (os error 2)"
        );
        // An absolute symlink restarts from the root, a relative one stops at it.
        symlink(dir.join("outside.raw"), root.join("abs")).unwrap();
        symlink("../outside.raw", root.join("rel")).unwrap();
        for link in ["abs", "rel"] {
            let err = open_beneath(&root, link, READ).unwrap_err();
            assert!(
                matches!(&err, ImageError::Open { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
                "{link}: {err}"
            );
        }
        // A symlink that stays inside is followed.
        symlink("/disk.raw", root.join("inside")).unwrap();
        open_beneath(&root, "inside", READ).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn magic_links_are_refused() {
        let err = open_beneath(Path::new("/"), "/proc/self/exe", READ).unwrap_err();
        assert!(
            matches!(&err, ImageError::Open { source, .. } if source.raw_os_error() == Some(libc::ELOOP)),
            "{err}"
        );
    }

    #[test]
    fn missing_files_directories_and_fifos_are_refused() {
        let dir = scratch("kinds");
        let root = dir.join("root");
        assert_eq!(
            open_beneath(&root, "/x", READ).unwrap_err().to_string(),
            "Could not open '/x': No such file or directory (os error 2)"
        );
        assert_eq!(
            open_beneath(&root, "/sub", READ).unwrap_err().to_string(),
            "Could not open '/sub': not a regular file or block device"
        );
        let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(
            open_beneath(&root, "/fifo", READ).unwrap_err().to_string(),
            "Could not open '/fifo': not a regular file or block device"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
