//! virtio-balloon (virtio 1.2 section 5.5): the host asks the guest for memory back, and the
//! guest hands over pages it will not touch until it takes them back.
//!
//! The device has an inflate queue, a deflate queue and, when the driver accepts
//! `VIRTIO_BALLOON_F_REPORTING`, a free page reporting queue, in that order (no statistics
//! queue and no free page hinting, so nothing shifts the reporting queue's index). Its
//! configuration holds `num_pages`, the target the host sets ([`BalloonHandle::set_target`]),
//! and `actual`, the pages the driver holds, which the driver writes.
//!
//! Every queue is served on the event loop, never on a vCPU thread: kicks reach it through a
//! nested epoll set ([`SlotKicks`]), as the hot-replace slots' do. Pages the guest inflates,
//! and free ranges it reports, are returned to the host at once (see [`page_ranges`]).
//! Deflating needs nothing: `VIRTIO_BALLOON_F_MUST_TELL_HOST` is not offered, a deflated page
//! is allocated again, zeroed, when the guest touches it.
//!
//! The guest controls every frame number, range and `actual` value: frames outside guest RAM
//! are ignored with a rate-limited warning, the work done per event loop wake-up is bounded,
//! and `actual` is only reported, never trusted for anything else.

pub mod change_events;
pub mod page_ranges;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::interrupt::VirtioInterrupt;
use super::slot_ring::{empty_ring, next_chain, KickWatch, SlotKicks};
use super::virtio_mmio::{
    read_config_bytes, ActivateError, ActivateParams, VirtioDevice, VirtioMmioTransport,
};
use page_ranges::{coalesce, discard, discard_pages, Discarded, PAGE_SHIFT, PAGE_SIZE};

/// Virtio device ID of a memory balloon.
const VIRTIO_ID_BALLOON: u32 = 5;
/// The guest may deflate the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// The guest reports free pages on the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// Queue indices.
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
const QUEUES: usize = 3;
const QUEUE_MAX_SIZE: u16 = 128;
/// Token under which the driver's `actual` updates reach the event loop; queues use their
/// index.
const TOKEN_ACTUAL: u64 = QUEUES as u64;

/// Frame numbers read from one inflate or deflate buffer; Linux sends at most 256. Beyond
/// this the rest of the buffer is ignored.
const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Frames, or reported ranges, handled per queue and event loop wake-up before the device
/// kicks itself and lets the loop serve others.
const MAX_WORK_PER_WAKE: usize = 16384;
/// At most one warning about guest addresses outside RAM per this long.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Offset of `actual` in the configuration space; `num_pages` is at 0.
const ACTUAL_OFFSET: u64 = 4;
const CONFIG_LEN: usize = 8;

/// `-device virtio-balloon-device` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    /// `id=`.
    pub id: Option<String>,
    /// `deflate-on-oom=on`: offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// `free-page-reporting=on`: offer `VIRTIO_BALLOON_F_REPORTING`.
    pub free_page_reporting: bool,
}

/// What the driver started.
struct Running {
    queues: Vec<Option<Queue>>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Warns about guest addresses outside RAM at most once per [`WARN_INTERVAL`], saying how
/// many were ignored in between.
#[derive(Default)]
struct OutsideWarning {
    last: Option<Instant>,
    ignored: u64,
}

impl OutsideWarning {
    fn note(&mut self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.ignored += bytes;
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
        {
            log::warn!(
                "balloon: the guest gave {} bytes outside its RAM, ignored",
                self.ignored
            );
            self.last = Some(now);
            self.ignored = 0;
        }
    }
}

/// The balloon device.
pub struct Balloon {
    memory: GuestMemoryMmap,
    features: u64,
    num_pages: u32,
    actual: u32,
    queue_max_sizes: [u16; QUEUES],
    running: Option<Running>,
    watched: Vec<KickWatch>,
    /// Written when the driver changes `actual`, for the event loop to report it.
    actual_changed: EventFd,
    outside: OutsideWarning,
    /// Bytes returned to the host since the machine was built.
    returned: u64,
    /// Guest RAM is pinned for a passed-through function's DMA: inflated and reported pages
    /// stay backed, since discarding them would leave the device writing pages the guest no
    /// longer sees.
    discard_inhibited: bool,
}

impl Balloon {
    fn new(
        memory: GuestMemoryMmap,
        options: &BalloonOptions,
        kicks: &Arc<SlotKicks>,
    ) -> std::io::Result<Self> {
        let mut features = 0;
        if options.deflate_on_oom {
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if options.free_page_reporting {
            features |= 1 << VIRTIO_BALLOON_F_REPORTING;
        }
        let actual_changed = EventFd::new(EFD_NONBLOCK)?;
        kicks.watch(TOKEN_ACTUAL, actual_changed.as_raw_fd());
        Ok(Balloon {
            memory,
            features: features | (1 << VIRTIO_RING_F_EVENT_IDX),
            num_pages: 0,
            actual: 0,
            queue_max_sizes: [QUEUE_MAX_SIZE; QUEUES],
            running: None,
            watched: (0..QUEUES as u64)
                .map(|token| KickWatch::new(Arc::clone(kicks), token))
                .collect(),
            actual_changed,
            outside: OutsideWarning::default(),
            returned: 0,
            discard_inhibited: false,
        })
    }

    fn set_actual(&mut self, actual: u32) {
        if actual != self.actual {
            self.actual = actual;
            if let Err(e) = self.actual_changed.write(1) {
                log::warn!("balloon: cannot report the guest's new size: {e}");
            }
        }
    }

    /// Serves queue `index` after a kick. Runs on the event loop.
    fn serve_queue(&mut self, index: usize) {
        let Some(watch) = self.watched.get_mut(index) else {
            return;
        };
        let queue = self
            .running
            .as_mut()
            .and_then(|r| r.queues.get_mut(index))
            .and_then(Option::as_mut);
        let Some(queue) = queue.filter(|_| watch.fd().is_some()) else {
            // Reset since the kick (on a vCPU thread, which leaves the epoll set alone).
            watch.unwatch();
            return;
        };
        let Some(kick) = watch.fd() else {
            return;
        };
        let _ = kick.read();
        let memory = &self.memory;
        let discard = !self.discard_inhibited;
        let mut work = 0;
        let mut used = 0;
        let mut done = Discarded::default();
        'ring: loop {
            if queue.disable_notification(memory).is_err() {
                break;
            }
            while work < MAX_WORK_PER_WAKE {
                let Some(chain) = next_chain(queue, memory, "balloon") else {
                    break;
                };
                let head = chain.head_index();
                let (cost, result) = match index {
                    INFLATE if discard => inflate(chain),
                    REPORTING if discard => report(chain),
                    INFLATE | DEFLATE => (read_pfns(chain).len(), Ok(Discarded::default())),
                    _ => (chain.count(), Ok(Discarded::default())),
                };
                work += cost.max(1);
                match result {
                    Ok(d) => done += d,
                    Err(e) => log::warn!("balloon: returning guest memory to the host: {e}"),
                }
                if let Err(e) = queue.add_used(memory, head, 0) {
                    log::warn!("balloon: completing a buffer of queue {index}: {e}");
                    break 'ring;
                }
                used += 1;
            }
            if work >= MAX_WORK_PER_WAKE {
                let _ = kick.write(1);
                break;
            }
            match queue.enable_notification(memory) {
                Ok(true) if queue.ready() => continue,
                _ => break,
            }
        }
        self.returned += done.bytes;
        self.outside.note(done.outside);
        if used == 0 {
            return;
        }
        if let Some(running) = self.running.as_mut() {
            let wants = running
                .queues
                .get_mut(index)
                .and_then(Option::as_mut)
                .is_none_or(|q| q.needs_notification(&self.memory).unwrap_or(true));
            if wants {
                if let Err(e) = running.interrupt.signal_used_queue(index) {
                    log::warn!("balloon: raising its interrupt: {e}");
                }
            }
        }
    }
}

/// The frame numbers in a buffer of the inflate or deflate queue: little-endian 32-bit
/// words in its device-readable descriptors, at most [`MAX_PFNS_PER_CHAIN`]. A descriptor
/// outside guest memory is skipped.
fn read_pfns(chain: DescriptorChain<&GuestMemoryMmap>) -> Vec<u32> {
    let memory = chain.memory();
    let mut pfns = Vec::new();
    let mut bytes = Vec::new();
    for desc in chain.clone().readable() {
        let words = (desc.len() as usize / 4).min(MAX_PFNS_PER_CHAIN - pfns.len());
        bytes.resize(words * 4, 0);
        if memory.read_slice(&mut bytes, desc.addr()).is_err() {
            continue;
        }
        pfns.extend(
            bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])),
        );
        if pfns.len() == MAX_PFNS_PER_CHAIN {
            break;
        }
    }
    pfns
}

/// Returns the frames of an inflate buffer to the host.
fn inflate(chain: DescriptorChain<&GuestMemoryMmap>) -> (usize, std::io::Result<Discarded>) {
    let memory = chain.memory();
    let mut pfns = read_pfns(chain.clone());
    let cost = pfns.len();
    let mut done = Discarded::default();
    for range in coalesce(&mut pfns) {
        match discard_pages(memory, range) {
            Ok(d) => done += d,
            Err(e) => return (cost, Err(e)),
        }
    }
    (cost, Ok(done))
}

/// Returns the free ranges of a reporting buffer to the host: each descriptor is one range.
fn report(chain: DescriptorChain<&GuestMemoryMmap>) -> (usize, std::io::Result<Discarded>) {
    let memory = chain.memory();
    let mut done = Discarded::default();
    let mut cost = 0;
    for desc in chain.clone() {
        cost += 1;
        match discard(memory, desc.addr().0, u64::from(desc.len())) {
            Ok(d) => done += d,
            Err(e) => return (cost, Err(e)),
        }
    }
    (cost, Ok(done))
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset == ACTUAL_OFFSET => self.set_actual(u32::from_le_bytes(bytes)),
            _ => log::debug!(
                "balloon: {}-byte configuration write at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        let reporting = params.features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0;
        // A balloon restored from a snapshot goes on from the used indices: it had completed
        // every buffer it took before the machine was saved.
        let resume = params.resume.then_some(None);
        let mut queues = Vec::with_capacity(QUEUES);
        for index in 0..QUEUES {
            let wanted = index != REPORTING || reporting;
            let queue = empty_ring(&self.memory, &params, index, QUEUE_MAX_SIZE, resume);
            if wanted && queue.is_none() && params.queues.get(index).is_some_and(|q| q.ready) {
                return Err(ActivateError::InvalidQueue {
                    index: index as u16,
                    reason: "the ring does not lie in guest RAM",
                });
            }
            queues.push(queue.filter(|_| wanted));
        }
        params.interrupt.set_vring_signalled_externally(false);
        for (index, queue) in queues.iter().enumerate() {
            match (queue, params.notify.get(index)) {
                (Some(_), Some(fd)) => {
                    self.watched[index].watch(fd);
                    // Buffers queued before the device started.
                    let _ = fd.write(1);
                }
                _ => self.watched[index].unwatch(),
            }
        }
        self.running = Some(Running {
            queues,
            interrupt: params.interrupt,
        });
        Ok(())
    }

    /// Every queue is served on the event loop as soon as it is kicked; the target and the
    /// pages the driver holds are saved with the machine.
    fn resumable(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        // Runs on a vCPU thread when the driver resets the device: the kick watches are left
        // for the event loop to drop when it next hears from them.
        self.running = None;
        // A driver that resets its device has given every page back.
        self.set_actual(0);
    }
}

/// The balloon as the monitor sees it: its transport, and the epoll set its kicks and the
/// driver's `actual` updates arrive on.
pub struct BalloonHandle {
    transport: Arc<VirtioMmioTransport<Balloon>>,
    kicks: Arc<SlotKicks>,
    ram_bytes: u64,
}

impl BalloonHandle {
    /// A balloon for guest RAM `memory`, and the new epoll set its kicks and `actual`
    /// updates are reported in. The caller places the device in a transport, then makes the
    /// handle with [`BalloonHandle::attach`].
    pub fn device(
        memory: GuestMemoryMmap,
        options: &BalloonOptions,
    ) -> std::io::Result<(Balloon, Arc<SlotKicks>)> {
        let kicks = Arc::new(SlotKicks::new()?);
        let balloon = Balloon::new(memory, options, &kicks)?;
        Ok((balloon, kicks))
    }

    /// The handle of a balloon placed in `transport`.
    pub fn attach(
        transport: Arc<VirtioMmioTransport<Balloon>>,
        kicks: Arc<SlotKicks>,
        ram_bytes: u64,
    ) -> Self {
        BalloonHandle {
            transport,
            kicks,
            ram_bytes,
        }
    }

    /// What the event loop waits on: readable when a queue was kicked or the driver changed
    /// `actual`.
    pub fn events_fd(&self) -> RawFd {
        self.kicks.as_raw_fd()
    }

    /// Serves the kicked queues and drains the `actual` notifications. Runs on the event
    /// loop.
    pub fn serve(&self) {
        for token in self.kicks.ready() {
            match usize::try_from(token) {
                Ok(index) if index < QUEUES => {
                    self.transport.with_device(|b| b.serve_queue(index));
                }
                _ => {
                    self.transport.with_device(|b| {
                        let _ = b.actual_changed.read();
                    });
                }
            }
        }
    }

    /// Asks the guest to shrink or grow to `bytes` of memory (at most its RAM, at least
    /// nothing): the balloon's target becomes the difference, and the driver is told.
    pub fn set_target(&self, bytes: u64) -> std::io::Result<()> {
        let pages = self.ram_bytes.saturating_sub(bytes) >> PAGE_SHIFT;
        // RAM sizes are capped far below 2^32 pages.
        let pages = u32::try_from(pages).unwrap_or(u32::MAX);
        self.transport.update_config(|b| b.num_pages = pages)
    }

    /// The guest's RAM, which the balloon's target is taken from.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// The guest's memory size: its RAM less the pages its driver says the balloon holds.
    pub fn actual_bytes(&self) -> u64 {
        let pages = self.transport.with_device(|b| b.actual);
        self.ram_bytes.saturating_sub(u64::from(pages) * PAGE_SIZE)
    }

    /// Bytes of guest memory returned to the host so far.
    pub fn returned_bytes(&self) -> u64 {
        self.transport.with_device(|b| b.returned)
    }

    /// The configuration space: the target (`num_pages`) and the driver's `actual`, for a
    /// snapshot.
    pub fn config(&self) -> (u32, u32) {
        self.transport.with_device(|b| (b.num_pages, b.actual))
    }

    /// Puts a saved configuration back. It comes from a file: a target or `actual` above the
    /// RAM's page count is refused and nothing changes.
    pub fn restore_config(&self, num_pages: u32, actual: u32) -> Result<(), String> {
        let pages = self.ram_bytes >> PAGE_SHIFT;
        if u64::from(num_pages) > pages || u64::from(actual) > pages {
            return Err(format!(
                "balloon of {num_pages} target and {actual} held pages exceeds the {pages} pages \
                 of RAM"
            ));
        }
        self.transport.with_device(|b| {
            b.num_pages = num_pages;
            b.actual = actual;
        });
        Ok(())
    }

    /// Keeps (`true`) or lets go (`false`) the host pages behind what the guest inflates or
    /// reports from now on: kept while guest RAM is pinned for a passed-through function,
    /// as QEMU disables discarding for VFIO.
    pub fn inhibit_discard(&self, inhibit: bool) {
        self.transport
            .with_device(|b| b.discard_inhibited = inhibit);
    }

    /// Forgets the target, as a machine reset does: the next boot starts with the balloon
    /// empty. The device itself is reset with every other one.
    pub fn reset_target(&self) {
        self.transport.with_device(|b| {
            b.num_pages = 0;
            b.set_actual(0);
        });
    }
}

#[cfg(test)]
mod tests;
