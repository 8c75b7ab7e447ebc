//! Disks served by vhost-user backends the user started (qemu-storage-daemon, another
//! Citadel's citadel-blk), attached at run time the way QEMU attaches them: `chardev-add`
//! connects to the backend's Unix socket, `device_add {"driver":"vhost-user-blk-device",
//! "chardev":..}` plugs the disk into a hot-replace disk slot (the guest sees its new size),
//! `device_del` takes it out and closes the connection, and the chardev stays until
//! `chardev-remove`. A chardev serves one device at a time.
//!
//! The VMM, confined, may create no socket: the device launcher connects on its behalf and
//! hands the connected socket over (see [`citadel_launcher::connect`]), or the management
//! connects and passes the socket with `getfd`. A chardev whose connection a device used and
//! closed connects again at its next `device_add` (the backend is expected to accept a new
//! frontend, as qemu-storage-daemon does); one whose socket was passed cannot, and says so.
//!
//! The backend is untrusted like any vhost-user peer, and must honour the slot's fixed
//! features and request limits, which the guest's driver negotiated at boot
//! ([`VhostUserBlk::check_fits_slot`]): one that cannot is refused, naming the limit.
//!
//! Every refusal leaves the chardevs and the slots as they were, but for the connection a
//! `device_add` refused after the handshake began has used up: a chardev on a path connects
//! again at the next one, one on a passed socket is left disconnected.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use citadel_launcher::Launcher;
use citadel_qmp::chardev::{ChardevAdd, ChardevInfo, ChardevSocket};
use citadel_qmp::device::DeviceAdd;
use citadel_qmp::error::QmpError;
use serde_json::{json, Value};

use crate::devices::blk_slot::PluggedDisk;
use crate::devices::manager::DeviceManager;
use crate::devices::vhost_user::BACKEND_TIMEOUT;
use crate::devices::vhost_user_blk::VhostUserBlk;
use crate::hotplug::free_disk_slot;

/// Chardevs one VM may have at once: each may hold a connection.
pub const MAX_CHARDEVS: usize = 8;

/// The device models that plug a chardev's backend into a disk slot: StratoVirt's name for a
/// vhost-user-blk device on the lightweight machine, and the `-mmio` spelling of Citadel's
/// other slot drivers.
pub const VHOST_USER_BLK_DRIVERS: [&str; 2] = ["vhost-user-blk-device", "vhost-user-blk-mmio"];

/// What a chardev disk's slot reports as its node name (`query-block` shows it): a chardev
/// is no block node, and `:` can appear in no node name, so the two never meet.
fn node_name_of(chardev: &str) -> String {
    format!("chardev:{chardev}")
}

/// The chardev whose disk reports `node_name`, when it is such a disk.
pub fn chardev_of(node_name: &str) -> Option<&str> {
    node_name.strip_prefix("chardev:")
}

/// A Unix socket leading to a vhost-user backend.
struct Chardev {
    /// What `query-chardev` and `query-block` show: `unix:PATH` or `fd:NAME`.
    filename: String,
    /// The path to connect to again; `None` for a socket passed with `getfd`.
    path: Option<String>,
    /// The connection, until a device takes it.
    socket: Option<UnixStream>,
    /// The device using the chardev.
    device: Option<String>,
}

impl Chardev {
    /// The backend, for errors and `query-block`: its socket path, or `fd:NAME`.
    fn peer(&self) -> String {
        self.path.clone().unwrap_or_else(|| self.filename.clone())
    }
}

/// The chardevs of one VM.
#[derive(Default)]
pub struct Chardevs {
    chardevs: BTreeMap<String, Chardev>,
}

impl Chardevs {
    /// `chardev-add`: connects, through `launcher`, to the socket path `add` names, or takes
    /// the socket `passed` gives (asked for only once the id is known to be free: a passed
    /// descriptor is consumed).
    pub fn chardev_add(
        &mut self,
        launcher: &Launcher,
        add: &ChardevAdd,
        passed: impl FnOnce(&str) -> Result<OwnedFd, QmpError>,
    ) -> Result<Value, QmpError> {
        if self.chardevs.contains_key(&add.id) {
            return Err(QmpError::generic(format!(
                "Chardev '{}' already exists",
                add.id
            )));
        }
        if self.chardevs.len() >= MAX_CHARDEVS {
            return Err(QmpError::generic(format!(
                "Too many chardevs: at most {MAX_CHARDEVS}"
            )));
        }
        let (socket, filename, path) = match &add.socket {
            ChardevSocket::Path(path) => (
                connect(launcher, path)?,
                format!("unix:{path}"),
                Some(path.clone()),
            ),
            ChardevSocket::Fd(name) => (passed_socket(passed(name)?)?, format!("fd:{name}"), None),
        };
        log::info!("chardev {}: {filename}", add.id);
        self.chardevs.insert(
            add.id.clone(),
            Chardev {
                filename,
                path,
                socket: Some(socket),
                device: None,
            },
        );
        Ok(json!({}))
    }

    /// Records the chardev of a vhost-user-blk device of the command line, connected at start
    /// by the VMM itself: listed, in use for good (such a device leaves no slot).
    pub fn add_static(&mut self, id: &str, path: &str, device: &str) {
        self.chardevs.insert(
            id.to_string(),
            Chardev {
                filename: format!("unix:{path}"),
                path: Some(path.to_string()),
                socket: None,
                device: Some(device.to_string()),
            },
        );
    }

    /// `chardev-remove`: closes a chardev no device uses.
    pub fn chardev_remove(&mut self, id: &str) -> Result<Value, QmpError> {
        let chardev = self
            .chardevs
            .get(id)
            .ok_or_else(|| QmpError::generic(format!("Chardev '{id}' not found")))?;
        if chardev.device.is_some() {
            return Err(QmpError::generic(format!("Chardev '{id}' is busy")));
        }
        self.chardevs.remove(id);
        log::info!("chardev {id}: removed");
        Ok(json!({}))
    }

    /// `query-chardev`.
    pub fn query(&self) -> Vec<ChardevInfo> {
        self.chardevs
            .iter()
            .map(|(id, c)| ChardevInfo {
                label: id.clone(),
                filename: c.filename.clone(),
                frontend_open: c.device.is_some(),
            })
            .collect()
    }

    /// The backend of the disk whose slot reports `node_name`, for `query-block`: its
    /// socket path, or `fd:NAME` for a socket passed with `getfd`.
    pub fn socket_of(&self, node_name: &str) -> Option<String> {
        let id = chardev_of(node_name)?;
        self.chardevs.get(id).map(Chardev::peer)
    }

    /// `device_add` of a vhost-user-blk device: the backend behind chardev `add.chardev`
    /// goes into disk slot `add.addr` (the first free one when absent).
    pub fn device_add(
        &mut self,
        launcher: &Launcher,
        devices: &DeviceManager,
        add: &DeviceAdd,
    ) -> Result<Value, QmpError> {
        for (member, given) in [
            ("drive", add.drive.is_some()),
            ("netdev", add.netdev.is_some()),
            ("mac", add.mac.is_some()),
        ] {
            if given {
                return Err(QmpError::unexpected_parameter(member));
            }
        }
        let addr = free_disk_slot(devices, add)?;
        let chardev_id = add
            .chardev
            .as_deref()
            .ok_or_else(|| QmpError::missing_parameter("chardev"))?;
        let chardev = self.chardevs.get_mut(chardev_id).ok_or_else(|| {
            QmpError::generic(format!(
                "Property '{}.chardev' can't find value '{chardev_id}'",
                add.driver
            ))
        })?;
        if chardev.device.is_some() {
            return Err(QmpError::generic(format!(
                "Property '{}.chardev' can't take value '{chardev_id}', it's in use",
                add.driver
            )));
        }
        // The connection is used up by this attempt whatever its outcome; the next one
        // connects again.
        let socket = match (chardev.socket.take(), &chardev.path) {
            (Some(socket), _) => socket,
            (None, Some(path)) => connect(launcher, path)?,
            (None, None) => {
                return Err(QmpError::generic(format!(
                    "Chardev '{chardev_id}' is disconnected: its socket was passed with getfd and a device_add has used it; chardev-remove it and add a new one"
                )))
            }
        };
        let peer = chardev.peer();
        let disk = VhostUserBlk::from_stream(socket, PathBuf::from(&peer), BACKEND_TIMEOUT)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        disk.check_fits_slot().map_err(|why| {
            QmpError::generic(format!(
                "Device {} cannot take the backend at {peer}: {why}",
                add.id
            ))
        })?;
        let plugged = PluggedDisk {
            device_id: add.id.clone(),
            node_name: node_name_of(chardev_id),
            disk,
        };
        devices
            .plug_disk(addr, plugged)
            .map_err(|e| QmpError::generic(e.why))?;
        log::info!(
            "device {}: disk slot {addr} served by the backend at {peer} (chardev {chardev_id})",
            add.id
        );
        chardev.device = Some(add.id.clone());
        Ok(json!({}))
    }

    /// `device_del` of a vhost-user-blk device: it leaves its slot and its connection closes;
    /// the chardev stays. `None` when no chardev serves a device with that id.
    pub fn device_del(&mut self, devices: &DeviceManager, id: &str) -> Option<String> {
        let chardev = self
            .chardevs
            .values_mut()
            .find(|c| c.device.as_deref() == Some(id))?;
        let plugged = devices.unplug_disk(id)?;
        drop(plugged.disk);
        chardev.device = None;
        Some(id.to_string())
    }
}

/// Connects to `path` through the launcher, with QEMU's words on failure.
fn connect(launcher: &Launcher, path: &str) -> Result<UnixStream, QmpError> {
    launcher
        .connect(path)
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// A descriptor passed as a chardev's socket, refused unless it is a socket (a connected
/// stream is the backend's business: the vhost-user handshake fails on anything else).
fn passed_socket(fd: OwnedFd) -> Result<UnixStream, QmpError> {
    // SAFETY: `stat` is plain data, which fstat fills.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor owned here writes into the live `stat` above. The raw
    // syscall, since the C library's fstat (newfstatat) and std's metadata (statx) are not
    // in the confined event loop's allowlist.
    if unsafe { libc::syscall(libc::SYS_fstat, fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(QmpError::generic(format!(
            "Cannot use the descriptor passed: {}",
            std::io::Error::last_os_error()
        )));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(QmpError::generic(
            "The descriptor passed is not a socket: connect a Unix socket to the backend and pass that",
        ));
    }
    Ok(UnixStream::from(fd))
}
