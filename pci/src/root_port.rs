//! A PCI Express root port with a native-hotplug slot (`-device pcie-root-port`).
//!
//! The slot is the kind Linux's pciehp drives without firmware help: attention button, power
//! controller, attention and power indicators, hot-plug capable, no command-completed
//! notification (so the driver never waits on a write), and a link that reports data-link
//! layer activity. An empty slot starts powered off with both indicators off, as firmware
//! leaves one. The port's events are signalled with MSI.

use crate::config::{ConfigSpace, Identity};
use crate::msi::MsiCapability;
use crate::segment::Function;

/// The identity a root port reports: the generic PCIe root port guests know from QEMU.
pub const IDENTITY: Identity = Identity {
    vendor: 0x1b36,
    device: 0x000c,
    class: 0x06_04_00,
    revision: 0,
};

/// Capability id of the PCI Express capability.
pub const PCIE_CAPABILITY_ID: u8 = 0x10;

/// Registers of the PCI Express capability, relative to its start.
pub mod pcie {
    /// PCI Express capabilities register (16 bits).
    pub const CAPABILITIES: u16 = 0x02;
    /// Device capabilities (32 bits).
    pub const DEVICE_CAPABILITIES: u16 = 0x04;
    /// Device control (16 bits).
    pub const DEVICE_CONTROL: u16 = 0x08;
    /// Device status (16 bits).
    pub const DEVICE_STATUS: u16 = 0x0a;
    /// Link capabilities (32 bits).
    pub const LINK_CAPABILITIES: u16 = 0x0c;
    /// Link control (16 bits).
    pub const LINK_CONTROL: u16 = 0x10;
    /// Link status (16 bits).
    pub const LINK_STATUS: u16 = 0x12;
    /// Slot capabilities (32 bits).
    pub const SLOT_CAPABILITIES: u16 = 0x14;
    /// Slot control (16 bits).
    pub const SLOT_CONTROL: u16 = 0x18;
    /// Slot status (16 bits).
    pub const SLOT_STATUS: u16 = 0x1a;
    /// Root control (16 bits).
    pub const ROOT_CONTROL: u16 = 0x1c;
    /// Root status (32 bits).
    pub const ROOT_STATUS: u16 = 0x20;
    /// Link capabilities 2 (32 bits).
    pub const LINK_CAPABILITIES_2: u16 = 0x2c;
    /// Link control 2 (16 bits).
    pub const LINK_CONTROL_2: u16 = 0x30;
}

/// Capabilities register: version 2, root port (type 4), slot implemented.
const PCIE_CAPABILITIES: u16 = 2 | (4 << 4) | (1 << 8);
/// Device capabilities: 128-byte payloads, role-based error reporting.
const DEVICE_CAPABILITIES: u32 = 1 << 15;
/// Link capabilities: 2.5 GT/s, x1, data-link-layer link active reporting; the port number
/// goes in bits 31:24.
const LINK_CAPABILITIES: u32 = 1 | (1 << 4) | (1 << 20);
/// Link status: 2.5 GT/s, x1, slot clock configuration.
const LINK_STATUS: u16 = 1 | (1 << 4) | (1 << 12);

/// Slot capabilities bits.
pub mod slot_cap {
    /// Attention button present.
    pub const ATTENTION_BUTTON: u32 = 1 << 0;
    /// Power controller present.
    pub const POWER_CONTROLLER: u32 = 1 << 1;
    /// Attention indicator present.
    pub const ATTENTION_INDICATOR: u32 = 1 << 3;
    /// Power indicator present.
    pub const POWER_INDICATOR: u32 = 1 << 4;
    /// Hot-plug capable.
    pub const HOT_PLUG_CAPABLE: u32 = 1 << 6;
    /// No command completed support.
    pub const NO_COMMAND_COMPLETED: u32 = 1 << 18;
    /// Shift of the physical slot number.
    pub const SLOT_NUMBER_SHIFT: u32 = 19;
}

/// Slot control: power controller control (1 = off).
pub const SLOT_CONTROL_POWER_OFF: u16 = 1 << 10;
/// Slot control: an indicator field (attention in bits 7:6, power in 9:8) set to "off".
const INDICATORS_OFF: u16 = (0b11 << 6) | (0b11 << 8);
/// Slot control bits the guest writes: every event enable, both indicators, power control
/// and the link-state event enable (no electromechanical interlock).
const SLOT_CONTROL_WRITABLE: u16 = 0x17ff;
/// Slot status event bits the guest clears with 1: attention button pressed, power fault,
/// MRL sensor changed, presence detect changed, command completed, data-link-layer state
/// changed.
const SLOT_STATUS_EVENTS: u16 = 0x011f;

/// How a root port is configured on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPortConfig {
    /// Port number: the link's port number and the slot's physical number.
    pub port: u8,
    /// Whether function 0 of its device announces more functions.
    pub multifunction: bool,
}

/// A root port.
#[derive(Debug)]
pub struct RootPort {
    config: RootPortConfig,
    space: ConfigSpace,
    pcie: u16,
    msi: MsiCapability,
}

impl RootPort {
    /// A root port with an empty slot.
    pub fn new(config: RootPortConfig) -> RootPort {
        let mut space = ConfigSpace::bridge(IDENTITY);
        if config.multifunction {
            space.set_multifunction();
        }
        // 0x3c bytes of PCI Express capability (version 2), padded so that MSI follows at
        // 0x80.
        let pcie = space
            .add_capability(PCIE_CAPABILITY_ID, &[0; 0x3e])
            .expect("the first capability fits");
        let msi = MsiCapability::add(&mut space).expect("MSI fits after the PCIe capability");
        let at = |reg| pcie + reg;
        space.set_u16(at(pcie::CAPABILITIES), PCIE_CAPABILITIES);
        space.set_u32(at(pcie::DEVICE_CAPABILITIES), DEVICE_CAPABILITIES);
        space.writable_u16(at(pcie::DEVICE_CONTROL), 0xffff);
        space.write_1_clears_u16(at(pcie::DEVICE_STATUS), 0x000f);
        space.set_u32(
            at(pcie::LINK_CAPABILITIES),
            LINK_CAPABILITIES | (u32::from(config.port) << 24),
        );
        space.writable_u16(at(pcie::LINK_CONTROL), 0x0ffb);
        space.set_u16(at(pcie::LINK_STATUS), LINK_STATUS);
        space.write_1_clears_u16(at(pcie::LINK_STATUS), 0xc000);
        space.set_u32(
            at(pcie::SLOT_CAPABILITIES),
            slot_cap::ATTENTION_BUTTON
                | slot_cap::POWER_CONTROLLER
                | slot_cap::ATTENTION_INDICATOR
                | slot_cap::POWER_INDICATOR
                | slot_cap::HOT_PLUG_CAPABLE
                | slot_cap::NO_COMMAND_COMPLETED
                | (u32::from(config.port) << slot_cap::SLOT_NUMBER_SHIFT),
        );
        space.set_u16(
            at(pcie::SLOT_CONTROL),
            SLOT_CONTROL_POWER_OFF | INDICATORS_OFF,
        );
        space.writable_u16(at(pcie::SLOT_CONTROL), SLOT_CONTROL_WRITABLE);
        space.write_1_clears_u16(at(pcie::SLOT_STATUS), SLOT_STATUS_EVENTS);
        // System error enables and the PME interrupt enable.
        space.writable_u16(at(pcie::ROOT_CONTROL), 0x000f);
        // PME status.
        space.write_1_clears_u16(at(pcie::ROOT_STATUS) + 2, 0x0001);
        space.set_u32(at(pcie::LINK_CAPABILITIES_2), 1 << 1);
        space.set_u16(at(pcie::LINK_CONTROL_2), 1);
        space.writable_u16(at(pcie::LINK_CONTROL_2), 0x000f);
        RootPort {
            config,
            space,
            pcie,
            msi,
        }
    }

    /// Where the PCI Express capability starts.
    pub fn pcie_offset(&self) -> u16 {
        self.pcie
    }

    /// Where the MSI capability starts.
    pub fn msi_offset(&self) -> u16 {
        self.msi.offset()
    }
}

impl Function for RootPort {
    fn read(&self, offset: u16, data: &mut [u8]) {
        self.space.read(offset, data);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        self.space.write(offset, data);
    }

    fn multifunction(&self) -> bool {
        self.config.multifunction
    }

    fn reset(&mut self) {
        *self = RootPort::new(self.config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reg;

    fn port() -> RootPort {
        RootPort::new(RootPortConfig {
            port: 3,
            multifunction: false,
        })
    }

    fn read16(port: &RootPort, offset: u16) -> u16 {
        let mut data = [0; 2];
        port.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    fn read32(port: &RootPort, offset: u16) -> u32 {
        let mut data = [0; 4];
        port.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_capability_list_is_pcie_then_msi() {
        let p = port();
        assert_eq!(read32(&p, 0), 0x000c_1b36);
        assert_eq!(read32(&p, 8) >> 8, 0x06_04_00);
        assert_eq!(p.read_header_type(), 1);
        let mut data = [0; 1];
        p.read(reg::CAPABILITIES, &mut data);
        assert_eq!(data[0], 0x40);
        assert_eq!(read16(&p, 0x40), 0x8010);
        assert_eq!(read16(&p, 0x80) & 0xff, 0x05);
        assert_eq!(p.pcie_offset(), 0x40);
        assert_eq!(p.msi_offset(), 0x80);
        assert_eq!(read16(&p, 0x40 + pcie::CAPABILITIES), 0x0142);
    }

    #[test]
    fn the_slot_is_hotplug_capable_numbered_by_the_port_and_starts_empty_and_off() {
        let p = port();
        let caps = read32(&p, 0x40 + pcie::SLOT_CAPABILITIES);
        assert_eq!(caps >> slot_cap::SLOT_NUMBER_SHIFT, 3);
        assert_eq!(caps & 0x7ffff, 0x4005b);
        assert_eq!(read32(&p, 0x40 + pcie::LINK_CAPABILITIES) >> 24, 3);
        assert_eq!(read16(&p, 0x40 + pcie::SLOT_STATUS) & (1 << 6), 0);
        assert_eq!(read16(&p, 0x40 + pcie::LINK_STATUS) & (1 << 13), 0);
        assert_eq!(read16(&p, 0x40 + pcie::SLOT_CONTROL), 0x07c0);
    }

    #[test]
    fn slot_control_takes_enables_indicators_and_power_and_reset_restores_it() {
        let mut p = port();
        p.write(0x40 + pcie::SLOT_CONTROL, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&p, 0x40 + pcie::SLOT_CONTROL), 0x17ff);
        p.write(reg::SECONDARY_BUS, &[1]);
        p.reset();
        assert_eq!(read16(&p, 0x40 + pcie::SLOT_CONTROL), 0x07c0);
        let mut bus = [0xff];
        p.read(reg::SECONDARY_BUS, &mut bus);
        assert_eq!(bus, [0]);
    }

    impl RootPort {
        fn read_header_type(&self) -> u8 {
            self.space.read_u8(reg::HEADER_TYPE)
        }
    }
}
