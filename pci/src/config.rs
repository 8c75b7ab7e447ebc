//! One function's configuration space: 4 KiB of registers and, for every bit, whether the
//! guest may write it and whether a write of 1 clears it. Headers, BARs and capabilities are
//! all described by those two masks, so one write path serves them all and a guest can never
//! change a read-only bit.

use crate::address::CONFIG_SPACE_SIZE;

/// Standard header registers.
pub mod reg {
    /// Vendor id (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device id (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status register (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision id, then the class code in the upper three bytes.
    pub const CLASS_REVISION: u16 = 0x08;
    /// Cache line size (8 bits).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Latency timer (8 bits).
    pub const LATENCY_TIMER: u16 = 0x0d;
    /// Header type (8 bits; bit 7 = multi-function).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// Type 0: the first BAR.
    pub const BAR0: u16 = 0x10;
    /// Type 0: the end of the six BARs.
    pub const BAR_END: u16 = 0x28;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: u16 = 0x34;
    /// Interrupt line (8 bits, scratch for the OS).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt pin (8 bits).
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// Type 1: primary bus number.
    pub const PRIMARY_BUS: u16 = 0x18;
    /// Type 1: secondary bus number.
    pub const SECONDARY_BUS: u16 = 0x19;
    /// Type 1: subordinate bus number.
    pub const SUBORDINATE_BUS: u16 = 0x1a;
    /// Type 1: secondary latency timer.
    pub const SECONDARY_LATENCY: u16 = 0x1b;
    /// Type 1: I/O base and limit (8 bits each).
    pub const IO_BASE: u16 = 0x1c;
    /// Type 1: secondary status (16 bits).
    pub const SECONDARY_STATUS: u16 = 0x1e;
    /// Type 1: memory base and limit (16 bits each).
    pub const MEMORY_BASE: u16 = 0x20;
    /// Type 1: prefetchable memory base and limit (16 bits each).
    pub const PREF_MEMORY_BASE: u16 = 0x24;
    /// Type 1: upper 32 bits of the prefetchable base.
    pub const PREF_BASE_UPPER: u16 = 0x28;
    /// Type 1: upper 32 bits of the prefetchable limit.
    pub const PREF_LIMIT_UPPER: u16 = 0x2c;
    /// Type 1: bridge control (16 bits).
    pub const BRIDGE_CONTROL: u16 = 0x3e;
}

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status register: the function has a capabilities list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Header type bit 7: the device has more than one function.
pub const HEADER_MULTIFUNCTION: u8 = 0x80;

/// Command bits a guest may set: I/O space, memory space, bus master, parity error response,
/// SERR# enable and INTx disable (PCI Express keeps the others read-only zero).
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
/// Status bits that record errors and are cleared by writing 1.
const STATUS_W1C: u16 = 0xf900;

/// One function's configuration registers and their write rules.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_1_clears: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Where the next capability goes, and the pointer byte that must point at it.
    next_capability: u16,
    last_pointer: u16,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor", &self.read_u16(reg::VENDOR_ID))
            .field("device", &self.read_u16(reg::DEVICE_ID))
            .finish_non_exhaustive()
    }
}

/// The identity of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Revision id.
    pub revision: u8,
}

/// Where capabilities start: right after the type 0 and type 1 headers.
const FIRST_CAPABILITY: u16 = 0x40;
/// End of the space the capabilities list can address.
const CAPABILITIES_END: u16 = 0x100;

impl ConfigSpace {
    fn new(identity: Identity, header_type: u8) -> ConfigSpace {
        let mut space = ConfigSpace {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            write_1_clears: Box::new([0; CONFIG_SPACE_SIZE]),
            next_capability: FIRST_CAPABILITY,
            last_pointer: reg::CAPABILITIES,
        };
        space.set_u16(reg::VENDOR_ID, identity.vendor);
        space.set_u16(reg::DEVICE_ID, identity.device);
        space.set_u32(
            reg::CLASS_REVISION,
            (identity.class << 8) | u32::from(identity.revision),
        );
        space.set_u8(reg::HEADER_TYPE, header_type);
        space.writable_u16(reg::COMMAND, COMMAND_WRITABLE);
        space.write_1_clears_u16(reg::STATUS, STATUS_W1C);
        space.writable_u8(reg::CACHE_LINE_SIZE, 0xff);
        space.writable_u8(reg::INTERRUPT_LINE, 0xff);
        space
    }

    /// A type 0 (endpoint) header.
    pub fn endpoint(identity: Identity) -> ConfigSpace {
        ConfigSpace::new(identity, 0)
    }

    /// A type 1 (PCI-to-PCI bridge) header with writable bus numbers and forwarding windows:
    /// 16-bit I/O, 32-bit memory and 64-bit prefetchable memory.
    pub fn bridge(identity: Identity) -> ConfigSpace {
        let mut space = ConfigSpace::new(identity, 1);
        for offset in [
            reg::PRIMARY_BUS,
            reg::SECONDARY_BUS,
            reg::SUBORDINATE_BUS,
            reg::SECONDARY_LATENCY,
        ] {
            space.writable_u8(offset, 0xff);
        }
        // Base and limit keep their low nibble: the I/O window decodes 16 bits, the
        // prefetchable window 64 bits (type 1 in the low nibble).
        space.writable_u8(reg::IO_BASE, 0xf0);
        space.writable_u8(reg::IO_BASE + 1, 0xf0);
        space.write_1_clears_u16(reg::SECONDARY_STATUS, STATUS_W1C);
        space.writable_u16(reg::MEMORY_BASE, 0xfff0);
        space.writable_u16(reg::MEMORY_BASE + 2, 0xfff0);
        space.set_u16(reg::PREF_MEMORY_BASE, 1);
        space.set_u16(reg::PREF_MEMORY_BASE + 2, 1);
        space.writable_u16(reg::PREF_MEMORY_BASE, 0xfff0);
        space.writable_u16(reg::PREF_MEMORY_BASE + 2, 0xfff0);
        space.writable_u32(reg::PREF_BASE_UPPER, 0xffff_ffff);
        space.writable_u32(reg::PREF_LIMIT_UPPER, 0xffff_ffff);
        // Parity and SERR# enables, ISA and VGA enables, master abort mode, secondary bus
        // reset.
        space.writable_u16(reg::BRIDGE_CONTROL, 0x007f);
        space
    }

    /// Marks the function as one of several of its device (header type bit 7).
    pub fn set_multifunction(&mut self) {
        let header = self.read_u8(reg::HEADER_TYPE) | HEADER_MULTIFUNCTION;
        self.set_u8(reg::HEADER_TYPE, header);
    }

    /// Appends a capability with id `id` whose registers after the id and next-pointer bytes
    /// are `body`, links it at the end of the list and returns its offset. `None` when it does
    /// not fit below 0x100.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Option<u16> {
        let offset = self.next_capability;
        let end = offset as usize + 2 + body.len();
        if end > CAPABILITIES_END as usize {
            return None;
        }
        self.bytes[offset as usize] = id;
        self.bytes[offset as usize + 1] = 0;
        self.bytes[offset as usize + 2..end].copy_from_slice(body);
        self.bytes[self.last_pointer as usize] = offset as u8;
        self.last_pointer = offset + 1;
        self.next_capability = (end as u16).next_multiple_of(4);
        let status = self.read_u16(reg::STATUS) | STATUS_CAPABILITIES;
        self.set_u16(reg::STATUS, status);
        Some(offset)
    }

    /// Reads `data.len()` bytes at `offset` as the guest sees them; an access that is not 1, 2
    /// or 4 bytes, not naturally aligned or past the end reads all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        match checked_range(offset, data.len()) {
            Some(range) => data.copy_from_slice(&self.bytes[range]),
            None => data.fill(0xff),
        }
    }

    /// Applies a guest write of `data` at `offset`: writable bits take the written value,
    /// write-1-to-clear bits written as 1 are cleared, every other bit keeps its value. Returns
    /// whether the access was valid (see [`ConfigSpace::read`]); an invalid one changes nothing.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> bool {
        let Some(range) = checked_range(offset, data.len()) else {
            return false;
        };
        for (i, &value) in range.zip(data) {
            let writable = self.writable[i];
            let clears = self.write_1_clears[i] & value;
            self.bytes[i] = ((self.bytes[i] & !writable) | (value & writable)) & !clears;
        }
        true
    }

    /// Every byte, for a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Takes the guest-changeable bits (writable and write-1-to-clear) of `saved`, a
    /// [`ConfigSpace::snapshot`] of a space built alike; every other bit stays as built, so a
    /// snapshot cannot change what the guest could not. Refuses (and changes nothing for) a
    /// snapshot of another size.
    pub fn restore(&mut self, saved: &[u8]) -> bool {
        if saved.len() != CONFIG_SPACE_SIZE {
            return false;
        }
        for (i, &value) in saved.iter().enumerate() {
            let mask = self.writable[i] | self.write_1_clears[i];
            self.bytes[i] = (self.bytes[i] & !mask) | (value & mask);
        }
        true
    }

    /// The byte at `offset`, as the device sees it.
    pub fn read_u8(&self, offset: u16) -> u8 {
        self.bytes[offset as usize]
    }

    /// The 16-bit register at `offset`.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let o = offset as usize;
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }

    /// The 32-bit register at `offset`.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let o = offset as usize;
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().expect("four bytes"))
    }

    /// Sets a byte from the device side, whatever the write rules.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.bytes[offset as usize] = value;
    }

    /// Sets a 16-bit register from the device side.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        let o = offset as usize;
        self.bytes[o..o + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Sets a 32-bit register from the device side.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        let o = offset as usize;
        self.bytes[o..o + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Lets the guest write the bits of `mask` in the byte at `offset`.
    pub fn writable_u8(&mut self, offset: u16, mask: u8) {
        self.writable[offset as usize] = mask;
    }

    /// Lets the guest write the bits of `mask` in the 16-bit register at `offset`.
    pub fn writable_u16(&mut self, offset: u16, mask: u16) {
        let o = offset as usize;
        self.writable[o..o + 2].copy_from_slice(&mask.to_le_bytes());
    }

    /// Lets the guest write the bits of `mask` in the 32-bit register at `offset`.
    pub fn writable_u32(&mut self, offset: u16, mask: u32) {
        let o = offset as usize;
        self.writable[o..o + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Makes the bits of `mask` in the 16-bit register at `offset` cleared by a guest write of
    /// 1 (status bits the device sets).
    pub fn write_1_clears_u16(&mut self, offset: u16, mask: u16) {
        let o = offset as usize;
        self.write_1_clears[o..o + 2].copy_from_slice(&mask.to_le_bytes());
    }
}

/// The byte range of a naturally aligned 1, 2 or 4-byte access inside the space.
fn checked_range(offset: u16, len: usize) -> Option<std::ops::Range<usize>> {
    let start = offset as usize;
    let valid =
        matches!(len, 1 | 2 | 4) && start.is_multiple_of(len) && start + len <= CONFIG_SPACE_SIZE;
    valid.then_some(start..start + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Identity = Identity {
        vendor: 0x1b36,
        device: 0x000c,
        class: 0x060400,
        revision: 0,
    };

    fn read32(space: &ConfigSpace, offset: u16) -> u32 {
        let mut data = [0; 4];
        space.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identity_and_header_read_back_and_are_read_only() {
        let mut space = ConfigSpace::bridge(ID);
        assert_eq!(read32(&space, 0), 0x000c_1b36);
        assert_eq!(read32(&space, 8), 0x0604_0000);
        assert_eq!(space.read_u8(reg::HEADER_TYPE), 1);
        assert!(space.write(0, &0u32.to_le_bytes()));
        assert!(space.write(8, &0xffff_ffffu32.to_le_bytes()));
        assert_eq!(read32(&space, 0), 0x000c_1b36);
        assert_eq!(read32(&space, 8), 0x0604_0000);
    }

    #[test]
    fn only_writable_bits_change_and_status_bits_clear_on_one() {
        let mut space = ConfigSpace::endpoint(ID);
        space.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(space.read_u16(reg::COMMAND), COMMAND_WRITABLE);
        space.set_u16(reg::STATUS, 0x8000 | 0x0010);
        space.write(reg::STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(
            space.read_u16(reg::STATUS),
            0x0010,
            "capabilities bit is read-only"
        );
    }

    #[test]
    fn bridge_windows_keep_their_type_nibbles() {
        let mut space = ConfigSpace::bridge(ID);
        space.write(reg::PREF_MEMORY_BASE, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(space.read_u32(reg::PREF_MEMORY_BASE), 0xfff1_fff1);
        space.write(reg::SECONDARY_BUS, &[7]);
        assert_eq!(space.read_u8(reg::SECONDARY_BUS), 7);
    }

    #[test]
    fn bad_accesses_read_all_ones_and_write_nothing() {
        let mut space = ConfigSpace::bridge(ID);
        let mut data = [0; 4];
        space.read(2, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut three = [0; 3];
        space.read(0, &mut three);
        assert_eq!(three, [0xff; 3]);
        space.read(4094, &mut data[..2]);
        assert_eq!(data[..2], [0x00, 0x00]);
        space.read(4096, &mut data[..1]);
        assert_eq!(data[0], 0xff);
        assert!(!space.write(0x19, &[1, 2]));
        assert!(!space.write(4095, &[1, 2]));
        assert_eq!(space.read_u8(reg::SECONDARY_BUS), 0);
    }

    #[test]
    fn capabilities_chain_from_the_pointer_and_stop_at_0x100() {
        let mut space = ConfigSpace::endpoint(ID);
        assert_eq!(space.add_capability(0x10, &[0; 58]), Some(0x40));
        assert_eq!(space.add_capability(0x05, &[0; 12]), Some(0x7c));
        assert_eq!(space.read_u8(reg::CAPABILITIES), 0x40);
        assert_eq!(space.read_u8(0x41), 0x7c);
        assert_eq!(space.read_u8(0x7d), 0);
        assert_ne!(space.read_u16(reg::STATUS) & STATUS_CAPABILITIES, 0);
        assert_eq!(space.add_capability(0x11, &[0; 120]), None);
    }
}
