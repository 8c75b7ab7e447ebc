//! Writing a snapshot directory and reading one back with every check done before the caller
//! builds anything from it.
//!
//! Writing never leaves half a snapshot behind: the directory must not exist (it is created,
//! mode 0700) or be empty, both files are created exclusively (see
//! [`citadel_launcher::snapshot_dir`], which makes them: in the VMM, confined, the device
//! launcher does), and on any failure (a full disk, a read error on guest RAM) the files, and
//! the directory if it was created for the snapshot, are removed. Reading never changes either
//! file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use citadel_launcher::snapshot_dir::{self, SnapshotDirError, SnapshotFiles};
pub use citadel_launcher::snapshot_dir::{MEMORY_FILE, STATE_FILE};

use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::format::{self, FormatError, Header, CHECKSUM};

/// Bytes of guest RAM copied per read.
const CHUNK: usize = 1 << 20;

/// Why a snapshot could not be written. One line, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The directory or its files could not be made.
    #[error(transparent)]
    Directory(#[from] SnapshotDirError),
    /// The JSON state is above the format's cap.
    #[error("snapshot state of {0} bytes exceeds the format's limit")]
    StateTooLarge(usize),
    /// Guest RAM could not be read.
    #[error("reading guest RAM for the snapshot: {0}")]
    GuestRam(#[source] vm_memory::GuestMemoryError),
    /// A snapshot file could not be written.
    #[error("writing the snapshot's {file} file: {source}")]
    Io {
        /// `state`, `memory`, or the directory.
        file: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

fn io_err(file: &'static str) -> impl FnOnce(io::Error) -> WriteError {
    move |source| WriteError::Io { file, source }
}

/// What [`write_into`] writes.
pub struct SnapshotData<'a> {
    /// The machine state, serialised.
    pub state: &'a [u8],
    /// Guest RAM, written region after region in address order, as the RAM memfd holds it.
    pub memory: &'a GuestMemoryMmap,
    /// vCPU count.
    pub vcpus: u32,
}

/// Copies guest RAM into `out` as the guest sees it, returning its size and checksum. Read
/// through the mapping rather than from the file behind it: a machine restored from a
/// snapshot maps that file privately, and its guest's writes are only in the mapping.
fn copy_memory(memory: &GuestMemoryMmap, mut out: &File) -> Result<(u64, u64), WriteError> {
    let mut digest = CHECKSUM.digest();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for region in memory.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let len = (region.len() - offset).min(CHUNK as u64) as usize;
            memory
                .read_slice(&mut buf[..len], region.start_addr().unchecked_add(offset))
                .map_err(WriteError::GuestRam)?;
            digest.update(&buf[..len]);
            out.write_all(&buf[..len]).map_err(io_err(MEMORY_FILE))?;
            offset += len as u64;
        }
        total += region.len();
    }
    out.sync_all().map_err(io_err(MEMORY_FILE))?;
    Ok((total, digest.finalize()))
}

/// Writes a snapshot into freshly prepared, empty `files`: guest RAM, then the state with its
/// header, each synced, then the directory. The caller removes the files when this fails.
pub fn write_into(files: &SnapshotFiles, data: &SnapshotData<'_>) -> Result<(), WriteError> {
    let state_len =
        u32::try_from(data.state.len()).map_err(|_| WriteError::StateTooLarge(data.state.len()))?;
    if state_len > format::MAX_STATE_BYTES {
        return Err(WriteError::StateTooLarge(data.state.len()));
    }
    let (ram_bytes, memory_crc) = copy_memory(data.memory, &files.memory)?;
    let header = Header {
        ram_bytes,
        vcpus: data.vcpus,
        state_len,
        state_crc: CHECKSUM.checksum(data.state),
        memory_crc,
    };
    let mut state = &files.state;
    state
        .write_all(&header.encode())
        .and_then(|()| state.write_all(data.state))
        .and_then(|()| state.sync_all())
        .map_err(io_err(STATE_FILE))?;
    files.dir.sync_all().map_err(io_err("directory"))
}

/// Writes a snapshot into `dir`, which must not exist or be empty, from this process (which
/// must be allowed to create files there). On failure nothing it wrote is left behind.
pub fn write(dir: &Path, data: &SnapshotData<'_>) -> Result<(), WriteError> {
    // The directory helpers resolve from "/"; a relative path means the working directory.
    let dir = std::path::absolute(dir).map_err(io_err("directory"))?;
    let path = dir.to_string_lossy();
    let files = snapshot_dir::create(Path::new("/"), &path)?;
    let result = write_into(&files, data);
    if result.is_err() {
        if let Err(e) = snapshot_dir::remove(Path::new("/"), &path, files.created_dir) {
            log::warn!("removing the partial snapshot: {e}");
        }
    }
    result
}

/// A snapshot directory that passed every check.
#[derive(Debug)]
pub struct CheckedSnapshot {
    /// The header.
    pub header: Header,
    /// The JSON state, its checksum verified.
    pub state: Vec<u8>,
    /// The memory file, opened read-only, its length verified (and its checksum, unless the
    /// caller chose not to).
    pub memory: File,
}

fn open_read(dir: &Path, name: &'static str) -> Result<File, FormatError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(name))
        .map_err(|e| FormatError::Io {
            file: name,
            reason: e.to_string(),
        })
}

/// Reads and checks the snapshot in `dir` for a machine of `ram_bytes` and `vcpus`: the
/// header, the state's checksum, the machine's shape, then the memory file's length and,
/// with `verify_memory`, its checksum (a read of the whole file). Nothing is written.
pub fn read(
    dir: &Path,
    ram_bytes: u64,
    vcpus: u32,
    verify_memory: bool,
) -> Result<CheckedSnapshot, FormatError> {
    let bytes = format::read_state(open_read(dir, STATE_FILE)?)?;
    let (header, state) = format::split_state(&bytes)?;
    header.check_machine(ram_bytes, vcpus)?;
    let state = state.to_vec();
    let memory = open_read(dir, MEMORY_FILE)?;
    let len = memory
        .metadata()
        .map_err(|e| FormatError::Io {
            file: MEMORY_FILE,
            reason: e.to_string(),
        })?
        .len();
    if verify_memory {
        format::check_memory(&memory, len, &header)?;
    } else {
        format::check_memory_length(len, &header)?;
    }
    Ok(CheckedSnapshot {
        header,
        state,
        memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path = std::env::temp_dir()
                .join(format!("citadel-snapshot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Guest RAM holding `bytes`, in two regions when it has more than one page.
    fn ram(bytes: &[u8]) -> GuestMemoryMmap {
        let split = (bytes.len() / 2) & !4095;
        let parts = [(0, &bytes[..split]), (1 << 32, &bytes[split..])];
        let parts: Vec<_> = parts.into_iter().filter(|p| !p.1.is_empty()).collect();
        let ranges: Vec<_> = parts
            .iter()
            .map(|&(addr, part)| (vm_memory::GuestAddress(addr), part.len()))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        for (addr, part) in parts {
            memory
                .write_slice(part, vm_memory::GuestAddress(addr))
                .unwrap();
        }
        memory
    }

    fn bytes_of(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(dir.join(STATE_FILE)).unwrap(),
            std::fs::read(dir.join(MEMORY_FILE)).unwrap(),
        )
    }

    #[test]
    fn a_written_snapshot_reads_back_and_refusals_change_nothing() {
        let tmp = TempDir::new("roundtrip");
        let dir = tmp.0.join("snap");
        let content: Vec<u8> = (0..3 * CHUNK + 4096).map(|i| (i % 251) as u8).collect();
        let memory = ram(&content);
        let data = SnapshotData {
            state: b"{\"vcpus\":[]}",
            memory: &memory,
            vcpus: 2,
        };
        write(&dir, &data).unwrap();
        let checked = read(&dir, content.len() as u64, 2, true).unwrap();
        assert_eq!(checked.state, b"{\"vcpus\":[]}");
        assert_eq!(std::fs::read(dir.join(MEMORY_FILE)).unwrap(), content);

        let before = bytes_of(&dir);
        assert_eq!(
            read(&dir, content.len() as u64 + 4096, 2, true)
                .unwrap_err()
                .to_string(),
            format!(
                "snapshot has {} bytes of RAM, the command line asks for {} bytes (-m)",
                content.len(),
                content.len() + 4096
            )
        );
        assert_eq!(
            read(&dir, content.len() as u64, 1, true)
                .unwrap_err()
                .to_string(),
            "snapshot has 2 vCPUs, the command line asks for 1 (-smp)"
        );
        assert_eq!(bytes_of(&dir), before);

        // A corrupt memory byte, then a truncated memory file.
        let mut bad = content.clone();
        bad[CHUNK + 17] ^= 0x80;
        std::fs::write(dir.join(MEMORY_FILE), &bad).unwrap();
        assert_eq!(
            read(&dir, content.len() as u64, 2, true)
                .unwrap_err()
                .to_string(),
            "snapshot memory file is corrupt (checksum mismatch)"
        );
        // Unverified, the memory is taken as it is; its length is still checked.
        assert!(read(&dir, content.len() as u64, 2, false).is_ok());
        std::fs::write(dir.join(MEMORY_FILE), &content[..CHUNK]).unwrap();
        for verify in [true, false] {
            assert_eq!(
                read(&dir, content.len() as u64, 2, verify)
                    .unwrap_err()
                    .to_string(),
                format!(
                    "snapshot memory file is {CHUNK} bytes, the snapshot's RAM is {} bytes",
                    content.len()
                )
            );
        }
        std::fs::write(dir.join(MEMORY_FILE), &content).unwrap();

        // A corrupt state byte.
        let mut state = before.0.clone();
        let last = state.len() - 2;
        state[last] ^= 0x01;
        std::fs::write(dir.join(STATE_FILE), &state).unwrap();
        assert_eq!(
            read(&dir, content.len() as u64, 2, true)
                .unwrap_err()
                .to_string(),
            "snapshot state file is corrupt (state checksum mismatch)"
        );
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), state);
    }

    #[test]
    fn a_non_empty_directory_is_refused_and_kept() {
        let tmp = TempDir::new("nonempty");
        std::fs::write(tmp.0.join("keep"), b"x").unwrap();
        let memory = ram(&[0u8; 4096]);
        let data = SnapshotData {
            state: b"{}",
            memory: &memory,
            vcpus: 1,
        };
        let err = write(&tmp.0, &data).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("snapshot directory '{}' is not empty", tmp.0.display())
        );
        assert_eq!(std::fs::read(tmp.0.join("keep")).unwrap(), b"x");
        assert!(!tmp.0.join(MEMORY_FILE).exists());
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let tmp = TempDir::new("failed");
        // A state over the format's cap, refused once the files exist.
        let memory = ram(&vec![1u8; CHUNK + 8192]);
        let state = vec![b' '; format::MAX_STATE_BYTES as usize + 1];
        let data = SnapshotData {
            state: &state,
            memory: &memory,
            vcpus: 1,
        };
        let created = tmp.0.join("new");
        assert!(write(&created, &data).is_err());
        assert!(!created.exists());
        let existing = tmp.0.join("empty");
        std::fs::create_dir(&existing).unwrap();
        assert!(write(&existing, &data).is_err());
        assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 0);
    }
}
