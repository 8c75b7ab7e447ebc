//! PCI functions opened for passthrough: the launcher checks that the host function exists and
//! is bound to vfio-pci, opens a VFIO container and the function's group (`/dev/vfio/vfio`,
//! `/dev/vfio/<group>`), joins them under the type-1 IOMMU, and sends the VMM the container's
//! and the device's descriptors with the device's regions and interrupt counts.
//!
//! The group and container stay open here until the VMM closes the function again: vfio-ioctls
//! opens them by path, which the VMM's filters forbid, and keeping the group here is what holds
//! the function for this VM.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};

use citadel_pci::address::host_function;

use crate::protocol::{VfioInfo, VfioRegion, MAX_VFIO_DEVICES};

/// Where the kernel lists PCI functions.
const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// The only driver a passed-through function may be bound to.
const VFIO_PCI: &str = "vfio-pci";

/// Why a function could not be opened; one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum VfioOpenError {
    /// `host` is not a PCI address.
    #[error("Invalid host '{0}': expected a PCI address such as 0000:00:01.0")]
    Address(String),
    /// No such function on the host.
    #[error("host {0}: no such PCI device (a jailed VM sees only those given to citadel-jailer --vfio-device)")]
    NoDevice(String),
    /// The function has another driver, or none.
    #[error("host {host} is not bound to vfio-pci (its driver: {driver})")]
    NotVfio {
        /// The function.
        host: String,
        /// Its driver, or "none".
        driver: String,
    },
    /// This VM has the function already.
    #[error("host {0} is already passed through to this VM")]
    InUse(String),
    /// Too many functions open.
    #[error("{MAX_VFIO_DEVICES} host devices are passed through already")]
    TooMany,
    /// The group holds a function bound to another driver.
    #[error("host {0}: its IOMMU group is not viable (every function in it must be bound to vfio-pci or to no driver)")]
    NotViable(String),
    /// Any other VFIO failure.
    #[error("host {host}: {source}")]
    Vfio {
        /// The function.
        host: String,
        /// What vfio-ioctls said.
        source: VfioError,
    },
    /// Duplicating a descriptor for the VMM failed.
    #[error("host {host}: duplicating a descriptor: {source}")]
    Dup {
        /// The function.
        host: String,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// A function opened for the VMM: its descriptors and what the VMM needs to know of it.
pub(crate) struct Opened {
    /// The container (for DMA mappings) and the device, in that order.
    pub fds: Vec<OwnedFd>,
    /// Its regions and interrupt counts.
    pub info: VfioInfo,
}

/// The functions passed through, by canonical address.
#[derive(Default)]
pub(crate) struct VfioDevices {
    open: BTreeMap<String, VfioDevice>,
}

impl VfioDevices {
    /// Opens `host` for the VMM.
    pub(crate) fn open(&mut self, host: &str) -> Result<Opened, VfioOpenError> {
        let host = host_function(host).ok_or_else(|| VfioOpenError::Address(host.into()))?;
        if self.open.contains_key(&host) {
            return Err(VfioOpenError::InUse(host));
        }
        if self.open.len() >= MAX_VFIO_DEVICES {
            return Err(VfioOpenError::TooMany);
        }
        let sysfs = Path::new(SYSFS_PCI_DEVICES).join(&host);
        if !sysfs.exists() {
            return Err(VfioOpenError::NoDevice(host));
        }
        let driver = link_name(&sysfs.join("driver")).unwrap_or_else(|| "none".into());
        if driver != VFIO_PCI {
            return Err(VfioOpenError::NotVfio { host, driver });
        }
        let vfio = |source| VfioOpenError::Vfio {
            host: host.clone(),
            source,
        };
        let container = Arc::new(VfioContainer::new(None).map_err(vfio)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sysfs, ops, false).map_err(|e| match e {
            VfioError::GroupViable => VfioOpenError::NotViable(host.clone()),
            other => vfio(other),
        })?;
        let regions = (0..=VFIO_PCI_CONFIG_REGION_INDEX)
            .map(|index| VfioRegion {
                index,
                flags: device.get_region_flags(index),
                size: device.get_region_size(index),
                offset: device.get_region_offset(index),
            })
            .collect();
        let vectors = |index| device.get_irq_info(index).map_or(0, |irq| irq.count);
        let dup = |fd: i32| {
            // SAFETY: `fd` is owned by `container` or `device`, both alive for this borrow.
            unsafe { BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|source| VfioOpenError::Dup {
                    host: host.clone(),
                    source,
                })
        };
        let fds = vec![dup(container.as_raw_fd())?, dup(device.as_raw_fd())?];
        let opened = Opened {
            fds,
            info: VfioInfo {
                regions,
                msi_vectors: vectors(VFIO_PCI_MSI_IRQ_INDEX),
                msix_vectors: vectors(VFIO_PCI_MSIX_IRQ_INDEX),
            },
        };
        log::info!("launcher: {host} opened for passthrough");
        self.open.insert(host, device);
        Ok(opened)
    }

    /// Lets `host` go: its group leaves the container and both are closed, which ends the
    /// DMA mappings made through the container. The VMM closes its descriptors first.
    pub(crate) fn close(&mut self, host: &str) -> bool {
        let Some(host) = host_function(host) else {
            return false;
        };
        let closed = self.open.remove(&host).is_some();
        if closed {
            log::info!("launcher: {host} released");
        }
        closed
    }
}

/// The last component of the symbolic link at `path`.
fn link_name(path: &Path) -> Option<String> {
    let target: PathBuf = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_named() {
        let mut devices = VfioDevices::default();
        let e = devices.open("0000:fe:1f.7").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("host 0000:fe:1f.7: no such PCI device")));
        let e = devices.open("../etc").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("Invalid host '../etc'")));
    }
}
