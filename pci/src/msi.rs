//! Message-signalled interrupts: the MSI capability a function carries, which the guest
//! programs with the message its interrupts are to write.

use crate::config::ConfigSpace;

/// Capability id of MSI.
pub const CAPABILITY_ID: u8 = 0x05;
/// Message control: MSI enable.
const CONTROL_ENABLE: u16 = 1 << 0;
/// Message control: 64-bit message address capable.
const CONTROL_64BIT: u16 = 1 << 7;
/// Message control bits the guest writes: enable and multiple message enable.
const CONTROL_WRITABLE: u16 = CONTROL_ENABLE | (0x7 << 4);

/// A single-vector, 64-bit MSI capability in a configuration space.
#[derive(Clone, Copy, Debug)]
pub struct MsiCapability {
    offset: u16,
}

impl MsiCapability {
    /// Adds the capability to `space`; `None` when it does not fit.
    pub fn add(space: &mut ConfigSpace) -> Option<MsiCapability> {
        // Control, then the 64-bit address and the 16-bit data (and 2 reserved bytes).
        let mut body = [0u8; 12];
        body[..2].copy_from_slice(&CONTROL_64BIT.to_le_bytes());
        let offset = space.add_capability(CAPABILITY_ID, &body)?;
        space.writable_u16(offset + 2, CONTROL_WRITABLE);
        // The address is dword aligned.
        space.writable_u32(offset + 4, 0xffff_fffc);
        space.writable_u32(offset + 8, 0xffff_ffff);
        space.writable_u16(offset + 12, 0xffff);
        Some(MsiCapability { offset })
    }

    /// Where the capability starts.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    /// The message the guest programmed (address, data), if it enabled MSI.
    pub fn message(&self, space: &ConfigSpace) -> Option<(u64, u32)> {
        let control = space.read_u16(self.offset + 2);
        (control & CONTROL_ENABLE != 0).then(|| {
            let address = u64::from(space.read_u32(self.offset + 4))
                | (u64::from(space.read_u32(self.offset + 8)) << 32);
            (address, u32::from(space.read_u16(self.offset + 12)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Identity;

    #[test]
    fn the_guest_programs_address_data_and_enable_only() {
        let mut space = ConfigSpace::endpoint(Identity {
            vendor: 1,
            device: 2,
            class: 0,
            revision: 0,
        });
        let msi = MsiCapability::add(&mut space).unwrap();
        assert_eq!(space.read_u16(msi.offset() + 2), CONTROL_64BIT);
        space.write(msi.offset() + 4, &0xfee0_1003u32.to_le_bytes());
        space.write(msi.offset() + 12, &0x4041u16.to_le_bytes());
        assert_eq!(msi.message(&space), None);
        space.write(msi.offset() + 2, &0xffffu16.to_le_bytes());
        assert_eq!(msi.message(&space), Some((0xfee0_1000, 0x4041)));
        assert_eq!(
            space.read_u16(msi.offset() + 2),
            CONTROL_64BIT | CONTROL_WRITABLE
        );
        assert_eq!(space.read_u32(msi.offset() + 4), 0xfee0_1000);
        assert_eq!(space.read_u16(msi.offset() + 12), 0x4041);
    }
}
