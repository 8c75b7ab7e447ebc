//! A PCI Express root port with a native-hotplug slot (`-device pcie-root-port`).
//!
//! The slot is the kind Linux's pciehp drives without firmware help: attention button, power
//! controller, attention and power indicators, hot-plug capable, no command-completed
//! notification (so the driver never waits on a write), and a link that reports data-link
//! layer activity. An empty slot starts powered off with both indicators off, as firmware
//! leaves one. The port's events are signalled with MSI.
//!
//! Hotplug follows the native PCIe sequence. A plug makes the card present and its link
//! active, and announces both changes. An unplug request presses the attention button; the
//! guest's driver then has the card's drivers let go, powers the slot off and turns its power
//! indicator off, and only then is the card taken out ([`RootPort::take_ejected`]), its
//! absence announced in turn. A guest that never releases the slot keeps the card.

use std::sync::Arc;

use crate::address::Bdf;
use crate::config::{reg, ConfigSpace, Identity};
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
/// Slot control: the event enables (attention button, presence detect, command completed,
/// data-link-layer state) and the hot-plug interrupt enable.
const ENABLE_ATTENTION_BUTTON: u16 = 1 << 0;
const ENABLE_PRESENCE_DETECT: u16 = 1 << 3;
const ENABLE_COMMAND_COMPLETED: u16 = 1 << 4;
const ENABLE_HOTPLUG_INTERRUPT: u16 = 1 << 5;
const ENABLE_LINK_STATE: u16 = 1 << 12;
/// Slot status bits.
pub mod slot_status {
    /// Attention button pressed.
    pub const ATTENTION_BUTTON_PRESSED: u16 = 1 << 0;
    /// Presence detect changed.
    pub const PRESENCE_DETECT_CHANGED: u16 = 1 << 3;
    /// Command completed.
    pub const COMMAND_COMPLETED: u16 = 1 << 4;
    /// Presence detect state: a card is in the slot.
    pub const PRESENCE_DETECT_STATE: u16 = 1 << 6;
    /// Data-link-layer state changed.
    pub const LINK_STATE_CHANGED: u16 = 1 << 8;
}
/// Link status: data-link-layer link active.
pub const LINK_STATUS_ACTIVE: u16 = 1 << 13;
/// Slot control: the power indicator field (bits 9:8), on (01) and off (11).
const POWER_INDICATOR_MASK: u16 = 0b11 << 8;
const POWER_INDICATOR_ON: u16 = 0b01 << 8;
const POWER_INDICATOR_OFF: u16 = 0b11 << 8;
/// Slot control: an indicator field (attention in bits 7:6, power in 9:8) set to "off".
const INDICATORS_OFF: u16 = (0b11 << 6) | (0b11 << 8);
/// Slot control bits the guest writes: every event enable, both indicators, power control
/// and the link-state event enable (no electromechanical interlock).
const SLOT_CONTROL_WRITABLE: u16 = 0x17ff;
/// Slot status event bits the guest clears with 1: attention button pressed, power fault,
/// MRL sensor changed, presence detect changed, command completed, data-link-layer state
/// changed.
const SLOT_STATUS_EVENTS: u16 = 0x011f;

/// What a root port tells the machine.
pub trait SlotEvents: Send + Sync + std::fmt::Debug {
    /// Sends the port's interrupt: a write of `data` to `address` (its MSI message).
    fn interrupt(&self, address: u64, data: u32);
    /// The guest released a slot whose card is to be removed (power and power indicator
    /// off): the machine should now call [`RootPort::take_ejected`].
    fn released(&self);
}

/// Why a hotplug request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// The slot already holds a card.
    #[error("the slot is occupied")]
    Occupied,
    /// The slot holds no card.
    #[error("the slot is empty")]
    Empty,
    /// The card's removal was already asked for and the guest has not released it yet.
    #[error("the device is already being removed")]
    AlreadyRemoving,
}

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
    events: Arc<dyn SlotEvents>,
    card: Option<Box<dyn Function>>,
    removing: bool,
}

impl RootPort {
    /// A root port with an empty slot, telling `events` what happens to it.
    pub fn new(config: RootPortConfig, events: Arc<dyn SlotEvents>) -> RootPort {
        let (space, pcie, msi) = Self::registers(config);
        RootPort {
            config,
            space,
            pcie,
            msi,
            events,
            card: None,
            removing: false,
        }
    }

    /// The registers of a port with an empty slot.
    fn registers(config: RootPortConfig) -> (ConfigSpace, u16, MsiCapability) {
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
        (space, pcie, msi)
    }

    /// Whether a card is in the slot.
    pub fn occupied(&self) -> bool {
        self.card.is_some()
    }

    /// Puts `card` in the slot: present, link up, both announced. An occupied slot hands the
    /// card back.
    pub fn plug(&mut self, card: Box<dyn Function>) -> Result<(), Box<dyn Function>> {
        if self.card.is_some() {
            return Err(card);
        }
        self.card = Some(card);
        self.update_slot(|status, link| {
            *status |= slot_status::PRESENCE_DETECT_STATE
                | slot_status::PRESENCE_DETECT_CHANGED
                | slot_status::LINK_STATE_CHANGED;
            *link |= LINK_STATUS_ACTIVE;
        });
        Ok(())
    }

    /// Asks the guest to release the card: presses the attention button.
    pub fn request_unplug(&mut self) -> Result<(), HotplugError> {
        if self.card.is_none() {
            return Err(HotplugError::Empty);
        }
        if self.removing {
            return Err(HotplugError::AlreadyRemoving);
        }
        self.removing = true;
        self.update_slot(|status, _| *status |= slot_status::ATTENTION_BUTTON_PRESSED);
        Ok(())
    }

    /// Whether the card's removal was asked for and the guest has not released it yet.
    pub fn removing(&self) -> bool {
        self.removing
    }

    /// The port's registers and whether a removal is under way, for a snapshot.
    pub fn snapshot(&self) -> (Vec<u8>, bool) {
        (self.space.snapshot(), self.removing)
    }

    /// Puts a [`RootPort::snapshot`] back on a port built alike, holding the same card: the
    /// guest-changeable register bits (slot control, bus numbers, windows, MSI) and the
    /// removal under way. Nothing is signalled. Refuses registers of another size.
    pub fn restore(&mut self, config: &[u8], removing: bool) -> bool {
        if !self.space.restore(config) {
            return false;
        }
        self.removing = removing && self.card.is_some();
        true
    }

    /// The card in the slot, if any.
    pub fn card_mut(&mut self) -> Option<&mut (dyn Function + 'static)> {
        self.card.as_deref_mut()
    }

    /// Takes the card out if its removal was asked for and the guest has released the slot;
    /// the slot then reports it empty, link down.
    pub fn take_ejected(&mut self) -> Option<Box<dyn Function>> {
        if !self.removing || !self.released() {
            return None;
        }
        self.removing = false;
        let card = self.card.take();
        self.update_slot(|status, link| {
            *status &= !slot_status::PRESENCE_DETECT_STATE;
            *status |= slot_status::PRESENCE_DETECT_CHANGED | slot_status::LINK_STATE_CHANGED;
            *link &= !LINK_STATUS_ACTIVE;
        });
        card
    }

    fn powered_off(&self) -> bool {
        self.space.read_u16(self.pcie + pcie::SLOT_CONTROL) & SLOT_CONTROL_POWER_OFF != 0
    }

    /// Whether the guest is done with the slot: power off and then the power indicator off.
    /// Linux's pciehp waits a second between the two and ignores presence and link changes
    /// in that second, so a card taken out (or a new one put in) before the indicator goes
    /// off would go unnoticed.
    fn released(&self) -> bool {
        let control = self.space.read_u16(self.pcie + pcie::SLOT_CONTROL);
        self.powered_off() && control & POWER_INDICATOR_MASK == POWER_INDICATOR_OFF
    }

    /// Whether an enabled slot event is pending with the hot-plug interrupt enabled.
    fn event_pending(&self) -> bool {
        let control = self.space.read_u16(self.pcie + pcie::SLOT_CONTROL);
        let status = self.space.read_u16(self.pcie + pcie::SLOT_STATUS);
        let enabled = [
            (
                ENABLE_ATTENTION_BUTTON,
                slot_status::ATTENTION_BUTTON_PRESSED,
            ),
            (ENABLE_PRESENCE_DETECT, slot_status::PRESENCE_DETECT_CHANGED),
            (ENABLE_COMMAND_COMPLETED, slot_status::COMMAND_COMPLETED),
            (ENABLE_LINK_STATE, slot_status::LINK_STATE_CHANGED),
        ];
        control & ENABLE_HOTPLUG_INTERRUPT != 0
            && enabled
                .iter()
                .any(|&(enable, event)| control & enable != 0 && status & event != 0)
    }

    /// Sends the port's MSI when a change makes an enabled event pending that was not: the
    /// edge PCI Express asks of a hot-plug interrupt.
    fn interrupt_if_raised(&self, was_pending: bool) {
        if was_pending || !self.event_pending() {
            return;
        }
        if let Some((address, data)) = self.msi.message(&self.space) {
            self.events.interrupt(address, data);
        }
    }

    /// Changes the slot and link status registers with `change`, then interrupts if due.
    fn update_slot(&mut self, change: impl FnOnce(&mut u16, &mut u16)) {
        let was_pending = self.event_pending();
        let mut status = self.space.read_u16(self.pcie + pcie::SLOT_STATUS);
        let mut link = self.space.read_u16(self.pcie + pcie::LINK_STATUS);
        change(&mut status, &mut link);
        self.space.set_u16(self.pcie + pcie::SLOT_STATUS, status);
        self.space.set_u16(self.pcie + pcie::LINK_STATUS, link);
        self.interrupt_if_raised(was_pending);
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
        let was_pending = self.event_pending();
        let was_released = self.released();
        self.space.write(offset, data);
        if self.removing && !was_released && self.released() {
            self.events.released();
        }
        // Enabling an event, or the interrupt, with the event already pending raises it.
        self.interrupt_if_raised(was_pending);
    }

    fn multifunction(&self) -> bool {
        self.config.multifunction
    }

    /// Back to the registers at power-on. A card stays plugged, powered and present; one
    /// whose removal was asked for is released, as the guest that was to power its slot off
    /// is gone.
    fn reset(&mut self) {
        let (space, _, _) = Self::registers(self.config);
        self.space = space;
        if let Some(card) = self.card.as_mut() {
            card.reset();
            let control = self.space.read_u16(self.pcie + pcie::SLOT_CONTROL);
            let powered =
                (control & !(SLOT_CONTROL_POWER_OFF | POWER_INDICATOR_MASK)) | POWER_INDICATOR_ON;
            self.space.set_u16(self.pcie + pcie::SLOT_CONTROL, powered);
            self.space.set_u16(
                self.pcie + pcie::SLOT_STATUS,
                slot_status::PRESENCE_DETECT_STATE,
            );
            let link = self.space.read_u16(self.pcie + pcie::LINK_STATUS) | LINK_STATUS_ACTIVE;
            self.space.set_u16(self.pcie + pcie::LINK_STATUS, link);
            if self.removing {
                let off = self.space.read_u16(self.pcie + pcie::SLOT_CONTROL)
                    | SLOT_CONTROL_POWER_OFF
                    | POWER_INDICATOR_OFF;
                self.space.set_u16(self.pcie + pcie::SLOT_CONTROL, off);
                self.events.released();
            }
        }
    }

    /// The card, at device 0 function 0 of the port's secondary bus.
    fn downstream(&self, bdf: Bdf) -> Option<&dyn Function> {
        self.routes(bdf).then_some(self.card.as_deref()?)
    }

    fn downstream_mut(&mut self, bdf: Bdf) -> Option<&mut dyn Function> {
        if !self.routes(bdf) {
            return None;
        }
        self.card
            .as_mut()
            .map(|card| card.as_mut() as &mut dyn Function)
    }
}

impl RootPort {
    /// Whether a configuration access to `bdf` is the card's: its secondary bus, device 0
    /// function 0 (a PCI Express link has one device), and only while the slot is powered.
    fn routes(&self, bdf: Bdf) -> bool {
        let secondary = self.space.read_u8(reg::SECONDARY_BUS);
        secondary != 0
            && bdf.bus == secondary
            && bdf.device == 0
            && bdf.function == 0
            && !self.powered_off()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what a port tells the machine.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub interrupts: Mutex<Vec<(u64, u32)>>,
        pub released: Mutex<u32>,
    }

    impl SlotEvents for Recorder {
        fn interrupt(&self, address: u64, data: u32) {
            self.interrupts.lock().unwrap().push((address, data));
        }
        fn released(&self) {
            *self.released.lock().unwrap() += 1;
        }
    }

    /// A card whose registers are 0x1234_5678 then whatever was written last.
    #[derive(Debug, Default)]
    pub(crate) struct Card {
        written: Mutex<[u8; 4]>,
        pub resets: u32,
    }

    impl Function for Card {
        fn read(&self, offset: u16, data: &mut [u8]) {
            let value = match offset {
                0 => 0x1234_5678u32.to_le_bytes(),
                _ => *self.written.lock().unwrap(),
            };
            data.copy_from_slice(&value[..data.len()]);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.written.lock().unwrap()[..data.len()].copy_from_slice(data);
        }
        fn multifunction(&self) -> bool {
            false
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn port_with(events: Arc<Recorder>) -> RootPort {
        RootPort::new(
            RootPortConfig {
                port: 3,
                multifunction: false,
            },
            events,
        )
    }

    fn port() -> RootPort {
        port_with(Arc::new(Recorder::default()))
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

    fn write16(port: &mut RootPort, offset: u16, value: u16) {
        port.write(offset, &value.to_le_bytes());
    }

    /// What Linux's pciehp does at probe: MSI programmed and enabled, slot events and the
    /// hot-plug interrupt enabled.
    fn driver_ready(port: &mut RootPort) {
        port.write(0x80 + 4, &0xfee0_0000u32.to_le_bytes());
        write16(port, 0x80 + 12, 0x0041);
        write16(port, 0x80 + 2, 1);
        let control = read16(port, 0x58);
        write16(port, 0x58, control | 0x1029);
    }

    #[test]
    fn the_capability_list_is_pcie_then_msi() {
        let p = port();
        assert_eq!(read32(&p, 0), 0x000c_1b36);
        assert_eq!(read32(&p, 8) >> 8, 0x06_04_00);
        assert_eq!(p.space.read_u8(reg::HEADER_TYPE), 1);
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
        assert!(!p.occupied());
    }

    #[test]
    fn slot_control_takes_enables_indicators_and_power_and_reset_restores_it() {
        let mut p = port();
        write16(&mut p, 0x40 + pcie::SLOT_CONTROL, 0xffff);
        assert_eq!(read16(&p, 0x40 + pcie::SLOT_CONTROL), 0x17ff);
        p.write(reg::SECONDARY_BUS, &[1]);
        p.reset();
        assert_eq!(read16(&p, 0x40 + pcie::SLOT_CONTROL), 0x07c0);
        let mut bus = [0xff];
        p.read(reg::SECONDARY_BUS, &mut bus);
        assert_eq!(bus, [0]);
    }

    #[test]
    fn a_plug_is_announced_once_and_the_guest_clears_it() {
        let events = Arc::new(Recorder::default());
        let mut p = port_with(events.clone());
        driver_ready(&mut p);
        p.plug(Box::new(Card::default())).unwrap();
        assert!(p.occupied());
        let status = read16(&p, 0x5a);
        assert_eq!(status, 0x0148, "present, presence and link changed");
        assert_ne!(read16(&p, 0x52) & LINK_STATUS_ACTIVE, 0);
        assert_eq!(
            *events.interrupts.lock().unwrap(),
            vec![(0xfee0_0000, 0x41)]
        );
        assert!(p.plug(Box::new(Card::default())).is_err());
        write16(&mut p, 0x5a, 0x0108);
        assert_eq!(read16(&p, 0x5a), 0x0040);
        assert_eq!(events.interrupts.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_event_pending_when_interrupts_get_enabled_is_raised_then() {
        let events = Arc::new(Recorder::default());
        let mut p = port_with(events.clone());
        p.plug(Box::new(Card::default())).unwrap();
        assert!(
            events.interrupts.lock().unwrap().is_empty(),
            "MSI not enabled yet"
        );
        driver_ready(&mut p);
        assert_eq!(events.interrupts.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_unplug_waits_for_the_guest_to_power_the_slot_off() {
        let events = Arc::new(Recorder::default());
        let mut p = port_with(events.clone());
        assert_eq!(p.request_unplug(), Err(HotplugError::Empty));
        driver_ready(&mut p);
        p.plug(Box::new(Card::default())).unwrap();
        write16(&mut p, 0x5a, 0x0108);
        // The guest powers the slot on.
        let on = read16(&p, 0x58) & !SLOT_CONTROL_POWER_OFF;
        write16(&mut p, 0x58, on);
        assert!(p.take_ejected().is_none());
        p.request_unplug().unwrap();
        assert_eq!(p.request_unplug(), Err(HotplugError::AlreadyRemoving));
        assert_eq!(read16(&p, 0x5a) & 1, 1, "attention button pressed");
        assert_eq!(events.interrupts.lock().unwrap().len(), 2);
        assert!(p.take_ejected().is_none(), "still powered");
        write16(&mut p, 0x5a, 0x0001);
        // Power on and the indicator on (01), as pciehp leaves a working slot.
        let on = (read16(&p, 0x58) & !POWER_INDICATOR_MASK) | POWER_INDICATOR_ON;
        write16(&mut p, 0x58, on);
        let off = read16(&p, 0x58) | SLOT_CONTROL_POWER_OFF;
        write16(&mut p, 0x58, off);
        assert_eq!(*events.released.lock().unwrap(), 0, "indicator still on");
        assert!(p.take_ejected().is_none());
        let dark = read16(&p, 0x58) | POWER_INDICATOR_OFF;
        write16(&mut p, 0x58, dark);
        assert_eq!(*events.released.lock().unwrap(), 1);
        assert!(p.take_ejected().is_some());
        assert!(!p.occupied() && !p.removing());
        assert_eq!(
            read16(&p, 0x5a),
            0x0108,
            "absent, presence and link changed"
        );
        assert_eq!(read16(&p, 0x52) & LINK_STATUS_ACTIVE, 0);
        assert_eq!(events.interrupts.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_reset_keeps_a_card_powered_and_releases_one_being_removed() {
        let events = Arc::new(Recorder::default());
        let mut p = port_with(events.clone());
        p.plug(Box::new(Card::default())).unwrap();
        p.reset();
        assert_eq!(read16(&p, 0x5a), 0x0040);
        assert_eq!(read16(&p, 0x58) & SLOT_CONTROL_POWER_OFF, 0);
        assert_ne!(read16(&p, 0x52) & LINK_STATUS_ACTIVE, 0);
        p.request_unplug().unwrap();
        p.reset();
        assert_eq!(*events.released.lock().unwrap(), 1);
        assert!(p.take_ejected().is_some());
    }
}
