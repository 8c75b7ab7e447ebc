//! One virtio-blk request: validating its descriptor chain and executing it on the image.
//!
//! A chain is a readable byte stream (16-byte header, then write data or discard segments)
//! followed by a writable byte stream (read data or the serial number, then one status byte).
//! Framing across descriptors is free, as the virtio specification requires. Every address is
//! checked against guest memory before use; every length and sector range is checked with
//! overflow-safe arithmetic; data moves through one preallocated buffer per queue, so a request
//! never makes the backend allocate.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::disk::{AlignedBuf, Disk, SECTOR_SIZE};
use crate::stats::Stats;

/// Request types (virtio 1.2, 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const HEADER_LEN: u64 = 16;
const DISCARD_SEG_LEN: u64 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// Most descriptors accepted in one chain (direct or indirect).
pub const MAX_SEGMENTS: usize = 1024;
/// Most discard / write-zeroes segments in one request (advertised in the config space).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors one discard / write-zeroes segment may cover (advertised).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Size of the per-queue bounce buffer: the largest piece moved with one pread/pwrite.
pub const BOUNCE_LEN: usize = 1 << 20;
/// Most data bytes one descriptor may carry (advertised as `size_max`).
pub const SIZE_MAX: u32 = 64 << 10;
/// Upper bound of the advertised `seg_max`, whatever the queue size: with [`SIZE_MAX`] it
/// caps one request at 254 × 64 KiB (15.9 MiB), so that one request occupies a worker, and
/// keeps GET_VRING_BASE or SIGTERM waiting, for milliseconds rather than seconds.
pub const SEG_MAX_CAP: u32 = 254;

/// The per-request bounds the device advertises and enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most data bytes in one descriptor (`size_max`).
    pub size_max: u32,
    /// Most descriptors carrying data in one request (`seg_max`).
    pub seg_max: u32,
}

impl Limits {
    /// The limits of a device whose queues hold at most `queue_size` descriptors: a chain of
    /// `seg_max` data descriptors plus header and status fits in the ring without indirect
    /// descriptors.
    pub fn for_queue_size(queue_size: u16) -> Limits {
        Limits {
            size_max: SIZE_MAX,
            seg_max: u32::from(queue_size.saturating_sub(2)).clamp(1, SEG_MAX_CAP),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: u64,
    len: u32,
}

/// Per-queue scratch space reused by every request.
pub struct Scratch {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    bounce: AlignedBuf,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            readable: Vec::with_capacity(MAX_SEGMENTS),
            writable: Vec::with_capacity(MAX_SEGMENTS),
            bounce: AlignedBuf::new(BOUNCE_LEN),
        }
    }
}

/// What the device knows about itself when executing requests.
pub struct Device<'a> {
    /// The image.
    pub disk: &'a Disk,
    /// GET_ID answer, zero padded; `None` answers UNSUPP.
    pub serial: Option<[u8; ID_LEN]>,
    /// Counters.
    pub stats: &'a Stats,
    /// Advertised bounds of one request.
    pub limits: Limits,
}

/// Why a request failed; logged at debug level, answered with IOERR or UNSUPP.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("descriptor out of guest memory")]
    BadAddress,
    #[error("readable descriptor after a writable one")]
    Direction,
    #[error("descriptor with {len} data bytes, more than size_max {max}")]
    SegmentTooLarge { len: u64, max: u32 },
    #[error("more than seg_max {max} data descriptors")]
    TooManySegments { max: u32 },
    #[error("request layout: {0}")]
    Layout(&'static str),
    #[error("sectors {sector}+{count} beyond capacity {capacity}")]
    Range {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("unsupported flags {0:#x}")]
    Flags(u32),
    #[error("guest memory access failed")]
    Memory,
    #[error("image I/O: {0}")]
    Io(std::io::Error),
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::Unsupported(_) | Failure::Flags(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// Validates and executes the request made of `chain`. Returns the number of bytes written
/// into guest memory (the used-ring length); 0 means the chain was too broken to carry even a
/// status byte and was returned untouched.
pub fn handle<M: GuestMemory>(
    chain: impl Iterator<Item = Descriptor>,
    mem: &M,
    dev: &Device<'_>,
    scratch: &mut Scratch,
) -> u32 {
    Stats::add(&dev.stats.requests, 1);
    scratch.readable.clear();
    scratch.writable.clear();
    let mut last_has_next = false;
    let mut shape: Result<(), Failure> = Ok(());
    for desc in chain {
        if scratch.readable.len() + scratch.writable.len() >= MAX_SEGMENTS {
            last_has_next = true;
            break;
        }
        last_has_next = desc.has_next();
        let seg = Segment {
            addr: desc.addr().0,
            len: desc.len(),
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, access(&desc)) && shape.is_ok() {
            shape = Err(Failure::BadAddress);
        }
        if desc.is_write_only() {
            scratch.writable.push(seg);
        } else {
            if !scratch.writable.is_empty() && shape.is_ok() {
                shape = Err(Failure::Direction);
            }
            scratch.readable.push(seg);
        }
    }
    // A chain that ends on a descriptor still pointing further was cut short (bad index,
    // loop, nested indirect table, too long): nothing in it can be trusted.
    let status_at = match scratch.writable.last() {
        Some(s) if !last_has_next && s.len > 0 => s.addr.checked_add(u64::from(s.len) - 1),
        _ => None,
    };
    let Some(status_at) =
        status_at.filter(|a| mem.check_range(GuestAddress(*a), 1, Permissions::Write))
    else {
        log::debug!("dropping a malformed descriptor chain without status");
        Stats::add(&dev.stats.errors, 1);
        return 0;
    };
    let result = shape
        .and_then(|()| check_limits(&scratch.readable, &scratch.writable, &dev.limits))
        .and_then(|()| execute(mem, dev, scratch));
    let (status, data_len) = match result {
        Ok(len) => (S_OK, len),
        Err(f) => {
            log::debug!("request failed: {f}");
            let counter = if f.status() == S_UNSUPP {
                &dev.stats.unsupported
            } else {
                &dev.stats.errors
            };
            Stats::add(counter, 1);
            (f.status(), 0)
        }
    };
    if mem.write_obj(status, GuestAddress(status_at)).is_err() {
        Stats::add(&dev.stats.errors, 1);
        return 0;
    }
    data_len + 1
}

fn access(desc: &Descriptor) -> Permissions {
    if desc.is_write_only() {
        Permissions::Write
    } else {
        Permissions::Read
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Refuses a request whose data breaks the advertised `size_max` or `seg_max`, before any
/// byte of the image or of guest memory is touched. Together the two rules bound the whole
/// request to `seg_max` × `size_max` bytes. Data is what lies between the 16-byte header and the
/// status byte; the header and status may share descriptors with it in any framing, so each
/// descriptor is judged by the data bytes it carries.
fn check_limits(
    readable: &[Segment],
    writable: &[Segment],
    limits: &Limits,
) -> Result<(), Failure> {
    let mut segments = 0u32;
    let mut check = |segs: &[Segment], data_start: u64, data_end: u64| {
        let mut pos = 0u64;
        for seg in segs {
            let end = pos + u64::from(seg.len);
            let data = end.min(data_end).saturating_sub(pos.max(data_start));
            pos = end;
            if data == 0 {
                continue;
            }
            if data > u64::from(limits.size_max) {
                return Err(Failure::SegmentTooLarge {
                    len: data,
                    max: limits.size_max,
                });
            }
            segments += 1;
            if segments > limits.seg_max {
                return Err(Failure::TooManySegments {
                    max: limits.seg_max,
                });
            }
        }
        Ok(())
    };
    // Lengths are u32 and a chain holds at most MAX_SEGMENTS of them: the sums cannot overflow.
    check(readable, HEADER_LEN, total(readable))?;
    check(writable, 0, total(writable).saturating_sub(1))
}

/// Copies `out.len()` bytes of the stream formed by `segs`, starting `skip` bytes in.
fn gather<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> Result<(), Failure> {
    walk(segs, skip, out.len(), |addr, range| {
        mem.read_slice(&mut out[range], GuestAddress(addr))
            .map_err(|_| Failure::Memory)
    })
}

/// Copies `data` into the stream formed by `segs`, starting `skip` bytes in.
fn scatter<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    data: &[u8],
) -> Result<(), Failure> {
    walk(segs, skip, data.len(), |addr, range| {
        mem.write_slice(&data[range], GuestAddress(addr))
            .map_err(|_| Failure::Memory)
    })
}

/// Calls `f(guest_address, buffer_range)` for each piece of the stream window
/// `[skip, skip + len)`; fails if the stream is shorter.
fn walk(
    segs: &[Segment],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let avail = (seg_len - skip) as usize;
        let n = avail.min(len - done);
        let addr = seg.addr.checked_add(skip).ok_or(Failure::BadAddress)?;
        f(addr, done..done + n)?;
        done += n;
        skip = 0;
    }
    if done != len {
        return Err(Failure::Layout("chain shorter than the request"));
    }
    Ok(())
}

fn check_range(disk: &Disk, sector: u64, count: u64) -> Result<u64, Failure> {
    let capacity = disk.capacity();
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(Failure::Range {
            sector,
            count,
            capacity,
        }),
    }
}

fn execute<M: GuestMemory>(
    mem: &M,
    dev: &Device<'_>,
    scratch: &mut Scratch,
) -> Result<u32, Failure> {
    let Scratch {
        readable,
        writable,
        bounce,
    } = scratch;
    let mut header = [0u8; HEADER_LEN as usize];
    gather(mem, readable, 0, &mut header)
        .map_err(|_| Failure::Layout("no 16-byte request header"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8-byte slice"));
    let readable_len = total(readable);
    let writable_len = total(writable);
    // The status byte is the last writable byte; the rest of the writable stream is data.
    let in_len = writable_len - 1;
    let out_len = readable_len - HEADER_LEN;
    let disk = dev.disk;
    let stats = dev.stats;
    match kind {
        T_IN => {
            if out_len != 0 {
                return Err(Failure::Layout("read request with data to the device"));
            }
            if !in_len.is_multiple_of(SECTOR_SIZE) {
                return Err(Failure::Layout("read length not a multiple of 512"));
            }
            // The used-ring length cannot report more, so refuse before any I/O.
            let used_len = u32::try_from(in_len)
                .ok()
                .ok_or(Failure::Layout("read longer than 4 GiB"))?;
            let mut offset = check_range(disk, sector, in_len / SECTOR_SIZE)?;
            let buf = bounce.as_mut_slice();
            let mut pos = 0u64;
            while pos < in_len {
                let n = (in_len - pos).min(buf.len() as u64) as usize;
                disk.read_at(&mut buf[..n], offset).map_err(Failure::Io)?;
                scatter(mem, writable, pos, &buf[..n])?;
                pos += n as u64;
                offset += n as u64;
            }
            Stats::add(&stats.reads, 1);
            Stats::add(&stats.read_bytes, in_len);
            Ok(used_len)
        }
        T_OUT => {
            if in_len != 0 {
                return Err(Failure::Layout("write request with data from the device"));
            }
            if disk.readonly() {
                return Err(Failure::ReadOnly);
            }
            if !out_len.is_multiple_of(SECTOR_SIZE) {
                return Err(Failure::Layout("write length not a multiple of 512"));
            }
            let mut offset = check_range(disk, sector, out_len / SECTOR_SIZE)?;
            let buf = bounce.as_mut_slice();
            let mut pos = 0u64;
            while pos < out_len {
                let n = (out_len - pos).min(buf.len() as u64) as usize;
                gather(mem, readable, HEADER_LEN + pos, &mut buf[..n])?;
                disk.write_at(&buf[..n], offset).map_err(Failure::Io)?;
                pos += n as u64;
                offset += n as u64;
            }
            Stats::add(&stats.writes, 1);
            Stats::add(&stats.written_bytes, out_len);
            Ok(0)
        }
        T_FLUSH => {
            disk.flush().map_err(Failure::Io)?;
            Stats::add(&stats.flushes, 1);
            Ok(0)
        }
        T_GET_ID => {
            let serial = dev.serial.ok_or(Failure::Unsupported(kind))?;
            let n = (in_len as usize).min(ID_LEN);
            scatter(mem, writable, 0, &serial[..n])?;
            Ok(n as u32)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.readonly() {
                return Err(Failure::ReadOnly);
            }
            if out_len == 0 || !out_len.is_multiple_of(DISCARD_SEG_LEN) {
                return Err(Failure::Layout(
                    "discard segments not a multiple of 16 bytes",
                ));
            }
            let count = out_len / DISCARD_SEG_LEN;
            if count > u64::from(MAX_DISCARD_SEG) {
                return Err(Failure::Layout("too many discard segments"));
            }
            for i in 0..count {
                let mut raw = [0u8; DISCARD_SEG_LEN as usize];
                gather(mem, readable, HEADER_LEN + i * DISCARD_SEG_LEN, &mut raw)?;
                let start = u64::from_le_bytes(raw[0..8].try_into().expect("8-byte slice"));
                let sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4-byte slice"));
                let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4-byte slice"));
                let allowed = if kind == T_DISCARD {
                    0
                } else {
                    WRITE_ZEROES_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(Failure::Flags(flags));
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err(Failure::Layout("discard segment larger than advertised"));
                }
                let offset = check_range(disk, start, u64::from(sectors))?;
                let len = u64::from(sectors) * SECTOR_SIZE;
                if kind == T_DISCARD {
                    disk.discard(offset, len)
                } else {
                    disk.write_zeroes(offset, len, flags & WRITE_ZEROES_UNMAP != 0)
                }
                .map_err(Failure::Io)?;
            }
            Stats::add(&stats.discards, 1);
            Ok(0)
        }
        other => Err(Failure::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ImageSource;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x10_0000;

    struct Fixture {
        mem: GuestMemoryMmap,
        disk: Disk,
        stats: Stats,
        limits: Limits,
        path: std::path::PathBuf,
    }

    impl Fixture {
        fn new(readonly: bool) -> Fixture {
            Fixture::with_sectors(readonly, 64)
        }

        /// An image of `sectors` sectors of 0x5a, and the limits of a 256-entry queue.
        fn with_sectors(readonly: bool, sectors: usize) -> Fixture {
            let path = std::env::temp_dir().join(format!(
                "citadel-blk-req-{}-{:?}.img",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, vec![0x5au8; sectors * 512]).unwrap();
            let disk = Disk::open(&ImageSource::Path(path.clone()), readonly, false).unwrap();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
            Fixture {
                mem,
                disk,
                stats: Stats::default(),
                limits: Limits::for_queue_size(256),
                path,
            }
        }

        fn run(&self, descs: &[Descriptor]) -> (u32, u8) {
            let dev = Device {
                disk: &self.disk,
                serial: Some(*b"citadel-serial\0\0\0\0\0\0"),
                stats: &self.stats,
                limits: self.limits,
            };
            let mut scratch = Scratch::default();
            let used = handle(descs.iter().copied(), &self.mem, &dev, &mut scratch);
            let last = descs.last().unwrap();
            let status = self
                .mem
                .read_obj::<u8>(GuestAddress(last.addr().0 + u64::from(last.len()) - 1))
                .unwrap_or(0xff);
            (used, status)
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(at)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn d(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut flags = 0;
        if write {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        Descriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn write_then_read_split_across_descriptors() {
        let f = Fixture::new(false);
        f.header(0x1000, T_OUT, 2);
        f.mem
            .write_slice(&[7u8; 1024], GuestAddress(0x2000))
            .unwrap();
        let (used, status) = f.run(&[
            d(0x1000, 16, false, true),
            d(0x2000, 100, false, true),
            d(0x2000 + 100, 924, false, true),
            d(0x3000, 1, true, false),
        ]);
        assert_eq!((used, status), (1, S_OK));
        let bytes = std::fs::read(&f.path).unwrap();
        assert!(bytes[1024..2048].iter().all(|&b| b == 7));
        assert_eq!(bytes[2048], 0x5a);

        f.header(0x1000, T_IN, 2);
        let (used, status) = f.run(&[
            d(0x1000, 16, false, true),
            d(0x4000, 1024, true, true),
            d(0x3000, 1, true, false),
        ]);
        assert_eq!((used, status), (1025, S_OK));
        let mut back = [0u8; 1024];
        f.mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back.iter().all(|&b| b == 7));
    }

    #[test]
    fn out_of_range_and_bad_address_fail_with_ioerr() {
        let f = Fixture::new(false);
        f.header(0x1000, T_IN, 63);
        let (used, status) = f.run(&[
            d(0x1000, 16, false, true),
            d(0x4000, 1024, true, true),
            d(0x3000, 1, true, false),
        ]);
        assert_eq!((used, status), (1, S_IOERR));
        f.header(0x1000, T_IN, u64::MAX);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(0x4000, 512, true, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_IOERR)
        );
        f.header(0x1000, T_IN, 0);
        let (used, status) = f.run(&[
            d(0x1000, 16, false, true),
            d(MEM - 256, 512, true, true),
            d(0x3000, 1, true, false),
        ]);
        assert_eq!((used, status), (1, S_IOERR));
        assert_eq!(f.stats.errors.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn malformed_chains_are_dropped_or_refused() {
        let f = Fixture::new(false);
        f.header(0x1000, T_IN, 0);
        // Status outside memory: nothing can be reported.
        assert_eq!(
            f.run(&[d(0x1000, 16, false, true), d(MEM + 10, 1, true, false)])
                .0,
            0
        );
        // Truncated chain (last descriptor still has NEXT).
        assert_eq!(
            f.run(&[d(0x1000, 16, false, true), d(0x3000, 1, true, true)])
                .0,
            0
        );
        // Readable after writable.
        assert_eq!(
            f.run(&[
                d(0x4000, 512, true, true),
                d(0x1000, 16, false, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_IOERR)
        );
        // Header too short.
        assert_eq!(
            f.run(&[d(0x1000, 8, false, true), d(0x3000, 1, true, false)]),
            (1, S_IOERR)
        );
        // Unknown type.
        f.header(0x1000, 99, 0);
        assert_eq!(
            f.run(&[d(0x1000, 16, false, true), d(0x3000, 1, true, false)]),
            (1, S_UNSUPP)
        );
    }

    #[test]
    fn readonly_get_id_and_discard() {
        let f = Fixture::new(true);
        f.header(0x1000, T_OUT, 0);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(0x2000, 512, false, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_IOERR)
        );
        f.header(0x1000, T_GET_ID, 0);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(0x4000, 20, true, true),
                d(0x3000, 1, true, false)
            ]),
            (21, S_OK)
        );
        let mut id = [0u8; 14];
        f.mem.read_slice(&mut id, GuestAddress(0x4000)).unwrap();
        assert_eq!(&id, b"citadel-serial");

        let rw = Fixture::new(false);
        rw.header(0x1000, T_DISCARD, 0);
        rw.mem.write_obj(4u64, GuestAddress(0x2000)).unwrap();
        rw.mem.write_obj(8u32, GuestAddress(0x2008)).unwrap();
        rw.mem.write_obj(0u32, GuestAddress(0x200c)).unwrap();
        assert_eq!(
            rw.run(&[
                d(0x1000, 16, false, true),
                d(0x2000, 16, false, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_OK)
        );
        let bytes = std::fs::read(&rw.path).unwrap();
        assert!(bytes[2048..6144].iter().all(|&b| b == 0));
        assert_eq!(bytes[6144], 0x5a);
        // Discard with the unmap flag is not defined: UNSUPP.
        rw.mem.write_obj(1u32, GuestAddress(0x200c)).unwrap();
        assert_eq!(
            rw.run(&[
                d(0x1000, 16, false, true),
                d(0x2000, 16, false, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_UNSUPP)
        );
    }

    #[test]
    fn limits_follow_the_queue_size_up_to_the_cap() {
        assert_eq!(Limits::for_queue_size(1).seg_max, 1);
        assert_eq!(Limits::for_queue_size(16).seg_max, 14);
        assert_eq!(Limits::for_queue_size(256).seg_max, 254);
        let big = Limits::for_queue_size(1024);
        assert_eq!((big.seg_max, big.size_max), (SEG_MAX_CAP, SIZE_MAX));
    }

    #[test]
    fn size_max_bounds_the_data_of_each_descriptor_in_any_framing() {
        let max = SIZE_MAX as usize;
        let f = Fixture::with_sectors(false, 2 * max / 512);
        let data = 0x10000u64;
        f.mem
            .write_slice(&vec![0xaa; 2 * max], GuestAddress(data))
            .unwrap();
        // Exactly size_max in one descriptor, and size_max of data sharing a descriptor with
        // the header or with the status byte: accepted.
        f.header(0x1000, T_IN, 0);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(data, SIZE_MAX, true, true),
                d(0x3000, 1, true, false)
            ]),
            (SIZE_MAX + 1, S_OK)
        );
        f.header(data - 16, T_OUT, 0);
        assert_eq!(
            f.run(&[
                d(data - 16, 16 + SIZE_MAX, false, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_OK)
        );
        f.header(0x1000, T_IN, 0);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(data, SIZE_MAX + 1, true, false)
            ]),
            (SIZE_MAX + 1, S_OK)
        );
        // One sector more: IOERR, and neither the image nor guest memory changes.
        let image = std::fs::read(&f.path).unwrap();
        f.mem
            .write_slice(&vec![0xbb; 2 * max], GuestAddress(data))
            .unwrap();
        f.header(0x1000, T_IN, 0);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(data, SIZE_MAX + 512, true, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_IOERR)
        );
        f.header(0x1000, T_OUT, 0);
        assert_eq!(
            f.run(&[
                d(0x1000, 16, false, true),
                d(data, SIZE_MAX + 512, false, true),
                d(0x3000, 1, true, false)
            ]),
            (1, S_IOERR)
        );
        assert_eq!(std::fs::read(&f.path).unwrap(), image, "image changed");
        let mut back = vec![0u8; 2 * max];
        f.mem.read_slice(&mut back, GuestAddress(data)).unwrap();
        assert!(back.iter().all(|&b| b == 0xbb), "guest memory changed");
    }

    #[test]
    fn seg_max_bounds_the_data_descriptors_of_a_request() {
        let f = Fixture::with_sectors(false, 512);
        let seg_max = f.limits.seg_max as usize;
        f.mem
            .write_slice(&[0xcc; 512], GuestAddress(0x4000))
            .unwrap();
        let chain = |segments: usize, write: bool| {
            let mut c = vec![d(0x1000, 16, false, true)];
            // Empty descriptors carry no data and do not count.
            c.push(d(0x4000, 0, write, true));
            c.extend((0..segments).map(|_| d(0x4000, 512, write, true)));
            c.push(d(0x3000, 1, true, false));
            c
        };
        f.header(0x1000, T_OUT, 0);
        assert_eq!(f.run(&chain(seg_max, false)), (1, S_OK));
        let image = std::fs::read(&f.path).unwrap();
        assert!(image[..seg_max * 512].iter().all(|&b| b == 0xcc));
        f.mem
            .write_slice(&[0xdd; 512], GuestAddress(0x4000))
            .unwrap();
        f.header(0x1000, T_OUT, 0);
        assert_eq!(f.run(&chain(seg_max + 1, false)), (1, S_IOERR));
        f.header(0x1000, T_IN, 0);
        assert_eq!(f.run(&chain(seg_max + 1, true)), (1, S_IOERR));
        assert_eq!(std::fs::read(&f.path).unwrap(), image, "image changed");
        let mut back = [0u8; 512];
        f.mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back.iter().all(|&b| b == 0xdd), "guest memory changed");
        assert_eq!(f.stats.errors.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
