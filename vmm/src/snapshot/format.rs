//! The on-disk layout of a snapshot: a `state` file (a fixed header followed by the machine
//! state as JSON) and a `memory` file (guest RAM, in the order of the RAM memfd).
//!
//! Both files are untrusted input when restored: the header is read with explicit length
//! checks, the state is read only up to [`MAX_STATE_BYTES`], and both checksums are verified
//! before anything is built from them.
//!
//! Header, all integers little-endian:
//!
//! | Offset | Size | Field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `CITSNAP\0` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 4 | architecture (1: x86-64) |
//! | 16 | 8 | guest RAM size in bytes (the length of `memory`) |
//! | 24 | 4 | vCPU count |
//! | 28 | 4 | length of the JSON state that follows the header |
//! | 32 | 8 | CRC-64/XZ of the JSON state |
//! | 40 | 8 | CRC-64/XZ of the `memory` file |
//! | 48 | 8 | CRC-64/XZ of bytes 0 to 47 |

use std::io::Read;

use crc::{Crc, Digest, Table, CRC_64_XZ};

/// The checksum of both files and of the header, table-driven 16 bytes at a time: the memory
/// file's checksum is taken over all of guest RAM on every snapshot and restore.
pub const CHECKSUM: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

/// First bytes of a state file.
pub const MAGIC: [u8; 8] = *b"CITSNAP\0";
/// The version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The architecture code of x86-64.
pub const ARCH_X86_64: u32 = 1;
/// Length of the header.
pub const HEADER_LEN: usize = 56;
/// The largest JSON state accepted: far above what the largest machine (255 vCPUs, each with
/// its XSAVE area, LAPIC and MSRs) writes, and small enough to read into memory.
pub const MAX_STATE_BYTES: u32 = 64 << 20;

/// Why a snapshot cannot be restored. Each message is one line naming the file and the fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The state file is shorter than its header or its declared state.
    #[error("snapshot state file is truncated: {0}")]
    Truncated(&'static str),
    /// The state file does not start with the magic.
    #[error("snapshot state file is not a Citadel snapshot (bad magic)")]
    BadMagic,
    /// The header checksum does not match.
    #[error("snapshot state file header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// The state was written by a newer Citadel.
    #[error("snapshot format version {found} is newer than this Citadel reads ({FORMAT_VERSION})")]
    NewerVersion {
        /// The version in the file.
        found: u32,
    },
    /// The snapshot was taken on another architecture.
    #[error("snapshot was taken on architecture {found}, this host is x86-64 ({ARCH_X86_64})")]
    OtherArch {
        /// The code in the file.
        found: u32,
    },
    /// The declared state length is above the cap.
    #[error("snapshot state of {0} bytes exceeds the {MAX_STATE_BYTES}-byte limit")]
    StateTooLarge(u32),
    /// The state file has bytes after its declared state.
    #[error("snapshot state file has trailing bytes after its declared state")]
    TrailingBytes,
    /// The JSON state does not match its checksum.
    #[error("snapshot state file is corrupt (state checksum mismatch)")]
    StateChecksum,
    /// The memory file does not have the snapshot's RAM size.
    #[error("snapshot memory file is {found} bytes, the snapshot's RAM is {expected} bytes")]
    MemoryLength {
        /// The file's length.
        found: u64,
        /// The RAM size in the header.
        expected: u64,
    },
    /// The memory file does not match its checksum.
    #[error("snapshot memory file is corrupt (checksum mismatch)")]
    MemoryChecksum,
    /// The command line asks for another RAM size.
    #[error(
        "snapshot has {} of RAM, the command line asks for {} (-m)",
        ram_size(*snapshot),
        ram_size(*command_line)
    )]
    RamMismatch {
        /// Bytes in the snapshot.
        snapshot: u64,
        /// Bytes on the command line.
        command_line: u64,
    },
    /// The command line asks for another vCPU count.
    #[error("snapshot has {snapshot} vCPUs, the command line asks for {command_line} (-smp)")]
    VcpuMismatch {
        /// vCPUs in the snapshot.
        snapshot: u32,
        /// vCPUs on the command line.
        command_line: u32,
    },
    /// The command line builds other devices.
    #[error("snapshot devices [{snapshot}] differ from the command line's [{command_line}]")]
    DeviceMismatch {
        /// Devices in the snapshot, comma-separated.
        snapshot: String,
        /// Devices of the command line, comma-separated.
        command_line: String,
    },
    /// The command line plugs disks or NICs into other slots.
    #[error("snapshot has {snapshot}, the command line plugs {command_line}")]
    PluggedMismatch {
        /// The slots plugged in the snapshot.
        snapshot: String,
        /// The slots the command line plugs.
        command_line: String,
    },
    /// Reading a file failed.
    #[error("reading the snapshot {file} file: {reason}")]
    Io {
        /// `state` or `memory`.
        file: &'static str,
        /// What the OS said.
        reason: String,
    },
}

/// The fixed part of a state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Length of the JSON state.
    pub state_len: u32,
    /// Checksum of the JSON state.
    pub state_crc: u64,
    /// Checksum of the memory file.
    pub memory_crc: u64,
}

impl Header {
    /// The header's bytes, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&ARCH_X86_64.to_le_bytes());
        out[16..24].copy_from_slice(&self.ram_bytes.to_le_bytes());
        out[24..28].copy_from_slice(&self.vcpus.to_le_bytes());
        out[28..32].copy_from_slice(&self.state_len.to_le_bytes());
        out[32..40].copy_from_slice(&self.state_crc.to_le_bytes());
        out[40..48].copy_from_slice(&self.memory_crc.to_le_bytes());
        let crc = CHECKSUM.checksum(&out[..48]);
        out[48..56].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a header: magic, checksum, version, architecture, state length cap.
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let bytes: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(FormatError::Truncated("shorter than its header"))?;
        if bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if CHECKSUM.checksum(&bytes[..48]) != le64(&bytes[48..56]) {
            return Err(FormatError::HeaderChecksum);
        }
        let version = le32(&bytes[8..12]);
        if version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion { found: version });
        }
        let arch = le32(&bytes[12..16]);
        if arch != ARCH_X86_64 {
            return Err(FormatError::OtherArch { found: arch });
        }
        let state_len = le32(&bytes[28..32]);
        if state_len > MAX_STATE_BYTES {
            return Err(FormatError::StateTooLarge(state_len));
        }
        Ok(Header {
            ram_bytes: le64(&bytes[16..24]),
            vcpus: le32(&bytes[24..28]),
            state_len,
            state_crc: le64(&bytes[32..40]),
            memory_crc: le64(&bytes[40..48]),
        })
    }

    /// Refuses a snapshot the command line's machine cannot take.
    pub fn check_machine(&self, ram_bytes: u64, vcpus: u32) -> Result<(), FormatError> {
        if self.ram_bytes != ram_bytes {
            return Err(FormatError::RamMismatch {
                snapshot: self.ram_bytes,
                command_line: ram_bytes,
            });
        }
        if self.vcpus != vcpus {
            return Err(FormatError::VcpuMismatch {
                snapshot: self.vcpus,
                command_line: vcpus,
            });
        }
        Ok(())
    }
}

/// A RAM size as the user wrote it: in MiB when it is a whole number of them.
fn ram_size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// Splits a whole state file into its checked header and its checked JSON state.
pub fn split_state(file: &[u8]) -> Result<(Header, &[u8]), FormatError> {
    let header = Header::decode(file)?;
    let end = HEADER_LEN + header.state_len as usize;
    let state = file
        .get(HEADER_LEN..end)
        .ok_or(FormatError::Truncated("shorter than its declared state"))?;
    if file.len() > end {
        return Err(FormatError::TrailingBytes);
    }
    if CHECKSUM.checksum(state) != header.state_crc {
        return Err(FormatError::StateChecksum);
    }
    Ok((header, state))
}

/// Reads a state file, never more than its header and [`MAX_STATE_BYTES`] (plus one byte, to
/// tell trailing bytes apart).
pub fn read_state(file: impl Read) -> Result<Vec<u8>, FormatError> {
    let cap = HEADER_LEN as u64 + u64::from(MAX_STATE_BYTES) + 1;
    let mut out = Vec::new();
    file.take(cap)
        .read_to_end(&mut out)
        .map_err(|e| FormatError::Io {
            file: "state",
            reason: e.to_string(),
        })?;
    Ok(out)
}

/// Refuses a memory file of `len` bytes that does not hold the header's RAM size.
pub fn check_memory_length(len: u64, header: &Header) -> Result<(), FormatError> {
    if len != header.ram_bytes {
        return Err(FormatError::MemoryLength {
            found: len,
            expected: header.ram_bytes,
        });
    }
    Ok(())
}

/// Checks the memory file's length and checksum against the header, reading it once.
pub fn check_memory(mut file: impl Read, len: u64, header: &Header) -> Result<(), FormatError> {
    check_memory_length(len, header)?;
    let mut digest = CHECKSUM.digest();
    let read = feed(&mut digest, &mut file).map_err(|e| FormatError::Io {
        file: "memory",
        reason: e.to_string(),
    })?;
    // The file may have been shortened between the length check and the read.
    if read != header.ram_bytes {
        return Err(FormatError::MemoryLength {
            found: read,
            expected: header.ram_bytes,
        });
    }
    if digest.finalize() != header.memory_crc {
        return Err(FormatError::MemoryChecksum);
    }
    Ok(())
}

/// Feeds everything `file` yields into `digest`; returns the byte count.
pub fn feed(digest: &mut Digest<'_, u64, Table<16>>, file: &mut impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                digest.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: &[u8], memory: &[u8]) -> Vec<u8> {
        let header = Header {
            ram_bytes: memory.len() as u64,
            vcpus: 2,
            state_len: state.len() as u32,
            state_crc: CHECKSUM.checksum(state),
            memory_crc: CHECKSUM.checksum(memory),
        };
        let mut file = header.encode().to_vec();
        file.extend_from_slice(state);
        file
    }

    #[test]
    fn a_written_snapshot_reads_back() {
        let memory = vec![7u8; 3 << 20];
        let file = sample(b"{\"x\":1}", &memory);
        let (header, state) = split_state(&file).unwrap();
        assert_eq!(state, b"{\"x\":1}");
        assert_eq!((header.ram_bytes, header.vcpus), (3 << 20, 2));
        check_memory(&memory[..], memory.len() as u64, &header).unwrap();
        header.check_machine(3 << 20, 2).unwrap();
    }

    #[test]
    fn every_corrupted_state_byte_is_refused() {
        let file = sample(b"{\"vcpus\":[]}", b"mem");
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(split_state(&bad).is_err(), "flipped byte {i} accepted");
        }
    }

    #[test]
    fn corrupt_or_short_memory_is_refused() {
        let memory = vec![1u8; 8192];
        let file = sample(b"{}", &memory);
        let (header, _) = split_state(&file).unwrap();
        let mut bad = memory.clone();
        bad[4000] = 2;
        assert_eq!(
            check_memory(&bad[..], 8192, &header),
            Err(FormatError::MemoryChecksum)
        );
        assert_eq!(
            check_memory(&memory[..4096], 4096, &header),
            Err(FormatError::MemoryLength {
                found: 4096,
                expected: 8192
            })
        );
        // Shortened after its length was taken.
        assert_eq!(
            check_memory(&memory[..4096], 8192, &header),
            Err(FormatError::MemoryLength {
                found: 4096,
                expected: 8192
            })
        );
    }

    #[test]
    fn header_fields_are_checked() {
        let file = sample(b"{}", b"m");
        let reseal = |f: &mut Vec<u8>| {
            let crc = CHECKSUM.checksum(&f[..48]);
            f[48..56].copy_from_slice(&crc.to_le_bytes());
        };
        let mut newer = file.clone();
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut newer);
        assert_eq!(
            split_state(&newer).unwrap_err().to_string(),
            "snapshot format version 2 is newer than this Citadel reads (1)"
        );
        let mut arm = file.clone();
        arm[12..16].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut arm);
        assert_eq!(split_state(&arm), Err(FormatError::OtherArch { found: 2 }));
        let mut huge = file.clone();
        huge[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut huge);
        assert_eq!(
            split_state(&huge),
            Err(FormatError::StateTooLarge(u32::MAX))
        );
        let mut trailing = file.clone();
        trailing.push(0);
        assert_eq!(split_state(&trailing), Err(FormatError::TrailingBytes));
        assert_eq!(
            split_state(&file[..HEADER_LEN + 1]),
            Err(FormatError::Truncated("shorter than its declared state"))
        );
        assert_eq!(
            split_state(b"CITSNAP"),
            Err(FormatError::Truncated("shorter than its header"))
        );
    }

    #[test]
    fn another_machine_is_refused() {
        let header = Header::decode(&sample(b"", &[0u8; 4096])).unwrap();
        assert_eq!(
            header.check_machine(8192, 2).unwrap_err().to_string(),
            "snapshot has 4096 bytes of RAM, the command line asks for 8192 bytes (-m)"
        );
        assert_eq!(
            header.check_machine(4096, 1).unwrap_err().to_string(),
            "snapshot has 2 vCPUs, the command line asks for 1 (-smp)"
        );
    }

    #[test]
    fn reading_stops_past_the_cap() {
        let long = std::io::repeat(0).take(u64::from(MAX_STATE_BYTES) * 2);
        let read = read_state(long).unwrap();
        assert_eq!(read.len(), HEADER_LEN + MAX_STATE_BYTES as usize + 1);
    }
}
