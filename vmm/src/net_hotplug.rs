//! NIC hotplug over QMP on the lightweight machine: `netdev_add` starts a `citadel-net` on a
//! tap through the launcher and connects a vhost-user frontend to it, `device_add` plugs it
//! into a hot-replace NIC slot (the guest's link comes up), `device_del` takes it out (the
//! link goes down) and, as in StratoVirt's guide, leaves the netdev for `netdev_del`, which
//! ends the backend process.
//!
//! Every refusal leaves the netdevs, the slots and the processes as they were.
//!
//! A netdev holds its tap queue for as long as it exists: a tap named in `netdev_add` is
//! attached by the launcher and its queue kept here, a passed one is kept as passed. A plugged
//! NIC whose citadel-net dies gets a new one ([`Netdevs::restart`]) on a duplicate of that
//! queue, so the tap, with whatever the host configured on it, outlives the dead backend even
//! when the launcher created it.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use citadel_launcher::{Launcher, NetSpec};
use citadel_qmp::device::DeviceAdd;
use citadel_qmp::error::QmpError;
use citadel_qmp::netdev::{NetdevAdd, Tap};
use serde_json::{json, Value};

use crate::devices::manager::DeviceManager;
use crate::devices::net_slot::{PluggedNic, NET_SPEC};
use crate::devices::vhost_user::{VhostUserConnection, BACKEND_TIMEOUT};
use crate::hotplug::{free_slot, stop_backend, within_budget, AttemptError};

/// Network backends one VM may have at once: each is a process.
pub const MAX_NETDEVS: usize = 8;

/// The device model of a hot-replace NIC slot.
pub const NIC_DRIVER: &str = "virtio-net-mmio";

/// A network backend: a tap served by a backend process.
struct Netdev {
    /// The backend process; `None` once it died and none replaced it.
    pid: Option<i32>,
    /// The tap's queues; each backend gets duplicates.
    queues: Vec<OwnedFd>,
    /// When the backend was restarted, within the last restart window.
    restarts: Vec<Instant>,
    /// The frontend, while no device uses the netdev; a plugged NIC lives in its slot.
    conn: Option<VhostUserConnection>,
    /// The device using the netdev.
    device: Option<String>,
}

fn duplicates(fds: &[OwnedFd]) -> Result<Vec<OwnedFd>, String> {
    fds.iter()
        .map(OwnedFd::try_clone)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("duplicating the tap descriptor: {e}"))
}

/// The netdevs of one VM.
#[derive(Default)]
pub struct Netdevs {
    netdevs: BTreeMap<String, Netdev>,
}

impl Netdevs {
    /// `netdev_add`: starts a citadel-net through `launcher` on the tap queues `tap` gives,
    /// which are asked for only once the id is known to be free (a passed descriptor is
    /// consumed, a named tap attached).
    pub fn netdev_add(
        &mut self,
        launcher: &Launcher,
        add: &NetdevAdd,
        tap: impl FnOnce() -> Result<Vec<OwnedFd>, QmpError>,
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
        let queues = tap()?;
        let backend = launcher
            .spawn_net(NetSpec {
                id: add.id.clone(),
                queues: duplicates(&queues).map_err(QmpError::generic)?,
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
                pid: Some(backend.pid),
                queues,
                restarts: Vec::new(),
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
        let taken: Vec<(u64, bool)> = slots
            .iter()
            .map(|s| (s.addr, s.plugged.is_some()))
            .collect();
        let slot = &slots[free_slot(add, &taken, "NIC")?];
        let addr = slot.addr;
        if let Some(mac) = add.mac.filter(|mac| *mac != slot.mac) {
            return Err(QmpError::generic(format!(
                "Device {} cannot have MAC {}: the guest's driver read the MAC of NIC slot {addr}, {}, when it probed the slot at boot, and it does not change",
                add.id,
                format_mac(mac),
                format_mac(slot.mac)
            )));
        }
        let nic = self.take_nic(add)?;
        match devices.plug_nic(addr, nic) {
            Ok(()) => Ok(json!({})),
            Err(e) => {
                self.plug_refused(launcher, add, e.nic.map(|nic| nic.conn));
                Err(QmpError::generic(e.why))
            }
        }
    }

    /// The NIC `add` asks for: netdev `add.netdev`'s frontend, which is then used by device
    /// `add.id` until [`Netdevs::give_back`].
    pub fn take_nic(&mut self, add: &DeviceAdd) -> Result<PluggedNic, QmpError> {
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
        netdev.device = Some(add.id.clone());
        Ok(PluggedNic {
            device_id: add.id.clone(),
            netdev_id: netdev_id.to_string(),
            conn,
        })
    }

    /// A NIC taken with [`Netdevs::take_nic`] was not plugged: its frontend goes back to the
    /// netdev, or, used up (the backend failed while taking the rings), the netdev goes.
    pub fn plug_refused(
        &mut self,
        launcher: &Launcher,
        add: &DeviceAdd,
        conn: Option<VhostUserConnection>,
    ) {
        let Some(netdev_id) = add.netdev.as_deref() else {
            return;
        };
        match conn {
            Some(conn) => self.give_back(netdev_id, Some(conn)),
            None => self.release(launcher, netdev_id),
        }
    }

    /// The device using netdev `netdev_id` left: the netdev takes its frontend back (`None`
    /// when the frontend went with the device).
    pub fn give_back(&mut self, netdev_id: &str, conn: Option<VhostUserConnection>) {
        if let Some(netdev) = self.netdevs.get_mut(netdev_id) {
            netdev.device = None;
            netdev.conn = conn;
        }
    }

    /// `device_del` of a NIC: it leaves its slot; its netdev stays for `netdev_del`. `None`
    /// when no NIC has that id.
    pub fn device_del(&mut self, devices: &DeviceManager, id: &str) -> Option<String> {
        let nic = devices.unplug_nic(id)?;
        self.give_back(&nic.netdev_id, Some(nic.conn));
        Some(id.to_string())
    }

    /// Ends netdev `id`'s backend process and forgets the netdev.
    fn release(&mut self, launcher: &Launcher, id: &str) {
        if let Some(netdev) = self.netdevs.remove(id) {
            drop(netdev.conn);
            match netdev.pid {
                Some(pid) => {
                    stop(launcher, pid);
                    log::info!("netdev {id}: released, citadel-net[{pid}] ended");
                }
                None => log::info!("netdev {id}: released"),
            }
        }
    }

    /// Replaces the backend of netdev `id`, plugged into NIC slot `addr`, which hung up;
    /// returns the new process id. The old process is stopped (reaped by the launcher) before
    /// the new one starts, so that its pid is never signalled afterwards.
    pub fn restart(
        &mut self,
        launcher: &Launcher,
        id: &str,
        replace: &dyn Fn(VhostUserConnection) -> Result<(), String>,
    ) -> Result<i32, String> {
        let netdev = self
            .netdevs
            .get_mut(id)
            .ok_or_else(|| format!("netdev {id} is gone"))?;
        if let Some(pid) = netdev.pid.take() {
            if let Err(e) = launcher.stop(pid) {
                log::debug!("citadel-net[{pid}] is gone already: {e}");
            }
        }
        let queues = &netdev.queues;
        let pid = within_budget(&mut netdev.restarts, || {
            let backend = launcher.spawn_net(NetSpec {
                id: id.to_string(),
                queues: duplicates(queues).map_err(AttemptError::Retry)?,
                mac: None,
            })?;
            let peer = PathBuf::from(format!("citadel-net[{}] ({id})", backend.pid));
            VhostUserConnection::from_stream(backend.socket, peer, NET_SPEC, BACKEND_TIMEOUT)
                .map_err(|e| e.to_string())
                .and_then(replace)
                .map(|()| backend.pid)
                .map_err(|why| {
                    stop(launcher, backend.pid);
                    AttemptError::Retry(why)
                })
        })?;
        netdev.pid = Some(pid);
        Ok(pid)
    }
}

fn stop(launcher: &Launcher, pid: i32) {
    stop_backend(launcher, "citadel-net", pid);
}

/// A MAC address as `52:54:00:c1:7a:00`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let bytes: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    bytes.join(":")
}
