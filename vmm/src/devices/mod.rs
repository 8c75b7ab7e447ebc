//! Devices the monitor itself emulates, and the MMIO transport that device processes attach
//! to. Device I/O itself is served by backend processes.

pub mod backend_hangups;
pub mod balloon;
pub mod blk_slot;
pub mod deadline;
pub mod interrupt;
pub mod legacy;
pub mod manager;
pub mod mmio_bus;
pub mod msi_routes;
pub mod msix;
pub mod net_slot;
pub mod pcie;
pub mod slot_ring;
pub mod vfio_pci;
pub mod vhost_user;
pub mod vhost_user_blk;
pub mod virtio_mmio;
pub mod virtio_pci;
