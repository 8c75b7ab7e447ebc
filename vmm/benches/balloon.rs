//! Host memory the balloon returns per second, the monitor's part of an inflation: guest RAM
//! in its memfd, backed page by page, then given back the way Linux's driver sends frames
//! (buffers of 256 frame numbers, highest first), coalesced and punched out of the file as
//! the device does. A second run gives back every other page only, so nothing coalesces: one
//! system call per page, the worst a guest can ask for. Reading the frames from the ring is
//! not counted (a few hundred bytes per buffer).
//!
//! Prints figures; asserts only that the memory really left the memfd.
//! Run with `cargo bench -p citadel --bench balloon`.

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use citadel::devices::balloon::page_ranges::{coalesce, discard_pages, PAGE_SIZE};
use citadel::memory::create_guest_ram;
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 1 << 30;
/// Guest-physical range given back: 512 MiB from 256 MiB.
const START: u64 = 256 << 20;
const LEN: u64 = 512 << 20;
/// Frame numbers per buffer, as Linux's driver sends them.
const PFNS_PER_BUFFER: u64 = 256;
const RUNS: usize = 5;

fn allocated(file: &std::fs::File) -> u64 {
    file.metadata().expect("stat the memfd").blocks() * 512
}

/// Backs the range, gives back the pages `stride` apart in buffers of 256 frames and returns
/// (bytes that left the memfd, seconds).
fn run(stride: u64) -> (u64, f64) {
    let ram = create_guest_ram(RAM).expect("guest RAM");
    let chunk = vec![0xa5u8; 1 << 20];
    for off in (0..LEN).step_by(chunk.len()) {
        ram.memory
            .write_slice(&chunk, GuestAddress(START + off))
            .expect("fill");
    }
    let before = allocated(&ram.memfd);
    let first = START / PAGE_SIZE;
    let frames: Vec<u32> = (0..LEN / PAGE_SIZE)
        .step_by(stride as usize)
        .map(|i| (first + i) as u32)
        .collect();
    let start = Instant::now();
    for buffer in frames.chunks(PFNS_PER_BUFFER as usize).rev() {
        let mut pfns: Vec<u32> = buffer.iter().rev().copied().collect();
        for range in coalesce(&mut pfns) {
            discard_pages(&ram.memory, range).expect("discard");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let returned = before - allocated(&ram.memfd);
    let expected = frames.len() as u64 * PAGE_SIZE;
    assert!(
        returned >= expected,
        "{returned} bytes left the memfd, {expected} expected"
    );
    (returned, seconds)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    for (what, stride) in [("contiguous frames", 1), ("every other frame", 2)] {
        let rates: Vec<f64> = (0..RUNS)
            .map(|_| {
                let (bytes, seconds) = run(stride);
                bytes as f64 / (1 << 20) as f64 / seconds
            })
            .collect();
        println!(
            "balloon, {what}: {:.0} MiB/s returned to the host (median of {RUNS}, {} MiB each)",
            median(rates),
            (LEN / stride) >> 20
        );
    }
}
