//! Where a configuration access lands: bus, device, function and register, decoded from an
//! ECAM offset or from the 0xCF8 address register.

/// Number of devices on a bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Number of functions of a device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;
/// Size of one function's configuration space (PCI Express extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the ECAM window for buses 0 to 255.
pub const ECAM_SIZE: u64 = 256 << 20;

/// A function's position on the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, below 32.
    pub device: u8,
    /// Function number, below 8.
    pub function: u8,
}

impl Bdf {
    /// A position, or `None` when the device or function number is out of range.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        (device < DEVICES_PER_BUS && function < FUNCTIONS_PER_DEVICE).then_some(Bdf {
            bus,
            device,
            function,
        })
    }

    /// The device and function as one byte, as the bus sees them.
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A decoded configuration access: the function and the register offset inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAccess {
    /// The function addressed.
    pub bdf: Bdf,
    /// Byte offset in its configuration space.
    pub offset: u16,
}

/// Decodes an offset into the ECAM window: bus in bits 27:20, device 19:15, function 14:12,
/// register 11:0. Offsets past the window decode to nothing.
pub fn ecam(offset: u64) -> Option<ConfigAccess> {
    if offset >= ECAM_SIZE {
        return None;
    }
    let bdf = Bdf::new(
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
    )?;
    Some(ConfigAccess {
        bdf,
        offset: (offset & 0xfff) as u16,
    })
}

/// Decodes the 0xCF8 address register plus the data port byte (0 to 3) accessed: enable in bit
/// 31, bus 23:16, device 15:11, function 10:8, dword register 7:2. A register with the enable
/// bit clear addresses nothing. Only the first 256 bytes are reachable this way.
pub fn port_cf8(address: u32, data_byte: u8) -> Option<ConfigAccess> {
    if address & 0x8000_0000 == 0 || data_byte > 3 {
        return None;
    }
    let bdf = Bdf::new(
        (address >> 16) as u8,
        ((address >> 11) & 0x1f) as u8,
        ((address >> 8) & 0x7) as u8,
    )?;
    Some(ConfigAccess {
        bdf,
        offset: (address & 0xfc) as u16 + u16::from(data_byte),
    })
}

/// Most host PCI functions one VM passes through: what the launcher opens for it and the
/// jailer exposes to it.
pub const MAX_HOST_FUNCTIONS: usize = 16;

/// A host PCI function's address `host` as sysfs names it, `dddd:bb:dd.f` in lower case (the
/// domain may be left out), or `None` when it is not one.
pub fn host_function(host: &str) -> Option<String> {
    let host = host.to_ascii_lowercase();
    let parts: Vec<&str> = host.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [domain, bus, devfn] => (*domain, *bus, *devfn),
        [bus, devfn] => ("0000", *bus, *devfn),
        _ => return None,
    };
    let (device, function) = devfn.split_once('.')?;
    let hex = |s: &str, width: usize, max: u32| {
        // from_str_radix would take a sign too.
        (s.len() <= width && !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|&v| v <= max)
    };
    let domain = hex(domain, 4, 0xffff)?;
    let bus = hex(bus, 2, 0xff)?;
    let device = hex(device, 2, 0x1f)?;
    let function = hex(function, 1, 7)?;
    Some(format!("{domain:04x}:{bus:02x}:{device:02x}.{function}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecam_offsets_decode_to_bus_device_function_and_register() {
        let a = ecam((3 << 20) | (5 << 15) | (2 << 12) | 0x104).unwrap();
        assert_eq!(a.bdf, Bdf::new(3, 5, 2).unwrap());
        assert_eq!(a.offset, 0x104);
        assert_eq!(a.bdf.to_string(), "03:05.2");
        assert_eq!(ecam(ECAM_SIZE), None);
        assert_eq!(
            ecam(ECAM_SIZE - 1).unwrap().bdf,
            Bdf::new(255, 31, 7).unwrap()
        );
    }

    #[test]
    fn cf8_needs_the_enable_bit_and_reaches_only_256_bytes() {
        assert_eq!(port_cf8(0x0001_08fc, 0), None);
        let a = port_cf8(0x8001_0afc, 3).unwrap();
        assert_eq!(a.bdf, Bdf::new(1, 1, 2).unwrap());
        assert_eq!(a.offset, 0xff);
        assert_eq!(port_cf8(0x8000_0000, 4), None);
    }

    #[test]
    fn host_functions_are_checked_and_written_as_sysfs_does() {
        assert_eq!(
            host_function("0000:00:01.0").as_deref(),
            Some("0000:00:01.0")
        );
        assert_eq!(host_function("00:1F.7").as_deref(), Some("0000:00:1f.7"));
        assert_eq!(host_function("1:2:3.4").as_deref(), Some("0001:02:03.4"));
        for bad in [
            "",
            "0000:00:20.0",
            "0000:00:01.8",
            "0000:100:01.0",
            "../../x",
            "0:0:0",
            "a:b:c.d.e",
            "+0:0:0.0",
        ] {
            assert_eq!(host_function(bad), None, "{bad}");
        }
    }
}
