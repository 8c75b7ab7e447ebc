//! Block hotplug over QMP on the lightweight machine: `blockdev-add` starts a `citadel-blk`
//! through the launcher and connects a vhost-user frontend to it, `device_add` plugs it into
//! a hot-replace disk slot, `device_del` takes it out and, as on StratoVirt's lightweight
//! machine, releases the node and ends its backend process too (the guide never calls
//! `blockdev-del` there); `blockdev-del` ends a node that no device uses.
//!
//! Disks on the command line take the same path: each `-drive` is a `blockdev-add` made
//! before anything else is created, each `-device virtio-blk-device` a `device_add` into the
//! next slot before the vCPUs run, so the guest finds the disk's capacity at probe and
//! `device_del` takes it out like any other.
//!
//! An image named `/dev/fdset/N` is not opened by path: the backend gets a duplicate of a
//! descriptor of fd set N (see [`PassedFds::open`]), passed with `add-fd` or `-add-fd`.
//!
//! NICs go through the same commands (see [`crate::net_hotplug`]), and so do disks served by
//! backends the user started (see [`crate::chardev`]): `device_add` dispatches on the driver,
//! `device_del` on the id.
//!
//! Every refusal leaves the registry, the slots and the processes as they were.
//!
//! A plugged disk's backend that dies (or hangs up its socket) is restarted: the event loop
//! learns of the hang-up (see [`crate::devices::backend_hangups`]) and
//! [`Hotplug::restart_backends`] stops what is left of the old process, asks the launcher
//! for a new one on the same image with the same options, and puts it behind the slot, which
//! hands it the inflight area so that no request the guest queued is lost or answered twice.
//! A plugged NIC's backend is restarted the same way on the same tap (see
//! [`crate::net_hotplug`]), without an inflight area: a frame may be sent twice or lost. At
//! most `RESTART_BUDGET` restarts per `RESTART_WINDOW`, each tried as many times as
//! `RESTART_BACKOFF` has pauses; past that the disk fails: its requests get I/O errors, the
//! driver sees DEVICE_NEEDS_RESET, one error line is logged, and `device_del` still takes it
//! out.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use citadel_launcher::{BlkSpec, ImageSource, Launcher, LauncherError};
use citadel_qmp::chardev::{ChardevAdd, ChardevInfo, ChardevSocket};
use citadel_qmp::device::{BlockdevAdd, DeviceAdd};
use citadel_qmp::error::QmpError;
use citadel_qmp::fds::fdset_of;
use citadel_qmp::netdev::{NetdevAdd, Tap};
use serde_json::{json, Value};

use crate::chardev::{Chardevs, VHOST_USER_BLK_DRIVERS};
use crate::cli::{
    BlkDeviceConfig, ChardevConfig, DriveConfig, NetdevConfig, NetdevTap, NicDeviceConfig,
    PciDeviceConfig, VhostUserBlkConfig,
};
use crate::devices::blk_slot::PluggedDisk;
use crate::devices::manager::{DeviceManager, HungUp};
use crate::devices::pcie::{CardBackend, PciDevices, PlugError, PlugRefused};
use crate::devices::vhost_user::{VhostUserConnection, BACKEND_TIMEOUT};
use crate::devices::vhost_user_blk::VhostUserBlk;
use crate::net_hotplug::{Netdevs, NIC_DRIVER};
use crate::passed_fds::PassedFds;

/// Block nodes one VM may have at once: each is a process.
pub const MAX_NODES: usize = 16;

/// The device model of a hot-replace disk slot.
const DISK_DRIVER: &str = "virtio-blk-mmio";
/// The device model of a disk behind a PCI Express root port (q35).
const PCI_DISK_DRIVER: &str = "virtio-blk-pci";
/// The device model of a NIC behind a PCI Express root port (q35).
const PCI_NIC_DRIVER: &str = "virtio-net-pci";
/// `device_add`'s driver for a host PCI function passed through (q35).
const VFIO_DRIVER: &str = "vfio-pci";

/// Most restarts of one disk's backend within [`RESTART_WINDOW`]: a backend that keeps
/// dying (an image it cannot serve, a bug a guest request triggers) is given up on rather
/// than restarted forever.
pub const RESTART_BUDGET: usize = 3;
/// The window [`RESTART_BUDGET`] counts restarts in.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The pause before each attempt to restart a backend. The event loop waits through them, so
/// they stay short.
const RESTART_BACKOFF: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(200),
];

/// A block node: an image served by a backend process.
struct Node {
    filename: String,
    read_only: bool,
    direct: bool,
    serial: Option<String>,
    /// A duplicate of the image descriptor for an image from a descriptor, kept to start a
    /// backend again; `None` for an image the launcher opens by `filename`.
    image_fd: Option<OwnedFd>,
    /// The backend process; `None` once it died and none replaced it.
    pid: Option<i32>,
    /// When the backend was restarted, within the last [`RESTART_WINDOW`].
    restarts: Vec<Instant>,
    /// The frontend, while no device uses the node; a plugged disk lives in its slot.
    disk: Option<VhostUserBlk>,
    /// The device using the node.
    device: Option<String>,
}

/// A card plugged into a root port.
struct PciCard {
    bus: String,
    backend: PciBackend,
}

/// What serves a PCI card.
enum PciBackend {
    /// A disk's block node.
    Node(String),
    /// A NIC's netdev.
    Netdev(String),
    /// A host PCI function, by address, held open by the launcher.
    Host(String),
}

/// What a `device_del` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// The device is gone: announce it now.
    Done(String),
    /// The guest was asked to release the device; it is announced once it has.
    Requested,
}

/// A disk of the command line that could not be set up, as one line naming it.
#[derive(Debug, thiserror::Error)]
pub enum ColdPlugError {
    /// A `-drive` whose backend could not be started.
    #[error("-drive {id}: {why}")]
    Drive {
        /// The drive's id.
        id: String,
        /// What went wrong.
        why: String,
    },
    /// A `-device virtio-blk-device` that could not be plugged.
    #[error("-device virtio-blk-device {id}: {why}")]
    Device {
        /// The device's id.
        id: String,
        /// What went wrong.
        why: String,
    },
    /// A `-device virtio-blk-pci` or `virtio-net-pci` that could not be plugged.
    #[error("-device {driver} {id}: {why}")]
    PciDevice {
        /// The device model.
        driver: String,
        /// The device's id.
        id: String,
        /// What went wrong.
        why: String,
    },
    /// A `-netdev` whose backend could not be started.
    #[error("-netdev {id}: {why}")]
    Netdev {
        /// The netdev's id.
        id: String,
        /// What went wrong.
        why: String,
    },
    /// A `-device virtio-net-device` that could not be plugged.
    #[error("-device virtio-net-device {id}: {why}")]
    Nic {
        /// The device's id.
        id: String,
        /// What went wrong.
        why: String,
    },
    /// A `-chardev` no device uses that could not be connected.
    #[error("-chardev {id}: {why}")]
    Chardev {
        /// The chardev's id.
        id: String,
        /// What went wrong.
        why: String,
    },
}

/// The block nodes, the netdevs, the launcher that starts their backends, and the
/// descriptors passed to the VM that images may come from.
pub struct Hotplug {
    launcher: Result<Launcher, String>,
    nodes: BTreeMap<String, Node>,
    /// PCI cards by device id: their root port and what serves them.
    pci_cards: BTreeMap<String, PciCard>,
    netdevs: Netdevs,
    chardevs: Chardevs,
    fds: PassedFds,
}

impl Hotplug {
    /// Hotplug through `launcher`, or refusing every `blockdev-add`, `netdev_add` and NIC
    /// `device_add` with the reason there is none.
    pub fn new(launcher: Result<Launcher, String>) -> Self {
        Hotplug {
            launcher,
            nodes: BTreeMap::new(),
            pci_cards: BTreeMap::new(),
            fds: PassedFds::new(),
            netdevs: Netdevs::default(),
            chardevs: Chardevs::default(),
        }
    }

    /// The device launcher, or why there is none.
    pub fn launcher(&self) -> Result<&Launcher, &str> {
        self.launcher.as_ref().map_err(String::as_str)
    }

    /// The descriptors passed to the VM (`getfd`, `add-fd`, `-add-fd`).
    pub fn fds_mut(&mut self) -> &mut PassedFds {
        &mut self.fds
    }

    /// The descriptors passed to the VM, for `query-fdsets`.
    pub fn fds(&self) -> &PassedFds {
        &self.fds
    }

    /// Starts a backend for each of the command line's drives, in order, as `blockdev-add`
    /// would, with the serial number of the device in `disks` that uses it; a relative image
    /// path is taken from `cwd`. On a refusal the caller drops the whole `Hotplug`, which
    /// ends the launcher and every backend already started.
    pub fn add_drives(
        &mut self,
        drives: &[DriveConfig],
        disks: &[BlkDeviceConfig],
        cwd: &Path,
    ) -> Result<(), ColdPlugError> {
        for drive in drives {
            let refuse = |why: String| ColdPlugError::Drive {
                id: drive.id.clone(),
                why,
            };
            let path = cwd.join(&drive.file);
            let filename = path
                .to_str()
                .ok_or_else(|| refuse(format!("{} is not valid UTF-8", path.display())))?;
            let serial = disks
                .iter()
                .find(|d| d.drive == drive.id)
                .and_then(|d| d.serial.clone());
            let add = BlockdevAdd {
                node_name: drive.id.clone(),
                filename: filename.to_string(),
                read_only: drive.read_only,
                direct: drive.direct,
            };
            self.add_node(&add, serial).map_err(|e| refuse(e.desc))?;
            // A node is only ever plugged into a slot: one that cannot fit is refused now,
            // while a refusal still leaves nothing behind.
            let fits = self
                .nodes
                .get(&drive.id)
                .and_then(|node| node.disk.as_ref())
                .map_or(Ok(()), VhostUserBlk::check_fits_slot);
            if let Err(why) = fits {
                self.release(&drive.id);
                return Err(refuse(if drive.direct {
                    format!("{why} (direct=on aligns I/O to the image's direct I/O block size)")
                } else {
                    why
                }));
            }
        }
        Ok(())
    }

    /// Starts a backend for each of the command line's netdevs, in order, as `netdev_add`
    /// would; a `fds=` netdev's tap is its entry in `taps` (by netdev id). On a refusal the
    /// caller drops the whole `Hotplug`, which ends the launcher and every backend already
    /// started.
    pub fn add_netdevs(
        &mut self,
        netdevs: &[NetdevConfig],
        mut taps: BTreeMap<String, OwnedFd>,
    ) -> Result<(), ColdPlugError> {
        for netdev in netdevs {
            let refuse = |e: QmpError| ColdPlugError::Netdev {
                id: netdev.id.clone(),
                why: e.desc,
            };
            match &netdev.tap {
                NetdevTap::Ifname(name) => {
                    let add = NetdevAdd {
                        id: netdev.id.clone(),
                        tap: Tap::Ifname(name.clone()),
                    };
                    self.netdev_add(&add).map_err(refuse)?;
                }
                NetdevTap::Fd(fd) => {
                    let add = NetdevAdd {
                        id: netdev.id.clone(),
                        tap: Tap::Fd(format!("fds={fd}")),
                    };
                    let tap = taps.remove(&netdev.id).ok_or_else(|| {
                        refuse(QmpError::generic(format!("descriptor {fd} was not taken")))
                    })?;
                    let launcher = available(&self.launcher).map_err(refuse)?;
                    self.netdevs
                        .netdev_add(launcher, &add, || Ok(vec![tap]))
                        .map_err(refuse)?;
                }
            }
        }
        Ok(())
    }

    /// Records the command line's chardevs: those of its vhost-user-blk devices as in use,
    /// and connects the others, as `chardev-add` would, for a later `device_add`; a relative
    /// path is taken from `cwd`. On a refusal the caller drops the whole `Hotplug`.
    pub fn add_chardevs(
        &mut self,
        disks: &[VhostUserBlkConfig],
        chardevs: &[ChardevConfig],
        cwd: &Path,
    ) -> Result<(), ColdPlugError> {
        for (i, disk) in disks.iter().enumerate() {
            let device = disk
                .id
                .clone()
                .unwrap_or_else(|| format!("vhost-user-blk-device #{i}"));
            self.chardevs
                .add_static(&disk.chardev, &disk.socket.to_string_lossy(), &device);
        }
        for chardev in chardevs {
            let refuse = |why: String| ColdPlugError::Chardev {
                id: chardev.id.clone(),
                why,
            };
            let path = cwd.join(&chardev.path);
            let path = path
                .to_str()
                .ok_or_else(|| refuse(format!("{} is not valid UTF-8", path.display())))?;
            let add = ChardevAdd {
                id: chardev.id.clone(),
                socket: ChardevSocket::Path(path.to_string()),
            };
            self.chardev_add(&add).map_err(|e| refuse(e.desc))?;
        }
        Ok(())
    }

    /// Plugs the command line's virtio-blk devices into the disk slots and its virtio-net
    /// devices into the NIC slots in order, slot 0 first. Run before the vCPUs do: the
    /// guest's driver then finds each disk's capacity and each NIC's link up at probe.
    pub fn cold_plug(
        &mut self,
        devices: &DeviceManager,
        disks: &[BlkDeviceConfig],
        nics: &[NicDeviceConfig],
    ) -> Result<(), ColdPlugError> {
        for (slot, nic) in nics.iter().enumerate() {
            let add = DeviceAdd {
                driver: NIC_DRIVER.to_string(),
                id: nic.id.clone(),
                addr: Some(slot.to_string()),
                drive: None,
                netdev: Some(nic.netdev.clone()),
                mac: nic.mac,
                chardev: None,
                bus: None,
                host: None,
            };
            self.device_add(devices, &add)
                .map_err(|e| ColdPlugError::Nic {
                    id: nic.id.clone(),
                    why: e.desc,
                })?;
        }
        for disk in disks {
            let add = DeviceAdd {
                driver: DISK_DRIVER.to_string(),
                id: disk.id.clone(),
                addr: Some(disk.slot.to_string()),
                drive: Some(disk.drive.clone()),
                netdev: None,
                mac: None,
                chardev: None,
                bus: None,
                host: None,
            };
            self.device_add(devices, &add)
                .map_err(|e| ColdPlugError::Device {
                    id: disk.id.clone(),
                    why: e.desc,
                })?;
        }
        Ok(())
    }

    /// Plugs the command line's PCI cards into their root ports (q35), as `device_add`
    /// would, before the vCPUs run; the slots then start as a machine reset leaves occupied
    /// ones, powered with the card present, so the guest finds the cards when it first
    /// enumerates the bus rather than through hotplug events.
    pub fn cold_plug_pci(
        &mut self,
        devices: &DeviceManager,
        cards: &[PciDeviceConfig],
    ) -> Result<(), ColdPlugError> {
        for card in cards {
            let add = DeviceAdd {
                driver: card.driver.clone(),
                id: card.id.clone(),
                addr: None,
                drive: card.drive.clone(),
                netdev: card.netdev.clone(),
                mac: card.mac,
                chardev: None,
                bus: Some(card.bus.clone()),
                host: card.host.clone(),
            };
            self.device_add(devices, &add)
                .map_err(|e| ColdPlugError::PciDevice {
                    driver: card.driver.clone(),
                    id: card.id.clone(),
                    why: e.desc,
                })?;
        }
        if let (Some(pci), false) = (devices.pci(), cards.is_empty()) {
            pci.host().reset();
        }
        Ok(())
    }

    /// `blockdev-add`.
    pub fn blockdev_add(&mut self, add: &BlockdevAdd) -> Result<Value, QmpError> {
        self.add_node(add, None)
    }

    /// Starts the backend of node `add`, answering the guest's GET_ID with `serial`.
    fn add_node(&mut self, add: &BlockdevAdd, serial: Option<String>) -> Result<Value, QmpError> {
        if self.nodes.contains_key(&add.node_name) {
            return Err(QmpError::generic(format!(
                "{} is already registered.",
                add.node_name
            )));
        }
        if self.nodes.len() >= MAX_NODES {
            return Err(QmpError::generic(format!(
                "Too many block nodes: at most {MAX_NODES}"
            )));
        }
        let launcher = self
            .launcher
            .as_ref()
            .map_err(|why| QmpError::generic(format!("Block hotplug is unavailable: {why}")))?;
        let image_fd = match fdset_of(&add.filename) {
            Some(fdset_id) => Some(self.fds.open(&add.filename, fdset_id?, add.read_only)?),
            None => None,
        };
        let mut node = Node {
            filename: add.filename.clone(),
            read_only: add.read_only,
            direct: add.direct,
            serial,
            image_fd,
            pid: None,
            restarts: Vec::new(),
            disk: None,
            device: None,
        };
        let backend = launcher
            .spawn_blk(node.spec(&add.node_name)?)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let peer = PathBuf::from(format!("citadel-blk[{}] ({})", backend.pid, add.node_name));
        let disk = match VhostUserBlk::from_stream(backend.socket, peer, BACKEND_TIMEOUT) {
            Ok(disk) => disk,
            Err(e) => {
                stop(launcher, backend.pid);
                return Err(QmpError::generic(e.to_string()));
            }
        };
        log::info!(
            "block node {}: {} served by citadel-blk[{}]{}",
            add.node_name,
            add.filename,
            backend.pid,
            if add.read_only { ", read-only" } else { "" }
        );
        node.pid = Some(backend.pid);
        node.disk = Some(disk);
        self.nodes.insert(add.node_name.clone(), node);
        Ok(json!({}))
    }

    /// `blockdev-del`.
    pub fn blockdev_del(&mut self, node_name: &str) -> Result<Value, QmpError> {
        let node = self.nodes.get(node_name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{node_name}'"))
        })?;
        if let Some(device) = &node.device {
            return Err(QmpError::generic(format!(
                "Node '{node_name}' is busy: device '{device}' uses it"
            )));
        }
        self.release(node_name);
        Ok(json!({}))
    }

    /// `netdev_add`. A tap passed with `getfd` is taken from the named descriptors, as
    /// QEMU's monitor takes it; a tap named is attached by the launcher (in the jail's network
    /// namespace, with the launcher's rights).
    pub fn netdev_add(&mut self, add: &NetdevAdd) -> Result<Value, QmpError> {
        let launcher = available(&self.launcher)?;
        let fds = &mut self.fds;
        self.netdevs.netdev_add(launcher, add, || match &add.tap {
            Tap::Ifname(name) => launcher
                .open_tap(name)
                .map(|queue| vec![queue])
                .map_err(|e| QmpError::generic(e.to_string())),
            Tap::Fd(name) => Ok(vec![fds.take(name)?]),
        })
    }

    /// `netdev_del`.
    pub fn netdev_del(&mut self, id: &str) -> Result<Value, QmpError> {
        let launcher = available(&self.launcher)?;
        self.netdevs.netdev_del(launcher, id)
    }

    /// `chardev-add`.
    pub fn chardev_add(&mut self, add: &ChardevAdd) -> Result<Value, QmpError> {
        let launcher = reachable(&self.launcher)?;
        let fds = &mut self.fds;
        self.chardevs
            .chardev_add(launcher, add, |name| fds.take(name))
    }

    /// `chardev-remove`.
    pub fn chardev_remove(&mut self, id: &str) -> Result<Value, QmpError> {
        self.chardevs.chardev_remove(id)
    }

    /// `query-chardev`.
    pub fn query_chardev(&self) -> Vec<ChardevInfo> {
        self.chardevs.query()
    }

    /// `device_add`: a disk or a NIC, by its driver.
    pub fn device_add(
        &mut self,
        devices: &DeviceManager,
        add: &DeviceAdd,
    ) -> Result<Value, QmpError> {
        let vhost_user_blk = VHOST_USER_BLK_DRIVERS.contains(&add.driver.as_str());
        if [PCI_DISK_DRIVER, PCI_NIC_DRIVER, VFIO_DRIVER].contains(&add.driver.as_str()) {
            return self.pci_card_add(devices, add);
        }
        if add.host.is_some() {
            return Err(QmpError::unexpected_parameter("host"));
        }
        if devices.pci().is_some() && (add.driver == DISK_DRIVER || add.driver == NIC_DRIVER) {
            return Err(QmpError::generic(format!(
                "{} is the microvm machine's; the q35 machine hot-plugs {PCI_DISK_DRIVER} and {PCI_NIC_DRIVER} behind a pcie-root-port",
                add.driver
            )));
        }
        if add.driver != DISK_DRIVER && add.driver != NIC_DRIVER && !vhost_user_blk {
            let known = if devices.pci().is_some() {
                format!("{PCI_DISK_DRIVER}, {PCI_NIC_DRIVER} and {VFIO_DRIVER}")
            } else {
                format!(
                    "{DISK_DRIVER}, {} and {NIC_DRIVER}",
                    VHOST_USER_BLK_DRIVERS[0]
                )
            };
            return Err(QmpError::generic(format!(
                "Unsupported replaceable device type. ({}; this machine hot-plugs {known})",
                add.driver
            )));
        }
        if add.bus.is_some() {
            return Err(QmpError::unexpected_parameter("bus"));
        }
        self.check_id_free(devices, &add.id)?;
        if vhost_user_blk {
            let launcher = reachable(&self.launcher)?;
            return self.chardevs.device_add(launcher, devices, add);
        }
        if add.chardev.is_some() {
            return Err(QmpError::unexpected_parameter("chardev"));
        }
        if add.driver == NIC_DRIVER {
            let launcher = available(&self.launcher)?;
            return self.netdevs.device_add(launcher, devices, add);
        }
        if add.netdev.is_some() {
            return Err(QmpError::unexpected_parameter("netdev"));
        }
        if add.mac.is_some() {
            return Err(QmpError::unexpected_parameter("mac"));
        }
        let addr = free_disk_slot(devices, add)?;
        let (node_name, disk) = self.take_disk(add)?;
        let plugged = PluggedDisk {
            device_id: add.id.clone(),
            node_name: node_name.clone(),
            disk,
        };
        match devices.plug_disk(addr, plugged) {
            Ok(()) => Ok(json!({})),
            Err(e) => {
                self.plug_refused(&node_name, e.disk.map(|plugged| plugged.disk));
                Err(QmpError::generic(e.why))
            }
        }
    }

    /// The disk `add` asks for: block node `add.drive`'s frontend, which is then used by
    /// device `add.id` until [`Hotplug::plug_refused`] or the device leaves.
    fn take_disk(&mut self, add: &DeviceAdd) -> Result<(String, VhostUserBlk), QmpError> {
        let node_name = add
            .drive
            .as_deref()
            .ok_or_else(|| QmpError::missing_parameter("drive"))?;
        let node = self
            .nodes
            .get_mut(node_name)
            .ok_or_else(|| QmpError::generic(format!("Failed to find block node '{node_name}'")))?;
        if let Some(device) = &node.device {
            return Err(QmpError::generic(format!(
                "Node '{node_name}' is already in use by device '{device}'"
            )));
        }
        let Some(disk) = node.disk.take() else {
            return Err(QmpError::generic(format!(
                "Node '{node_name}' has no usable backend"
            )));
        };
        node.device = Some(add.id.clone());
        Ok((node_name.to_string(), disk))
    }

    /// A disk taken with [`Hotplug::take_disk`] was not plugged: its frontend goes back to
    /// the node, or, used up (the backend failed while taking the ring), the node goes.
    fn plug_refused(&mut self, node_name: &str, disk: Option<VhostUserBlk>) {
        match (disk, self.nodes.get_mut(node_name)) {
            (Some(disk), Some(node)) => {
                node.device = None;
                node.disk = Some(disk);
            }
            _ => self.release(node_name),
        }
    }

    /// Refuses a device id a disk slot, NIC slot or PCI card already uses.
    fn check_id_free(&self, devices: &DeviceManager, id: &str) -> Result<(), QmpError> {
        let in_slot = |plugged: Option<&(String, String)>| plugged.is_some_and(|(d, _)| d == id);
        let taken = self.pci_cards.contains_key(id)
            || devices
                .disk_slots()
                .iter()
                .any(|s| in_slot(s.plugged.as_ref()))
            || devices
                .nic_slots()
                .iter()
                .any(|s| in_slot(s.plugged.as_ref()));
        if taken {
            return Err(QmpError::generic(format!("{id} is already registered.")));
        }
        Ok(())
    }

    /// `device_add` of a virtio-blk-pci disk or a virtio-net-pci NIC into a root port (q35):
    /// the node's or netdev's backend serves a new card, which the guest is told of through
    /// the port's slot.
    fn pci_card_add(
        &mut self,
        devices: &DeviceManager,
        add: &DeviceAdd,
    ) -> Result<Value, QmpError> {
        let Some(pci) = devices.pci() else {
            return Err(QmpError::generic(format!(
                "{} needs the q35 machine (-machine q35); this machine hot-plugs {DISK_DRIVER} and {NIC_DRIVER}",
                add.driver
            )));
        };
        let nic = add.driver == PCI_NIC_DRIVER;
        let vfio = add.driver == VFIO_DRIVER;
        for (present, name) in [
            (add.netdev.is_some() && !nic, "netdev"),
            (add.mac.is_some() && !nic, "mac"),
            (add.drive.is_some() && (nic || vfio), "drive"),
            (add.chardev.is_some(), "chardev"),
            (add.host.is_some() && !vfio, "host"),
        ] {
            if present {
                return Err(QmpError::unexpected_parameter(name));
            }
        }
        self.check_id_free(devices, &add.id)?;
        let bus = add
            .bus
            .as_deref()
            .ok_or_else(|| QmpError::missing_parameter("bus"))?;
        match add.slot().transpose()? {
            None | Some(0) => {}
            Some(_) => {
                return Err(QmpError::generic(format!(
                    "Invalid addr for device {}: a root port has one slot, addr 0x0",
                    add.id
                )))
            }
        }
        let backend = if vfio {
            self.pci_vfio_add(pci, bus, add)?
        } else if nic {
            self.pci_nic_add(pci, bus, add)?
        } else {
            self.pci_disk_add(pci, bus, add)?
        };
        self.pci_cards.insert(
            add.id.clone(),
            PciCard {
                bus: bus.to_string(),
                backend,
            },
        );
        self.pin_for_passthrough(devices);
        Ok(json!({}))
    }

    /// The disk half of [`Hotplug::pci_card_add`].
    fn pci_disk_add(
        &mut self,
        pci: &PciDevices,
        bus: &str,
        add: &DeviceAdd,
    ) -> Result<PciBackend, QmpError> {
        let (node_name, disk) = self.take_disk(add)?;
        let plugged = PluggedDisk {
            device_id: add.id.clone(),
            node_name: node_name.clone(),
            disk,
        };
        match pci.plug_disk(bus, plugged) {
            Ok(()) => Ok(PciBackend::Node(node_name)),
            Err(PlugRefused { why, disk }) => {
                self.plug_refused(&node_name, disk.map(|plugged| plugged.disk));
                Err(QmpError::generic(why))
            }
        }
    }

    /// The NIC half of [`Hotplug::pci_card_add`]: without `mac`, the card's MAC address is
    /// locally administered and names the root port.
    fn pci_nic_add(
        &mut self,
        pci: &PciDevices,
        bus: &str,
        add: &DeviceAdd,
    ) -> Result<PciBackend, QmpError> {
        let launcher = available(&self.launcher)?;
        let nic = self.netdevs.take_nic(add)?;
        let netdev_id = nic.netdev_id.clone();
        let mac = add.mac.unwrap_or_else(|| pci.default_mac(bus));
        match pci.plug_nic(bus, nic, mac) {
            Ok(()) => Ok(PciBackend::Netdev(netdev_id)),
            Err((why, nic)) => {
                self.netdevs
                    .plug_refused(launcher, add, nic.map(|nic| nic.conn));
                Err(QmpError::generic(why))
            }
        }
    }

    /// The passthrough half of [`Hotplug::pci_card_add`]: the launcher opens host function
    /// `add.host` and keeps its group until the card has left; the card gets the device.
    fn pci_vfio_add(
        &self,
        pci: &PciDevices,
        bus: &str,
        add: &DeviceAdd,
    ) -> Result<PciBackend, QmpError> {
        let launcher = available(&self.launcher)?;
        let host = add
            .host
            .as_deref()
            .ok_or_else(|| QmpError::missing_parameter("host"))?;
        let host = citadel_pci::address::host_function(host).ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid host '{host}': expected a PCI address such as 0000:00:01.0"
            ))
        })?;
        pci.check_plug(bus).map_err(QmpError::generic)?;
        let handle = launcher
            .open_vfio(&host)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        match pci.plug_vfio(bus, &host, handle) {
            Ok(()) => {
                log::info!("{}: host {host} plugged into {bus}", add.id);
                Ok(PciBackend::Host(host))
            }
            Err(why) => {
                release_host(launcher, &host);
                Err(QmpError::generic(why))
            }
        }
    }

    /// Tells the balloon whether guest RAM is pinned for a passed-through function (a
    /// `vfio-pci` card is plugged or on its way out): what it inflates or reports then stays
    /// backed. Runs on the event loop, as the balloon's queues are served, so no page is
    /// discarded between a function's DMA mapping and this.
    fn pin_for_passthrough(&self, devices: &DeviceManager) {
        if let Some(balloon) = devices.balloon() {
            let pinned = self
                .pci_cards
                .values()
                .any(|card| matches!(card.backend, PciBackend::Host(_)));
            balloon.inhibit_discard(pinned);
        }
    }

    /// `device_del`: a disk leaves its slot and its node and backend process end; a NIC
    /// leaves its slot and its netdev stays; a PCI card's guest is asked to release it (see
    /// [`Hotplug::pci_ejected`]).
    pub fn device_del(&mut self, devices: &DeviceManager, id: &str) -> Result<Deletion, QmpError> {
        if let Some(card) = self.pci_cards.get(id) {
            let pci = devices
                .pci()
                .ok_or_else(|| QmpError::device_not_found(id))?;
            return match pci.request_unplug(&card.bus) {
                Ok(()) => Ok(Deletion::Requested),
                Err(PlugError::AlreadyRemoving(_)) => Err(QmpError::generic(format!(
                    "Device {id} is already in the process of unplug"
                ))),
                Err(e) => Err(QmpError::generic(e.to_string())),
            };
        }
        if let Some(id) = self.chardevs.device_del(devices, id) {
            return Ok(Deletion::Done(id));
        }
        let Some(plugged) = devices.unplug_disk(id) else {
            return self
                .netdevs
                .device_del(devices, id)
                .map(Deletion::Done)
                .ok_or_else(|| QmpError::device_not_found(id));
        };
        drop(plugged.disk);
        self.release(&plugged.node_name);
        Ok(Deletion::Done(id.to_string()))
    }

    /// Takes out the PCI cards the guest has released and returns their device ids, to be
    /// announced. A disk's node and a NIC's netdev get their frontends back, still connected
    /// to their backends, for another `device_add`, until `blockdev-del` or `netdev_del` ends
    /// the backend.
    pub fn pci_ejected(&mut self, devices: &DeviceManager) -> Vec<String> {
        let Some(pci) = devices.pci() else {
            return Vec::new();
        };
        let mut deleted = Vec::new();
        for ejected in pci.take_ejected() {
            let Some(id) = self
                .pci_cards
                .iter()
                .find(|(_, card)| card.bus == ejected.bus)
                .map(|(id, _)| id.clone())
            else {
                continue;
            };
            match self.pci_cards.remove(&id).map(|card| card.backend) {
                Some(PciBackend::Node(node_name)) => {
                    if let Some(node) = self.nodes.get_mut(&node_name) {
                        node.device = None;
                        node.disk = ejected.disk;
                    }
                }
                Some(PciBackend::Netdev(netdev_id)) => self
                    .netdevs
                    .give_back(&netdev_id, ejected.nic.map(|nic| nic.conn)),
                Some(PciBackend::Host(host)) => {
                    if let Ok(launcher) = self.launcher.as_ref() {
                        release_host(launcher, &host);
                    }
                }
                None => {}
            }
            log::info!("{id}: released by the guest, removed from {}", ejected.bus);
            deleted.push(id);
        }
        self.pin_for_passthrough(devices);
        deleted
    }

    /// `query-block`: one entry per disk slot (microvm) and one per PCI disk card (q35), in
    /// QEMU's shape; a plugged slot and every card have `inserted`.
    pub fn query_block(&self, devices: &DeviceManager) -> Value {
        let slots = devices.disk_slots().into_iter().map(|slot| {
            let qdev = format!("disk-slot-{}", slot.addr);
            self.block_entry(qdev, slot.plugged)
        });
        let cards = self
            .pci_cards
            .iter()
            .filter_map(|(id, card)| match &card.backend {
                PciBackend::Node(node_name) => {
                    Some(self.block_entry(id.clone(), Some((id.clone(), node_name.clone()))))
                }
                _ => None,
            });
        Value::Array(slots.chain(cards).collect())
    }

    /// One `query-block` entry: `qdev` names the slot, or the device once plugged, which
    /// `plugged` gives with its block node.
    fn block_entry(&self, qdev: String, plugged: Option<(String, String)>) -> Value {
        let mut entry = json!({
            "device": "",
            "qdev": qdev,
            "locked": false,
            "removable": true,
            "type": "unknown",
        });
        if let Some((id, node_name)) = plugged {
            let node = self.nodes.get(&node_name);
            entry["qdev"] = json!(id);
            entry["inserted"] = json!({
                "node-name": node_name,
                "file": node
                    .map(|n| n.filename.clone())
                    .or_else(|| self.chardevs.socket_of(&node_name))
                    .unwrap_or_default(),
                "ro": node.is_some_and(|n| n.read_only),
                "drv": "raw",
                "encrypted": false,
                "backing_file_depth": 0,
                "detect_zeroes": "off",
                "cache": {
                    "writeback": true,
                    "direct": node.is_some_and(|n| n.direct),
                    "no-flush": false,
                },
            });
        }
        entry
    }

    /// Ends node `node_name`'s backend process and forgets the node.
    fn release(&mut self, node_name: &str) {
        if let Some(node) = self.nodes.remove(node_name) {
            drop(node.disk);
            match (&self.launcher, node.pid) {
                (Ok(launcher), Some(pid)) => {
                    stop(launcher, pid);
                    log::info!("block node {node_name}: released, citadel-blk[{pid}] ended");
                }
                _ => log::info!("block node {node_name}: released"),
            }
        }
    }

    /// Restarts the backend of every plugged disk or NIC whose backend hung up, or fails the
    /// device when that is not possible. Called by the event loop.
    pub fn restart_backends(&mut self, devices: &DeviceManager) {
        for hung_up in devices.hung_up() {
            let started = Instant::now();
            match hung_up {
                HungUp::Disk {
                    addr,
                    device_id,
                    node_name,
                } => self.restart_disk(
                    &device_id,
                    &node_name,
                    started,
                    &|disk| devices.replace_disk_backend(addr, disk),
                    &|| devices.fail_disk_backend(addr),
                ),
                HungUp::Card(card) => {
                    let Some(pci) = devices.pci() else {
                        continue;
                    };
                    match &card.backend {
                        CardBackend::Node(node_name) => self.restart_disk(
                            &card.device_id,
                            node_name,
                            started,
                            &|disk| pci.replace_disk_backend(&card.bus, disk),
                            &|| pci.fail_disk_backend(&card.bus),
                        ),
                        CardBackend::Netdev(netdev_id) => self.restart_nic(
                            &card.device_id,
                            netdev_id,
                            started,
                            &|conn| pci.replace_nic_backend(&card.bus, conn),
                            &|| pci.fail_nic_backend(&card.bus),
                        ),
                    }
                }
                HungUp::Nic {
                    addr,
                    device_id,
                    netdev_id,
                } => self.restart_nic(
                    &device_id,
                    &netdev_id,
                    started,
                    &|conn| devices.replace_nic_backend(addr, conn),
                    &|| devices.fail_nic_backend(addr),
                ),
            }
        }
    }

    /// Restarts the backend of NIC `device_id` (netdev `netdev_id`), whose slot or card
    /// takes the new one with `replace`, or, when that is not possible, has it fail with
    /// `fail`.
    fn restart_nic(
        &mut self,
        device_id: &str,
        netdev_id: &str,
        started: Instant,
        replace: &dyn Fn(VhostUserConnection) -> Result<(), String>,
        fail: &dyn Fn(),
    ) {
        let restarted = available(&self.launcher)
            .map_err(|e| e.desc)
            .and_then(|launcher| self.netdevs.restart(launcher, netdev_id, replace));
        match restarted {
            Ok(pid) => log::warn!(
                "NIC {device_id}: its backend hung up; citadel-net[{pid}] took over in {} ms",
                started.elapsed().as_millis()
            ),
            Err(why) => {
                fail();
                log::error!(
                    "NIC {device_id}: its backend hung up and cannot be restarted ({why}); its link is down and the device needs a reset"
                );
            }
        }
    }

    /// Restarts the backend of disk `device_id` (node `node_name`), whose slot or card takes
    /// the new one with `replace`, or, when that is not possible, has it fail with `fail`.
    fn restart_disk(
        &mut self,
        device_id: &str,
        node_name: &str,
        started: Instant,
        replace: &dyn Fn(VhostUserBlk) -> Result<(), String>,
        fail: &dyn Fn(),
    ) {
        match self.restart_blk(node_name, replace) {
            Ok(pid) => log::warn!(
                "disk {device_id}: its backend hung up; citadel-blk[{pid}] took over in {} ms",
                started.elapsed().as_millis()
            ),
            Err(why) => {
                fail();
                log::error!(
                    "disk {device_id}: its backend hung up and cannot be restarted ({why}); its requests now fail with I/O errors and the device needs a reset"
                );
            }
        }
    }

    /// Replaces the backend of node `node_name`, whose slot or card takes the new one with
    /// `replace`; returns the new process id.
    fn restart_blk(
        &mut self,
        node_name: &str,
        replace: &dyn Fn(VhostUserBlk) -> Result<(), String>,
    ) -> Result<i32, String> {
        // A backend someone else started may keep no inflight record: replaying its ring from
        // the used index could answer a request twice, so its disk fails instead.
        if let Some(chardev) = crate::chardev::chardev_of(node_name) {
            return Err(format!(
                "its backend, behind chardev {chardev}, was not started by Citadel"
            ));
        }
        let launcher = self.launcher.as_ref().map_err(Clone::clone)?;
        let node = self
            .nodes
            .get_mut(node_name)
            .ok_or_else(|| format!("node {node_name} is gone"))?;
        // What is left of the old process goes first, reaped by the launcher, so that its pid
        // (which the new backend may be given) is never signalled afterwards.
        if let Some(pid) = node.pid.take() {
            if let Err(e) = launcher.stop(pid) {
                log::debug!("citadel-blk[{pid}] is gone already: {e}");
            }
        }
        let mut restarts = std::mem::take(&mut node.restarts);
        let restarted = within_budget(&mut restarts, || {
            let spec = node
                .spec(node_name)
                .map_err(|e| AttemptError::Retry(e.desc))?;
            let backend = launcher.spawn_blk(spec)?;
            let peer = PathBuf::from(format!("citadel-blk[{}] ({node_name})", backend.pid));
            VhostUserBlk::from_stream(backend.socket, peer, BACKEND_TIMEOUT)
                .map_err(|e| e.to_string())
                .and_then(replace)
                .map(|()| backend.pid)
                .map_err(|why| {
                    stop(launcher, backend.pid);
                    AttemptError::Retry(why)
                })
        });
        node.restarts = restarts;
        let pid = restarted?;
        node.pid = Some(pid);
        Ok(pid)
    }
}

impl Node {
    /// What the launcher needs to start a backend for this node.
    fn spec(&self, node_name: &str) -> Result<BlkSpec, QmpError> {
        let image = match &self.image_fd {
            Some(fd) => ImageSource::Fd(fd.try_clone().map_err(|e| {
                QmpError::generic(format!("duplicating the image descriptor: {e}"))
            })?),
            None => ImageSource::Path(PathBuf::from(&self.filename)),
        };
        Ok(BlkSpec {
            id: node_name.to_string(),
            image,
            read_only: self.read_only,
            direct: self.direct,
            serial: self.serial.clone(),
        })
    }
}

/// Why one attempt to start a backend in place of one that died failed.
#[derive(Debug)]
pub enum AttemptError {
    /// Worth another attempt after a pause.
    Retry(String),
    /// No attempt can succeed: the launcher is gone.
    Final(String),
}

impl From<LauncherError> for AttemptError {
    fn from(e: LauncherError) -> Self {
        match e {
            LauncherError::Gone => AttemptError::Final(e.to_string()),
            e => AttemptError::Retry(e.to_string()),
        }
    }
}

/// Runs `attempt`, the start of a backend to replace one that died, after each pause of
/// `RESTART_BACKOFF` until it succeeds or fails for good, if the device was restarted fewer
/// than [`RESTART_BUDGET`] times within [`RESTART_WINDOW`] (`restarts` keeps when); the last
/// failure otherwise.
pub fn within_budget<T>(
    restarts: &mut Vec<Instant>,
    mut attempt: impl FnMut() -> Result<T, AttemptError>,
) -> Result<T, String> {
    restarts.retain(|at| at.elapsed() < RESTART_WINDOW);
    if restarts.len() >= RESTART_BUDGET {
        return Err(format!(
            "it was restarted {RESTART_BUDGET} times within {} s already",
            RESTART_WINDOW.as_secs()
        ));
    }
    restarts.push(Instant::now());
    let mut why = String::new();
    for pause in RESTART_BACKOFF {
        std::thread::sleep(pause);
        match attempt() {
            Ok(done) => return Ok(done),
            Err(AttemptError::Retry(e)) => why = e,
            Err(AttemptError::Final(e)) => return Err(e),
        }
    }
    Err(why)
}

/// The launcher, or why NIC hotplug cannot start backends.
/// Which of `slots` (each an address and whether it is occupied) `add` goes into: the one its
/// `addr` names, or the first free one; refused when that slot does not exist or is occupied.
/// `kind` names the slots when every one is taken. Returns the slot's index in `slots`.
pub(crate) fn free_slot(
    add: &DeviceAdd,
    slots: &[(u64, bool)],
    kind: &str,
) -> Result<usize, QmpError> {
    let index = match add.slot() {
        Some(addr) => {
            let addr = addr?;
            slots
                .iter()
                .position(|&(a, _)| a == addr)
                .ok_or_else(|| QmpError::generic(format!("Invalid addr for device {}", add.id)))?
        }
        None => slots
            .iter()
            .position(|&(_, occupied)| !occupied)
            .ok_or_else(|| QmpError::generic(format!("Every {kind} slot is occupied")))?,
    };
    let (addr, occupied) = slots[index];
    if occupied {
        return Err(QmpError::generic(format!(
            "The slot {addr} is occupied already."
        )));
    }
    Ok(index)
}

/// The disk slot `add` goes into (see [`free_slot`]).
pub(crate) fn free_disk_slot(devices: &DeviceManager, add: &DeviceAdd) -> Result<u64, QmpError> {
    let slots: Vec<(u64, bool)> = devices
        .disk_slots()
        .iter()
        .map(|s| (s.addr, s.plugged.is_some()))
        .collect();
    free_slot(add, &slots, "disk").map(|i| slots[i].0)
}

fn available(launcher: &Result<Launcher, String>) -> Result<&Launcher, QmpError> {
    launcher
        .as_ref()
        .map_err(|why| QmpError::generic(format!("NIC hotplug is unavailable: {why}")))
}

/// The launcher, or why backends the user started cannot be connected to.
fn reachable(launcher: &Result<Launcher, String>) -> Result<&Launcher, QmpError> {
    launcher
        .as_ref()
        .map_err(|why| QmpError::generic(format!("Backends cannot be reached: {why}")))
}

/// Has the launcher let host function `host` go, once the card using it is dropped.
fn release_host(launcher: &Launcher, host: &str) {
    if let Err(e) = launcher.close_vfio(host) {
        log::warn!("host {host}: releasing it: {e}");
    }
}

/// Stops backend `pid` (`what` names it in the log). A backend the launcher no longer runs has
/// exited by itself, as one does when its frontend hangs up, and was reaped already: that is
/// what stopping it was for, so only the launcher's other failures are worth a warning.
pub(crate) fn stop_backend(launcher: &Launcher, what: &str, pid: i32) {
    match launcher.stop(pid) {
        Ok(()) => {}
        Err(LauncherError::Refused(why)) => log::debug!("stopping {what}[{pid}]: {why}"),
        Err(e) => log::warn!("stopping {what}[{pid}]: {e}"),
    }
}

fn stop(launcher: &Launcher, pid: i32) {
    stop_backend(launcher, "citadel-blk", pid);
}
