//! Serves one virtio-blk queue whose descriptor table, available ring and every other byte of
//! guest memory come from the input, the way a citadel-blk queue worker does: pop each chain
//! the ring offers, parse and execute it with the backend's request code against a memfd
//! disk, publish the used element.
//!
//! Input: one byte of setup (bits 0-2: queue size as a power of two up to 128; bit 3: the disk
//! is read-only; bit 4: GET_ID has a serial; bit 5: EVENT_IDX), two bytes of the first avail
//! index the backend expects, then guest memory from address 0: the descriptor table at 0x0,
//! the available ring at 0x800, the used ring at 0x1000, anything after. Guest memory is two
//! regions, 0x0-0x10000 and 0x20000-0x28000, so chains can straddle the hole.
//!
//! Checks that nothing panics or touches memory out of bounds, that a read-only disk is never
//! modified, that the image keeps its size, and that a used length never exceeds the bytes the
//! chain made writable.
//!
//! Run with `scripts/fuzz.sh`, or from `backends/blk/fuzz` with
//! `cargo fuzz run descriptor_chain`.

#![no_main]

// citadel-blk is a binary crate: its modules are compiled into this target, at the crate
// root where their `crate::` paths expect them.
#[allow(dead_code)]
#[path = "../../src/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "../../src/disk.rs"]
mod disk;
#[allow(dead_code)]
#[path = "../../src/request.rs"]
mod request;
#[allow(dead_code)]
#[path = "../../src/stats.rs"]
mod stats;

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cli::ImageSource;
use crate::disk::Disk;
use crate::request::{Limits, Scratch};
use crate::stats::Stats;

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x800;
const USED: u64 = 0x1000;
const LOW: (u64, usize) = (0x0, 0x1_0000);
const HIGH: (u64, usize) = (0x2_0000, 0x8000);
const DISK_LEN: usize = 64 * 512;

thread_local! {
    // One per worker in the backend, reused by every request; allocating its 1 MiB bounce
    // buffer for every input would dominate the run time.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A disk image in a memfd, every byte 0x5a, opened as citadel-blk opens an inherited fd.
fn disk(readonly: bool) -> Disk {
    // SAFETY: valid C string, constant flags; the result is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"citadel-blk-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor owned by nobody else.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(&[0x5a; DISK_LEN]).unwrap();
    Disk::open(&ImageSource::Fd(file.into_raw_fd()), readonly, false).unwrap()
}

/// The image's bytes, read through the backend's own reader.
fn contents(disk: &Disk) -> Vec<u8> {
    let mut bytes = vec![0; DISK_LEN];
    disk.read_at(&mut bytes, 0).unwrap();
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((&[setup, a0, a1], image)) = data.split_first_chunk::<3>() else {
        return;
    };
    let size = 1u16 << (setup & 7);
    let readonly = setup & 8 != 0;
    let serial = (setup & 16 != 0).then_some(*b"citadel-fuzz-serial\0");
    let event_idx = setup & 32 != 0;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW.0), LOW.1),
        (GuestAddress(HIGH.0), HIGH.1),
    ])
    .unwrap();
    let (low, high) = image.split_at(image.len().min(LOW.1));
    mem.write_slice(low, GuestAddress(LOW.0)).unwrap();
    mem.write_slice(&high[..high.len().min(HIGH.1)], GuestAddress(HIGH.0))
        .unwrap();

    let disk = disk(readonly);
    let before = contents(&disk);
    let stats = Stats::default();
    let dev = request::Device {
        disk: &disk,
        serial,
        stats: &stats,
        // As a device whose queues hold `size` descriptors advertises and enforces.
        limits: Limits::for_queue_size(size),
    };
    let mut queue = Queue::new(128).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_next_avail(u16::from_le_bytes([a0, a1]));
    queue.set_ready(true);
    assert!(queue.is_valid(&mem));

    // As the queue worker: a guest claiming more new entries than the ring holds is refused,
    // and one pass serves at most one ring's worth of requests.
    let Ok(avail) = queue.avail_idx(&mem, Ordering::Acquire) else {
        return;
    };
    if avail.0.wrapping_sub(queue.next_avail()) > queue.size() {
        return;
    }
    SCRATCH.with_borrow_mut(|scratch| {
        for _ in 0..size {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let writable: u64 = chain
                .clone()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            let len = request::handle(chain, &mem, &dev, scratch);
            assert!(
                u64::from(len) <= writable,
                "used {len} of {writable} writable bytes"
            );
            if queue.add_used(&mem, head, len).is_err() {
                break;
            }
        }
    });
    let after = contents(&disk);
    if readonly {
        assert!(before == after, "a read-only disk was modified");
    }
    assert_eq!(disk.capacity(), (DISK_LEN / 512) as u64);
});
