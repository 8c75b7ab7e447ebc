//! One frontend connection: its vhost-user messages (memory table, rings, features) and one
//! worker thread per queue pair that moves frames between the rings and the tap.
//!
//! Ring `q` belongs to queue pair `q / 2` (RX when even, TX when odd). A ring's kick descriptor
//! is watched by its pair's worker only while the ring is both started (SET_VRING_KICK) and
//! enabled (SET_VRING_ENABLE, or SET_FEATURES without PROTOCOL_FEATURES), as vhost-user asks.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_vhost_user::memory::MemoryTable;
use citadel_vhost_user::refusal::{bad_input, nonblocking, refuse};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VhostError, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Mem, NetBackend, NetConfig, PairEvent, QUEUE_SIZE};

/// Epoll data of a worker's descriptors.
const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const TAP: u64 = 2;
const EXIT: u64 = 3;

/// A queue pair's worker thread and what the message handler needs to steer it.
struct Worker {
    epoll: Arc<Epoll>,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The state of one frontend connection; dropping it stops the workers.
pub struct Connection {
    backend: Arc<NetBackend>,
    mem: Mem,
    vrings: Vec<VringRwLock<Mem>>,
    /// The kick descriptor each ring has in its worker's epoll set, if any.
    watched: Vec<Option<RawFd>>,
    workers: Vec<Worker>,
    table: Option<MemoryTable>,
    memory_files: MemoryFilePolicy,
    acked_features: u64,
}

impl Connection {
    /// A fresh device for a new frontend, with its worker threads started.
    pub fn new(config: Arc<NetConfig>) -> std::io::Result<Connection> {
        let memory_files = config.memory_files;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(NetBackend::new(config, mem.clone()));
        let vrings = (0..backend.num_queues())
            .map(|_| VringRwLock::new(mem.clone(), QUEUE_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(std::io::Error::other)?;
        let mut conn = Connection {
            watched: vec![None; vrings.len()],
            backend,
            mem,
            vrings,
            workers: Vec::new(),
            table: None,
            memory_files,
            acked_features: 0,
        };
        for pair in 0..conn.backend.pairs() {
            let worker = conn.spawn_worker(pair)?;
            conn.workers.push(worker);
        }
        Ok(conn)
    }

    /// Number of rings: an RX and a TX ring per queue pair.
    pub fn rings(&self) -> u32 {
        self.vrings.len() as u32
    }

    fn spawn_worker(&self, pair: usize) -> std::io::Result<Worker> {
        let epoll = Arc::new(Epoll::new()?);
        let exit = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EXIT),
        )?;
        // Edge-triggered: the worker reads the tap until it is empty or the guest has no room.
        epoll.ctl(
            ControlOperation::Add,
            self.backend.tap_fd(pair),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP),
        )?;
        let backend = Arc::clone(&self.backend);
        let (rx, tx) = (
            self.vrings[2 * pair].clone(),
            self.vrings[2 * pair + 1].clone(),
        );
        let events = Arc::clone(&epoll);
        let thread = std::thread::Builder::new()
            .name(format!("net-pair{pair}"))
            .spawn(move || work(&backend, pair, &rx, &tx, &events))?;
        Ok(Worker {
            epoll,
            exit,
            thread: Some(thread),
        })
    }

    fn vring(&self, index: u32) -> Result<&VringRwLock<Mem>, VhostError> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostError::InvalidParam)
    }

    /// Ring `index`, provided it is stopped: its size, addresses and base change only then,
    /// never under its worker.
    fn stopped_vring(
        &self,
        index: u32,
        what: &'static str,
    ) -> Result<&VringRwLock<Mem>, VhostError> {
        let vring = self.vring(index)?;
        if vring.get_ref().get_queue().ready() {
            return refuse(what);
        }
        Ok(vring)
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

    /// Puts ring `index`'s kick descriptor in its worker's epoll set while the ring is started
    /// and enabled, and takes it out otherwise.
    fn update_watch(&mut self, index: usize) -> Result<(), VhostError> {
        let epoll = &self.workers[index / 2].epoll;
        let data = if index.is_multiple_of(2) {
            RX_KICK
        } else {
            TX_KICK
        };
        if let Some(fd) = self.watched[index].take() {
            // The descriptor may be closed already, which removed it from the set.
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let state = self.vrings[index].get_ref();
        let kick = state.get_kick().as_ref().map(|k| k.as_raw_fd());
        if let Some(fd) = kick.filter(|_| state.get_queue().ready() && state.is_enabled()) {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(VhostError::ReqHandlerError)?;
            self.watched[index] = Some(fd);
        }
        Ok(())
    }

    /// Starts ring `index` once it has a kick descriptor, if its layout fits guest memory.
    fn start(&mut self, index: usize) -> Result<(), VhostError> {
        let vring = &self.vrings[index];
        let startable = {
            let state = vring.get_ref();
            !state.get_queue().ready() && state.get_kick().is_some()
        };
        if !startable {
            return self.update_watch(index);
        }
        let mem = self.mem.memory();
        vring.set_queue_ready(true);
        if !vring.get_ref().get_queue().is_valid(&*mem) {
            vring.set_queue_ready(false);
            return Err(bad_input(format!(
                "ring {index}: size or ring addresses invalid for the memory table"
            )));
        }
        self.update_watch(index)
    }

    fn set_all_enabled(&mut self, enabled: bool) -> Result<(), VhostError> {
        for index in 0..self.vrings.len() {
            self.vrings[index].set_enabled(enabled);
            self.update_watch(index)?;
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for worker in &self.workers {
            // An eventfd write only fails when the counter would overflow, in which case the
            // worker is already due to wake up.
            let _ = worker.exit.write(1);
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
        self.backend.discard_pending();
    }
}

/// A queue pair's worker: serves kicks and tap readiness until told to exit, or until the
/// pair cannot go on (the device logged why).
fn work(
    backend: &NetBackend,
    pair: usize,
    rx: &VringRwLock<Mem>,
    tx: &VringRwLock<Mem>,
    epoll: &Epoll,
) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("queue pair {pair}: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let (event, ring) = match ev.data() {
                RX_KICK => (PairEvent::RxKick, Some(rx)),
                TX_KICK => (PairEvent::TxKick, Some(tx)),
                TAP => (PairEvent::Tap, None),
                _ => return,
            };
            if let Some(ring) = ring {
                // Consumes the kick; a ring disabled meanwhile is not served.
                match ring.read_kick() {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        log::warn!("queue pair {pair}: reading a kick: {e}");
                        continue;
                    }
                }
            }
            if backend.handle_event(event, pair, rx, tx).is_err() {
                return;
            }
        }
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
        self.acked_features = 0;
        self.set_all_enabled(false)
    }

    fn get_features(&mut self) -> Result<u64, VhostError> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> Result<(), VhostError> {
        let offered = self.backend.features();
        if features & !offered != 0 {
            return Err(bad_input(format!(
                "features {:#x} not offered",
                features & !offered
            )));
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are enabled at once.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.set_all_enabled(true)?;
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
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
        let table = MemoryTable::new(ctx, files, self.memory_files)
            .map_err(|e| bad_input(e.to_string()))?;
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(table.mem.clone());
        self.table = Some(table);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), VhostError> {
        let vring = self.stopped_vring(index, "SET_VRING_NUM on a running ring")?;
        match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= QUEUE_SIZE => {
                vring.set_queue_size(n);
                Ok(())
            }
            _ => Err(bad_input(format!(
                "ring {index}: size {num} is not a power of two up to {QUEUE_SIZE}"
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
        let vring = self.stopped_vring(index, "SET_VRING_ADDR on a running ring")?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|e| bad_input(format!("ring {index}: {e}")))?;
        // A guest that restarted its driver starts its used ring again from its own index.
        let used_idx = vring
            .queue_used_idx()
            .map_err(|e| bad_input(format!("ring {index}: reading the used index: {e}")))?;
        vring.set_queue_next_used(used_idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), VhostError> {
        let base = u16::try_from(base).map_err(|_| VhostError::InvalidParam)?;
        self.stopped_vring(index, "SET_VRING_BASE on a running ring")?
            .set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState, VhostError> {
        let vring = self.vring(index)?.clone();
        // Waits for the worker to finish with the ring (it holds the ring while serving it).
        vring.set_queue_ready(false);
        self.update_watch(index as usize)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, next_avail.into()))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<(), VhostError> {
        let Some(kick) = fd else {
            return refuse("polling mode (no kick descriptor) is not supported");
        };
        nonblocking(&kick)?;
        let index = usize::from(index);
        self.vring(index as u32)?;
        // The old descriptor leaves the epoll set before it is closed.
        if let Some(fd) = self.watched[index].take() {
            let _ = self.workers[index / 2].epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::default(),
            );
        }
        self.vrings[index].set_kick(Some(kick));
        self.start(index)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<(), VhostError> {
        let vring = self.vring(index.into())?;
        if let Some(call) = fd.as_ref() {
            nonblocking(call)?;
        }
        vring.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<(), VhostError> {
        self.vring(index.into())?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures, VhostError> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<(), VhostError> {
        let offered = self.backend.protocol_features();
        VhostUserProtocolFeatures::from_bits(features)
            .filter(|f| offered.contains(*f))
            .map(|_| ())
            .ok_or_else(|| bad_input(format!("protocol features {features:#x} not offered")))
    }

    fn get_queue_num(&mut self) -> Result<u64, VhostError> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), VhostError> {
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>, VhostError> {
        Ok(self.backend.get_config(offset, size))
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
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File), VhostError> {
        refuse("inflight tracking is not supported")
    }

    fn set_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
        _file: File,
    ) -> Result<(), VhostError> {
        refuse("inflight tracking is not supported")
    }

    citadel_vhost_user::refuse_unsupported_requests!();
}
