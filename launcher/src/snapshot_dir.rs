//! Creating a snapshot directory and its two files on the VMM's behalf, and removing them
//! again when writing the snapshot failed.
//!
//! The VMM, once confined, may create no file; the launcher makes them and hands the open
//! descriptors over. Paths resolve as disk images do (see [`crate::image`]): with the
//! launcher's "/" as the root, so that in a jail no path reaches outside it, and without magic
//! links. The directory must not exist (it is created, mode 0700) or be an empty directory;
//! both files are created exclusively (mode 0600), so nothing that was there is overwritten.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use crate::image::open_how;

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Why a snapshot directory could not be prepared or cleaned up. One line naming the path.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDirError {
    /// The path has no last component to create (empty, "/", or ending in "." or "..").
    #[error("'{0}' cannot be a snapshot directory")]
    BadPath(String),
    /// The path exists and is not a directory.
    #[error("snapshot path '{0}' is not a directory")]
    NotADirectory(String),
    /// The directory exists and holds files.
    #[error("snapshot directory '{0}' is not empty")]
    NotEmpty(String),
    /// A file operation failed.
    #[error("snapshot directory '{path}': {what}: {source}")]
    Io {
        /// The path as given.
        path: String,
        /// The step.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
}

/// A prepared snapshot directory: the directory itself (for syncing it once the files are
/// written) and its two new, empty files, open for writing.
#[derive(Debug)]
pub struct SnapshotFiles {
    /// The directory, open for reading.
    pub dir: File,
    /// `memory`, empty.
    pub memory: File,
    /// `state`, empty.
    pub state: File,
    /// Whether the directory was created for this snapshot (and so is removed with it).
    pub created_dir: bool,
}

/// The parent of `path` and its last component, which must be a plain name.
fn split(path: &str) -> Result<(&Path, CString), SnapshotDirError> {
    let bad = || SnapshotDirError::BadPath(path.to_string());
    let p = Path::new(path);
    let Some(Component::Normal(name)) = p.components().next_back() else {
        return Err(bad());
    };
    let parent = match p.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = CString::new(name.as_bytes()).map_err(|_| bad())?;
    Ok((parent, name))
}

fn io_err<'a>(
    path: &'a str,
    what: &'static str,
) -> impl FnOnce(io::Error) -> SnapshotDirError + 'a {
    move |source| SnapshotDirError::Io {
        path: path.to_string(),
        what,
        source,
    }
}

/// Opens the directory that holds `path`'s last component, resolved with `root` as the root.
fn open_parent(root: &Path, path: &str, parent: &Path) -> Result<File, SnapshotDirError> {
    let root_dir = open_how(
        libc::AT_FDCWD,
        root.as_os_str().as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )
    .map_err(io_err(path, "opening the root"))?;
    open_how(
        root_dir.as_raw_fd(),
        parent.as_os_str().as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(io_err(path, "opening its parent"))
}

/// `openat(dir, name, flags, mode)`, never following a symlink in `name`.
fn open_at(dir: &File, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated name that lives for the call; the kernel returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Whether the directory open as `dir` has no entry besides "." and "..".
fn is_empty(dir: &File) -> io::Result<bool> {
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into the live buffer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(true);
        }
        // struct linux_dirent64: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name.
        let mut at = 0usize;
        while at + 19 < n as usize {
            let reclen = usize::from(u16::from_ne_bytes([buf[at + 16], buf[at + 17]]));
            let name = &buf[at + 19..(at + reclen).min(n as usize)];
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            if name != b"." && name != b".." {
                return Ok(false);
            }
            if reclen == 0 {
                break;
            }
            at += reclen;
        }
    }
}

/// `unlinkat(dir, name, flags)`; a name already gone is not an error.
fn unlink_at(dir: &File, name: &CString, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a NUL-terminated name that lives for the call.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
    }
    Ok(())
}

/// Prepares the snapshot directory `path`, resolved with `root` as the root: creates it, or
/// takes an existing empty directory, then creates both files. On failure nothing it created
/// is left behind.
pub fn create(root: &Path, path: &str) -> Result<SnapshotFiles, SnapshotDirError> {
    let (parent, name) = split(path)?;
    let parent_dir = open_parent(root, path, parent)?;
    // SAFETY: a NUL-terminated name that lives for the call.
    let created_dir = if unsafe { libc::mkdirat(parent_dir.as_raw_fd(), name.as_ptr(), 0o700) } == 0
    {
        true
    } else {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(io_err(path, "creating it")(err));
        }
        false
    };
    let result = fill(&parent_dir, &name, path, created_dir);
    if result.is_err() && created_dir {
        if let Err(e) = unlink_at(&parent_dir, &name, libc::AT_REMOVEDIR) {
            log::warn!("removing the snapshot directory {path}: {e}");
        }
    }
    result
}

fn fill(
    parent: &File,
    name: &CString,
    path: &str,
    created_dir: bool,
) -> Result<SnapshotFiles, SnapshotDirError> {
    let name = name
        .to_str()
        .map_err(|_| SnapshotDirError::BadPath(path.to_string()))?;
    let dir = open_at(parent, name, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTDIR) || e.raw_os_error() == Some(libc::ELOOP) {
            SnapshotDirError::NotADirectory(path.to_string())
        } else {
            io_err(path, "opening it")(e)
        }
    })?;
    if !created_dir && !is_empty(&dir).map_err(io_err(path, "listing it"))? {
        return Err(SnapshotDirError::NotEmpty(path.to_string()));
    }
    let new_file = |file| {
        open_at(
            &dir,
            file,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
    };
    let memory = new_file(MEMORY_FILE).map_err(io_err(path, "creating its memory file"))?;
    let state = match new_file(STATE_FILE) {
        Ok(state) => state,
        Err(e) => {
            let _ = remove_files(&dir);
            return Err(io_err(path, "creating its state file")(e));
        }
    };
    Ok(SnapshotFiles {
        dir,
        memory,
        state,
        created_dir,
    })
}

fn remove_files(dir: &File) -> io::Result<()> {
    for file in [STATE_FILE, MEMORY_FILE] {
        let name = CString::new(file).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        unlink_at(dir, &name, 0)?;
    }
    Ok(())
}

/// Removes what [`create`] made for `path` (resolved with `root` as the root) once writing the
/// snapshot failed: both files, and the directory when `remove_dir` (it was created for the
/// snapshot). Files already gone are not an error.
pub fn remove(root: &Path, path: &str, remove_dir: bool) -> Result<(), SnapshotDirError> {
    let (parent, name) = split(path)?;
    let parent_dir = open_parent(root, path, parent)?;
    let text = name
        .to_str()
        .map_err(|_| SnapshotDirError::BadPath(path.to_string()))?;
    let dir = open_at(&parent_dir, text, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(io_err(path, "opening it"))?;
    remove_files(&dir).map_err(io_err(path, "removing its files"))?;
    if remove_dir {
        unlink_at(&parent_dir, &name, libc::AT_REMOVEDIR).map_err(io_err(path, "removing it"))?;
    }
    Ok(())
}

/// The three descriptors of `files` in the order the protocol sends them: directory, memory,
/// state.
pub(crate) fn into_fds(files: SnapshotFiles) -> Vec<OwnedFd> {
    vec![
        OwnedFd::from(files.dir),
        OwnedFd::from(files.memory),
        OwnedFd::from(files.state),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "citadel-launcher-snapshot-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/empty")).unwrap();
        std::fs::create_dir_all(dir.join("root/full")).unwrap();
        std::fs::write(dir.join("root/full/keep"), b"x").unwrap();
        std::fs::write(dir.join("root/file"), b"x").unwrap();
        dir
    }

    #[test]
    fn a_new_directory_and_both_files_are_created_and_removed_again() {
        let dir = scratch("new");
        let root = dir.join("root");
        let files = create(&root, "/snap").unwrap();
        assert!(files.created_dir);
        let meta = std::fs::metadata(root.join("snap")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        for name in [MEMORY_FILE, STATE_FILE] {
            let meta = std::fs::metadata(root.join("snap").join(name)).unwrap();
            assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (0, 0o600));
        }
        drop(files);
        remove(&root, "/snap", true).unwrap();
        assert!(!root.join("snap").exists());
        // An existing empty directory is taken, and kept when the snapshot is removed.
        let files = create(&root, "empty").unwrap();
        assert!(!files.created_dir);
        remove(&root, "empty", false).unwrap();
        assert_eq!(std::fs::read_dir(root.join("empty")).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn what_exists_is_never_overwritten_and_paths_stay_in_the_root() {
        let dir = scratch("refused");
        let root = dir.join("root");
        assert_eq!(
            create(&root, "/full").unwrap_err().to_string(),
            "snapshot directory '/full' is not empty"
        );
        assert_eq!(std::fs::read(root.join("full/keep")).unwrap(), b"x");
        assert_eq!(
            create(&root, "/file").unwrap_err().to_string(),
            "snapshot path '/file' is not a directory"
        );
        for bad in ["", "/", "/snap/..", "."] {
            assert_eq!(
                create(&root, bad).unwrap_err().to_string(),
                format!("'{bad}' cannot be a snapshot directory")
            );
        }
        // `..` stops at the root: the directory is made inside it.
        let files = create(&root, "../../escaped").unwrap();
        drop(files);
        assert!(root.join("escaped/state").exists());
        assert!(!dir.join("escaped").exists());
        // A symlink as the last component is not followed.
        symlink(dir.join("outside"), root.join("link")).unwrap();
        assert_eq!(
            create(&root, "/link").unwrap_err().to_string(),
            "snapshot path '/link' is not a directory"
        );
        assert!(!dir.join("outside").exists());
        // A missing parent is an error, and nothing is created.
        let err = create(&root, "/missing/snap").unwrap_err().to_string();
        assert!(
            err.starts_with("snapshot directory '/missing/snap': opening its parent"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
