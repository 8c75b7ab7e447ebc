//! Citadel's PCI Express configuration space: what a guest sees when it enumerates the
//! standard machine's PCI segment through ECAM or the legacy 0xCF8/0xCFC ports.
//!
//! [`config::ConfigSpace`] is one function's 4 KiB of registers with per-bit write rules
//! (read-only, read-write, write-1-to-clear), which is all a header, a BAR or a capability
//! needs; [`host_bridge`] and [`root_port`] build their functions from it, the root port with
//! a native-hotplug slot and an MSI capability; [`segment::Segment`] routes an access by
//! bus, device and function, following the bus numbers the guest gives the root ports.
//!
//! Nothing here touches KVM or guest memory, so the crate is tested on its own; every access
//! a guest makes is bounds-checked and an access that fits no register reads all-ones.

pub mod address;
pub mod config;
pub mod host_bridge;
pub mod msi;
pub mod root_port;
pub mod segment;
