//! The q35 machine's PCI Express segment on the machine's buses: its ECAM window on the MMIO
//! bus, the 0xCF8/0xCFC ports on port I/O, the root ports the command line configures, and
//! the cards hot-plugged into them. Every vCPU reaches it through one lock, held only for a
//! register access.
//!
//! A root port's hotplug interrupt is one MSI message sent through KVM. When the guest releases
//! a slot whose card is to go, the port signals [`PcieHost::eject_event`], and the event
//! loop takes the card out with [`PcieHost::take_ejected`]: that, not `device_del`, is when a
//! PCI device is deleted.
//!
//! A disk card's device is a [`BlkSlot`] and a NIC card's a `NetSlot`, as in the microvm
//! machine's slots, holding their disk or NIC from the card's plug to its eject: a backend that
//! dies is noticed and replaced the same way. Their backend sockets and the kicks they answer
//! themselves (a failed backend's) are reported under [`CARD_TOKEN`] and the port's position.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use citadel_launcher::VfioHandle;
use citadel_pci::config::reg;
use citadel_pci::root_port::{HotplugError, RootPort, RootPortConfig, SlotEvents};
use citadel_pci::segment::{Function, Segment, SegmentError, PORT_ADDRESS, PORT_COUNT};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend_hangups::BackendHangups;
use super::blk_slot::{BlkSlot, PluggedDisk, QuiesceError};
use super::mmio_bus::{MmioBus, MmioDevice};
use super::msi_routes::MsiRoutes;
use super::msix::MsixInterrupt;
use super::net_slot::{NetSlot, PluggedNic};
use super::slot_ring::SlotKicks;
use super::vfio_pci::{PassthroughWiring, VfioPciCard};
use super::vhost_user::VhostUserConnection;
use super::vhost_user_blk::VhostUserBlk;
use super::virtio_mmio::{VirtioDevice, VirtioMmioTransport};
use super::virtio_pci::{BarWiring, CardHandle, VirtioPciCard};
use crate::snapshot::pci::{CardSnapshot, PciSnapshot, PortSnapshot};

/// The root bus's name, which the command line's root ports name as their `bus`.
pub const ROOT_BUS: &str = "pcie.0";

/// A root port of the command line (`-device pcie-root-port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPortSpec {
    /// Its `id`, which `device_add` names as a `bus`.
    pub id: String,
    /// Its device number on bus 0.
    pub device: u8,
    /// Its function number.
    pub function: u8,
    /// Port number and multifunction flag.
    pub config: RootPortConfig,
}

/// Why the segment could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PcieError {
    /// A root port could not be placed.
    #[error("-device pcie-root-port,id={id}: {source}")]
    Placement {
        /// The port's id.
        id: String,
        /// Why.
        source: SegmentError,
    },
    /// The eject eventfd could not be created.
    #[error("creating the PCI eject eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Why a card cannot go into, or out of, a slot. The texts are QEMU's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlugError {
    /// No root port has that id.
    #[error("Bus '{0}' not found")]
    NoSuchBus(String),
    /// The root bus takes no hot-plugged cards.
    #[error("Bus '{ROOT_BUS}' does not support hotplugging")]
    RootBus,
    /// The port's slot holds a card already.
    #[error("PCI: slot 0 function 0 not available on bus '{0}': it holds a device")]
    Occupied(String),
    /// The slot is empty.
    #[error("Bus '{0}' holds no device")]
    Empty(String),
    /// The guest has not released the card yet.
    #[error("the device on bus '{0}' is already in the process of unplug")]
    AlreadyRemoving(String),
    /// A snapshot's state does not fit.
    #[error("{0}")]
    Snapshot(String),
}

/// What the root ports tell the machine: their MSI messages go to KVM, a slot released for
/// removal wakes the event loop.
#[derive(Debug)]
struct PortEvents {
    routes: Arc<MsiRoutes>,
    ejected: EventFd,
}

impl SlotEvents for PortEvents {
    fn interrupt(&self, address: u64, data: u32) {
        if let Err(e) = self.routes.signal(address, data) {
            log::warn!("pcie: root port interrupt not delivered: {e}");
        }
    }

    fn released(&self) {
        if let Err(e) = self.ejected.write(1) {
            log::warn!("pcie: cannot report a released slot: {e}");
        }
    }
}

/// The segment, shared by the vCPUs (configuration accesses) and the event loop (hotplug,
/// reset).
#[derive(Debug)]
pub struct PcieHost {
    segment: Mutex<Segment>,
    ports: Vec<RootPortSpec>,
    events: Arc<PortEvents>,
}

impl PcieHost {
    /// The host bridge and `root_ports`, placed where the command line says, their
    /// interrupts sent through `routes`.
    pub fn new(root_ports: &[RootPortSpec], routes: Arc<MsiRoutes>) -> Result<PcieHost, PcieError> {
        let events = Arc::new(PortEvents {
            routes,
            ejected: EventFd::new(EFD_NONBLOCK).map_err(PcieError::EventFd)?,
        });
        let mut segment = Segment::default();
        for spec in root_ports {
            let port = RootPort::new(spec.config, events.clone());
            segment
                .add_root_port(spec.device, spec.function, port)
                .map_err(|source| PcieError::Placement {
                    id: spec.id.clone(),
                    source,
                })?;
        }
        Ok(PcieHost {
            segment: Mutex::new(segment),
            ports: root_ports.to_vec(),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Segment> {
        // Register state stays consistent whatever a panicking holder was doing: every access
        // is a single register read or write.
        self.segment.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `port` is one of the configuration ports.
    pub fn decodes_port(port: u16) -> bool {
        (PORT_ADDRESS..PORT_ADDRESS + PORT_COUNT).contains(&port)
    }

    /// A read of a configuration port.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        self.lock().port_read(port, data);
    }

    /// A write of a configuration port.
    pub fn port_write(&self, port: u16, data: &[u8]) {
        self.lock().port_write(port, data);
    }

    /// Readable when the guest released a slot whose card is to go.
    pub fn eject_event(&self) -> &EventFd {
        &self.events.ejected
    }

    /// Runs `f` on the root port named `bus`.
    fn with_port<R>(
        &self,
        bus: &str,
        f: impl FnOnce(&mut RootPort) -> Result<R, PlugError>,
    ) -> Result<R, PlugError> {
        if bus == ROOT_BUS {
            return Err(PlugError::RootBus);
        }
        let spec = self
            .ports
            .iter()
            .find(|p| p.id == bus)
            .ok_or_else(|| PlugError::NoSuchBus(bus.to_string()))?;
        let mut segment = self.lock();
        let port = segment
            .root_port_mut(spec.device, spec.function)
            .ok_or_else(|| PlugError::NoSuchBus(bus.to_string()))?;
        f(port)
    }

    /// Root port `bus`'s registers and removal state, with its card's header (256 bytes, as
    /// the guest reads them) if it holds one: for a snapshot.
    fn save_port(&self, bus: &str) -> Result<PortState, PlugError> {
        self.with_port(bus, |port| {
            let (config, removing) = port.snapshot();
            let header = port.card_mut().map(|card| {
                let mut header = vec![0u8; CARD_HEADER_LEN];
                for (offset, chunk) in (0u16..).step_by(4).zip(header.chunks_exact_mut(4)) {
                    card.read(offset, chunk);
                }
                header
            });
            Ok((config, removing, header))
        })
    }

    /// Puts root port `bus`'s saved registers and removal state back and replays the guest's
    /// writes of its card's header: the BARs, the interrupt line and the capabilities (the
    /// card's own write masks apply), then the command register, which places the BARs. The
    /// card's MSI-X table must be back first: enabling MSI-X routes its vectors.
    fn restore_port(
        &self,
        bus: &str,
        config: &[u8],
        removing: bool,
        header: Option<&[u8]>,
    ) -> Result<(), String> {
        self.with_port(bus, |port| {
            if !port.restore(config, removing) {
                return Err(PlugError::Snapshot(format!(
                    "root port {bus}: {} bytes of registers",
                    config.len()
                )));
            }
            let (Some(header), Some(card)) = (header, port.card_mut()) else {
                return Ok(());
            };
            if header.len() != CARD_HEADER_LEN {
                return Err(PlugError::Snapshot(format!(
                    "the card in {bus}: a header of {} bytes",
                    header.len()
                )));
            }
            let dword = |at: usize| &header[at..at + 4];
            for at in (usize::from(reg::BAR0)..usize::from(reg::BAR_END)).step_by(4) {
                card.write(at as u16, dword(at));
            }
            card.write(
                reg::INTERRUPT_LINE,
                &header[usize::from(reg::INTERRUPT_LINE)..][..1],
            );
            for at in (0x40..CARD_HEADER_LEN).step_by(4) {
                card.write(at as u16, dword(at));
            }
            card.write(reg::COMMAND, &header[usize::from(reg::COMMAND)..][..2]);
            Ok(())
        })
        .map_err(|e| e.to_string())
    }

    /// Puts `card` in the slot of root port `bus` and tells the guest.
    pub fn plug(&self, bus: &str, card: Box<dyn Function>) -> Result<(), PlugError> {
        self.with_port(bus, |port| {
            port.plug(card)
                .map_err(|_| PlugError::Occupied(bus.to_string()))
        })
    }

    /// Asks the guest to release the card in root port `bus`.
    pub fn request_unplug(&self, bus: &str) -> Result<(), PlugError> {
        self.with_port(bus, |port| {
            port.request_unplug().map_err(|e| match e {
                HotplugError::AlreadyRemoving => PlugError::AlreadyRemoving(bus.to_string()),
                HotplugError::Empty | HotplugError::Occupied => PlugError::Empty(bus.to_string()),
            })
        })
    }

    /// Takes out every card the guest has released, with the id of the port it was in.
    pub fn take_ejected(&self) -> Vec<(String, Box<dyn Function>)> {
        let _ = self.events.ejected.read();
        let mut segment = self.lock();
        self.ports
            .iter()
            .filter_map(|spec| {
                let port = segment.root_port_mut(spec.device, spec.function)?;
                Some((spec.id.clone(), port.take_ejected()?))
            })
            .collect()
    }

    /// Puts every function back as it was built; cards stay plugged.
    pub fn reset(&self) {
        self.lock().reset();
    }
}

/// The ECAM window, as the MMIO bus sees it.
impl MmioDevice for PcieHost {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock().ecam_read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.lock().ecam_write(offset, data);
    }
}

/// Card BARs on the machine's MMIO bus, their notification addresses as KVM ioeventfds.
pub struct KvmBarWiring {
    /// The bus BARs are mapped on.
    pub mmio: Arc<MmioBus>,
    /// The VM the ioeventfds are registered with.
    pub vm: Arc<VmFd>,
}

impl BarWiring for KvmBarWiring {
    fn map(&self, base: u64, len: u64, region: Arc<dyn MmioDevice>) -> Result<(), String> {
        self.mmio
            .insert(base, len, region)
            .map_err(|e| e.to_string())
    }

    fn unmap(&self, base: u64) {
        if let Err(e) = self.mmio.remove(base) {
            log::warn!("pcie: unmapping a BAR at {base:#x}: {e}");
        }
    }

    fn register_notify(&self, addr: u64, evt: &EventFd) -> Result<(), String> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| e.to_string())
    }

    fn unregister_notify(&self, addr: u64, evt: &EventFd) {
        if let Err(e) = self
            .vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
        {
            log::warn!("pcie: unregistering the notification at {addr:#x}: {e}");
        }
    }
}

/// A card that could not be plugged: why, and its disk when still usable.
pub struct PlugRefused {
    /// Why, as one line.
    pub why: String,
    /// The disk, unless the attempt used it up.
    pub disk: Option<Box<PluggedDisk>>,
}

/// The device of a card in a slot.
enum PluggedCard {
    Disk(CardHandle<BlkSlot>),
    Nic(CardHandle<NetSlot>),
}

impl PluggedCard {
    fn run_pending_activation(&self) {
        match self {
            PluggedCard::Disk(card) => card.run_pending_activation(),
            PluggedCard::Nic(card) => card.run_pending_activation(),
        }
    }
}

/// A card the guest released, taken out of its slot.
pub struct Ejected {
    /// The id of the root port it was in.
    pub bus: String,
    /// A disk's frontend, still connected to its backend, for its block node to keep.
    pub disk: Option<VhostUserBlk>,
    /// A NIC's frontend, still connected to its backend, for its netdev to keep.
    pub nic: Option<PluggedNic>,
}

/// The segment with what plugging a card takes: interrupt routes, BAR wiring, guest memory
/// for the card's backend, and the device starts the event loop runs.
pub struct PciDevices {
    host: Arc<PcieHost>,
    routes: Arc<MsiRoutes>,
    wiring: Arc<KvmBarWiring>,
    memory: GuestMemoryMmap,
    activation: EventFd,
    kicks: Arc<SlotKicks>,
    hangups: Arc<BackendHangups>,
    cards: Mutex<BTreeMap<String, PluggedCard>>,
    passthrough: Arc<PassthroughWiring>,
}

/// A root port's registers and removal state, and its card's header if it holds one.
type PortState = (Vec<u8>, bool, Option<Vec<u8>>);

/// Bytes of a card's header a snapshot keeps: the type 0 header and the capabilities.
const CARD_HEADER_LEN: usize = 256;

/// Flag of the kick and hang-up tokens of PCI cards; the rest is the root port's position.
/// The microvm machine's slots use their number, with bit 32 for NICs.
pub const CARD_TOKEN: u64 = 1 << 33;

/// The token of the card in the root port at position `port`.
fn card_token(port: u64) -> u64 {
    CARD_TOKEN | port
}

/// A PCI card whose backend hung up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HungUpCard {
    /// Its root port.
    pub bus: String,
    /// The device id.
    pub device_id: String,
    /// What serves it.
    pub backend: CardBackend,
}

/// What serves a card whose backend hung up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardBackend {
    /// A disk's block node.
    Node(String),
    /// A NIC's netdev.
    Netdev(String),
}

impl PciDevices {
    /// The segment of `root_ports` on `vm`, its ECAM window on `mmio`; cards' devices are
    /// started on the event loop when `activation` is signalled; `kicks` is where a card
    /// reports kicks it has to answer itself (a failed disk) and `hangups` where a disk
    /// card's backend socket is watched.
    pub fn new(
        vm: Arc<VmFd>,
        mmio: Arc<MmioBus>,
        memory: &GuestMemoryMmap,
        root_ports: &[RootPortSpec],
        activation: EventFd,
        kicks: Arc<SlotKicks>,
        hangups: Arc<BackendHangups>,
    ) -> Result<PciDevices, PcieError> {
        let routes = Arc::new(MsiRoutes::new(vm.clone()));
        let host = Arc::new(PcieHost::new(root_ports, routes.clone())?);
        Ok(PciDevices {
            host,
            routes,
            passthrough: Arc::new(PassthroughWiring::new(mmio.clone(), vm.clone())),
            wiring: Arc::new(KvmBarWiring { mmio, vm }),
            memory: memory.clone(),
            activation,
            kicks,
            hangups,
            cards: Mutex::new(BTreeMap::new()),
        })
    }

    /// The root port at position `port`'s id.
    fn port_id(&self, token: u64) -> Option<&str> {
        let index = usize::try_from(token & !CARD_TOKEN).ok()?;
        self.host.ports.get(index).map(|p| p.id.as_str())
    }

    /// The card behind `token` whose backend hung up, if it still holds its disk or NIC.
    pub fn hung_up(&self, token: u64) -> Option<HungUpCard> {
        let bus = self.port_id(token)?.to_string();
        let (device_id, backend) = match self.cards_lock().get(&bus)? {
            PluggedCard::Disk(card) => card.with_device(|s| {
                s.disk()
                    .map(|d| (d.device_id.clone(), CardBackend::Node(d.node_name.clone())))
            })?,
            PluggedCard::Nic(card) => card.with_device(|s| {
                s.nic().map(|n| {
                    (
                        n.device_id.clone(),
                        CardBackend::Netdev(n.netdev_id.clone()),
                    )
                })
            })?,
        };
        Some(HungUpCard {
            bus,
            device_id,
            backend,
        })
    }

    /// Replaces the backend of the NIC card in root port `bus` with `conn` (see
    /// [`NetSlot::replace_backend`]); the hang-up watch moves to the new socket.
    pub fn replace_nic_backend(&self, bus: &str, conn: VhostUserConnection) -> Result<(), String> {
        match self.cards_lock().get(bus) {
            Some(PluggedCard::Nic(card)) => {
                self.hangups
                    .replace(self.token_of(bus), card.transport(), conn)
            }
            _ => Err(format!("no NIC card in {bus}")),
        }
    }

    /// Gives up on the backend of the NIC card in root port `bus`: its link goes down and the
    /// driver is told the device needs a reset (see [`NetSlot::fail_backend`]).
    pub fn fail_nic_backend(&self, bus: &str) {
        if let Some(PluggedCard::Nic(card)) = self.cards_lock().get(bus) {
            self.hangups.fail(self.token_of(bus), card.transport());
        }
    }

    /// Replaces the backend of the disk card in root port `bus` with `disk` (see
    /// [`BlkSlot::replace_backend`]); the hang-up watch moves to the new socket.
    pub fn replace_disk_backend(&self, bus: &str, disk: VhostUserBlk) -> Result<(), String> {
        match self.cards_lock().get(bus) {
            Some(PluggedCard::Disk(card)) => {
                self.hangups
                    .replace(self.token_of(bus), card.transport(), disk)
            }
            _ => Err(format!("no disk card in {bus}")),
        }
    }

    /// Gives up on the backend of the disk card in root port `bus`: the card answers the
    /// driver's requests with I/O errors and the driver is told the device needs a reset (see
    /// [`BlkSlot::fail_backend`]).
    pub fn fail_disk_backend(&self, bus: &str) {
        if let Some(PluggedCard::Disk(card)) = self.cards_lock().get(bus) {
            self.hangups.fail(self.token_of(bus), card.transport());
        }
    }

    /// Refuses a snapshot while a host function is passed through: a root port holds a card
    /// that is no virtio card.
    pub fn check_snapshot(&self) -> Result<(), String> {
        let cards = self.cards_lock();
        for spec in &self.host.ports {
            let occupied = self.host.with_port(&spec.id, |port| Ok(port.occupied()));
            if occupied.unwrap_or(false) && !cards.contains_key(&spec.id) {
                return Err(format!(
                    "root port {}: a passed-through host function cannot be kept in a snapshot",
                    spec.id
                ));
            }
        }
        Ok(())
    }

    /// The segment's state for a snapshot of the paused machine: every root port, and every
    /// virtio-pci card's header, transport and MSI-X. Refused while a host function is passed
    /// through (its device state lives in the host's hardware).
    pub fn save(&self) -> Result<PciSnapshot, String> {
        self.check_snapshot()?;
        let mut ports = Vec::new();
        let mut cards = Vec::new();
        let plugged = self.cards_lock();
        for spec in &self.host.ports {
            let (config, removing, header) =
                self.host.save_port(&spec.id).map_err(|e| e.to_string())?;
            ports.push(PortSnapshot {
                id: spec.id.clone(),
                config,
                removing,
            });
            let Some(header) = header else {
                continue;
            };
            let (transport, msix) = match plugged.get(&spec.id) {
                Some(PluggedCard::Disk(card)) => card.save(),
                Some(PluggedCard::Nic(card)) => card.save(),
                None => continue,
            };
            cards.push(CardSnapshot {
                bus: spec.id.clone(),
                config: header,
                transport,
                msix,
            });
        }
        Ok(PciSnapshot { ports, cards })
    }

    /// Puts a saved segment back on a machine whose command line plugged the same cards (see
    /// [`crate::snapshot::pci::check_cards`]), before its vCPUs first run. Started devices
    /// resume from their used indices once the event loop runs their activation.
    pub fn restore(&self, saved: &PciSnapshot) -> Result<(), String> {
        let ids: Vec<&str> = saved.ports.iter().map(|p| p.id.as_str()).collect();
        let ours: Vec<&str> = self.host.ports.iter().map(|p| p.id.as_str()).collect();
        if ids != ours {
            return Err(format!(
                "the snapshot has root ports {ids:?}, the command line {ours:?}"
            ));
        }
        for port in &saved.ports {
            let card = saved.cards.iter().find(|c| c.bus == port.id);
            if let Some(card) = card {
                match self.cards_lock().get(&port.id) {
                    Some(PluggedCard::Disk(handle)) => handle.restore(&card.transport, &card.msix),
                    Some(PluggedCard::Nic(handle)) => handle.restore(&card.transport, &card.msix),
                    None => Err("the command line plugs no virtio card there".to_string()),
                }
                .map_err(|e| format!("the card in {}: {e}", port.id))?;
            }
            self.host.restore_port(
                &port.id,
                &port.config,
                port.removing,
                card.map(|c| c.config.as_slice()),
            )?;
        }
        Ok(())
    }

    /// Stops every started card's backend for a snapshot (see [`BlkSlot::quiesce`] and
    /// [`NetSlot::quiesce`]); a card whose backend could not stop is given up on, and on a
    /// refusal the caller starts those stopped so far again
    /// ([`PciDevices::unquiesce_backends`]).
    pub fn quiesce_backends(&self) -> Result<(), String> {
        for (bus, card) in self.cards_lock().iter() {
            let token = self.token_of(bus);
            let stopped = match card {
                PluggedCard::Disk(card) => card.with_device(BlkSlot::quiesce).map_err(|e| {
                    if matches!(e, QuiesceError::Failed(_)) {
                        self.hangups.fail(token, card.transport());
                    }
                    e.to_string()
                }),
                PluggedCard::Nic(card) => card.with_device(NetSlot::quiesce).inspect_err(|_| {
                    self.hangups.fail(token, card.transport());
                }),
            };
            stopped.map_err(|why| format!("the card in {bus}: {why}"))?;
        }
        Ok(())
    }

    /// Starts the backends [`PciDevices::quiesce_backends`] stopped again; one that cannot
    /// start is given up on.
    pub fn unquiesce_backends(&self) {
        for (bus, card) in self.cards_lock().iter() {
            let token = self.token_of(bus);
            let started = match card {
                PluggedCard::Disk(card) => card
                    .with_device(BlkSlot::unquiesce)
                    .inspect_err(|_| self.hangups.fail(token, card.transport())),
                PluggedCard::Nic(card) => card
                    .with_device(NetSlot::unquiesce)
                    .inspect_err(|_| self.hangups.fail(token, card.transport())),
            };
            if let Err(e) = started {
                log::warn!("the card in {bus}: {e}; it fails from now on");
            }
        }
    }

    /// Answers the kicks of the card behind `token` that it serves itself: a failed disk's
    /// requests, a NIC's frames with no backend.
    pub fn serve_kicks(&self, token: u64) {
        let Some(bus) = self.port_id(token) else {
            return;
        };
        match self.cards_lock().get(bus) {
            Some(PluggedCard::Disk(card)) => card.with_device(BlkSlot::serve_empty_ring),
            Some(PluggedCard::Nic(card)) => card.with_device(NetSlot::drop_tx),
            None => {}
        }
    }

    /// The segment.
    pub fn host(&self) -> &Arc<PcieHost> {
        &self.host
    }

    /// Plugs a virtio-blk card served by `plugged` into root port `bus`. A refusal hands the
    /// disk back when it is still usable.
    pub fn plug_disk(&self, bus: &str, plugged: PluggedDisk) -> Result<(), PlugRefused> {
        if let Err(e) = self.check_free(bus) {
            return Err(PlugRefused {
                why: e.to_string(),
                disk: Some(Box::new(plugged)),
            });
        }
        let port = self.port_index(bus);
        let socket = plugged.disk.socket();
        let device = BlkSlot::card(
            bus,
            port,
            self.memory.clone(),
            self.kicks.clone(),
            card_token(port),
            plugged,
        )
        .map_err(|e| PlugRefused {
            why: e.why,
            disk: e.disk,
        })?;
        let card = self
            .card(device)
            .map_err(|why| PlugRefused { why, disk: None })?;
        self.plug_card(bus, card, PluggedCard::Disk)
            .map_err(|why| PlugRefused { why, disk: None })?;
        self.hangups.watch(card_token(port), socket);
        Ok(())
    }

    /// The token root port `bus`'s card reports kicks and hang-ups under.
    fn token_of(&self, bus: &str) -> u64 {
        card_token(self.port_index(bus))
    }

    /// Root port `bus`'s position among the command line's ports (its cards' token).
    fn port_index(&self, bus: &str) -> u64 {
        self.host
            .ports
            .iter()
            .position(|p| p.id == bus)
            .map_or(u64::from(u8::MAX), |i| i as u64)
    }

    /// Whether root port `bus` exists and has room for a card.
    fn check_free(&self, bus: &str) -> Result<(), PlugError> {
        self.host.with_port(bus, |port| {
            if port.occupied() {
                Err(PlugError::Occupied(bus.to_string()))
            } else {
                Ok(())
            }
        })
    }

    /// The MAC address of a NIC card in root port `bus` when `device_add` gives none:
    /// locally administered, the last byte the port's number.
    pub fn default_mac(&self, bus: &str) -> [u8; 6] {
        let port = self
            .host
            .ports
            .iter()
            .find(|p| p.id == bus)
            .map_or(0, |p| p.config.port);
        [0x52, 0x54, 0x00, 0xc1, 0x7b, port]
    }

    /// Plugs a virtio-net card served by `nic` into root port `bus`, with MAC address `mac`.
    /// A refusal hands the NIC back when it is still usable.
    pub fn plug_nic(
        &self,
        bus: &str,
        nic: PluggedNic,
        mac: [u8; 6],
    ) -> Result<(), (String, Option<Box<PluggedNic>>)> {
        if let Err(e) = self.check_free(bus) {
            return Err((e.to_string(), Some(Box::new(nic))));
        }
        let port = self.port_index(bus);
        let socket = nic.conn.socket();
        let mut slot = NetSlot::new(
            port,
            self.memory.clone(),
            self.kicks.clone(),
            card_token(port),
        );
        slot.make_card(bus, mac);
        slot.plug(nic).map_err(|e| (e.why, e.nic))?;
        let card = self.card(slot).map_err(|why| (why, None))?;
        self.plug_card(bus, card, PluggedCard::Nic)
            .map_err(|why| (why, None))?;
        self.hangups.watch(card_token(port), socket);
        Ok(())
    }

    /// Whether root port `bus` exists and is free, as one line if not.
    pub fn check_plug(&self, bus: &str) -> Result<(), String> {
        self.check_free(bus).map_err(|e| e.to_string())
    }

    /// Plugs host PCI function `host`, opened by the launcher as `handle`, into root port
    /// `bus`: see [`VfioPciCard`].
    pub fn plug_vfio(&self, bus: &str, host: &str, handle: VfioHandle) -> Result<(), String> {
        self.check_plug(bus)?;
        let port_device = self
            .host
            .ports
            .iter()
            .find(|p| p.id == bus)
            .map_or(0, |p| p.device);
        let card = VfioPciCard::new(
            host,
            handle,
            &self.memory,
            self.routes.clone(),
            self.passthrough.clone(),
            port_device,
        )
        .map_err(|e| format!("host {host}: {e}"))?;
        self.host
            .plug(bus, Box::new(card))
            .map_err(|e| e.to_string())
    }

    /// Builds a card around `device`: a vector per queue and one for configuration changes.
    fn card<D: VirtioDevice + 'static>(&self, device: D) -> Result<VirtioPciCard<D>, String> {
        let queues = device.queue_max_sizes().len();
        let vectors = u16::try_from(queues + 1)
            .ok()
            .filter(|&v| v <= super::virtio_pci::MAX_VECTORS)
            .ok_or_else(|| {
                format!(
                    "a PCI card has at most {} queues",
                    super::virtio_pci::MAX_VECTORS - 1
                )
            })?;
        let interrupt =
            MsixInterrupt::new(self.routes.clone(), vectors, queues).map_err(|e| e.to_string())?;
        let activation = self.activation.try_clone().map_err(|e| e.to_string())?;
        let transport = VirtioMmioTransport::new(device, Arc::new(interrupt))
            .map_err(|e| e.to_string())?
            .with_deferred_activation(activation);
        Ok(VirtioPciCard::new(transport, vectors, self.wiring.clone()))
    }

    /// Puts `card` into root port `bus`, keeping a handle on its device.
    fn plug_card<D: VirtioDevice + 'static>(
        &self,
        bus: &str,
        card: VirtioPciCard<D>,
        plugged: impl FnOnce(CardHandle<D>) -> PluggedCard,
    ) -> Result<(), String> {
        let handle = card.handle();
        self.host
            .plug(bus, Box::new(card))
            .map_err(|e| e.to_string())?;
        self.cards_lock().insert(bus.to_string(), plugged(handle));
        Ok(())
    }

    fn cards_lock(&self) -> MutexGuard<'_, BTreeMap<String, PluggedCard>> {
        self.cards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the guest to release the card in root port `bus`.
    pub fn request_unplug(&self, bus: &str) -> Result<(), PlugError> {
        self.host.request_unplug(bus)
    }

    /// Takes out the cards the guest released; their frontends come back, still connected,
    /// for their block nodes and netdevs.
    pub fn take_ejected(&self) -> Vec<Ejected> {
        let ejected = self.host.take_ejected();
        let mut cards = self.cards_lock();
        ejected
            .into_iter()
            .map(|(bus, card)| {
                drop(card);
                let (disk, nic) = match cards.remove(&bus) {
                    Some(PluggedCard::Disk(disk)) => {
                        let plugged = disk.with_device(BlkSlot::unplug);
                        if let Some(plugged) = &plugged {
                            self.hangups
                                .unwatch(self.token_of(&bus), plugged.disk.socket());
                        }
                        (plugged.map(|p| p.disk), None)
                    }
                    Some(PluggedCard::Nic(nic)) => {
                        let plugged = nic.with_device(NetSlot::unplug);
                        if let Some(plugged) = &plugged {
                            self.hangups
                                .unwatch(self.token_of(&bus), plugged.conn.socket());
                        }
                        (None, plugged)
                    }
                    None => (None, None),
                };
                Ejected { bus, disk, nic }
            })
            .collect()
    }

    /// Starts every card's device whose driver asked since the last call.
    pub fn run_pending_activations(&self) {
        for card in self.cards_lock().values() {
            card.run_pending_activation();
        }
    }
}
