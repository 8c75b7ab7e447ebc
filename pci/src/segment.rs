//! PCI segment 0 of the standard machine: the functions on bus 0 and the two ways a guest
//! reaches their configuration space, the ECAM window and the 0xCF8/0xCFC port pair.
//!
//! Every function but the host bridge sits behind a root port's bus number; until a root
//! port holds a device, nothing answers there, and anything that answers nowhere reads as
//! all-ones, which is how a guest learns that a slot is empty.

use std::collections::BTreeMap;

use crate::address::{self, Bdf, ConfigAccess, FUNCTIONS_PER_DEVICE};
use crate::host_bridge::HostBridge;
use crate::root_port::RootPort;

/// A function's side of configuration accesses.
pub trait Function: Send + std::fmt::Debug {
    /// Reads `data.len()` bytes at `offset`; see [`crate::config::ConfigSpace::read`].
    fn read(&self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset`; see [`crate::config::ConfigSpace::write`].
    fn write(&mut self, offset: u16, data: &[u8]);
    /// Whether it announces other functions of its device (header type bit 7).
    fn multifunction(&self) -> bool;
    /// Puts the function back as it was built (machine reset).
    fn reset(&mut self);
    /// For a bridge: the function behind it that answers accesses to `bdf`, if any.
    fn downstream(&self, _bdf: Bdf) -> Option<&dyn Function> {
        None
    }
    /// For a bridge: the function behind it that takes writes to `bdf`, if any.
    fn downstream_mut(&mut self, _bdf: Bdf) -> Option<&mut dyn Function> {
        None
    }
}

/// Why a function cannot be placed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Device 0 of bus 0 is the host bridge's.
    #[error("device 0 of bus 0 is the host bridge")]
    HostBridgeSlot,
    /// Something already sits there.
    #[error("{0} is already occupied")]
    Occupied(Bdf),
    /// A function other than 0 of a device whose function 0 says it is alone.
    #[error("{0}: function 0 of that device is not multifunction (multifunction=on)")]
    SingleFunction(Bdf),
    /// Function 0 that says it is alone, in a device that has other functions.
    #[error("{0} must be multifunction (multifunction=on): its device has other functions")]
    NeedsMultifunction(Bdf),
}

/// The ports of the legacy configuration mechanism: the address register, then the data
/// window.
pub const PORT_ADDRESS: u16 = 0xcf8;
/// First data port.
pub const PORT_DATA: u16 = 0xcfc;
/// Number of ports from [`PORT_ADDRESS`].
pub const PORT_COUNT: u16 = 8;

/// A function of bus 0.
#[derive(Debug)]
enum Bus0Function {
    HostBridge(HostBridge),
    RootPort(RootPort),
}

impl Bus0Function {
    fn function(&self) -> &dyn Function {
        match self {
            Bus0Function::HostBridge(f) => f,
            Bus0Function::RootPort(f) => f,
        }
    }

    fn function_mut(&mut self) -> &mut dyn Function {
        match self {
            Bus0Function::HostBridge(f) => f,
            Bus0Function::RootPort(f) => f,
        }
    }
}

/// Segment 0: the functions of bus 0 by device and function number, and through the root
/// ports the cards behind them.
#[derive(Debug)]
pub struct Segment {
    bus0: BTreeMap<u8, Bus0Function>,
    cf8: u32,
}

impl Default for Segment {
    fn default() -> Self {
        let mut bus0 = BTreeMap::new();
        bus0.insert(0, Bus0Function::HostBridge(HostBridge::default()));
        Segment { bus0, cf8: 0 }
    }
}

impl Segment {
    /// Places root port `port` at 00:`device`.`function_number`, refusing a taken position,
    /// the host bridge's device, and a mix of functions that guests would not scan.
    pub fn add_root_port(
        &mut self,
        device: u8,
        function_number: u8,
        port: RootPort,
    ) -> Result<Bdf, SegmentError> {
        let function = Bus0Function::RootPort(port);
        let bdf = Bdf::new(0, device, function_number).ok_or(SegmentError::HostBridgeSlot)?;
        if device == 0 {
            return Err(SegmentError::HostBridgeSlot);
        }
        if self.bus0.contains_key(&bdf.devfn()) {
            return Err(SegmentError::Occupied(bdf));
        }
        let first = device << 3;
        let siblings = (first..first + FUNCTIONS_PER_DEVICE).any(|f| self.bus0.contains_key(&f));
        if function_number != 0 {
            if let Some(zero) = self.bus0.get(&first) {
                if !zero.function().multifunction() {
                    return Err(SegmentError::SingleFunction(bdf));
                }
            }
        } else if siblings && !function.function().multifunction() {
            return Err(SegmentError::NeedsMultifunction(bdf));
        }
        self.bus0.insert(bdf.devfn(), function);
        Ok(bdf)
    }

    /// The root port at 00:`device`.`function`, if there is one there.
    pub fn root_port_mut(&mut self, device: u8, function: u8) -> Option<&mut RootPort> {
        let devfn = Bdf::new(0, device, function)?.devfn();
        match self.bus0.get_mut(&devfn)? {
            Bus0Function::RootPort(port) => Some(port),
            Bus0Function::HostBridge(_) => None,
        }
    }

    /// Every root port.
    pub fn root_ports_mut(&mut self) -> impl Iterator<Item = &mut RootPort> {
        self.bus0.values_mut().filter_map(|f| match f {
            Bus0Function::RootPort(port) => Some(port),
            Bus0Function::HostBridge(_) => None,
        })
    }

    fn function(&self, bdf: Bdf) -> Option<&dyn Function> {
        if bdf.bus == 0 {
            return self.bus0.get(&bdf.devfn()).map(Bus0Function::function);
        }
        self.bus0
            .values()
            .find_map(|f| f.function().downstream(bdf))
    }

    fn function_mut(&mut self, bdf: Bdf) -> Option<&mut dyn Function> {
        if bdf.bus == 0 {
            return self
                .bus0
                .get_mut(&bdf.devfn())
                .map(Bus0Function::function_mut);
        }
        self.bus0
            .values_mut()
            .find_map(|f| f.function_mut().downstream_mut(bdf))
    }

    fn read(&self, access: Option<ConfigAccess>, data: &mut [u8]) {
        match access.and_then(|a| Some((a.offset, self.function(a.bdf)?))) {
            Some((offset, function)) => function.read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, access: Option<ConfigAccess>, data: &[u8]) {
        let Some(access) = access else { return };
        if let Some(function) = self.function_mut(access.bdf) {
            function.write(access.offset, data);
        }
    }

    /// A read at `offset` into the ECAM window.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        self.read(address::ecam(offset), data);
    }

    /// A write at `offset` into the ECAM window.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        self.write(address::ecam(offset), data);
    }

    /// The data-port access at `port` (0xCFC to 0xCFF), if it is one.
    fn data_access(&self, port: u16, len: usize) -> Option<ConfigAccess> {
        let byte = port.checked_sub(PORT_DATA)?;
        if byte as usize + len > 4 {
            return None;
        }
        address::port_cf8(self.cf8, byte as u8)
    }

    /// A read of `port` (0xCF8 to 0xCFF). The address register reads back only as a
    /// whole dword, as on real chipsets.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        if port == PORT_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.cf8.to_le_bytes());
            return;
        }
        self.read(self.data_access(port, data.len()), data);
    }

    /// A write of `port` (0xCF8 to 0xCFF). Only dword writes reach the address register:
    /// byte writes there are other (obsolete) mechanisms' probes.
    pub fn port_write(&mut self, port: u16, data: &[u8]) {
        if port == PORT_ADDRESS {
            if let Ok(dword) = <[u8; 4]>::try_from(data) {
                self.cf8 = u32::from_le_bytes(dword) & 0x80ff_fffc;
            }
            return;
        }
        let access = self.data_access(port, data.len());
        self.write(access, data);
    }

    /// Puts every function and the address register back as they were built.
    pub fn reset(&mut self) {
        self.cf8 = 0;
        self.bus0
            .values_mut()
            .for_each(|f| f.function_mut().reset());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root_port::tests::{Card, Recorder};
    use crate::root_port::{RootPort, RootPortConfig};
    use std::sync::Arc;

    fn port(n: u8, multifunction: bool) -> RootPort {
        RootPort::new(
            RootPortConfig {
                port: n,
                multifunction,
            },
            Arc::new(Recorder::default()),
        )
    }

    fn ecam32(segment: &Segment, bus: u64, dev: u64, func: u64, reg: u64) -> u32 {
        let mut data = [0; 4];
        segment.ecam_read((bus << 20) | (dev << 15) | (func << 12) | reg, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_host_bridge_and_ports_answer_through_ecam_and_cf8_alike() {
        let mut segment = Segment::default();
        segment.add_root_port(1, 0, port(1, false)).unwrap();
        assert_eq!(ecam32(&segment, 0, 0, 0, 0), 0x29c0_8086);
        assert_eq!(ecam32(&segment, 0, 1, 0, 0), 0x000c_1b36);
        assert_eq!(ecam32(&segment, 0, 2, 0, 0), 0xffff_ffff);
        assert_eq!(ecam32(&segment, 1, 0, 0, 0), 0xffff_ffff);

        segment.port_write(PORT_ADDRESS, &0x8000_0808u32.to_le_bytes());
        let mut data = [0; 4];
        segment.port_read(PORT_ADDRESS, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0808);
        segment.port_read(PORT_DATA, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0604_0000);
        let mut high = [0; 2];
        segment.port_read(PORT_DATA + 2, &mut high);
        assert_eq!(u16::from_le_bytes(high), 0x0604);
        // The enable bit off: nothing is addressed.
        segment.port_write(PORT_ADDRESS, &0x0000_0800u32.to_le_bytes());
        segment.port_read(PORT_DATA, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn writes_through_cf8_and_ecam_land_in_the_same_register() {
        let mut segment = Segment::default();
        segment.add_root_port(3, 0, port(1, false)).unwrap();
        segment.port_write(PORT_ADDRESS, &0x8000_1818u32.to_le_bytes());
        segment.port_write(PORT_DATA + 1, &[5]);
        assert_eq!(ecam32(&segment, 0, 3, 0, 0x18) & 0xff00, 0x0500);
        segment.ecam_write((3 << 15) | 0x1a, &[9]);
        let mut sub = [0];
        segment.port_read(PORT_DATA + 2, &mut sub);
        assert_eq!(sub, [9]);
        segment.reset();
        assert_eq!(ecam32(&segment, 0, 3, 0, 0x18), 0);
    }

    #[test]
    fn a_card_answers_on_its_ports_secondary_bus_once_powered() {
        let mut segment = Segment::default();
        segment.add_root_port(1, 0, port(1, false)).unwrap();
        segment.add_root_port(2, 0, port(2, false)).unwrap();
        let port2 = segment.root_port_mut(2, 0).unwrap();
        port2.plug(Box::new(Card::default())).unwrap();
        // Bus numbers, then power on (slot control at 0x40 + 0x18).
        segment.ecam_write((2 << 15) | 0x19, &[5]);
        segment.ecam_write((2 << 15) | 0x1a, &[5]);
        assert_eq!(ecam32(&segment, 5, 0, 0, 0), 0xffff_ffff, "slot still off");
        segment.ecam_write((2 << 15) | 0x58, &0x0000u16.to_le_bytes());
        assert_eq!(ecam32(&segment, 5, 0, 0, 0), 0x1234_5678);
        assert_eq!(ecam32(&segment, 5, 1, 0, 0), 0xffff_ffff);
        assert_eq!(ecam32(&segment, 6, 0, 0, 0), 0xffff_ffff);
        segment.ecam_write((5 << 20) | 0x10, &[1, 2, 3, 4]);
        assert_eq!(ecam32(&segment, 5, 0, 0, 0x10), 0x0403_0201);
        assert!(segment.root_port_mut(0, 0).is_none());
        assert_eq!(segment.root_ports_mut().count(), 2);
    }

    #[test]
    fn positions_are_checked() {
        let mut segment = Segment::default();
        assert_eq!(
            segment.add_root_port(0, 0, port(1, false)).unwrap_err(),
            SegmentError::HostBridgeSlot
        );
        segment.add_root_port(1, 0, port(1, false)).unwrap();
        let taken = segment.add_root_port(1, 0, port(2, false)).unwrap_err();
        assert_eq!(taken.to_string(), "00:01.0 is already occupied");
        assert!(matches!(
            segment.add_root_port(1, 1, port(2, false)),
            Err(SegmentError::SingleFunction(_))
        ));
        segment.add_root_port(2, 3, port(3, false)).unwrap();
        assert!(matches!(
            segment.add_root_port(2, 0, port(4, false)),
            Err(SegmentError::NeedsMultifunction(_))
        ));
        segment.add_root_port(2, 0, port(4, true)).unwrap();
        assert_eq!(ecam32(&segment, 0, 2, 3, 0), 0x000c_1b36);
        assert!(segment.add_root_port(32, 0, port(5, false)).is_err());
    }
}
