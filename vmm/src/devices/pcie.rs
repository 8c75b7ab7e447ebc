//! The q35 machine's PCI Express segment on the machine's buses: its ECAM window on the MMIO
//! bus, the 0xCF8/0xCFC ports on port I/O, and the root ports the command line configures.
//! Every vCPU reaches it through one lock, held only for a register access.

use std::sync::{Mutex, MutexGuard};

use citadel_pci::root_port::{RootPort, RootPortConfig};
use citadel_pci::segment::{Segment, SegmentError, PORT_ADDRESS, PORT_COUNT};

use super::mmio_bus::MmioDevice;

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
#[error("-device pcie-root-port,id={id}: {source}")]
pub struct PcieError {
    id: String,
    source: SegmentError,
}

/// The segment, shared by the vCPUs (configuration accesses) and the machine (reset).
#[derive(Debug)]
pub struct PcieHost {
    segment: Mutex<Segment>,
}

impl PcieHost {
    /// The host bridge and `root_ports`, placed where the command line says.
    pub fn new(root_ports: &[RootPortSpec]) -> Result<PcieHost, PcieError> {
        let mut segment = Segment::default();
        for spec in root_ports {
            segment
                .add(
                    spec.device,
                    spec.function,
                    Box::new(RootPort::new(spec.config)),
                )
                .map_err(|source| PcieError {
                    id: spec.id.clone(),
                    source,
                })?;
        }
        Ok(PcieHost {
            segment: Mutex::new(segment),
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

    /// Puts every function back as it was built.
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
