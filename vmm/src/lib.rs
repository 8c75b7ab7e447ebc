//! Citadel, a security-hardened microVM monitor on KVM.
//!
//! The monitor keeps only vCPU, MMIO and PCI emulation; device I/O is served by vhost-user
//! backend processes.

pub mod boot;
pub mod chardev;
pub mod cli;
pub mod cpu;
pub mod daemon;
pub mod devices;
pub mod hotplug;
pub mod lockdown;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod net_hotplug;
pub mod passed_fds;
pub mod qmp_server;
pub mod scm_rights;
pub mod snapshot;
#[cfg(test)]
mod test_kvm;
pub mod vcpu;
