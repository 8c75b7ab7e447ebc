//! virtio-mmio transport, modern interface (version 2, virtio 1.2 section 4.2).
//!
//! A transport decodes one 4 KiB slot of the MMIO gap around a [`VirtioDevice`]. It carries
//! the negotiation (status, features, queue layout, configuration space) and nothing else:
//! the guest's I/O never passes through it. Queue notifications reach the device through one
//! eventfd per queue, which the VMM registers as a KVM ioeventfd on the QueueNotify register
//! (see [`VirtioMmioTransport::notify_ioevents`]); interrupts leave through the [`Interrupt`]'s
//! irqfd. A vhost-user frontend hands both to its backend process, so kicks go guest → KVM →
//! backend and completions backend → KVM → guest.
//!
//! Everything the guest writes is untrusted: registers accessed with the wrong width or
//! misaligned are ignored (reads return zero, as the specification allows), invalid status
//! transitions are refused, and queue fields can only change while the driver is setting the
//! queue up.

mod device;
mod interrupt;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ADMIN_VQ, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA,
    VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio_bus::MmioDevice;
use crate::boot::layout;
use crate::snapshot::transport::{QueueSnapshot, TransportSnapshot};

use crate::devices::interrupt::{TransportInterrupt, VirtioInterrupt};
pub use device::{read_config_bytes, ActivateError, ActivateParams, QueueConfig, VirtioDevice};
pub use interrupt::{Interrupt, INT_CONFIG, INT_VRING};

/// "virt" in little-endian: the MagicValue register.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern interface; version 1 is the legacy one, which Citadel does not offer.
const MMIO_VERSION: u32 = 2;
/// VendorID: "CTDL" in little-endian. Drivers do not match on it.
const VENDOR_ID: u32 = 0x4c44_5443;

/// Offset of the QueueNotify register, where the VMM places the per-queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// Largest number of queues a transport accepts: each one costs an eventfd and a KVM
/// ioeventfd.
pub const MAX_QUEUES: usize = 256;
/// Largest queue size virtio allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Transport features this transport cannot carry, removed from what devices offer: each
/// needs registers or notification formats it does not implement (notification data would
/// also break the ioeventfd datamatch on the queue index).
const UNSUPPORTED_TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_SR_IOV)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | (1 << VIRTIO_F_NOTIF_CONFIG_DATA)
    | (1 << VIRTIO_F_RING_RESET)
    | (1 << VIRTIO_F_ADMIN_VQ);

/// Status values of the initialisation sequence, each the previous plus one bit.
const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = S_ACK | VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

/// Why a transport or its command-line declaration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VirtioMmioError {
    /// The device has more queues than a transport accepts.
    #[error("a virtio-mmio device may have at most {MAX_QUEUES} queues, this one has {0}")]
    TooManyQueues(usize),
    /// A queue's maximum size is not a power of two between 1 and 32768.
    #[error("queue {index} has maximum size {size}: not a power of two between 1 and 32768")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size the device reported.
        size: u16,
    },
    /// A queue notify eventfd could not be created.
    #[error("cannot create the notify eventfd of queue {index}: {source}")]
    NotifyEventFd {
        /// Queue index.
        index: usize,
        /// The failure.
        source: std::io::Error,
    },
    /// The slot index is past the last virtio-mmio slot.
    #[error(
        "virtio-mmio slot {slot} does not exist: there are {} slots",
        layout::VIRTIO_MMIO_MAX_SLOTS
    )]
    NoSuchSlot {
        /// The slot asked for.
        slot: u64,
    },
}

/// The driver's view of one queue.
#[derive(Clone, Copy, Debug)]
struct QueueState {
    max_size: u16,
    config: QueueConfig,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            // A driver that never writes QueueNum gets the largest queue, which is valid.
            config: QueueConfig {
                size: max_size,
                ..QueueConfig::default()
            },
        }
    }
}

/// Registers and device, guarded together by the transport's lock.
struct State<D> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueState>,
    /// Signalled when the driver set DRIVER_OK and the device waits to be started by
    /// [`VirtioMmioTransport::run_pending_activation`]; `None` starts it on the spot.
    activation: Option<EventFd>,
    /// DRIVER_OK was set and the device has not been started yet.
    pending: bool,
    /// The pending start is that of a device restored from a snapshot, which its driver
    /// had started (or asked to start) before the machine was saved.
    resume: bool,
}

/// The ring area a queue address register sets.
#[derive(Clone, Copy)]
enum QueueAddr {
    Desc,
    Avail,
    Used,
}

impl<D: VirtioDevice> State<D> {
    /// DeviceFeatures as offered to the driver.
    fn offered_features(&self) -> u64 {
        (self.device.features() & !UNSUPPORTED_TRANSPORT_FEATURES) | (1 << VIRTIO_F_VERSION_1)
    }

    fn packed_ring(&self) -> bool {
        self.driver_features & (1 << VIRTIO_F_RING_PACKED) != 0
    }

    fn read_register(&self, reg: u32, interrupt: &impl TransportInterrupt) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size.into()),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(q.config.ready)),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => interrupt.config_generation(),
            // No shared memory regions: a length of -1 says so; the base reads the same.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                log::debug!("virtio-mmio: read of write-only or reserved register {reg:#x}");
                0
            }
        }
    }

    fn write_register(
        &mut self,
        reg: u32,
        value: u32,
        interrupt: &Arc<impl TransportInterrupt>,
        notify: &[EventFd],
    ) {
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue_size(value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_STATUS => self.write_status(value, interrupt, notify),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.write_queue_addr(QueueAddr::Desc, false, value),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.write_queue_addr(QueueAddr::Desc, true, value),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.write_queue_addr(QueueAddr::Avail, false, value),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.write_queue_addr(QueueAddr::Avail, true, value),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.write_queue_addr(QueueAddr::Used, false, value),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_addr(QueueAddr::Used, true, value),
            // Selecting a region is harmless; there is none to describe.
            VIRTIO_MMIO_SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write of {value:#x} to read-only or reserved register {reg:#x} ignored"),
        }
    }

    fn selected_queue(&self) -> Option<&QueueState> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are accepted only between DRIVER and FEATURES_OK: afterwards the device
        // may already rely on what was negotiated.
        if self.status != S_DRIVER {
            log::debug!(
                "virtio-mmio: DriverFeatures written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => log::debug!("virtio-mmio: DriverFeatures word {sel} does not exist, ignored"),
        }
    }

    /// The selected queue, if the driver may change its setup now: after FEATURES_OK, before
    /// DRIVER_OK, and not after it gave up or the device asked for a reset.
    fn queue_for_setup(&mut self) -> Option<&mut QueueState> {
        if self.status != S_FEATURES_OK {
            log::debug!(
                "virtio-mmio: queue setup in status {:#x}, ignored",
                self.status
            );
            return None;
        }
        let sel = self.queue_sel;
        let queue = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i));
        if queue.is_none() {
            log::debug!("virtio-mmio: queue {sel} does not exist, setup ignored");
        }
        queue
    }

    fn write_queue_size(&mut self, value: u32) {
        let packed = self.packed_ring();
        let Some(queue) = self.queue_for_setup() else {
            return;
        };
        if queue.config.ready {
            log::debug!("virtio-mmio: QueueNum written while the queue is ready, ignored");
            return;
        }
        // Split rings need a power of two; packed rings take any size.
        let valid =
            value != 0 && value <= u32::from(queue.max_size) && (packed || value.is_power_of_two());
        if valid {
            queue.config.size = value as u16;
        } else {
            log::debug!(
                "virtio-mmio: invalid queue size {value} (max {}), ignored",
                queue.max_size
            );
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(queue) = self.queue_for_setup() else {
            return;
        };
        match value {
            0 => queue.config.ready = false,
            1 => queue.config.ready = true,
            _ => log::debug!("virtio-mmio: QueueReady value {value} is neither 0 nor 1, ignored"),
        }
    }

    fn write_queue_addr(&mut self, which: QueueAddr, high: bool, value: u32) {
        let Some(queue) = self.queue_for_setup() else {
            return;
        };
        if queue.config.ready {
            log::debug!("virtio-mmio: queue address written while the queue is ready, ignored");
            return;
        }
        let field = match which {
            QueueAddr::Desc => &mut queue.config.desc,
            QueueAddr::Avail => &mut queue.config.avail,
            QueueAddr::Used => &mut queue.config.used,
        };
        *field = if high {
            (*field & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (*field & !0xffff_ffff) | u64::from(value)
        };
    }

    fn write_status(
        &mut self,
        value: u32,
        interrupt: &Arc<impl TransportInterrupt>,
        notify: &[EventFd],
    ) {
        if value == 0 {
            self.reset(interrupt.as_ref(), notify);
            return;
        }
        let old = self.status;
        // The driver may give up at any point; the device keeps its state until a reset.
        if value == old | VIRTIO_CONFIG_S_FAILED {
            self.status = value;
            return;
        }
        let next = match old {
            0 => S_ACK,
            S_ACK => S_DRIVER,
            S_DRIVER => S_FEATURES_OK,
            S_FEATURES_OK => S_DRIVER_OK,
            _ => 0,
        };
        if next == 0 || value != next {
            log::debug!("virtio-mmio: invalid status transition {old:#x} -> {value:#x}, ignored");
            return;
        }
        match value {
            S_FEATURES_OK => {
                let offered = self.offered_features();
                let extra = self.driver_features & !offered;
                if extra != 0 {
                    log::debug!(
                        "virtio-mmio: driver accepted features {extra:#x} that were not offered, FEATURES_OK refused"
                    );
                } else if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                    log::debug!(
                        "virtio-mmio: driver did not accept VERSION_1, FEATURES_OK refused"
                    );
                } else {
                    self.status = value;
                }
            }
            S_DRIVER_OK => {
                self.status = value;
                self.request_start(interrupt, notify);
            }
            _ => self.status = value,
        }
    }

    /// Starts the device now, or, with deferred activation, records the request and hands
    /// it to whoever waits on the signal.
    fn request_start(&mut self, interrupt: &Arc<impl TransportInterrupt>, notify: &[EventFd]) {
        match &self.activation {
            Some(signal) => {
                self.pending = true;
                if let Err(e) = signal.write(1) {
                    log::warn!("virtio-mmio: cannot hand the device start over: {e}");
                }
            }
            None => self.start(interrupt, notify),
        }
    }

    /// Starts the device; on failure tells the driver to reset it. A resumed device then
    /// gets one kick per ready queue: the kicks the driver gave just before the machine was
    /// saved went to eventfds of the saved process, and the chains they announced wait.
    fn start(&mut self, interrupt: &Arc<impl TransportInterrupt>, notify: &[EventFd]) {
        let resume = std::mem::take(&mut self.resume);
        match self.activate(interrupt, notify, resume) {
            Ok(()) if resume => {
                for (queue, evt) in self.queues.iter().zip(notify) {
                    if queue.config.ready {
                        if let Err(e) = evt.write(1) {
                            log::warn!("virtio-mmio: cannot kick a resumed queue: {e}");
                        }
                    }
                }
            }
            Ok(()) => {}
            Err(e) => {
                log::warn!(
                    "virtio-mmio: device type {} not started: {e}",
                    self.device.device_type()
                );
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                if let Err(e) = interrupt.signal_config_change() {
                    log::warn!("virtio-mmio: cannot raise the configuration interrupt: {e}");
                }
            }
        }
    }

    fn activate(
        &mut self,
        interrupt: &Arc<impl TransportInterrupt>,
        notify: &[EventFd],
        resume: bool,
    ) -> Result<(), ActivateError> {
        let configs: Vec<QueueConfig> = self.queues.iter().map(|q| q.config).collect();
        check_ready_queues(&configs, self.packed_ring())?;
        let notify = notify
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::NotifyEventFd)?;
        let params = ActivateParams {
            features: self.driver_features,
            queues: configs,
            notify,
            interrupt: Arc::clone(interrupt) as Arc<dyn VirtioInterrupt>,
            resume,
        };
        self.device.activate(params)
    }

    fn reset(&mut self, interrupt: &impl TransportInterrupt, notify: &[EventFd]) {
        self.device.reset();
        self.status = 0;
        self.pending = false;
        self.resume = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueState::new(queue.max_size);
        }
        interrupt.reset();
        // Kicks left over from before the reset must not reach the next activation. The
        // eventfds are non-blocking, so an empty one just reports WouldBlock.
        for evt in notify {
            let _ = evt.read();
        }
    }
}

/// Checks what the device will rely on for a ready queue: a usable size, areas aligned as the
/// specification requires (virtio 1.2 sections 2.7 and 2.8), and no area wrapping around
/// the address space. Whether the areas are guest RAM is for the device to check: only it
/// knows the memory map it was given.
fn check_queue(q: &QueueConfig, packed: bool) -> Result<(), &'static str> {
    if q.size == 0 {
        return Err("size is zero");
    }
    let n = u64::from(q.size);
    // (alignment, length) of the descriptor, driver and device areas.
    let areas = if packed {
        [(16, 16 * n), (4, 4), (4, 4)]
    } else {
        [(16, 16 * n), (2, 6 + 2 * n), (4, 6 + 8 * n)]
    };
    for ((align, len), addr) in areas.into_iter().zip([q.desc, q.avail, q.used]) {
        if addr & (align - 1) != 0 {
            return Err("a ring area is misaligned");
        }
        if addr.checked_add(len).is_none() {
            return Err("a ring area wraps around the address space");
        }
    }
    Ok(())
}

/// Checks every ready queue of a device about to start with [`check_queue`].
fn check_ready_queues(queues: &[QueueConfig], packed: bool) -> Result<(), ActivateError> {
    for (index, queue) in queues.iter().enumerate() {
        if queue.ready {
            check_queue(queue, packed).map_err(|reason| ActivateError::InvalidQueue {
                index: index as u16,
                reason,
            })?;
        }
    }
    Ok(())
}

/// Checks that a saved Status register is one the initialisation sequence reaches: a step of
/// it, possibly with FAILED (the driver gives up at any step) and, once the device was
/// started, DEVICE_NEEDS_RESET (only a started device reports it).
fn check_saved_status(status: u32) -> Result<(), String> {
    let step = status & !(VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET);
    let reachable = matches!(step, 0 | S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
        && (status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 || step == S_DRIVER_OK);
    if reachable {
        Ok(())
    } else {
        Err(format!("status {status:#x} is not one a driver can reach"))
    }
}

/// What the driver selected and set up, for a transport whose registers read it back
/// (virtio-pci's common configuration does; virtio-mmio's selectors are write-only).
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverView {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted so far.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The selected queue's setup, if it exists.
    pub queue: Option<QueueConfig>,
    /// Number of queues of the device.
    pub queues: usize,
}

/// A virtio-mmio transport slot holding one device.
pub struct VirtioMmioTransport<D: VirtioDevice, I: TransportInterrupt = Interrupt> {
    state: Mutex<State<D>>,
    interrupt: Arc<I>,
    /// One per queue; fixed for the transport's life so the KVM ioeventfds stay valid.
    notify: Vec<EventFd>,
}

impl<D: VirtioDevice, I: TransportInterrupt> VirtioMmioTransport<D, I> {
    /// Wraps `device`, which raises its interrupts through `interrupt`. Creates the queue
    /// notify eventfds; refuses devices whose queues a driver could not use.
    pub fn new(device: D, interrupt: Arc<I>) -> Result<Self, VirtioMmioError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.len() > MAX_QUEUES {
            return Err(VirtioMmioError::TooManyQueues(max_sizes.len()));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(VirtioMmioError::InvalidQueueMaxSize { index, size });
            }
        }
        let notify = (0..max_sizes.len())
            .map(|index| {
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| VirtioMmioError::NotifyEventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queues = max_sizes.iter().map(|&m| QueueState::new(m)).collect();
        Ok(VirtioMmioTransport {
            state: Mutex::new(State {
                device,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues,
                activation: None,
                pending: false,
                resume: false,
            }),
            interrupt,
            notify,
        })
    }

    /// Defers starting the device: DRIVER_OK only records the request and signals `signal`,
    /// and whoever waits on it calls [`VirtioMmioTransport::run_pending_activation`]. A
    /// vhost-user device talks to its backend while it starts; deferred, that happens on the
    /// event loop and the vCPU that wrote DRIVER_OK goes back to the guest at once. Kicks
    /// in the meantime wait in the notify eventfds.
    pub fn with_deferred_activation(self, signal: EventFd) -> Self {
        self.lock().activation = Some(signal);
        self
    }

    /// Starts the device if the driver set DRIVER_OK since the last call and has not reset
    /// or failed it since.
    pub fn run_pending_activation(&self) {
        let mut state = self.lock();
        if std::mem::take(&mut state.pending) && state.status == S_DRIVER_OK {
            state.start(&self.interrupt, &self.notify);
        }
    }

    /// The transport's interrupt, shared with the device.
    pub fn interrupt(&self) -> &Arc<I> {
        &self.interrupt
    }

    /// The driver's selectors and the selected queue's setup.
    pub fn driver_view(&self) -> DriverView {
        let state = self.lock();
        DriverView {
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queue: state.selected_queue().map(|q| q.config),
            queues: state.queues.len(),
        }
    }

    /// The queue notify eventfds, by queue index, for a transport that places its own KVM
    /// ioeventfds.
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The KVM ioeventfds to register for a transport mapped at `base`: per queue, the
    /// QueueNotify address, the value to match (the queue index) and the eventfd.
    pub fn notify_ioevents(&self, base: u64) -> impl Iterator<Item = (u64, u32, &EventFd)> {
        let addr = base + QUEUE_NOTIFY_OFFSET;
        self.notify
            .iter()
            .enumerate()
            .map(move |(index, evt)| (addr, index as u32, evt))
    }

    /// Changes the device configuration with `change` and tells the driver. The change and
    /// the generation bump happen under the transport's lock, so a driver reading the
    /// configuration sees either all of it or a new generation.
    pub fn update_config<R>(&self, change: impl FnOnce(&mut D) -> R) -> std::io::Result<R> {
        let mut state = self.lock();
        let result = change(&mut state.device);
        self.interrupt.signal_config_change()?;
        Ok(result)
    }

    /// Changes the device with `change` and, if it succeeds, tells the driver its
    /// configuration changed; a refused change raises nothing.
    pub fn try_update_config<R, E>(
        &self,
        change: impl FnOnce(&mut D) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut state = self.lock();
        let result = change(&mut state.device)?;
        if let Err(e) = self.interrupt.signal_config_change() {
            log::warn!("virtio-mmio: cannot raise the configuration interrupt: {e}");
        }
        Ok(result)
    }

    /// Runs `f` on the device under the transport's lock; if the driver has started the
    /// device, sets DEVICE_NEEDS_RESET in its status and raises the configuration interrupt,
    /// as virtio asks of a device that can no longer work until it is reset.
    pub fn fail_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        let mut state = self.lock();
        let result = f(&mut state.device);
        if state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            state.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            if let Err(e) = self.interrupt.signal_config_change() {
                log::warn!("virtio-mmio: cannot raise the configuration interrupt: {e}");
            }
        }
        result
    }

    /// Runs `f` on the device under the transport's lock, raising nothing.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.lock().device)
    }

    /// Resets the device as if the driver had written 0 to Status: what a machine reset does
    /// to every device, so that no backend keeps serving rings in memory the next boot
    /// reuses.
    pub fn reset(&self) {
        self.lock().reset(self.interrupt.as_ref(), &self.notify);
    }

    /// The driver-visible state, for a snapshot.
    pub fn save(&self) -> TransportSnapshot {
        let state = self.lock();
        let (interrupt_status, config_generation) = self.interrupt.saved();
        TransportSnapshot {
            device_type: state.device.device_type(),
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queues: state
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    size: q.config.size,
                    desc: q.config.desc,
                    avail: q.config.avail,
                    used: q.config.used,
                    ready: q.config.ready,
                })
                .collect(),
            interrupt_status,
            config_generation,
        }
    }

    /// Takes saved driver-visible state, on a transport no driver has used yet. The state
    /// comes from a file and is checked whole before any of it is taken: it must name this
    /// device type and queue count, every queue size must be one a driver could have set, the
    /// status one the initialisation sequence reaches, and features accepted (FEATURES_OK)
    /// ones offered, VERSION_1 among them.
    ///
    /// A device the driver had started (DRIVER_OK) starts again in resume mode, its rings
    /// going on from the used indices in the restored guest memory; only a
    /// [`VirtioDevice::resumable`] one is taken, and only with ready queues that pass the
    /// checks a start applies. The start is deferred as a driver's DRIVER_OK is (see
    /// [`VirtioMmioTransport::with_deferred_activation`]), so that it runs on the event loop.
    /// A driver's DRIVER_OK the event loop had not acted on yet when the machine was saved
    /// comes back the same way. A started device that failed, or that the driver gave up on,
    /// stays stopped until the driver resets it.
    pub fn restore(&self, saved: &TransportSnapshot) -> Result<(), String> {
        let mut state = self.lock();
        let device_type = state.device.device_type();
        if saved.device_type != device_type {
            return Err(format!(
                "device type {} where the machine has {device_type}",
                saved.device_type
            ));
        }
        if saved.queues.len() != state.queues.len() {
            return Err(format!(
                "{} queues where the device has {}",
                saved.queues.len(),
                state.queues.len()
            ));
        }
        for (index, (queue, current)) in saved.queues.iter().zip(&state.queues).enumerate() {
            if !queue.size.is_power_of_two() || queue.size > current.max_size {
                return Err(format!("queue {index} has an invalid size {}", queue.size));
            }
        }
        check_saved_status(saved.status)?;
        // Before FEATURES_OK the register holds whatever the driver wrote; from then on it is
        // what the device relies on, necessarily a subset of what it offers.
        if saved.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if saved.driver_features & !state.offered_features() != 0 {
                return Err("the driver accepted features the device does not offer".to_string());
            }
            if saved.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err("the driver accepted features without VERSION_1".to_string());
            }
        }
        if saved.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !state.device.resumable() {
            return Err(format!(
                "device type {device_type} was started by its driver and cannot be resumed: \
                 its rings are not served by the VMM"
            ));
        }
        let configs: Vec<QueueConfig> = saved
            .queues
            .iter()
            .map(|q| QueueConfig {
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                ready: q.ready,
            })
            .collect();
        let resume = saved.status == S_DRIVER_OK;
        if resume {
            let packed = saved.driver_features & (1 << VIRTIO_F_RING_PACKED) != 0;
            check_ready_queues(&configs, packed).map_err(|e| e.to_string())?;
        }
        for (queue, config) in state.queues.iter_mut().zip(configs) {
            queue.config = config;
        }
        state.status = saved.status;
        state.driver_features = saved.driver_features;
        state.device_features_sel = saved.device_features_sel;
        state.driver_features_sel = saved.driver_features_sel;
        state.queue_sel = saved.queue_sel;
        self.interrupt
            .restore(saved.interrupt_status, saved.config_generation);
        if resume {
            state.resume = true;
            state.request_start(&self.interrupt, &self.notify);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State<D>> {
        // A panic elsewhere while holding the lock leaves registers that are each valid on
        // their own; keep serving the guest rather than poison every vCPU.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notifies queue `index` as a KVM ioeventfd would.
    pub fn notify_queue(&self, index: u32) {
        match self.notify.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::warn!(
                        "virtio-mmio: cannot signal the notify eventfd of queue {index}: {e}"
                    );
                }
            }
            None => log::debug!("virtio-mmio: notify of nonexistent queue {index} ignored"),
        }
    }
}

/// A register access the transport decodes: 32 bits wide and aligned.
fn register(offset: u64, len: usize) -> Option<u32> {
    (len == 4 && offset & 3 == 0 && offset < CONFIG_SPACE_OFFSET).then_some(offset as u32)
}

impl<D: VirtioDevice, I: TransportInterrupt> MmioDevice for VirtioMmioTransport<D, I> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.lock()
                .device
                .read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register(offset, data.len()) {
            Some(reg) => {
                // The interrupt handler's register is read on every interrupt: it never waits
                // for the lock, which an activation may hold while it talks to a backend.
                let value = match reg {
                    VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.isr_status(),
                    _ => self.lock().read_register(reg, self.interrupt.as_ref()),
                };
                data.copy_from_slice(&value.to_le_bytes());
            }
            None => {
                log::debug!(
                    "virtio-mmio: {}-byte read at {offset:#x} is not a register access",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.lock()
                .device
                .write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let (Some(reg), Ok(bytes)) = (register(offset, data.len()), <[u8; 4]>::try_from(data))
        else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a register access, ignored",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match reg {
            // The same path as the KVM ioeventfd, without taking the lock.
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            _ => self
                .lock()
                .write_register(reg, value, &self.interrupt, &self.notify),
        }
    }
}

/// Kernel command-line declaration of `len` bytes of virtio-mmio registers at `base` raising
/// `irq`, in the form Linux's `virtio_mmio.device=` parameter takes (`4K@0xd0000000:5`).
pub fn cmdline_device(base: u64, len: u64, irq: u32) -> String {
    // Powers of two, largest first, so the mask tests divisibility.
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    let size = UNITS
        .iter()
        .find(|(unit, _)| len != 0 && len & (unit - 1) == 0)
        .map_or_else(
            || len.to_string(),
            |(unit, suffix)| format!("{}{suffix}", len / unit),
        );
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

/// Kernel command-line declaration of virtio-mmio slot `slot` raising `irq`.
pub fn cmdline_slot(slot: u64, irq: u32) -> Result<String, VirtioMmioError> {
    let base = layout::virtio_mmio_slot(slot).ok_or(VirtioMmioError::NoSuchSlot { slot })?;
    Ok(cmdline_device(base.0, layout::VIRTIO_MMIO_SLOT_SIZE, irq))
}
