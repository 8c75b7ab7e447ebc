//! Function 00:00.0: the host bridge. Guests find the segment by it (Linux checks that bus 0
//! holds a host bridge before it trusts port 0xCF8), and it has nothing else to do.

use crate::config::{ConfigSpace, Identity};
use crate::segment::Function;

/// The identity the host bridge reports: the Q35 memory controller hub's, which guests know.
pub const IDENTITY: Identity = Identity {
    vendor: 0x8086,
    device: 0x29c0,
    class: 0x06_00_00,
    revision: 0,
};

/// The host bridge function.
#[derive(Debug)]
pub struct HostBridge {
    space: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            space: ConfigSpace::endpoint(IDENTITY),
        }
    }
}

impl Function for HostBridge {
    fn read(&self, offset: u16, data: &mut [u8]) {
        self.space.read(offset, data);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        self.space.write(offset, data);
    }

    fn multifunction(&self) -> bool {
        false
    }

    fn reset(&mut self) {
        *self = HostBridge::default();
    }
}
