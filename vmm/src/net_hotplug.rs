//! NIC hotplug over QMP on the lightweight machine: `netdev_add` starts a `citadel-net` on a
//! tap through the launcher and connects a vhost-user frontend to it, `device_add` plugs it
//! into a hot-replace NIC slot (the guest's link comes up), `device_del` takes it out (the
//! link goes down) and, as in StratoVirt's guide, leaves the netdev for `netdev_del`, which
//! ends the backend process.
//!
//! Every refusal leaves the netdevs, the slots and the processes as they were.

use std::collections::BTreeMap;
use std::path::PathBuf;

use citadel_launcher::{Launcher, NetSpec, TapSource};
use citadel_qmp::device::DeviceAdd;
use citadel_qmp::error::QmpError;
use citadel_qmp::netdev::{NetdevAdd, Tap};
use serde_json::{json, Value};

use crate::devices::manager::DeviceManager;
use crate::devices::net_slot::{PluggedNic, NET_SPEC};
use crate::devices::vhost_user::{VhostUserConnection, BACKEND_TIMEOUT};

/// Network backends one VM may have at once: each is a process.
pub const MAX_NETDEVS: usize = 8;

/// The device model of a hot-replace NIC slot.
pub const NIC_DRIVER: &str = "virtio-net-mmio";

/// A network backend: a tap served by a backend process.
struct Netdev {
    pid: i32,
    /// The frontend, while no device uses the netdev; a plugged NIC lives in its slot.
    conn: Option<VhostUserConnection>,
    /// The device using the netdev.
    device: Option<String>,
}

/// The netdevs of one VM.
#[derive(Default)]
pub struct Netdevs {
    netdevs: BTreeMap<String, Netdev>,
}

impl Netdevs {
    /// `netdev_add`: starts a citadel-net through `launcher` on the tap `tap` gives, which is
    /// asked for only once the id is known to be free (a passed descriptor is consumed).
    pub fn netdev_add(
        &mut self,
        launcher: &Launcher,
        add: &NetdevAdd,
        tap: impl FnOnce() -> Result<TapSource, QmpError>,
    ) -> Result<Value, QmpError> {
        if self.netdevs.contains_key(&add.id) {
            return Err(QmpError::generic(format!(
                "{} is already registered.",
                add.id
            )));
        }
        if self.netdevs.len() >= MAX_NETDEVS {
            return Err(QmpError::generic(format!(
                "Too many netdevs: at most {MAX_NETDEVS}"
            )));
        }
        let backend = launcher
            .spawn_net(NetSpec {
                id: add.id.clone(),
                tap: tap()?,
                mac: None,
            })
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let peer = PathBuf::from(format!("citadel-net[{}] ({})", backend.pid, add.id));
        let conn =
            match VhostUserConnection::from_stream(backend.socket, peer, NET_SPEC, BACKEND_TIMEOUT)
            {
                Ok(conn) => conn,
                Err(e) => {
                    stop(launcher, backend.pid);
                    return Err(QmpError::generic(e.to_string()));
                }
            };
        let tap = match &add.tap {
            Tap::Ifname(name) => format!("tap {name}"),
            Tap::Fd(name) => format!("the tap passed as '{name}'"),
        };
        log::info!(
            "netdev {}: {tap} served by citadel-net[{}]",
            add.id,
            backend.pid
        );
        self.netdevs.insert(
            add.id.clone(),
            Netdev {
                pid: backend.pid,
                conn: Some(conn),
                device: None,
            },
        );
        Ok(json!({}))
    }

    /// `netdev_del`: ends the backend of a netdev no device uses.
    pub fn netdev_del(&mut self, launcher: &Launcher, id: &str) -> Result<Value, QmpError> {
        let netdev = self
            .netdevs
            .get(id)
            .ok_or_else(|| QmpError::generic(format!("Failed to find netdev '{id}'")))?;
        if let Some(device) = &netdev.device {
            return Err(QmpError::generic(format!(
                "Netdev '{id}' is busy: device '{device}' uses it"
            )));
        }
        self.release(launcher, id);
        Ok(json!({}))
    }

    /// `device_add` of a NIC: plugs the netdev `add.netdev` into NIC slot `add.addr` (the
    /// first free one when absent).
    pub fn device_add(
        &mut self,
        launcher: &Launcher,
        devices: &DeviceManager,
        add: &DeviceAdd,
    ) -> Result<Value, QmpError> {
        if add.drive.is_some() {
            return Err(QmpError::unexpected_parameter("drive"));
        }
        let slots = devices.nic_slots();
        let addr = match add.slot() {
            Some(addr) => addr?,
            None => slots
                .iter()
                .find(|s| s.plugged.is_none())
                .map(|s| s.addr)
                .ok_or_else(|| QmpError::generic("Every NIC slot is occupied"))?,
        };
        let slot = slots
            .iter()
            .find(|s| s.addr == addr)
            .ok_or_else(|| QmpError::generic(format!("Invalid addr for device {}", add.id)))?;
        if slot.plugged.is_some() {
            return Err(QmpError::generic(format!(
                "The slot {addr} is occupied already."
            )));
        }
        if let Some(mac) = add.mac.filter(|mac| *mac != slot.mac) {
            return Err(QmpError::generic(format!(
                "Device {} cannot have MAC {}: the guest's driver read the MAC of NIC slot {addr}, {}, when it probed the slot at boot, and it does not change",
                add.id,
                format_mac(mac),
                format_mac(slot.mac)
            )));
        }
        let netdev_id = add
            .netdev
            .as_deref()
            .ok_or_else(|| QmpError::missing_parameter("netdev"))?;
        let netdev = self
            .netdevs
            .get_mut(netdev_id)
            .ok_or_else(|| QmpError::generic(format!("Failed to find netdev '{netdev_id}'")))?;
        if let Some(device) = &netdev.device {
            return Err(QmpError::generic(format!(
                "Netdev '{netdev_id}' is already in use by device '{device}'"
            )));
        }
        let Some(conn) = netdev.conn.take() else {
            return Err(QmpError::generic(format!(
                "Netdev '{netdev_id}' has no usable backend"
            )));
        };
        let nic = PluggedNic {
            device_id: add.id.clone(),
            netdev_id: netdev_id.to_string(),
            conn,
        };
        match devices.plug_nic(addr, nic) {
            Ok(()) => {
                netdev.device = Some(add.id.clone());
                Ok(json!({}))
            }
            Err(e) => {
                match e.nic {
                    Some(nic) => netdev.conn = Some(nic.conn),
                    // The backend failed while taking the rings: its connection is unusable,
                    // so the netdev goes with it.
                    None => self.release(launcher, netdev_id),
                }
                Err(QmpError::generic(e.why))
            }
        }
    }

    /// `device_del` of a NIC: it leaves its slot; its netdev stays for `netdev_del`. `None`
    /// when no NIC has that id.
    pub fn device_del(&mut self, devices: &DeviceManager, id: &str) -> Option<String> {
        let nic = devices.unplug_nic(id)?;
        if let Some(netdev) = self.netdevs.get_mut(&nic.netdev_id) {
            netdev.device = None;
            netdev.conn = Some(nic.conn);
        }
        Some(id.to_string())
    }

    /// Ends netdev `id`'s backend process and forgets the netdev.
    fn release(&mut self, launcher: &Launcher, id: &str) {
        if let Some(netdev) = self.netdevs.remove(id) {
            drop(netdev.conn);
            stop(launcher, netdev.pid);
            log::info!("netdev {id}: released, citadel-net[{}] ended", netdev.pid);
        }
    }
}

fn stop(launcher: &Launcher, pid: i32) {
    if let Err(e) = launcher.stop(pid) {
        log::warn!("stopping citadel-net[{pid}]: {e}");
    }
}

/// A MAC address as `52:54:00:c1:7a:00`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let bytes: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    bytes.join(":")
}
