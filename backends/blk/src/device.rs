//! The vhost-user-blk device: what it advertises, its queues and their worker threads, and the
//! handler of frontend messages for one connection.

use std::fs::File;
use std::io::{Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VhostError, GpuBackend, VhostUserBackendReqHandlerMut};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::Disk;
use citadel_sandbox::memory_file::MemoryFilePolicy;

use crate::inflight::{InflightQueue, InflightRegion};
use crate::request::{self, Limits, Scratch, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::stats::Stats;
use citadel_vhost_user::memory::MemoryTable;
use citadel_vhost_user::refusal::{bad_input, nonblocking, refuse};

/// vhost-user's own feature bit: rings start disabled and are enabled by SET_VRING_ENABLE.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Size of `struct virtio_blk_config` up to and including the write-zeroes fields.
pub const CONFIG_LEN: usize = 60;

const KICK: u64 = 0;
const WAKE: u64 = 1;

/// Static description of the device.
pub struct DeviceConfig {
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Logical block size advertised.
    pub block_size: u32,
    /// GET_ID answer.
    pub serial: Option<String>,
    /// Which files may back guest memory and the inflight area.
    pub memory_files: MemoryFilePolicy,
}

/// Everything that outlives a frontend connection: the image, counters, guest memory and
/// the per-queue workers.
pub struct Device {
    disk: Disk,
    serial: Option<[u8; ID_LEN]>,
    /// Request counters.
    pub stats: Stats,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queues: Vec<QueueSlot>,
    config: [u8; CONFIG_LEN],
    limits: Limits,
    features: u64,
    queue_size: u16,
    memory_files: MemoryFilePolicy,
    exiting: AtomicBool,
}

struct QueueSlot {
    state: Mutex<QueueState>,
    /// Held by the frontend's message handler while it waits for or holds `state`, so that a
    /// worker that gave `state` up for it waits here instead of taking it straight back.
    handler_gate: Mutex<()>,
    /// The handler is waiting for `state`: the worker lets go after its current request.
    handler_waiting: AtomicBool,
    epoll: Epoll,
    wake: EventFd,
}

/// The queue state as the message handler holds it; see [`QueueSlot::handler_lock`].
struct HandlerGuard<'a> {
    // Field order is drop order: the state is released before the gate.
    state: MutexGuard<'a, QueueState>,
    _gate: MutexGuard<'a, ()>,
}

impl Deref for HandlerGuard<'_> {
    type Target = QueueState;
    fn deref(&self) -> &QueueState {
        &self.state
    }
}

impl DerefMut for HandlerGuard<'_> {
    fn deref_mut(&mut self) -> &mut QueueState {
        &mut self.state
    }
}

impl QueueSlot {
    /// Locks the queue for the frontend's message handler. A worker holds the lock while it
    /// serves requests; seeing `handler_waiting` it lets go after the request in hand, so the
    /// handler (GET_VRING_BASE in particular) waits for at most one request, not a ring's worth.
    fn handler_lock(&self) -> HandlerGuard<'_> {
        let gate = self.handler_gate.lock().unwrap_or_else(|p| p.into_inner());
        self.handler_waiting.store(true, Ordering::SeqCst);
        let state = lock(&self.state);
        self.handler_waiting.store(false, Ordering::SeqCst);
        HandlerGuard { state, _gate: gate }
    }

    /// Called by a worker that gave the queue up to the handler: returns once the handler is
    /// done with it.
    fn wait_for_handler(&self) {
        drop(self.handler_gate.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

struct QueueState {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    /// SET_VRING_ENABLE state (only consulted when PROTOCOL_FEATURES is negotiated).
    enabled: bool,
    /// Between SET_VRING_KICK and GET_VRING_BASE / reset.
    started: bool,
    /// A ring access failed; nothing more is processed until the ring is set up again.
    broken: bool,
    protocol_features: bool,
    inflight: Option<InflightQueue>,
}

impl QueueState {
    fn runnable(&self) -> bool {
        self.started && !self.broken && (self.enabled || !self.protocol_features)
    }
}

fn lock(m: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    // A worker never panics while holding the lock; if one did, the state is still
    // structurally valid, so keep serving rather than propagating the poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Errors while creating the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating an epoll or eventfd failed.
    #[error("creating queue {queue} event plumbing: {source}")]
    Events {
        /// Queue index.
        queue: usize,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Spawning a worker thread failed.
    #[error("starting worker for queue {queue}: {source}")]
    Spawn {
        /// Queue index.
        queue: usize,
        /// What failed.
        source: std::io::Error,
    },
}

impl Device {
    /// Creates the device (no threads yet).
    pub fn new(disk: Disk, cfg: &DeviceConfig) -> Result<Device, DeviceError> {
        let mut features = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VHOST_USER_F_PROTOCOL_FEATURES;
        if disk.readonly() {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let limits = Limits::for_queue_size(cfg.queue_size);
        let config = build_config(&disk, cfg, &limits);
        let serial = cfg.serial.as_ref().map(|s| {
            let mut id = [0u8; ID_LEN];
            let n = s.len().min(ID_LEN);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
            id
        });
        let mut queues = Vec::with_capacity(cfg.num_queues.into());
        for queue in 0..usize::from(cfg.num_queues) {
            let err = |source| DeviceError::Events { queue, source };
            let epoll = Epoll::new().map_err(err)?;
            let wake = EventFd::new(EFD_NONBLOCK).map_err(err)?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    wake.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, WAKE),
                )
                .map_err(err)?;
            queues.push(QueueSlot {
                state: Mutex::new(QueueState {
                    queue: Queue::new(cfg.queue_size).map_err(|e| {
                        err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                    })?,
                    kick: None,
                    call: None,
                    enabled: false,
                    started: false,
                    broken: false,
                    protocol_features: false,
                    inflight: None,
                }),
                handler_gate: Mutex::new(()),
                handler_waiting: AtomicBool::new(false),
                epoll,
                wake,
            });
        }
        Ok(Device {
            disk,
            serial,
            stats: Stats::default(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            queues,
            config,
            limits,
            features,
            queue_size: cfg.queue_size,
            memory_files: cfg.memory_files,
            exiting: AtomicBool::new(false),
        })
    }

    /// Starts one worker thread per queue.
    pub fn spawn_workers(
        self: &Arc<Self>,
    ) -> Result<Vec<std::thread::JoinHandle<()>>, DeviceError> {
        (0..self.queues.len())
            .map(|queue| {
                let dev = Arc::clone(self);
                std::thread::Builder::new()
                    .name(format!("blk-q{queue}"))
                    .spawn(move || dev.worker(queue))
                    .map_err(|source| DeviceError::Spawn { queue, source })
            })
            .collect()
    }

    /// Number of request queues.
    pub fn num_queues(&self) -> u32 {
        self.queues.len() as u32
    }

    /// Asks every worker to return.
    pub fn stop_workers(&self) {
        self.exiting.store(true, Ordering::SeqCst);
        for slot in &self.queues {
            // An eventfd write only fails when the counter would overflow, in which case the
            // worker is already due to wake up.
            let _ = slot.wake.write(1);
        }
    }

    fn worker(&self, index: usize) {
        let slot = &self.queues[index];
        let mut scratch = Scratch::default();
        let mut events = [EpollEvent::default(); 2];
        while !self.exiting.load(Ordering::SeqCst) {
            let n = match slot.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("queue {index}: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == WAKE {
                    let _ = slot.wake.read();
                }
            }
            if self.process(index, &mut scratch) == Turn::Yielded {
                slot.wait_for_handler();
            }
        }
    }

    /// Drains the queue's avail ring and signals the guest if it asked for it.
    fn process(&self, index: usize, scratch: &mut Scratch) -> Turn {
        let slot = &self.queues[index];
        let mut st = lock(&slot.state);
        if let Some(kick) = st.kick.as_mut() {
            let mut buf = [0u8; 8];
            // Non-blocking: an empty counter just means the wake-up came from elsewhere.
            let _ = kick.read(&mut buf);
        }
        if !st.runnable() {
            return Turn::Done;
        }
        let mem = self.mem.memory();
        let dev = request::Device {
            disk: &self.disk,
            serial: self.serial,
            stats: &self.stats,
            limits: self.limits,
        };
        let st = &mut *st;
        let mut used_any = false;
        // A guest that refills its ring as fast as it is drained must not keep the queue
        // locked against the frontend's messages (GET_VRING_BASE waits for it): after one
        // ring's worth of requests the worker lets go and comes back through its epoll.
        let mut budget = st.queue.size();
        let mut turn = Turn::Done;
        let result: Result<(), virtio_queue::Error> = (|| loop {
            if st.queue.event_idx_enabled() {
                st.queue.disable_notification(&*mem)?;
            }
            // A guest claiming more new entries than the ring holds has broken the ring;
            // checking here also keeps virtio-queue from logging the same error on every kick.
            let avail = st.queue.avail_idx(&*mem, Ordering::Acquire)?;
            if avail.0.wrapping_sub(st.queue.next_avail()) > st.queue.size() {
                return Err(virtio_queue::Error::InvalidAvailRingIndex);
            }
            loop {
                // A guest that keeps its ring full must not hold up an exit.
                if self.exiting.load(Ordering::Relaxed) {
                    return Ok(());
                }
                // The handler waits for the queue for at most the request in hand.
                if slot.handler_waiting.load(Ordering::SeqCst) {
                    turn = Turn::Yielded;
                }
                if budget == 0 || turn == Turn::Yielded {
                    // Notifications may be off (EVENT_IDX): the worker's own wake-up
                    // brings it back to the rest of the ring.
                    let _ = slot.wake.write(1);
                    return Ok(());
                }
                budget -= 1;
                let next_avail = st.queue.next_avail();
                let Some(chain) = st.queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                let head = chain.head_index();
                let next_used = st.queue.next_used();
                if let Some(inflight) = st.inflight.as_mut() {
                    inflight.begin(head, next_avail, next_used);
                }
                let len = request::handle(chain, &*mem, &dev, scratch);
                st.queue.add_used(&*mem, head, len)?;
                if let Some(inflight) = st.inflight.as_mut() {
                    inflight.end();
                }
                used_any = true;
            }
            if !st.queue.event_idx_enabled() || !st.queue.enable_notification(&*mem)? {
                return Ok(());
            }
        })();
        if let Err(e) = result {
            log::warn!("queue {index}: ring access failed, stopping the queue: {e}");
            st.broken = true;
        }
        if used_any {
            match st.queue.needs_notification(&*mem) {
                Ok(true) => signal(st.call.as_ref(), index),
                Ok(false) => {}
                Err(e) => log::warn!("queue {index}: reading the used event: {e}"),
            }
        }
        turn
    }

    fn stop_queue(&self, index: usize) -> u16 {
        let slot = &self.queues[index];
        let mut st = slot.handler_lock();
        if let Some(kick) = st.kick.take() {
            let _ = slot.epoll.ctl(
                ControlOperation::Delete,
                kick.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        st.started = false;
        st.queue.set_ready(false);
        st.queue.next_avail()
    }

    /// Brings every queue back to its initial state and forgets the guest memory.
    fn reset(&self) {
        for (index, slot) in self.queues.iter().enumerate() {
            self.stop_queue(index);
            let mut st = slot.handler_lock();
            st.queue.reset();
            st.call = None;
            st.enabled = false;
            st.broken = false;
            st.protocol_features = false;
            st.inflight = None;
        }
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(GuestMemoryMmap::new());
    }
}

/// How a worker's turn on its queue ended.
#[derive(PartialEq, Eq)]
enum Turn {
    /// The ring is drained, stopped, or the turn's budget is spent.
    Done,
    /// The message handler asked for the queue in the middle of the ring.
    Yielded,
}

fn signal(call: Option<&File>, index: usize) {
    if let Some(mut call) = call {
        if let Err(e) = call.write_all(&1u64.to_ne_bytes()) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("queue {index}: signalling the guest: {e}");
            }
        }
    }
}

fn build_config(disk: &Disk, cfg: &DeviceConfig, limits: &Limits) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.capacity().to_le_bytes());
    put(8, &limits.size_max.to_le_bytes());
    put(12, &limits.seg_max.to_le_bytes());
    put(20, &cfg.block_size.to_le_bytes());
    put(34, &cfg.num_queues.to_le_bytes());
    let sectors_per_block = cfg.block_size / 512;
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &sectors_per_block.to_le_bytes());
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(52, &MAX_DISCARD_SEG.to_le_bytes());
    put(56, &[1]);
    c
}

/// The state of one frontend connection; dropping it resets the device.
pub struct Connection {
    dev: Arc<Device>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    table: Option<MemoryTable>,
    inflight: Option<InflightRegion>,
}

impl Connection {
    /// A fresh connection to `dev`.
    pub fn new(dev: Arc<Device>) -> Connection {
        dev.reset();
        Connection {
            dev,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            table: None,
            inflight: None,
        }
    }

    fn slot(&self, index: u32) -> Result<&QueueSlot, VhostError> {
        self.dev
            .queues
            .get(index as usize)
            .ok_or(VhostError::InvalidParam)
    }

    fn guest_addr(&self, frontend_addr: u64, what: &str) -> Result<u64, VhostError> {
        self.table
            .as_ref()
            .and_then(|t| t.frontend_to_guest(frontend_addr))
            .ok_or_else(|| {
                bad_input(format!(
                    "{what} address {frontend_addr:#x} is not in the memory table"
                ))
            })
    }

    /// Starts queue `index` if it has everything it needs.
    fn start_queue(&mut self, index: u32) -> Result<(), VhostError> {
        let slot = self.slot(index)?;
        let mem = self.dev.mem.memory();
        let mut st = slot.handler_lock();
        if st.started || st.kick.is_none() {
            return Ok(());
        }
        st.protocol_features = self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        st.queue
            .set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        st.queue.set_ready(true);
        if !st.queue.is_valid(&*mem) {
            st.queue.set_ready(false);
            return Err(bad_input(format!(
                "queue {index}: size or ring addresses invalid for the memory table"
            )));
        }
        let used = st
            .queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| bad_input(format!("queue {index}: reading used index: {e}")))?;
        st.queue.set_next_used(used.0);
        st.inflight = None;
        if let Some(region) = self.inflight.as_ref() {
            let q = region.queue(index as usize);
            if let Some(q) = q.as_ref() {
                if let Some(resume) = q.resume_point(used.0) {
                    log::info!(
                        "queue {index}: resuming at avail index {resume} (request head {}, frontend said {})",
                        q.head(),
                        st.queue.next_avail()
                    );
                    st.queue.set_next_avail(resume);
                }
            }
            st.inflight = q;
        }
        st.broken = false;
        st.started = true;
        let kick_fd = st.kick.as_ref().map(|k| k.as_raw_fd()).unwrap_or(-1);
        slot.epoll
            .ctl(
                ControlOperation::Add,
                kick_fd,
                EpollEvent::new(EventSet::IN, KICK),
            )
            .map_err(VhostError::ReqHandlerError)?;
        drop(st);
        // Requests made available before this backend (re)started are served right away.
        let _ = slot.wake.write(1);
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.dev.reset();
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> Result<(), VhostError> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<(), VhostError> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> Result<(), VhostError> {
        self.dev.reset();
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64, VhostError> {
        Ok(self.dev.features)
    }

    fn set_features(&mut self, features: u64) -> Result<(), VhostError> {
        if features & !self.dev.features != 0 {
            return Err(bad_input(format!(
                "features {:#x} not offered",
                features & !self.dev.features
            )));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<u64>>, VhostError> {
        if postcopy_listening.is_some() {
            return refuse("postcopy is not supported");
        }
        let table = MemoryTable::new(ctx, files, self.dev.memory_files)
            .map_err(|e| bad_input(e.to_string()))?;
        self.dev
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(table.mem.clone());
        self.table = Some(table);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), VhostError> {
        let max = self.dev.queue_size;
        let slot = self.slot(index)?;
        let mut st = slot.handler_lock();
        if st.started {
            return refuse("SET_VRING_NUM on a running queue");
        }
        match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= max => {
                st.queue.set_size(n);
                Ok(())
            }
            _ => Err(bad_input(format!(
                "queue {index}: size {num} is not a power of two up to {max}"
            ))),
        }
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<(), VhostError> {
        let desc = self.guest_addr(descriptor, "descriptor table")?;
        let avail = self.guest_addr(available, "avail ring")?;
        let used = self.guest_addr(used, "used ring")?;
        let slot = self.slot(index)?;
        let mut st = slot.handler_lock();
        if st.started {
            return refuse("SET_VRING_ADDR on a running queue");
        }
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(desc);
        st.queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(avail);
        st.queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(used);
        st.queue.set_used_ring_address(lo, hi);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), VhostError> {
        let slot = self.slot(index)?;
        let mut st = slot.handler_lock();
        if st.started {
            return refuse("SET_VRING_BASE on a running queue");
        }
        let base = u16::try_from(base).map_err(|_| VhostError::InvalidParam)?;
        st.queue.set_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState, VhostError> {
        self.slot(index)?;
        let base = self.dev.stop_queue(index as usize);
        Ok(VhostUserVringState::new(index, base.into()))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<(), VhostError> {
        let Some(kick) = fd else {
            return refuse("polling mode (no kick descriptor) is not supported");
        };
        nonblocking(&kick)?;
        self.slot(index.into())?;
        // A new kick descriptor restarts the queue with it.
        self.dev.stop_queue(index.into());
        self.dev.queues[usize::from(index)].handler_lock().kick = Some(kick);
        self.start_queue(index.into())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<(), VhostError> {
        let slot = self.slot(index.into())?;
        // A call descriptor that could block (a pipe nobody reads) would stall the worker
        // while it holds the queue.
        if let Some(call) = fd.as_ref() {
            nonblocking(call)?;
        }
        slot.handler_lock().call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<(), VhostError> {
        self.slot(index.into())?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures, VhostError> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::RESET_DEVICE)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<(), VhostError> {
        let offered = self.get_protocol_features()? | VhostUserProtocolFeatures::REPLY_ACK;
        let acked = VhostUserProtocolFeatures::from_bits(features)
            .filter(|f| offered.contains(*f))
            .ok_or_else(|| bad_input(format!("protocol features {features:#x} not offered")))?;
        self.acked_protocol = acked;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64, VhostError> {
        Ok(self.dev.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), VhostError> {
        let slot = self.slot(index)?;
        slot.handler_lock().enabled = enable;
        // Enabling lets a started queue run: wake its worker to look at the ring.
        let _ = slot.wake.write(1);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>, VhostError> {
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(VhostError::InvalidParam)?;
        self.dev
            .config
            .get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or(VhostError::InvalidParam)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<(), VhostError> {
        refuse("the configuration space is read-only")
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<(), VhostError> {
        refuse("not a GPU device")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File, VhostError> {
        refuse("shared objects are not supported")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File), VhostError> {
        let num_queues = usize::from(inflight.num_queues);
        if num_queues == 0 || num_queues > self.dev.queues.len() {
            return Err(bad_input(format!(
                "inflight area for {num_queues} queues (device has {})",
                self.dev.queues.len()
            )));
        }
        let (region, file) =
            InflightRegion::create(num_queues).map_err(|e| bad_input(e.to_string()))?;
        let reply = VhostUserInflight::new(
            region.len() as u64,
            0,
            inflight.num_queues,
            inflight.queue_size,
        );
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
        file: File,
    ) -> Result<(), VhostError> {
        let region = InflightRegion::map(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            usize::from(inflight.num_queues),
            self.dev.memory_files,
        )
        .map_err(|e| bad_input(e.to_string()))?;
        self.inflight = Some(region);
        Ok(())
    }

    citadel_vhost_user::refuse_unsupported_requests!();
}
