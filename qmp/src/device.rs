//! Arguments of the block and device hotplug commands, in the forms StratoVirt's guide, QEMU
//! and Kata Containers send them:
//!
//! - `blockdev-add {"node-name":"drive-0","file":{"driver":"file","filename":"/img"},
//!   "cache":{"direct":true},"read-only":false}`, also with `"driver":"raw"` and
//!   `file.aio` (Kata);
//! - `device_add {"id":"drive-0","driver":"virtio-blk-mmio","addr":"0x1","drive":"drive-0"}`,
//!   with `addr` in hex or decimal and an ignored `romfile` (Kata), or StratoVirt's `lun`
//!   instead of `addr`: `"lun":0` is slot 1 (vdb), each lun the slot after its number;
//! - `device_add {"id":"net-0","driver":"virtio-net-mmio","addr":"0x0","netdev":"net-0"}`,
//!   with an optional `"mac":"52:54:00:c1:7a:00"`;
//! - `device_add {"id":"disk-1","driver":"vhost-user-blk-device","addr":"0x1","chardev":"c0"}`,
//!   a disk served by a backend the user started (see [`crate::chardev`]);
//! - `device_del {"id":"drive-0"}`, `blockdev-del {"node-name":"drive-0"}`.
//!
//! Only the shape is checked here; whether a slot, file or node exists is the VMM's business.

use serde::Deserialize;

use crate::error::QmpError;

/// Longest `node-name` or device `id` accepted, as QEMU's block layer limits node names.
pub const MAX_ID_LEN: usize = 31;

/// Longest image path accepted (PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// `blockdev-add`: a raw image to be served by a block backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevAdd {
    /// The node name later commands refer to.
    pub node_name: String,
    /// The image.
    pub filename: String,
    /// Open the image read-only and refuse the guest's writes.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
}

/// `device_add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAdd {
    /// The device model (`virtio-blk-mmio`…).
    pub driver: String,
    /// The device's id, used by `device_del`.
    pub id: String,
    /// The slot (`addr`), as given: a hex (`0x1`) or decimal (`1`) string.
    pub addr: Option<String>,
    /// The block node the device serves.
    pub drive: Option<String>,
    /// The network backend the device serves.
    pub netdev: Option<String>,
    /// The MAC address the NIC is to have.
    pub mac: Option<[u8; 6]>,
    /// The chardev leading to the vhost-user backend the device serves.
    pub chardev: Option<String>,
    /// The bus a PCI device goes on (a root port's id on the q35 machine).
    pub bus: Option<String>,
    /// The host PCI function a `vfio-pci` device passes through (`0000:00:01.0`).
    pub host: Option<String>,
}

impl DeviceAdd {
    /// The slot number `addr` names: hex with a `0x` prefix, decimal otherwise.
    pub fn slot(&self) -> Option<Result<u64, QmpError>> {
        self.addr.as_deref().map(|addr| {
            let parsed = match addr.strip_prefix("0x").or_else(|| addr.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => addr.parse(),
            };
            parsed.map_err(|_| QmpError::generic(format!("Invalid addr for device {}", self.id)))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct BlockdevAddArgs {
    node_name: String,
    #[serde(default)]
    driver: Option<String>,
    file: FileArgs,
    #[serde(default)]
    read_only: Option<bool>,
    #[serde(default)]
    cache: Option<CacheArgs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileArgs {
    driver: String,
    filename: String,
    /// How QEMU would submit I/O (`threads`, `native`, `io_uring`): the backend has its own
    /// engine, so any of them is accepted and none changes anything.
    #[serde(default)]
    aio: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CacheArgs {
    #[serde(default)]
    direct: Option<bool>,
    /// Accepted for QEMU's shape; the backend always honours the guest's flushes.
    #[serde(default)]
    no_flush: Option<bool>,
}

impl BlockdevAddArgs {
    pub(crate) fn validate(self) -> Result<BlockdevAdd, QmpError> {
        check_id("node-name", &self.node_name)?;
        if let Some(driver) = self.driver.as_deref() {
            if driver != "raw" {
                return Err(QmpError::unaccepted_value("driver", driver));
            }
        }
        if self.file.driver != "file" {
            return Err(QmpError::unaccepted_value("file.driver", &self.file.driver));
        }
        if let Some(aio) = self.file.aio.as_deref() {
            if !matches!(aio, "threads" | "native" | "io_uring") {
                return Err(QmpError::unaccepted_value("file.aio", aio));
            }
        }
        let filename = self.file.filename;
        if filename.is_empty() || filename.len() > MAX_PATH_LEN || filename.contains('\0') {
            return Err(QmpError::generic(format!(
                "Parameter 'file.filename' expects a path of 1 to {MAX_PATH_LEN} bytes"
            )));
        }
        if self.cache.as_ref().and_then(|c| c.no_flush) == Some(true) {
            return Err(QmpError::generic(
                "cache.no-flush is not supported: guest flushes always reach the disk",
            ));
        }
        Ok(BlockdevAdd {
            node_name: self.node_name,
            filename,
            read_only: self.read_only.unwrap_or(false),
            direct: self.cache.and_then(|c| c.direct).unwrap_or(false),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceAddArgs {
    driver: String,
    id: String,
    #[serde(default)]
    addr: Option<String>,
    #[serde(default)]
    drive: Option<String>,
    #[serde(default)]
    netdev: Option<String>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    chardev: Option<String>,
    #[serde(default)]
    bus: Option<String>,
    #[serde(default)]
    host: Option<String>,
    /// StratoVirt's other way to name the slot: lun N is slot N + 1 (`addr` wins when both
    /// are given, as in StratoVirt).
    #[serde(default)]
    lun: Option<u64>,
    /// Option ROM of a PCI device; Kata passes an empty one for MMIO devices, which have none.
    #[serde(default)]
    romfile: Option<String>,
}

impl DeviceAddArgs {
    pub(crate) fn validate(self) -> Result<DeviceAdd, QmpError> {
        check_id("id", &self.id)?;
        if self.romfile.is_some_and(|r| !r.is_empty()) {
            return Err(QmpError::generic(format!(
                "Device {} has no option ROM: romfile must be empty",
                self.id
            )));
        }
        let mac = match self.mac.as_deref() {
            Some(mac) => Some(parse_mac(mac).ok_or_else(|| {
                QmpError::invalid_parameter_value("mac", "a MAC address such as 52:54:00:12:34:56")
            })?),
            None => None,
        };
        let addr = match (self.addr, self.lun) {
            (None, Some(lun)) => Some(
                lun.checked_add(1)
                    .ok_or_else(|| {
                        QmpError::generic(format!("Invalid addr for device {}", self.id))
                    })?
                    .to_string(),
            ),
            (addr, _) => addr,
        };
        Ok(DeviceAdd {
            driver: self.driver,
            id: self.id,
            addr,
            drive: self.drive,
            netdev: self.netdev,
            mac,
            chardev: self.chardev,
            bus: self.bus,
            host: self.host,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceDelArgs {
    pub(crate) id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct BlockdevDelArgs {
    pub(crate) node_name: String,
}

/// A MAC address written as six colon-separated pairs of hex digits.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Ids and node names: QEMU's rule (a letter first, then letters, digits, `-`, `.`, `_`),
/// which also keeps them printable in logs and errors; `member` names the argument.
pub fn check_id(member: &str, id: &str) -> Result<(), QmpError> {
    let mut chars = id.chars();
    let valid = id.len() <= MAX_ID_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if valid {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Parameter '{member}' expects an identifier: a letter, then at most {} letters, digits, '-', '.' or '_'",
            MAX_ID_LEN - 1
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arguments::from_arguments;
    use serde_json::{json, Value};

    fn blockdev(v: Value) -> Result<BlockdevAdd, QmpError> {
        let Value::Object(m) = v else { unreachable!() };
        from_arguments::<BlockdevAddArgs>(Some(m))?.validate()
    }

    fn device(v: Value) -> Result<DeviceAdd, QmpError> {
        let Value::Object(m) = v else { unreachable!() };
        from_arguments::<DeviceAddArgs>(Some(m))?.validate()
    }

    #[test]
    fn the_guides_and_katas_blockdev_add_are_understood() {
        let guide = blockdev(json!({"node-name":"drive-0","file":{"driver":"file",
            "filename":"/path/to/block"},"cache":{"direct":true},"read-only":false}))
        .unwrap();
        assert_eq!(
            guide,
            BlockdevAdd {
                node_name: "drive-0".into(),
                filename: "/path/to/block".into(),
                read_only: false,
                direct: true
            }
        );
        let kata = blockdev(
            json!({"driver":"raw","read-only":true,"node-name":"drive-x",
            "file":{"driver":"file","filename":"/img","aio":"native"}}),
        )
        .unwrap();
        assert!(kata.read_only && !kata.direct);
    }

    #[test]
    fn blockdev_add_mistakes_get_qemus_texts() {
        let e = |v| blockdev(v).unwrap_err().desc;
        assert_eq!(
            e(json!({"file":{"driver":"file","filename":"/i"}})),
            "Parameter 'node-name' is missing"
        );
        assert_eq!(
            e(json!({"node-name":"d","driver":"qcow2","file":{"driver":"file","filename":"/i"}})),
            "Parameter 'driver' does not accept value 'qcow2'"
        );
        assert_eq!(
            e(json!({"node-name":"d","file":{"driver":"nbd","filename":"/i"}})),
            "Parameter 'file.driver' does not accept value 'nbd'"
        );
        assert_eq!(
            e(json!({"node-name":"d","file":{"driver":"file","filename":"/i","x":1}})),
            "Parameter 'file.x' is unexpected"
        );
        assert!(
            e(json!({"node-name":"0d","file":{"driver":"file","filename":"/i"}}))
                .contains("expects an identifier")
        );
        assert!(
            e(json!({"node-name":"d","file":{"driver":"file","filename":""}}))
                .contains("expects a path")
        );
    }

    #[test]
    fn device_add_takes_hex_and_decimal_addresses() {
        let d = |addr: &str| {
            device(
                json!({"id":"drive-0","driver":"virtio-blk-mmio","addr":addr,
                "drive":"drive-0","romfile":""}),
            )
            .unwrap()
        };
        assert_eq!(d("0x1").slot().unwrap().unwrap(), 1);
        assert_eq!(d("0X1f").slot().unwrap().unwrap(), 31);
        assert_eq!(d("5").slot().unwrap().unwrap(), 5);
        assert_eq!(
            d("0xg").slot().unwrap().unwrap_err().desc,
            "Invalid addr for device drive-0"
        );
        assert_eq!(
            d("-1").slot().unwrap().unwrap_err().desc,
            "Invalid addr for device drive-0"
        );
        assert!(device(json!({"id":"a","driver":"virtio-blk-mmio","romfile":"x.rom"})).is_err());
        // StratoVirt's lun: lun 0 is slot 1 (vdb); addr wins over it.
        let lun = |args: Value| device(args).unwrap().slot().unwrap().unwrap();
        assert_eq!(
            lun(json!({"id":"d","driver":"virtio-blk-mmio","lun":0,"drive":"d"})),
            1
        );
        assert_eq!(
            lun(json!({"id":"d","driver":"virtio-blk-mmio","lun":4,"drive":"d"})),
            5
        );
        assert_eq!(
            lun(json!({"id":"d","driver":"virtio-blk-mmio","addr":"0x3","lun":0,"drive":"d"})),
            3
        );
        assert_eq!(
            device(json!({"id":"d","driver":"virtio-blk-mmio","lun":u64::MAX}))
                .unwrap_err()
                .desc,
            "Invalid addr for device d"
        );
        assert!(device(json!({"id":"d","driver":"virtio-blk-mmio","lun":"0"})).is_err());
        assert_eq!(
            device(json!({"driver":"virtio-blk-mmio"}))
                .unwrap_err()
                .desc,
            "Parameter 'id' is missing"
        );
    }

    #[test]
    fn device_add_reads_a_nics_mac_and_refuses_malformed_ones() {
        let nic = device(json!({"id":"net-0","driver":"virtio-net-mmio","addr":"0x0",
            "netdev":"net-0","mac":"52:54:00:C1:7a:00"}))
        .unwrap();
        assert_eq!(nic.netdev.as_deref(), Some("net-0"));
        assert_eq!(nic.mac, Some([0x52, 0x54, 0x00, 0xc1, 0x7a, 0x00]));
        for bad in [
            "52:54:00:c1:7a",
            "52:54:00:c1:7a:00:01",
            "52-54-00-c1-7a-00",
            "5:54:00:c1:7a:000",
            "zz:54:00:c1:7a:00",
        ] {
            let err = device(json!({"id":"n","driver":"virtio-net-mmio","mac":bad})).unwrap_err();
            assert!(
                err.desc.starts_with("Parameter 'mac' expects"),
                "{bad}: {}",
                err.desc
            );
        }
    }
}
