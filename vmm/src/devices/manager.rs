//! The machine's devices beyond the legacy ISA ones: the MMIO bus the vCPUs dispatch to, the
//! virtio-mmio slots on it, each with its address and interrupt line, and on q35 the PCI
//! Express segment (see [`crate::devices::pcie`]).
//!
//! Slot `i` sits at the address and raises the GSI that [`layout::virtio_mmio_slot_plan`]
//! gives it; devices take slots in the order they are added, so the same command line always
//! gives the guest the same layout. Everything KVM needs for a slot (the irqfd on its GSI, one
//! ioeventfd per queue on its QueueNotify register) is registered when the device is added,
//! before the vCPUs run: for them the running VMM never changes KVM's I/O or interrupt
//! routing. PCI cards are the exception: the guest places their BARs and enables their MSI-X
//! vectors while it runs, so on q35 their ioeventfds, irqfds and routes follow it.
//!
//! Devices start on the event loop: a driver's DRIVER_OK only signals
//! [`DeviceManager::activation_event`], and the event loop calls
//! [`DeviceManager::run_pending_activations`], so a vCPU never waits for a backend to take
//! the memory table and rings.
//!
//! A device reaches its interrupt only through its transport's
//! [`VirtioInterrupt`](crate::devices::interrupt::VirtioInterrupt): a virtio-mmio line (an
//! irqfd plus the status bits the driver reads) or a PCI card's MSI-X vectors.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use std::os::fd::RawFd;

use vm_memory::GuestMemoryMmap;

use super::backend_hangups::BackendHangups;
use super::balloon::{BalloonHandle, BalloonOptions};
use super::blk_slot::{BlkSlot, PluggedDisk, QuiesceError, SlotError};
use super::mmio_bus::{MmioBus, MmioBusError};
use super::net_slot::{NetSlot, NicSlotError, PluggedNic};
use super::pcie::{HungUpCard, PciDevices, PcieError, PcieHost, RootPortSpec, CARD_TOKEN};
use super::slot_ring::SlotKicks;
use super::vhost_user::VhostUserConnection;
use super::vhost_user_blk::VhostUserBlk;
use super::virtio_mmio::{Interrupt, VirtioDevice, VirtioMmioError, VirtioMmioTransport};
use crate::boot::layout;
use crate::snapshot::transport::TransportSnapshot;

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// Every virtio-mmio slot with an interrupt line of its own is taken.
    #[error(
        "too many virtio devices: the microvm machine has {} virtio-mmio slots",
        layout::VIRTIO_MMIO_GSIS.len()
    )]
    NoFreeSlot,
    /// The transport refused the device.
    #[error(transparent)]
    Transport(#[from] VirtioMmioError),
    /// The slot overlaps something already on the bus.
    #[error(transparent)]
    Bus(#[from] MmioBusError),
    /// An eventfd could not be created.
    #[error("creating the eventfds of virtio-mmio slot {slot}: {source}")]
    EventFd {
        /// The slot.
        slot: u64,
        /// What eventfd() said.
        source: std::io::Error,
    },
    /// KVM refused the irqfd or an ioeventfd.
    #[error("wiring virtio-mmio slot {slot} ({what}): {source}")]
    Kvm {
        /// The slot.
        slot: u64,
        /// What was being registered.
        what: &'static str,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// A root port could not be placed.
    #[error(transparent)]
    Pcie(#[from] PcieError),
}

/// Where a device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    /// Slot index.
    pub slot: u64,
    /// Guest-physical base of the slot's registers.
    pub base: u64,
    /// The GSI (IOAPIC pin) the slot raises.
    pub gsi: u32,
}

impl SlotInfo {
    /// The slot as the DSDT declares it. Slots lie in the 32-bit MMIO gap, below 4 GiB.
    pub fn acpi_node(&self) -> crate::boot::acpi::VirtioMmioNode {
        crate::boot::acpi::VirtioMmioNode {
            index: self.slot as u8,
            base: self.base as u32,
            size: layout::VIRTIO_MMIO_SLOT_SIZE as u32,
            gsi: self.gsi,
        }
    }
}

/// A transport holding any virtio device.
pub type Transport = VirtioMmioTransport<Box<dyn VirtioDevice>>;

/// Registers the KVM side of a slot: the irqfd on its GSI and the queue notify ioeventfds.
/// Implemented by the VM; tests record the calls instead.
pub trait SlotWiring {
    /// Makes a write to `irqfd` raise `gsi`.
    fn register_irqfd(&self, irqfd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    /// Makes a 4-byte guest write of `datamatch` to `addr` signal `evt` without a VM exit to
    /// the VMM.
    fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl SlotWiring for VmFd {
    fn register_irqfd(&self, irqfd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, irqfd, gsi)
    }

    fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_ioevent(self, evt, &IoEventAddress::Mmio(addr), datamatch)
    }
}

/// What the manager does to every slot, whatever its device.
trait SlotControl: Send + Sync {
    fn run_pending_activation(&self);
    fn reset(&self);
    fn save(&self) -> TransportSnapshot;
    fn restore(&self, saved: &TransportSnapshot) -> Result<(), String>;
}

impl<D: VirtioDevice> SlotControl for VirtioMmioTransport<D> {
    fn run_pending_activation(&self) {
        VirtioMmioTransport::run_pending_activation(self)
    }

    fn reset(&self) {
        VirtioMmioTransport::reset(self)
    }

    fn save(&self) -> TransportSnapshot {
        VirtioMmioTransport::save(self)
    }

    fn restore(&self, saved: &TransportSnapshot) -> Result<(), String> {
        VirtioMmioTransport::restore(self, saved)
    }
}

struct Slot {
    info: SlotInfo,
    transport: Arc<dyn SlotControl>,
}

/// A hot-replace disk slot.
struct DiskSlot {
    transport: Arc<VirtioMmioTransport<BlkSlot>>,
}

/// A hot-replace NIC slot.
struct NicSlot {
    transport: Arc<VirtioMmioTransport<NetSlot>>,
}

/// The kick token of NIC slot `index`; disk slots use their index.
const NIC_TOKEN: u64 = 1 << 32;

/// What one NIC slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSlotInfo {
    /// The slot's number (`addr` in `device_add`).
    pub addr: u64,
    /// The MAC address the guest's driver read at probe.
    pub mac: [u8; 6],
    /// The plugged device's id and its netdev's.
    pub plugged: Option<(String, String)>,
}

/// A plugged slot whose backend hung up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HungUp {
    /// A disk slot.
    Disk {
        /// The slot's number.
        addr: u64,
        /// The plugged device's id.
        device_id: String,
        /// Its block node.
        node_name: String,
    },
    /// A NIC slot.
    Nic {
        /// The slot's number.
        addr: u64,
        /// The plugged device's id.
        device_id: String,
        /// Its netdev.
        netdev_id: String,
    },
    /// A disk or NIC card behind a root port (q35).
    Card(HungUpCard),
}

/// What `query-block` shows of one disk slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSlotInfo {
    /// The slot's number (`addr` in `device_add`).
    pub addr: u64,
    /// The plugged device's id and its node name.
    pub plugged: Option<(String, String)>,
}

/// Owns the MMIO bus and the virtio-mmio slots of one machine.
pub struct DeviceManager {
    mmio: Arc<MmioBus>,
    slots: Vec<Slot>,
    disk_slots: Vec<DiskSlot>,
    nic_slots: Vec<NicSlot>,
    kicks: Arc<SlotKicks>,
    hangups: Arc<BackendHangups>,
    activation: EventFd,
    balloon: Option<BalloonHandle>,
    pci: Option<PciDevices>,
}

impl DeviceManager {
    /// A machine with no devices yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(DeviceManager {
            mmio: Arc::new(MmioBus::new()),
            slots: Vec::new(),
            disk_slots: Vec::new(),
            nic_slots: Vec::new(),
            kicks: Arc::new(SlotKicks::new()?),
            hangups: Arc::new(BackendHangups::new()?),
            activation: EventFd::new(EFD_NONBLOCK)?,
            balloon: None,
            pci: None,
        })
    }

    /// Readable when a driver asked for a device to start; the event loop then calls
    /// [`DeviceManager::run_pending_activations`].
    pub fn activation_event(&self) -> &EventFd {
        &self.activation
    }

    /// Starts every device whose driver set DRIVER_OK since the last call. Runs on the event
    /// loop; each start is bounded by its device (a vhost-user device's backend deadline).
    pub fn run_pending_activations(&self) {
        // Drain first: a DRIVER_OK written while the slots are walked signals again.
        let _ = self.activation.read();
        for slot in &self.slots {
            slot.transport.run_pending_activation();
        }
        if let Some(pci) = &self.pci {
            pci.run_pending_activations();
        }
    }

    /// The bus every vCPU dispatches its MMIO exits to.
    pub fn mmio_bus(&self) -> &Arc<MmioBus> {
        &self.mmio
    }

    /// Puts `device` in the next free slot and wires it: its interrupt line, its queue
    /// notifications, its place on the MMIO bus.
    pub fn add_virtio_mmio(
        &mut self,
        wiring: &dyn SlotWiring,
        device: Box<dyn VirtioDevice>,
    ) -> Result<SlotInfo, DeviceManagerError> {
        self.place(wiring, device).map(|(info, _)| info)
    }

    /// Adds `count` empty hot-replace disk slots (see [`BlkSlot`]), numbered from 0 in the
    /// order they are added: `device_add`'s `addr`.
    pub fn add_disk_slots(
        &mut self,
        wiring: &dyn SlotWiring,
        memory: &GuestMemoryMmap,
        count: u64,
    ) -> Result<(), DeviceManagerError> {
        for _ in 0..count {
            let index = self.disk_slots.len() as u64;
            let slot = BlkSlot::new(index, memory.clone(), Arc::clone(&self.kicks));
            let (_, transport) = self.place(wiring, slot)?;
            self.disk_slots.push(DiskSlot { transport });
        }
        Ok(())
    }

    /// Adds `count` empty hot-replace NIC slots (see [`NetSlot`]), numbered from 0 in the
    /// order they are added: `device_add`'s `addr`.
    pub fn add_nic_slots(
        &mut self,
        wiring: &dyn SlotWiring,
        memory: &GuestMemoryMmap,
        count: u64,
    ) -> Result<(), DeviceManagerError> {
        for _ in 0..count {
            let index = self.nic_slots.len() as u64;
            let slot = NetSlot::new(
                index,
                memory.clone(),
                Arc::clone(&self.kicks),
                NIC_TOKEN | index,
            );
            let (_, transport) = self.place(wiring, slot)?;
            self.nic_slots.push(NicSlot { transport });
        }
        Ok(())
    }

    /// Puts a balloon for `ram_bytes` of guest RAM `memory` in the next free slot.
    pub fn add_balloon(
        &mut self,
        wiring: &dyn SlotWiring,
        memory: &GuestMemoryMmap,
        ram_bytes: u64,
        options: &BalloonOptions,
    ) -> Result<SlotInfo, DeviceManagerError> {
        let (device, kicks) = BalloonHandle::device(memory.clone(), options).map_err(|source| {
            DeviceManagerError::EventFd {
                slot: self.slots.len() as u64,
                source,
            }
        })?;
        let (info, transport) = self.place(wiring, device)?;
        self.balloon = Some(BalloonHandle::attach(transport, kicks, ram_bytes));
        Ok(info)
    }

    /// The balloon, if the machine has one.
    pub fn balloon(&self) -> Option<&BalloonHandle> {
        self.balloon.as_ref()
    }

    fn place<D: VirtioDevice + 'static>(
        &mut self,
        wiring: &dyn SlotWiring,
        device: D,
    ) -> Result<(SlotInfo, Arc<VirtioMmioTransport<D>>), DeviceManagerError> {
        let slot = self.slots.len() as u64;
        let (base, gsi) =
            layout::virtio_mmio_slot_plan(slot).ok_or(DeviceManagerError::NoFreeSlot)?;
        let info = SlotInfo {
            slot,
            base: base.0,
            gsi,
        };
        let device_type = device.device_type();
        let kvm = |what| move |source| DeviceManagerError::Kvm { slot, what, source };
        let irqfd = EventFd::new(EFD_NONBLOCK)
            .map_err(|source| DeviceManagerError::EventFd { slot, source })?;
        wiring
            .register_irqfd(&irqfd, gsi)
            .map_err(kvm("interrupt line"))?;
        let activation = self
            .activation
            .try_clone()
            .map_err(|source| DeviceManagerError::EventFd { slot, source })?;
        let transport = Arc::new(
            VirtioMmioTransport::new(device, Arc::new(Interrupt::new(irqfd)))?
                .with_deferred_activation(activation),
        );
        for (addr, datamatch, evt) in transport.notify_ioevents(info.base) {
            wiring
                .register_ioevent(evt, addr, datamatch)
                .map_err(kvm("queue notification"))?;
        }
        self.mmio.insert(
            info.base,
            layout::VIRTIO_MMIO_SLOT_SIZE,
            Arc::clone(&transport) as _,
        )?;
        log::info!(
            "virtio-mmio slot {slot}: device type {device_type} at {:#x}, GSI {gsi}",
            info.base
        );
        self.slots.push(Slot {
            info,
            transport: Arc::clone(&transport) as _,
        });
        Ok((info, transport))
    }

    /// The disk slots and what is plugged into each.
    pub fn disk_slots(&self) -> Vec<DiskSlotInfo> {
        self.disk_slots
            .iter()
            .enumerate()
            .map(|(addr, s)| DiskSlotInfo {
                addr: addr as u64,
                plugged: s.transport.with_device(|slot| {
                    slot.disk()
                        .map(|d| (d.device_id.clone(), d.node_name.clone()))
                }),
            })
            .collect()
    }

    /// Plugs `disk` into disk slot `addr` and raises the slot's configuration change.
    pub fn plug_disk(&self, addr: u64, disk: PluggedDisk) -> Result<(), SlotError> {
        let Some(slot) = usize::try_from(addr)
            .ok()
            .and_then(|a| self.disk_slots.get(a))
        else {
            return Err(SlotError {
                why: format!("Invalid addr for device {}", disk.device_id),
                disk: Some(Box::new(disk)),
            });
        };
        let socket = disk.disk.socket();
        slot.transport.try_update_config(|s| s.plug(disk))?;
        self.hangups.watch(addr, socket);
        Ok(())
    }

    /// Takes the disk with device id `id` out of its slot and raises the slot's
    /// configuration change.
    pub fn unplug_disk(&self, id: &str) -> Option<PluggedDisk> {
        self.disk_slots.iter().enumerate().find_map(|(addr, slot)| {
            let socket = slot.transport.with_device(|s| {
                s.disk()
                    .filter(|d| d.device_id == id)
                    .map(|d| d.disk.socket())
            })?;
            self.hangups.unwatch(addr as u64, socket);
            slot.transport
                .try_update_config(|s| s.unplug().ok_or(()))
                .ok()
        })
    }

    /// What the event loop waits on for hang-ups of the backends of plugged slots.
    pub fn backend_hangups_fd(&self) -> RawFd {
        self.hangups.as_raw_fd()
    }

    /// The slots whose backend hung up (each stays reported until its backend is replaced,
    /// failed or unplugged).
    pub fn hung_up(&self) -> Vec<HungUp> {
        self.hangups
            .ready()
            .into_iter()
            .filter_map(|token| {
                if token & CARD_TOKEN != 0 {
                    return self.pci.as_ref()?.hung_up(token).map(HungUp::Card);
                }
                let addr = token & !NIC_TOKEN;
                let index = usize::try_from(addr).ok()?;
                if token & NIC_TOKEN != 0 {
                    let slot = self.nic_slots.get(index)?;
                    slot.transport.with_device(|s| {
                        s.nic().map(|n| HungUp::Nic {
                            addr,
                            device_id: n.device_id.clone(),
                            netdev_id: n.netdev_id.clone(),
                        })
                    })
                } else {
                    let slot = self.disk_slots.get(index)?;
                    slot.transport.with_device(|s| {
                        s.disk().map(|d| HungUp::Disk {
                            addr,
                            device_id: d.device_id.clone(),
                            node_name: d.node_name.clone(),
                        })
                    })
                }
            })
            .collect()
    }

    /// Replaces the backend of the NIC in NIC slot `addr` with `conn` (see
    /// [`NetSlot::replace_backend`]); the slot's hang-up watch moves to the new socket.
    pub fn replace_nic_backend(&self, addr: u64, conn: VhostUserConnection) -> Result<(), String> {
        let slot = self.nic_slot(addr)?;
        self.hangups
            .replace(NIC_TOKEN | addr, &slot.transport, conn)
    }

    /// Gives up on the backend of the NIC in NIC slot `addr`: its link goes down, the slot
    /// drops what the guest sends, and the driver is told the device needs a reset (see
    /// [`NetSlot::fail_backend`]).
    pub fn fail_nic_backend(&self, addr: u64) {
        if let Ok(slot) = self.nic_slot(addr) {
            self.hangups.fail(NIC_TOKEN | addr, &slot.transport);
        }
    }

    fn nic_slot(&self, addr: u64) -> Result<&NicSlot, String> {
        usize::try_from(addr)
            .ok()
            .and_then(|a| self.nic_slots.get(a))
            .ok_or_else(|| format!("no NIC slot {addr}"))
    }

    /// Replaces the backend of the disk in slot `addr` with `disk` (see
    /// [`BlkSlot::replace_backend`]); the slot's hang-up watch moves to the new socket.
    pub fn replace_disk_backend(&self, addr: u64, disk: VhostUserBlk) -> Result<(), String> {
        let slot = self.disk_slot(addr)?;
        self.hangups.replace(addr, &slot.transport, disk)
    }

    /// Gives up on the backend of the disk in slot `addr`: the slot answers the driver's
    /// requests with I/O errors, and the driver is told the device needs a reset (see
    /// [`BlkSlot::fail_backend`]).
    pub fn fail_disk_backend(&self, addr: u64) {
        if let Ok(slot) = self.disk_slot(addr) {
            self.hangups.fail(addr, &slot.transport);
        }
    }

    fn disk_slot(&self, addr: u64) -> Result<&DiskSlot, String> {
        usize::try_from(addr)
            .ok()
            .and_then(|a| self.disk_slots.get(a))
            .ok_or_else(|| format!("no disk slot {addr}"))
    }

    /// The NIC slots and what is plugged into each.
    pub fn nic_slots(&self) -> Vec<NicSlotInfo> {
        self.nic_slots
            .iter()
            .enumerate()
            .map(|(addr, s)| {
                s.transport.with_device(|slot| NicSlotInfo {
                    addr: addr as u64,
                    mac: slot.mac(),
                    plugged: slot
                        .nic()
                        .map(|n| (n.device_id.clone(), n.netdev_id.clone())),
                })
            })
            .collect()
    }

    /// Plugs `nic` into NIC slot `addr` and raises the slot's configuration change (the link
    /// comes up).
    pub fn plug_nic(&self, addr: u64, nic: PluggedNic) -> Result<(), NicSlotError> {
        let Some(slot) = usize::try_from(addr)
            .ok()
            .and_then(|a| self.nic_slots.get(a))
        else {
            return Err(NicSlotError {
                why: format!("Invalid addr for device {}", nic.device_id),
                nic: Some(Box::new(nic)),
            });
        };
        let socket = nic.conn.socket();
        slot.transport.try_update_config(|s| s.plug(nic))?;
        self.hangups.watch(NIC_TOKEN | addr, socket);
        Ok(())
    }

    /// Takes the NIC with device id `id` out of its slot and raises the slot's configuration
    /// change (the link goes down).
    pub fn unplug_nic(&self, id: &str) -> Option<PluggedNic> {
        self.nic_slots.iter().enumerate().find_map(|(addr, slot)| {
            let socket = slot.transport.with_device(|s| {
                s.nic()
                    .filter(|n| n.device_id == id)
                    .map(|n| n.conn.socket())
            })?;
            self.hangups.unwatch(NIC_TOKEN | addr as u64, socket);
            slot.transport
                .try_update_config(|s| s.unplug().ok_or(()))
                .ok()
        })
    }

    /// What the event loop waits on for kicks of empty hot-replace slots.
    pub fn slot_kicks_fd(&self) -> RawFd {
        self.kicks.as_raw_fd()
    }

    /// Answers the requests queued on empty disk slots and drops the frames queued on empty
    /// NIC slots.
    pub fn serve_empty_slots(&self) {
        for token in self.kicks.ready() {
            if token & CARD_TOKEN != 0 {
                if let Some(pci) = &self.pci {
                    pci.serve_kicks(token);
                }
                continue;
            }
            let index = usize::try_from(token & !NIC_TOKEN).ok();
            if token & NIC_TOKEN != 0 {
                if let Some(slot) = index.and_then(|i| self.nic_slots.get(i)) {
                    slot.transport.with_device(NetSlot::drop_tx);
                }
            } else if let Some(slot) = index.and_then(|i| self.disk_slots.get(i)) {
                slot.transport.with_device(BlkSlot::serve_empty_ring);
            }
        }
    }

    pub fn slots(&self) -> impl Iterator<Item = SlotInfo> + '_ {
        self.slots.iter().map(|s| s.info)
    }

    /// Every slot as the DSDT declares it to the guest.
    pub fn acpi_nodes(&self) -> Vec<crate::boot::acpi::VirtioMmioNode> {
        self.slots().map(|s| s.acpi_node()).collect()
    }

    /// How many devices a snapshot cannot keep: the command line's vhost-user-blk devices,
    /// whose backends are not stopped for one and which a restored machine could not find
    /// again.
    pub fn unsnapshottable_devices(&self) -> usize {
        let fixed =
            self.disk_slots.len() + self.nic_slots.len() + usize::from(self.balloon.is_some());
        self.slots.len().saturating_sub(fixed)
    }

    /// The disk slots and the NIC slots with something plugged, by `addr`.
    pub fn plugged_slots(&self) -> (Vec<u64>, Vec<u64>) {
        let disks = self
            .disk_slots()
            .into_iter()
            .filter(|s| s.plugged.is_some());
        let nics = self.nic_slots().into_iter().filter(|s| s.plugged.is_some());
        (
            disks.map(|s| s.addr).collect(),
            nics.map(|s| s.addr).collect(),
        )
    }

    /// Stops the backends of every started disk and NIC slot for a snapshot of the paused
    /// machine (see [`BlkSlot::quiesce`] and [`NetSlot::quiesce`]); the caller calls
    /// [`DeviceManager::unquiesce_backends`] once the snapshot is written. On a refusal the
    /// backends stopped so far are started again; one that could neither be stopped nor
    /// started again is given up on, as one that died and could not be replaced.
    pub fn quiesce_backends(&self) -> Result<(), String> {
        for (addr, slot) in (0u64..).zip(&self.disk_slots) {
            if let Err(e) = slot.transport.with_device(BlkSlot::quiesce) {
                if matches!(e, QuiesceError::Failed(_)) {
                    self.fail_disk_backend(addr);
                }
                self.unquiesce_backends();
                return Err(format!("disk slot {addr}: {e}"));
            }
        }
        for (addr, slot) in (0u64..).zip(&self.nic_slots) {
            if let Err(e) = slot.transport.with_device(NetSlot::quiesce) {
                self.fail_nic_backend(addr);
                self.unquiesce_backends();
                return Err(format!("NIC slot {addr}: {e}"));
            }
        }
        if let Some(pci) = &self.pci {
            if let Err(e) = pci.quiesce_backends() {
                self.unquiesce_backends();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts the backends [`DeviceManager::quiesce_backends`] stopped again; one that cannot
    /// start is given up on.
    pub fn unquiesce_backends(&self) {
        for (addr, slot) in (0u64..).zip(&self.disk_slots) {
            if let Err(e) = slot.transport.with_device(BlkSlot::unquiesce) {
                log::warn!("disk slot {addr}: {e}; its disk fails from now on");
                self.fail_disk_backend(addr);
            }
        }
        for (addr, slot) in (0u64..).zip(&self.nic_slots) {
            if let Err(e) = slot.transport.with_device(NetSlot::unquiesce) {
                log::warn!("NIC slot {addr}: {e}; its NIC fails from now on");
                self.fail_nic_backend(addr);
            }
        }
        if let Some(pci) = &self.pci {
            pci.unquiesce_backends();
        }
    }

    /// Every slot's transport state, in slot order, for a snapshot.
    pub fn save_transports(&self) -> Vec<TransportSnapshot> {
        self.slots.iter().map(|s| s.transport.save()).collect()
    }

    /// Puts saved transport states back, slot by slot, on a machine no driver has run on.
    /// Refuses another slot count, and stops at the first slot whose saved state its device
    /// refuses (the machine must then not run). A device its driver had started waits, like
    /// one a driver just started, for [`DeviceManager::run_pending_activations`] on the event
    /// loop, which resumes its rings.
    pub fn restore_transports(&self, saved: &[TransportSnapshot]) -> Result<(), String> {
        if saved.len() != self.slots.len() {
            return Err(format!(
                "the snapshot has {} virtio-mmio slots, the command line builds {}",
                saved.len(),
                self.slots.len()
            ));
        }
        for (slot, state) in self.slots.iter().zip(saved) {
            slot.transport
                .restore(state)
                .map_err(|e| format!("virtio-mmio slot {}: {e}", slot.info.slot))?;
        }
        Ok(())
    }

    /// Adds the PCI Express segment with `root_ports` (the q35 machine): its ECAM window goes
    /// on the MMIO bus, and the returned handle serves the configuration ports.
    pub fn add_pcie(
        &mut self,
        vm: Arc<VmFd>,
        memory: &GuestMemoryMmap,
        root_ports: &[RootPortSpec],
    ) -> Result<Arc<PcieHost>, DeviceManagerError> {
        let activation = self
            .activation
            .try_clone()
            .map_err(|source| DeviceManagerError::Pcie(PcieError::EventFd(source)))?;
        let pci = PciDevices::new(
            vm,
            self.mmio.clone(),
            memory,
            root_ports,
            activation,
            self.kicks.clone(),
            self.hangups.clone(),
        )?;
        let host = pci.host().clone();
        self.mmio
            .insert(layout::PCIE_ECAM_BASE, layout::PCIE_ECAM_SIZE, host.clone())?;
        self.pci = Some(pci);
        Ok(host)
    }

    /// The PCI Express segment and its cards, on the q35 machine.
    pub fn pci(&self) -> Option<&PciDevices> {
        self.pci.as_ref()
    }

    /// Resets every device, as a machine reset does: backends stop their rings before the
    /// next boot reuses the memory they pointed into.
    pub fn reset(&self) {
        if let Some(pci) = &self.pci {
            pci.host().reset();
        }
        for slot in &self.slots {
            slot.transport.reset();
        }
        if let Some(balloon) = &self.balloon {
            balloon.reset_target();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_mmio::{ActivateError, ActivateParams};
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// Records what would have been registered with KVM.
    #[derive(Default)]
    struct Recorder {
        irqfds: Mutex<Vec<(i32, u32)>>,
        ioevents: Mutex<Vec<(i32, u64, u32)>>,
        refuse_ioevents: bool,
    }

    impl SlotWiring for Recorder {
        fn register_irqfd(&self, irqfd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.irqfds.lock().unwrap().push((irqfd.as_raw_fd(), gsi));
            Ok(())
        }
        fn register_ioevent(
            &self,
            evt: &EventFd,
            addr: u64,
            datamatch: u32,
        ) -> Result<(), kvm_ioctls::Error> {
            if self.refuse_ioevents {
                return Err(kvm_ioctls::Error::new(libc::ENOSPC));
            }
            self.ioevents
                .lock()
                .unwrap()
                .push((evt.as_raw_fd(), addr, datamatch));
            Ok(())
        }
    }

    struct Dummy {
        queues: Vec<u16>,
        started: Arc<Mutex<usize>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.queues
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, _params: ActivateParams) -> Result<(), ActivateError> {
            *self.started.lock().unwrap() += 1;
            Ok(())
        }
        fn reset(&mut self) {}
    }

    fn dummy(queues: usize) -> Box<dyn VirtioDevice> {
        Box::new(Dummy {
            queues: vec![128; queues],
            started: Arc::default(),
        })
    }

    #[test]
    fn only_command_line_devices_cannot_be_kept_in_a_snapshot() {
        let mut manager = DeviceManager::new().unwrap();
        let memory =
            GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        manager
            .add_disk_slots(&Recorder::default(), &memory, 2)
            .unwrap();
        manager
            .add_nic_slots(&Recorder::default(), &memory, 1)
            .unwrap();
        assert_eq!(manager.unsnapshottable_devices(), 0);
        assert_eq!(manager.plugged_slots(), (vec![], vec![]));
        manager
            .add_virtio_mmio(&Recorder::default(), dummy(1))
            .unwrap();
        assert_eq!(manager.unsnapshottable_devices(), 1);
    }

    #[test]
    fn transport_states_move_slot_by_slot_and_a_slot_count_mismatch_is_refused() {
        let build = |devices: usize| {
            let mut manager = DeviceManager::new().unwrap();
            for _ in 0..devices {
                manager
                    .add_virtio_mmio(&Recorder::default(), dummy(1))
                    .unwrap();
            }
            manager
        };
        let from = build(2);
        // The driver acknowledges the second device only.
        assert!(from.mmio_bus().write(
            0xd000_0000
                + layout::VIRTIO_MMIO_SLOT_SIZE
                + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS),
            &1u32.to_le_bytes()
        ));
        let saved = from.save_transports();
        assert_eq!((saved[0].status, saved[1].status), (0, 1));

        let to = build(2);
        to.restore_transports(&saved).unwrap();
        assert_eq!(to.save_transports(), saved);
        let fewer = build(1);
        assert_eq!(
            fewer.restore_transports(&saved).unwrap_err(),
            "the snapshot has 2 virtio-mmio slots, the command line builds 1"
        );
        assert_eq!(fewer.save_transports()[0].status, 0);
    }

    /// A driver's DRIVER_OK through the bus only signals the activation event; the device
    /// starts when the event loop runs the pending activations.
    #[test]
    fn devices_start_when_the_event_loop_runs_pending_activations() {
        let started = Arc::new(Mutex::new(0));
        let mut manager = DeviceManager::new().unwrap();
        let device = Box::new(Dummy {
            queues: vec![16],
            started: Arc::clone(&started),
        });
        manager
            .add_virtio_mmio(&Recorder::default(), device)
            .unwrap();
        let bus = manager.mmio_bus();
        let w32 = |reg: u32, value: u32| {
            assert!(bus.write(0xd000_0000 + u64::from(reg), &value.to_le_bytes()))
        };
        use virtio_bindings::virtio_mmio::*;
        w32(VIRTIO_MMIO_STATUS, 1);
        w32(VIRTIO_MMIO_STATUS, 3);
        w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w32(VIRTIO_MMIO_STATUS, 11);
        w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10000);
        w32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x11000);
        w32(VIRTIO_MMIO_QUEUE_USED_LOW, 0x12000);
        w32(VIRTIO_MMIO_QUEUE_READY, 1);
        w32(VIRTIO_MMIO_STATUS, 15);
        assert_eq!(*started.lock().unwrap(), 0);
        assert_eq!(manager.activation_event().read().unwrap(), 1);
        manager.activation_event().write(1).unwrap();
        manager.run_pending_activations();
        assert_eq!(*started.lock().unwrap(), 1);
        // The event was drained.
        assert!(manager.activation_event().read().is_err());
    }

    #[test]
    fn devices_take_consecutive_slots_with_their_own_lines() {
        let wiring = Recorder::default();
        let mut manager = DeviceManager::new().unwrap();
        let a = manager.add_virtio_mmio(&wiring, dummy(1)).unwrap();
        let b = manager.add_virtio_mmio(&wiring, dummy(2)).unwrap();
        assert_eq!(
            (a, b),
            (
                SlotInfo {
                    slot: 0,
                    base: 0xd000_0000,
                    gsi: 5
                },
                SlotInfo {
                    slot: 1,
                    base: 0xd000_1000,
                    gsi: 6
                }
            )
        );
        let gsis: Vec<u32> = wiring.irqfds.lock().unwrap().iter().map(|i| i.1).collect();
        assert_eq!(gsis, vec![5, 6]);
        // One ioeventfd per queue on the slot's QueueNotify register, matching the queue index.
        let ioevents: Vec<(u64, u32)> = wiring
            .ioevents
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.1, e.2))
            .collect();
        assert_eq!(
            ioevents,
            vec![(0xd000_0050, 0), (0xd000_1050, 0), (0xd000_1050, 1)]
        );
        let nodes: Vec<(u8, u32, u32, u32)> = manager
            .acpi_nodes()
            .iter()
            .map(|n| (n.index, n.base, n.size, n.gsi))
            .collect();
        assert_eq!(
            nodes,
            vec![(0, 0xd000_0000, 0x1000, 5), (1, 0xd000_1000, 0x1000, 6)]
        );
        // The registers are on the bus: the magic value reads back at each base.
        let mut magic = [0u8; 4];
        assert!(manager.mmio_bus().read(0xd000_1000, &mut magic));
        assert_eq!(&magic, b"virt");
    }

    #[test]
    fn nic_slots_follow_the_disk_slots_with_their_own_macs() {
        let memory =
            GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        let wiring = Recorder::default();
        let mut manager = DeviceManager::new().unwrap();
        manager.add_disk_slots(&wiring, &memory, 6).unwrap();
        manager.add_nic_slots(&wiring, &memory, 2).unwrap();
        let after = manager.add_virtio_mmio(&wiring, dummy(1)).unwrap();
        assert_eq!((after.slot, after.base, after.gsi), (8, 0xd000_8000, 16));
        let nics = manager.nic_slots();
        assert_eq!(
            nics.iter().map(|n| (n.addr, n.mac)).collect::<Vec<_>>(),
            vec![
                (0, [0x52, 0x54, 0x00, 0xc1, 0x7a, 0x00]),
                (1, [0x52, 0x54, 0x00, 0xc1, 0x7a, 0x01])
            ]
        );
        assert!(nics.iter().all(|n| n.plugged.is_none()));
        // Slots 6 and 7 are virtio-net (device ID 1), pins 14 and 15.
        for (base, gsi) in [(0xd000_6000u64, 14u32), (0xd000_7000, 15)] {
            let mut id = [0u8; 4];
            assert!(manager.mmio_bus().read(base + 8, &mut id));
            assert_eq!(u32::from_le_bytes(id), 1);
            assert!(manager
                .acpi_nodes()
                .iter()
                .any(|n| u64::from(n.base) == base && n.gsi == gsi));
        }
        assert!(manager.unplug_nic("net-0").is_none());
    }

    #[test]
    fn the_seventeenth_device_is_refused() {
        let wiring = Recorder::default();
        let mut manager = DeviceManager::new().unwrap();
        for _ in 0..layout::VIRTIO_MMIO_GSIS.len() {
            manager.add_virtio_mmio(&wiring, dummy(1)).unwrap();
        }
        let err = manager.add_virtio_mmio(&wiring, dummy(1)).unwrap_err();
        assert!(matches!(err, DeviceManagerError::NoFreeSlot), "{err}");
        assert_eq!(
            err.to_string(),
            "too many virtio devices: the microvm machine has 16 virtio-mmio slots"
        );
        assert_eq!(manager.slots().count(), 16);
        assert_eq!(wiring.irqfds.lock().unwrap().len(), 16);
    }

    #[test]
    fn a_slot_kvm_refuses_is_not_mapped_and_stays_free() {
        let refusing = Recorder {
            refuse_ioevents: true,
            ..Recorder::default()
        };
        let mut manager = DeviceManager::new().unwrap();
        let err = manager.add_virtio_mmio(&refusing, dummy(1)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("wiring virtio-mmio slot 0 (queue notification): "),
            "{err}"
        );
        let mut data = [0u8; 4];
        assert!(!manager.mmio_bus().read(0xd000_0000, &mut data));
        let info = manager
            .add_virtio_mmio(&Recorder::default(), dummy(1))
            .unwrap();
        assert_eq!(info.slot, 0);
    }
}
