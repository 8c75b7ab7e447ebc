//! Citadel, a security-hardened microVM monitor on KVM.
//!
//! The monitor keeps only vCPU, MMIO and PCI emulation; device I/O is served by vhost-user
//! backend processes.

pub mod boot;
pub mod cpu;
pub mod memory;
