//! The vhost-user frontend shared by every device an external backend process serves
//! (`citadel-blk`, `citadel-net`, or any vhost-user backend of the same device type).
//!
//! The monitor only negotiates: it connects to the backend's socket, acks the backend's
//! features through the device's allowlist, reads the configuration space once when the
//! device needs it, and, when the guest driver starts the device, hands the backend the guest
//! RAM memfd, the ring addresses, the queue notify eventfds (KVM ioeventfds: a guest kick goes
//! KVM → backend) and the slot's irqfd as the call fd (a completion goes backend → KVM →
//! guest). No guest I/O passes through the monitor.
//!
//! Interrupt status: the backend signals the irqfd directly, so the transport never learns of
//! a completion. Instead of relaying every completion through the monitor (a poll of the call
//! eventfd, a status update and an irqfd write: a wakeup and two syscalls in the monitor per
//! interrupt), the transport reports VRING in InterruptStatus for as long as the device runs
//! (see [`VirtioInterrupt::set_vring_signalled_externally`]); each slot has an edge-triggered line
//! of its own, so the only cost is a used-ring check by the driver on a configuration
//! interrupt. A resample irqfd would need a level-triggered line and a monitor thread to
//! handle the resample.
//!
//! The backend is a peer, not a part of the monitor: every reply is checked (feature bits
//! against an allowlist, ring bases, what each device checks of the configuration) and every
//! request is bounded by a deadline (see [`super::deadline`]), so a stuck backend fails the
//! device instead of blocking the thread that talks to it forever: the event loop when the
//! device starts (the device manager defers starts there), the vCPU that resets it, the main
//! thread at startup. A backend that fails a request is not used again: its connection is in
//! an unknown state, and the driver sees DEVICE_NEEDS_RESET.
//!
//! Inflight tracking: when the backend offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, the first
//! start asks it for its inflight area (GET_INFLIGHT_FD) and the connection keeps the
//! descriptor. The area outlives the backend: a backend started to replace one that died is
//! given it (SET_INFLIGHT_FD, see [`VhostUserConnection::inherit_inflight`]) and finds in it the
//! request the dead one had taken but not completed. The monitor never maps or reads the area.
//!
//! [`VirtioInterrupt::set_vring_signalled_externally`]: super::interrupt::VirtioInterrupt::set_vring_signalled_externally

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::deadline::Deadline;
use super::virtio_mmio::ActivateParams;

/// How long the requests of one step (connection, start, stop) may wait for the backend in
/// all.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a device type asks of its backend at connection time.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSpec {
    /// The device type, for logs ("vhost-user-blk").
    pub name: &'static str,
    /// Device features passed on to the driver when the backend offers them; everything
    /// else the backend offers is dropped.
    pub allowed_features: u64,
    /// Bytes of configuration space read with GET_CONFIG at connection time, if the device
    /// shows the backend's configuration to the driver.
    pub config_len: Option<usize>,
    /// Queues of the device.
    pub queues: usize,
    /// QueueNumMax offered to the driver: a backend accepting less refuses SET_VRING_NUM for
    /// larger rings, which fails the activation.
    pub queue_max_size: u16,
}

/// Why a vhost-user device could not be set up, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be reached.
    #[error("vhost-user socket {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// What connect() or setsockopt() said.
        source: std::io::Error,
    },
    /// A request failed.
    #[error("vhost-user backend at {path}: {request} failed: {source}")]
    Request {
        /// The socket.
        path: String,
        /// The request.
        request: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// The deadline on the backend's answers could not be armed.
    #[error("vhost-user backend at {path}: cannot arm the reply deadline: {source}")]
    Deadline {
        /// The socket.
        path: String,
        /// What timer_create() or timer_settime() said.
        source: std::io::Error,
    },
    /// The backend's answers are unusable.
    #[error("vhost-user backend at {path}: {why}")]
    Backend {
        /// The socket.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// A connection to a vhost-user backend, negotiated for one device type.
pub struct VhostUserConnection {
    spec: DeviceSpec,
    path: PathBuf,
    frontend: Frontend,
    /// The connected socket, owned by `frontend`: what a deadline shuts down.
    socket: RawFd,
    timeout: Duration,
    /// What the backend offered, before the allowlist.
    offered: u64,
    /// The configuration space as the backend reported it at connection time (empty when
    /// the device does not read it).
    config: Vec<u8>,
    /// Guest RAM as the monitor maps it: ring addresses are given to the backend in the
    /// monitor's address space.
    memory: Option<GuestMemoryMmap>,
    /// Queues handed to the backend by the last start.
    started: Vec<usize>,
    /// A request failed: the connection is in an unknown state and is not used again.
    broken: bool,
    /// Whether the backend tracks inflight requests in an area the frontend keeps.
    tracks_inflight: bool,
    /// The backend's inflight area, once a start asked for it or inherited it.
    inflight: Option<InflightArea>,
    /// Whether this backend has the area: it created it, or was given it.
    inflight_shared: bool,
}

/// A backend's inflight area as GET_INFLIGHT_FD described it.
struct InflightArea {
    info: VhostUserInflight,
    file: File,
}

impl std::fmt::Debug for VhostUserConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserConnection")
            .field("device", &self.spec.name)
            .field("path", &self.path)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("started", &self.started)
            .field("broken", &self.broken)
            .field("inflight", &self.inflight.is_some())
            .finish()
    }
}

impl VhostUserConnection {
    /// Connects to the backend at `path` and negotiates what does not depend on the guest:
    /// ownership, features, protocol features and, if `spec` asks for it, the configuration.
    /// This step, and every later start or stop, waits at most `timeout` for the backend (the
    /// deadline signal handler must be registered, see
    /// [`super::deadline::register_handler`]).
    pub fn connect(
        path: &Path,
        spec: DeviceSpec,
        timeout: Duration,
    ) -> Result<VhostUserConnection, VhostUserError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_stream(stream, path.to_path_buf(), spec, timeout)
    }

    /// Negotiates as [`VhostUserConnection::connect`] does over an already connected socket
    /// (a backend the launcher started); `peer` names the backend in logs and errors.
    pub fn from_stream(
        stream: UnixStream,
        peer: PathBuf,
        spec: DeviceSpec,
        timeout: Duration,
    ) -> Result<VhostUserConnection, VhostUserError> {
        let socket = stream.as_raw_fd();
        let mut conn = VhostUserConnection {
            spec,
            path: peer,
            frontend: Frontend::from_stream(stream, spec.queues as u64),
            socket,
            timeout,
            offered: 0,
            config: Vec::new(),
            memory: None,
            started: Vec::new(),
            broken: false,
            tracks_inflight: false,
            inflight: None,
            inflight_shared: false,
        };
        let deadline = conn.deadline()?;
        conn.negotiate()?;
        drop(deadline);
        Ok(conn)
    }

    fn deadline(&self) -> Result<Deadline, VhostUserError> {
        Deadline::arm(self.socket, self.timeout).map_err(|source| VhostUserError::Deadline {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn negotiate(&mut self) -> Result<(), VhostUserError> {
        self.frontend
            .set_owner()
            .map_err(self.request("SET_OWNER"))?;
        let offered = self
            .frontend
            .get_features()
            .map_err(self.request("GET_FEATURES"))?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(self.backend("it does not offer VIRTIO_F_VERSION_1"));
        }
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(self.backend(
                "it does not offer protocol features (needed to enable and disable rings)",
            ));
        }
        // Acked now so that the protocol features can be negotiated; the virtio features are
        // set again when the driver has chosen. VERSION_1 goes with it: every driver of these
        // devices accepts it (the transports are virtio 1.0 only), and libvhost-user backends
        // such as qemu-storage-daemon give up on a feature set that lacks it.
        self.frontend
            .set_features(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (1 << VIRTIO_F_VERSION_1),
            )
            .map_err(self.request("SET_FEATURES"))?;
        let protocol = self
            .frontend
            .get_protocol_features()
            .map_err(self.request("GET_PROTOCOL_FEATURES"))?;
        let needs_config = self.spec.config_len.is_some();
        if needs_config && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(self.backend(
                "it does not offer VHOST_USER_PROTOCOL_F_CONFIG (needed to read the device configuration)",
            ));
        }
        let mut wanted =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        if needs_config {
            wanted |= VhostUserProtocolFeatures::CONFIG;
        }
        let acked = protocol & wanted;
        self.frontend
            .set_protocol_features(acked)
            .map_err(self.request("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // A request the backend refuses is then reported at that request, not as a hang
            // or a broken pipe later.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        self.tracks_inflight = acked.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        if let Some(len) = self.spec.config_len {
            let (_, config) = self
                .frontend
                .get_config(
                    0,
                    len as u32,
                    VhostUserConfigFlags::empty(),
                    &vec![0u8; len],
                )
                .map_err(self.request("GET_CONFIG"))?;
            if config.len() != len {
                return Err(self.backend(format!(
                    "GET_CONFIG returned {} bytes instead of {len}",
                    config.len()
                )));
            }
            self.config = config;
        }
        self.offered = offered;
        log::info!(
            "{} {}: backend features {offered:#x}, allowed {:#x}",
            self.spec.name,
            self.path.display(),
            self.features()
        );
        Ok(())
    }

    /// The backend's features that the device's allowlist lets through.
    pub fn features(&self) -> u64 {
        self.offered & self.spec.allowed_features
    }

    /// The configuration space the backend reported at connection time.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Names the backend in logs and errors.
    pub fn peer(&self) -> &Path {
        &self.path
    }

    /// Whether a request failed and the connection is not used again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The connected socket, for the event loop to learn when the backend hangs up. It stays
    /// owned by the connection.
    pub fn socket(&self) -> RawFd {
        self.socket
    }

    /// Takes over the inflight area of `dead`, the connection to the backend this one
    /// replaces, to hand it to this backend at its next start. Without one (the old backend
    /// never started, or does not track), this backend creates its own.
    pub fn inherit_inflight(&mut self, dead: &mut VhostUserConnection) {
        if self.tracks_inflight {
            self.inflight = dead.inflight.take();
            self.inflight_shared = false;
        }
    }

    /// Gives the device guest RAM, which it shares with the backend (by its memfd) when the
    /// driver starts the device. Every region must be file-backed.
    pub fn set_memory(&mut self, memory: &GuestMemoryMmap) -> Result<(), VhostUserError> {
        // A backend mapping the file under a private mapping would see the file's pages, not
        // the guest's.
        if memory.iter().any(|r| r.flags() & libc::MAP_SHARED == 0) {
            return Err(self.backend(
                "guest RAM is a private mapping of a snapshot's memory file, which no backend \
                 can share (restore with -incoming file:DIR,share=on)",
            ));
        }
        memory_regions(memory).map_err(|e| self.backend(format!("guest RAM: {e}")))?;
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn request(&self, request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
        let path = self.path.display().to_string();
        move |source| VhostUserError::Request {
            path,
            request,
            source,
        }
    }

    /// An error about this backend's answers.
    pub fn backend(&self, why: impl Into<String>) -> VhostUserError {
        VhostUserError::Backend {
            path: self.path.display().to_string(),
            why: why.into(),
        }
    }

    /// Starts the backend on the ready rings of `params`, each queue at the next available
    /// index given in `bases` (0 for a ring the driver just set up, or missing), within the
    /// deadline. A failure leaves the connection unusable.
    pub fn start_at(
        &mut self,
        params: &ActivateParams,
        bases: &[u16],
    ) -> Result<(), VhostUserError> {
        if self.broken {
            return Err(self.backend("it failed earlier and is not used again"));
        }
        let result = self
            .deadline()
            .and_then(|_deadline| self.start(params, bases));
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Stops the backend's rings within the deadline and returns, per queue index, where each
    /// stopped: the next available index the backend would have read.
    pub fn stop_rings(&mut self) -> Result<Vec<(usize, u16)>, VhostUserError> {
        if self.broken {
            return Err(self.backend("it failed earlier and is not used again"));
        }
        let result = self.deadline().and_then(|_deadline| self.stop());
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Stops the backend's rings, as a device reset does; a broken connection only forgets
    /// them.
    pub fn reset(&mut self) {
        if self.broken {
            self.started.clear();
            return;
        }
        if let Err(e) = self.stop_rings() {
            log::warn!("{}: stopping the backend's rings: {e}", self.spec.name);
        }
    }

    fn start(&mut self, params: &ActivateParams, bases: &[u16]) -> Result<(), VhostUserError> {
        let memory = self
            .memory
            .as_ref()
            .ok_or_else(|| self.backend("the device has no guest memory"))?;
        let regions = memory_regions(memory).map_err(|e| self.backend(e.to_string()))?;
        let host = |addr: u64, len: u64| {
            host_address(memory, addr, len)
                .ok_or_else(|| self.backend(format!("ring at {addr:#x} is not in guest RAM")))
        };
        let mut rings = Vec::new();
        for (index, queue) in params.queues.iter().enumerate() {
            if !queue.ready {
                continue;
            }
            let n = u64::from(queue.size);
            rings.push((
                index,
                VringConfigData {
                    queue_max_size: self.spec.queue_max_size,
                    queue_size: queue.size,
                    flags: 0,
                    desc_table_addr: host(queue.desc, 16 * n)?,
                    used_ring_addr: host(queue.used, 6 + 8 * n)?,
                    avail_ring_addr: host(queue.avail, 6 + 2 * n)?,
                    log_addr: None,
                },
            ));
        }
        // The protocol-features bit stays acked: without it the backend would forget the
        // protocol features negotiated at connection time.
        let features = params.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(self.request("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.request("SET_MEM_TABLE"))?;
        self.share_inflight(params)?;
        // The transport reports VRING from the first kick on: completions come straight from
        // the backend through the irqfd.
        params.interrupt.set_vring_signalled_externally(true);
        for (index, ring) in rings {
            let kick = params
                .notify
                .get(index)
                .ok_or_else(|| self.backend(format!("queue {index} has no notify eventfd")))?;
            self.started.push(index);
            self.frontend
                .set_vring_num(index, ring.queue_size)
                .map_err(self.request("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &ring)
                .map_err(self.request("SET_VRING_ADDR"))?;
            let base = bases.get(index).copied().unwrap_or(0);
            self.frontend
                .set_vring_base(index, base)
                .map_err(self.request("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, params.interrupt.queue_irqfd(index))
                .map_err(self.request("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(self.request("SET_VRING_KICK"))?;
            self.frontend
                .set_vring_enable(index, true)
                .map_err(self.request("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Makes sure the backend has its inflight area before it takes rings: asks it for a new
    /// one (GET_INFLIGHT_FD) at the first start, or gives it the one inherited from the
    /// backend it replaces (SET_INFLIGHT_FD).
    fn share_inflight(&mut self, params: &ActivateParams) -> Result<(), VhostUserError> {
        if !self.tracks_inflight || self.inflight_shared {
            return Ok(());
        }
        match &self.inflight {
            Some(area) => self
                .frontend
                .set_inflight_fd(&area.info, area.file.as_raw_fd())
                .map_err(self.request("SET_INFLIGHT_FD"))?,
            None => {
                let queue_size = params
                    .queues
                    .iter()
                    .map(|q| q.size)
                    .max()
                    .unwrap_or(self.spec.queue_max_size);
                let request =
                    VhostUserInflight::new(0, 0, self.spec.queues as u16, queue_size.max(1));
                let (info, file) = self
                    .frontend
                    .get_inflight_fd(&request)
                    .map_err(self.request("GET_INFLIGHT_FD"))?;
                // Handed as it is to the backend that replaces this one, which checks it
                // against the area; what SET_INFLIGHT_FD cannot carry is refused now.
                if info.mmap_size == 0 || info.num_queues == 0 || info.queue_size == 0 {
                    return Err(self.backend(format!(
                        "GET_INFLIGHT_FD described an empty area ({} bytes, {} queues of {})",
                        info.mmap_size, info.num_queues, info.queue_size
                    )));
                }
                self.inflight = Some(InflightArea { info, file });
            }
        }
        self.inflight_shared = true;
        Ok(())
    }

    fn stop(&mut self) -> Result<Vec<(usize, u16)>, VhostUserError> {
        let mut bases = Vec::new();
        for index in std::mem::take(&mut self.started) {
            self.frontend
                .set_vring_enable(index, false)
                .map_err(self.request("SET_VRING_ENABLE"))?;
            // Returns once the backend stopped the ring: no access to guest memory after it.
            let base = self
                .frontend
                .get_vring_base(index)
                .map_err(self.request("GET_VRING_BASE"))?;
            // A ring index is 16 bits wide; a backend saying more is not believed.
            let base = u16::try_from(base)
                .map_err(|_| self.backend(format!("GET_VRING_BASE returned {base}")))?;
            bases.push((index, base));
        }
        Ok(bases)
    }
}

/// The SET_MEM_TABLE description of guest RAM: one entry per region, each with the memfd.
fn memory_regions(
    memory: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, vhost::Error> {
    memory
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect()
}

/// The monitor's address of the `len` guest bytes at `addr`, which must lie in one region.
fn host_address(memory: &GuestMemoryMmap, addr: u64, len: u64) -> Option<u64> {
    let region = memory.find_region(GuestAddress(addr))?;
    let offset = addr.checked_sub(region.start_addr().0)?;
    (offset.checked_add(len)? <= region.len()).then(|| region.as_ptr() as u64 + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_addresses_must_lie_inside_one_ram_region() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap();
        let base = memory.find_region(GuestAddress(0)).unwrap().as_ptr() as u64;
        assert_eq!(host_address(&memory, 0x1000, 0x100), Some(base + 0x1000));
        assert_eq!(host_address(&memory, 0xff00, 0x100), Some(base + 0xff00));
        assert_eq!(host_address(&memory, 0xff00, 0x101), None);
        assert_eq!(host_address(&memory, 0x18000, 1), None);
        assert_eq!(host_address(&memory, u64::MAX, 2), None);
    }

    #[test]
    fn a_refusing_socket_is_one_readable_error() {
        let spec = DeviceSpec {
            name: "vhost-user-net",
            allowed_features: 0,
            config_len: None,
            queues: 2,
            queue_max_size: 256,
        };
        let err =
            VhostUserConnection::connect(Path::new("/nonexistent/net.sock"), spec, BACKEND_TIMEOUT)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "vhost-user socket /nonexistent/net.sock: No such file or directory (os error 2)"
        );
    }
}
