//! A benchmark job: lays out guest memory, starts the device, drives every queue from its
//! own thread at the requested depth, and measures throughput and CPU time.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{Limit, Options, Pattern};
use crate::cpu::{cpu_time, CpuError, Process};
use crate::device::{BlkDevice, DeviceError, DeviceRequest, QueueSetup};
use crate::histogram::Histogram;
use crate::memory::{MemoryError, SharedMemory, MAX_MEMORY};
use crate::ring::{align_up, Buffer, RingError, RingLayout, SplitRing};

/// Bytes reserved per request for its header (16 bytes) and status byte.
const HEADER_STRIDE: u64 = 32;
const STATUS_OFFSET: u64 = 16;
const SECTOR: u64 = 512;
/// Written to the status byte before submission, so a backend that completes a request
/// without writing a status is caught.
const STATUS_UNSET: u8 = 0xff;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Talking to the backend failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The shared memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The backend broke the ring protocol.
    #[error("queue {queue}: {source}")]
    Ring {
        /// Queue index.
        queue: u16,
        /// What was wrong.
        source: RingError,
    },
    /// Reading or writing request buffers failed.
    #[error("queue {queue}: request buffer access failed: {source}")]
    Buffer {
        /// Queue index.
        queue: u16,
        /// What vm-memory reported.
        source: GuestMemoryError,
    },
    /// A request completed with a non-OK status.
    #[error("queue {queue}: request at sector {sector} completed with status {status}")]
    Status {
        /// Queue index.
        queue: u16,
        /// Sector of the request.
        sector: u64,
        /// The virtio-blk status byte.
        status: u8,
    },
    /// Kicking or waiting on an eventfd failed.
    #[error("queue {queue}: {what}: {source}")]
    EventFd {
        /// Queue index.
        queue: u16,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The backend stopped completing requests.
    #[error("queue {queue}: no completion from the backend within {:.3} s with {in_flight} requests in flight", timeout.as_secs_f64())]
    Stalled {
        /// Queue index.
        queue: u16,
        /// Requests outstanding.
        in_flight: u16,
        /// How long the queue waited.
        timeout: Duration,
    },
    /// The disk is smaller than one I/O.
    #[error("the disk ({capacity} bytes) is smaller than one {block_size}-byte I/O")]
    DiskTooSmall {
        /// Disk size in bytes.
        capacity: u64,
        /// `--bs`.
        block_size: u32,
    },
    /// A data descriptor is larger than the backend accepts.
    #[error(
        "a data descriptor of {segment_size} bytes (--seg-size, else --bs) is larger than the disk's size_max of {size_max} bytes"
    )]
    BeyondSizeMax {
        /// `--seg-size`, else `--bs`.
        segment_size: u32,
        /// What the backend advertises.
        size_max: u32,
    },
    /// The memory layout does not fit.
    #[error("the job's rings and buffers need more than {MAX_MEMORY} bytes of memory")]
    LayoutTooLarge,
    /// Measuring CPU time failed.
    #[error("measuring CPU time: {0}")]
    Cpu(#[from] CpuError),
    /// A queue thread panicked.
    #[error("queue {0}: worker thread panicked")]
    WorkerPanicked(u16),
}

/// The outcome of a measured job.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// I/Os completed during the measurement.
    pub ios: u64,
    /// Bytes transferred during the measurement.
    pub bytes: u64,
    /// Wall-clock time of the measurement.
    pub elapsed: Duration,
    /// Sum of per-I/O latencies (submission to reaping).
    pub latency_sum: Duration,
    /// Distribution of per-I/O latencies.
    pub latency: Histogram,
    /// CPU time the backend used during the measurement.
    pub backend_cpu: Option<Duration>,
    /// CPU time this process used during the measurement.
    pub bench_cpu: Duration,
    /// Capacity of the disk in bytes.
    pub capacity: u64,
    /// Virtio features negotiated with the backend.
    pub features: u64,
}

/// Where a queue's rings and buffers live.
#[derive(Debug, Clone, Copy)]
struct QueueArea {
    ring: RingLayout,
    headers: GuestAddress,
    data: GuestAddress,
    data_stride: u64,
}

/// Lays out every queue's ring, request headers and data buffers; returns the areas and the
/// total memory size.
fn layout(options: &Options) -> Result<(Vec<QueueArea>, u64), JobError> {
    let depth = u64::from(options.iodepth);
    let data_stride = align_up(u64::from(options.block_size), 4096);
    let ring_bytes = RingLayout::footprint(options.queue_size);
    let header_bytes = align_up(depth * HEADER_STRIDE, 4096);
    let data_bytes = depth
        .checked_mul(data_stride)
        .ok_or(JobError::LayoutTooLarge)?;
    let per_queue = ring_bytes + header_bytes + data_bytes;
    let total = per_queue
        .checked_mul(u64::from(options.queues))
        .filter(|&t| t <= MAX_MEMORY)
        .ok_or(JobError::LayoutTooLarge)?;
    let mut areas = Vec::with_capacity(usize::from(options.queues));
    for q in 0..u64::from(options.queues) {
        let base = GuestAddress(q * per_queue);
        let ring = RingLayout::new(base, options.queue_size).map_err(|source| JobError::Ring {
            queue: q as u16,
            source,
        })?;
        areas.push(QueueArea {
            ring,
            headers: base.unchecked_add(ring_bytes),
            data: base.unchecked_add(ring_bytes + header_bytes),
            data_stride,
        });
    }
    Ok((areas, total))
}

/// Produces the sector of each I/O.
struct Offsets {
    pattern: Pattern,
    blocks: u64,
    sectors_per_block: u64,
    state: u64,
    next_block: u64,
}

impl Offsets {
    fn new(
        pattern: Pattern,
        blocks: u64,
        sectors_per_block: u64,
        seed: u64,
        queue: u16,
        queues: u16,
    ) -> Self {
        // splitmix64 of seed and queue gives each queue its own non-zero xorshift state.
        let mut z = seed
            .wrapping_add(u64::from(queue).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            pattern,
            blocks,
            sectors_per_block,
            state: z.max(1),
            // Sequential streams of different queues start spread over the disk.
            next_block: (u128::from(blocks) * u128::from(queue) / u128::from(queues)) as u64,
        }
    }

    fn next_sector(&mut self) -> u64 {
        let block = match self.pattern {
            Pattern::RandRead | Pattern::RandWrite => {
                // xorshift64*, mapped onto the block range by multiply-shift.
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let r = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                ((u128::from(r) * u128::from(self.blocks)) >> 64) as u64
            }
            Pattern::SeqRead => {
                let b = self.next_block;
                self.next_block = (b + 1) % self.blocks;
                b
            }
        };
        block * self.sectors_per_block
    }
}

/// One request slot: a header, a status byte and a data buffer, reused for every I/O.
struct Slot {
    header: GuestAddress,
    data: GuestAddress,
    sector: u64,
    submitted: Instant,
}

#[derive(Debug, Default, Clone)]
struct PhaseStats {
    ios: u64,
    latency_sum: Duration,
    latency: Histogram,
    elapsed: Duration,
}

/// The driver of one queue.
struct Worker<'a> {
    queue: u16,
    mem: &'a GuestMemoryMmap,
    ring: SplitRing,
    kick: &'a EventFd,
    call: &'a EventFd,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    slot_of_head: Vec<Option<usize>>,
    offsets: Offsets,
    pattern: Pattern,
    block_size: u32,
    segment_size: u32,
    /// The chain of the request being submitted, kept to reuse its allocation.
    chain: Vec<Buffer>,
    timeout: Duration,
}

impl<'a> Worker<'a> {
    fn new(
        queue: u16,
        mem: &'a GuestMemoryMmap,
        area: QueueArea,
        setup: &'a QueueSetup,
        options: &Options,
        offsets: Offsets,
    ) -> Result<Self, JobError> {
        let ring = SplitRing::new(mem, area.ring, options.event_idx)
            .map_err(|source| JobError::Ring { queue, source })?;
        let now = Instant::now();
        let mut slots = Vec::with_capacity(options.iodepth as usize);
        for i in 0..u64::from(options.iodepth) {
            let slot = Slot {
                header: area.headers.unchecked_add(i * HEADER_STRIDE),
                data: area.data.unchecked_add(i * area.data_stride),
                sector: 0,
                submitted: now,
            };
            if options.pattern.writes() {
                // Non-zero data, different per slot, so writes carry real content.
                let fill = vec![0x5a ^ (i as u8); options.block_size as usize];
                mem.write_slice(&fill, slot.data)
                    .map_err(|source| JobError::Buffer { queue, source })?;
            }
            slots.push(slot);
        }
        Ok(Self {
            queue,
            mem,
            ring,
            kick: &setup.kick,
            call: &setup.call,
            free_slots: (0..slots.len()).rev().collect(),
            slots,
            slot_of_head: vec![None; usize::from(area.ring.size)],
            offsets,
            pattern: options.pattern,
            block_size: options.block_size,
            segment_size: options.segment_size,
            chain: Vec::new(),
            timeout: options.timeout,
        })
    }

    fn ring_err(&self) -> impl FnOnce(RingError) -> JobError {
        let queue = self.queue;
        move |source| JobError::Ring { queue, source }
    }

    fn buf_err(&self) -> impl FnOnce(GuestMemoryError) -> JobError {
        let queue = self.queue;
        move |source| JobError::Buffer { queue, source }
    }

    fn submit(&mut self, index: usize) -> Result<(), JobError> {
        let sector = self.offsets.next_sector();
        let (kind, data_writable) = if self.pattern.writes() {
            (VIRTIO_BLK_T_OUT, false)
        } else {
            (VIRTIO_BLK_T_IN, true)
        };
        let slot = &mut self.slots[index];
        slot.sector = sector;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let (header_addr, data_addr) = (slot.header, slot.data);
        let status = header_addr.unchecked_add(STATUS_OFFSET);
        self.mem
            .write_slice(&header, header_addr)
            .map_err(self.buf_err())?;
        self.mem
            .write_obj(STATUS_UNSET, status)
            .map_err(self.buf_err())?;
        self.chain.clear();
        self.chain.push(Buffer {
            addr: header_addr,
            len: 16,
            device_writable: false,
        });
        let mut offset = 0;
        while offset < self.block_size {
            let len = self.segment_size.min(self.block_size - offset);
            self.chain.push(Buffer {
                addr: data_addr.unchecked_add(u64::from(offset)),
                len,
                device_writable: data_writable,
            });
            offset += len;
        }
        self.chain.push(Buffer {
            addr: status,
            len: 1,
            device_writable: true,
        });
        let head = self
            .ring
            .add_chain(self.mem, &self.chain)
            .map_err(|source| JobError::Ring {
                queue: self.queue,
                source,
            })?;
        self.slot_of_head[usize::from(head)] = Some(index);
        self.slots[index].submitted = Instant::now();
        Ok(())
    }

    /// Reaps every completion available; returns how many there were.
    fn reap(&mut self, stats: &mut PhaseStats) -> Result<u32, JobError> {
        let mut reaped = 0;
        while let Some(done) = self.ring.pop_used(self.mem).map_err(self.ring_err())? {
            let now = Instant::now();
            // pop_used only returns heads of chains in flight, and every such chain was
            // registered here by submit.
            let Some(index) = self.slot_of_head[usize::from(done.head)].take() else {
                return Err(JobError::Ring {
                    queue: self.queue,
                    source: RingError::UsedIdNotInFlight(done.head),
                });
            };
            let slot = &self.slots[index];
            let status: u8 = self
                .mem
                .read_obj(slot.header.unchecked_add(STATUS_OFFSET))
                .map_err(self.buf_err())?;
            if u32::from(status) != VIRTIO_BLK_S_OK {
                return Err(JobError::Status {
                    queue: self.queue,
                    sector: slot.sector,
                    status,
                });
            }
            let latency = now.saturating_duration_since(slot.submitted);
            stats.ios += 1;
            stats.latency_sum += latency;
            stats.latency.record(latency);
            self.free_slots.push(index);
            reaped += 1;
        }
        Ok(reaped)
    }

    fn wait_for_call(&mut self) -> Result<(), JobError> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms =
            libc::c_int::try_from(self.timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: `pfd` is a valid pollfd for the duration of the call and the count
            // passed is 1, matching it; the call eventfd stays open while `self` lives.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(JobError::EventFd {
                    queue: self.queue,
                    what: "waiting for the call eventfd",
                    source: err,
                });
            }
            if n == 0 {
                return Err(JobError::Stalled {
                    queue: self.queue,
                    in_flight: self.ring.in_flight(),
                    timeout: self.timeout,
                });
            }
            break;
        }
        match self.call.read() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(source) => Err(JobError::EventFd {
                queue: self.queue,
                what: "reading the call eventfd",
                source,
            }),
        }
    }

    /// Keeps the queue full until `keep_issuing` says stop, then drains it.
    fn run_phase(
        &mut self,
        mut keep_issuing: impl FnMut(u64) -> bool,
    ) -> Result<PhaseStats, JobError> {
        let mut stats = PhaseStats::default();
        let start = Instant::now();
        let mut issued = 0u64;
        loop {
            while !self.free_slots.is_empty() && keep_issuing(issued) {
                let Some(index) = self.free_slots.pop() else {
                    break;
                };
                self.submit(index)?;
                issued += 1;
            }
            if self.ring.publish(self.mem).map_err(self.ring_err())? {
                self.kick.write(1).map_err(|source| JobError::EventFd {
                    queue: self.queue,
                    what: "kicking the backend",
                    source,
                })?;
            }
            if self.ring.in_flight() == 0 {
                break;
            }
            if self.reap(&mut stats)? == 0
                && !self
                    .ring
                    .arm_notification(self.mem)
                    .map_err(self.ring_err())?
            {
                self.wait_for_call()?;
            }
        }
        stats.elapsed = start.elapsed();
        Ok(stats)
    }
}

/// Runs the job described by `options` and measures it.
pub fn run(options: &Options) -> Result<JobReport, JobError> {
    let (areas, total) = layout(options)?;
    let shared = SharedMemory::new(total)?;
    let mut device = BlkDevice::connect(
        &options.socket,
        DeviceRequest {
            queues: options.queues,
            event_idx: options.event_idx,
            writes: options.pattern.writes(),
        },
    )?;
    let info = device.info();
    let capacity = info.capacity_sectors.saturating_mul(SECTOR);
    let blocks = capacity / u64::from(options.block_size);
    if blocks == 0 {
        return Err(JobError::DiskTooSmall {
            capacity,
            block_size: options.block_size,
        });
    }
    // Beyond size_max the backend may refuse every data descriptor. QEMU's storage daemon
    // offers the feature with a size_max of 0, meaning no limit.
    if let Some(size_max) = info
        .size_max
        .filter(|m| *m != 0 && options.segment_size > *m)
    {
        return Err(JobError::BeyondSizeMax {
            segment_size: options.segment_size,
            size_max,
        });
    }
    if let Some(bs) = info.block_size {
        if bs != 0 && !options.block_size.is_multiple_of(bs) {
            log::warn!(
                "--bs {} is not a multiple of the disk's {bs}-byte blocks",
                options.block_size
            );
        }
    }
    let setups = areas
        .iter()
        .map(|a| QueueSetup::new(a.ring))
        .collect::<Result<Vec<_>, _>>()?;
    let mut workers = Vec::with_capacity(areas.len());
    for (q, (area, setup)) in areas.iter().zip(&setups).enumerate() {
        let queue = q as u16;
        let offsets = Offsets::new(
            options.pattern,
            blocks,
            u64::from(options.block_size) / SECTOR,
            options.seed,
            queue,
            options.queues,
        );
        workers.push(Worker::new(
            queue,
            shared.memory(),
            *area,
            setup,
            options,
            offsets,
        )?);
    }
    device.start(&shared, &setups)?;
    log::debug!(
        "device started: {} queues of {} descriptors",
        options.queues,
        options.queue_size
    );

    let barrier = Barrier::new(workers.len() + 1);
    let ios_per_queue = |q: u16| match options.limit {
        Limit::Ios(n) => {
            let queues = u64::from(options.queues);
            n / queues + u64::from(u64::from(q) < n % queues)
        }
        Limit::Time(_) => u64::MAX,
    };
    let (results, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|mut worker| {
                let barrier = &barrier;
                let budget = ios_per_queue(worker.queue);
                scope.spawn(move || {
                    let warm = if options.warmup.is_zero() {
                        Ok(PhaseStats::default())
                    } else {
                        let end = Instant::now() + options.warmup;
                        worker.run_phase(|_| Instant::now() < end)
                    };
                    // Always meet the barrier so that a failing queue cannot leave the others
                    // (and the measuring thread) waiting forever.
                    barrier.wait();
                    warm?;
                    match options.limit {
                        Limit::Time(d) => {
                            let end = Instant::now() + d;
                            worker.run_phase(|_| Instant::now() < end)
                        }
                        Limit::Ios(_) => worker.run_phase(|issued| issued < budget),
                    }
                })
            })
            .collect();
        barrier.wait();
        let before = sample_cpu(options.backend_pid);
        let results: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(q, h)| h.join().unwrap_or(Err(JobError::WorkerPanicked(q as u16))))
            .collect();
        let after = sample_cpu(options.backend_pid);
        (results, before.and_then(|b| after.map(|a| (b, a))))
    });
    let mut total_stats = PhaseStats::default();
    for result in results {
        let stats = result?;
        total_stats.ios += stats.ios;
        total_stats.latency_sum += stats.latency_sum;
        total_stats.latency.merge(&stats.latency);
        total_stats.elapsed = total_stats.elapsed.max(stats.elapsed);
    }
    let ((bench_before, backend_before), (bench_after, backend_after)) = cpu?;
    if let Err(e) = device.stop() {
        log::warn!("stopping the queues: {e}");
    }
    Ok(JobReport {
        ios: total_stats.ios,
        bytes: total_stats.ios * u64::from(options.block_size),
        elapsed: total_stats.elapsed,
        latency_sum: total_stats.latency_sum,
        latency: total_stats.latency,
        backend_cpu: backend_before
            .zip(backend_after)
            .map(|(b, a)| a.saturating_sub(b)),
        bench_cpu: bench_after.saturating_sub(bench_before),
        capacity,
        features: info.features,
    })
}

type CpuSample = (Duration, Option<Duration>);

fn sample_cpu(backend: Option<u32>) -> Result<CpuSample, CpuError> {
    let backend = backend.map(|pid| cpu_time(Process::Pid(pid))).transpose()?;
    Ok((cpu_time(Process::This)?, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_are_aligned_in_range_and_spread() {
        let blocks = 1000;
        let mut offsets = Offsets::new(Pattern::RandRead, blocks, 8, 1, 0, 1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let sector = offsets.next_sector();
            assert_eq!(sector % 8, 0);
            assert!(sector / 8 < blocks);
            seen.insert(sector);
        }
        assert!(seen.len() > 900, "only {} distinct blocks", seen.len());
    }

    #[test]
    fn queues_get_different_random_streams() {
        let mut a = Offsets::new(Pattern::RandWrite, 1 << 20, 8, 7, 0, 2);
        let mut b = Offsets::new(Pattern::RandWrite, 1 << 20, 8, 7, 1, 2);
        let sa: Vec<u64> = (0..16).map(|_| a.next_sector()).collect();
        let sb: Vec<u64> = (0..16).map(|_| b.next_sector()).collect();
        assert_ne!(sa, sb);
    }

    #[test]
    fn sequential_offsets_wrap_at_the_end() {
        let mut offsets = Offsets::new(Pattern::SeqRead, 4, 256, 1, 1, 2);
        let sectors: Vec<u64> = (0..4).map(|_| offsets.next_sector()).collect();
        assert_eq!(sectors, [512, 768, 0, 256]);
    }

    #[test]
    fn layout_keeps_queues_and_buffers_apart() {
        let options = match crate::cli::parse(
            [
                "--socket",
                "s",
                "--queues",
                "2",
                "--iodepth",
                "32",
                "--bs",
                "6144",
            ]
            .iter()
            .map(|s| s.to_string()),
        )
        .unwrap()
        {
            crate::cli::Command::Run(o) => *o,
            crate::cli::Command::Help => unreachable!(),
        };
        let (areas, total) = layout(&options).unwrap();
        assert_eq!(areas.len(), 2);
        let a = areas[0];
        let b = areas[1];
        assert_eq!(a.data_stride, 8192);
        assert!(a.ring.used_ring < a.headers);
        assert!(a.headers.unchecked_add(32 * HEADER_STRIDE) <= a.data);
        assert!(a.data.unchecked_add(32 * a.data_stride) <= b.ring.desc_table);
        assert_eq!(b.data.unchecked_add(32 * b.data_stride).raw_value(), total);
    }
}
