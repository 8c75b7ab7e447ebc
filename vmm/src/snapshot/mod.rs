//! VM memory snapshots: the state of a paused machine (vCPUs, in-kernel interrupt controllers
//! and timers, kvmclock) and its guest RAM, written to a directory and checked before any of
//! it is restored.
//!
//! [`format`] is the on-disk layout and its checks, [`vcpu_state`] what is kept of each vCPU,
//! [`serial`] what is kept of the UART (the i8042 keeps no state), [`files`] the directory
//! written and read back, [`transport`] what is kept of a virtio-mmio transport, [`memory`]
//! the restored guest RAM,
//! [`VmState`] what is kept of the VM itself.

pub mod files;
pub mod format;
pub mod memory;
pub mod pci;
pub mod serial;
pub mod transport;
pub mod vcpu_state;

use self::format::FormatError;
use self::serial::SerialSnapshot;
use self::transport::TransportSnapshot;
use self::vcpu_state::VcpuSnapshot;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

// KVM_IRQCHIP_* chip ids: the master and slave 8259 PICs and the IOAPIC.
const IRQCHIP_IDS: [u32; 3] = [0, 1, 2];

/// A KVM VM-wide ioctl that failed while saving or restoring.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct VmStateError {
    /// The ioctl.
    pub what: &'static str,
    /// What KVM said.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

/// The VM-wide state a snapshot keeps: both PICs and the IOAPIC, the PIT and the kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
        let irqchips = IRQCHIP_IDS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map(|()| chip)
                    .map_err(vm_err("KVM_GET_IRQCHIP"))
            })
            .collect::<Result<_, _>>()?;
        let mut clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK accepts only the realtime flag; the others describe the reading.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            irqchips,
            pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Puts the state on a VM built like the one saved (irqchip and PIT created), before its
    /// vCPUs first run. The guest's clock resumes where it stopped: the time the snapshot
    /// spent on disk is not seen by the guest.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(vm_err("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(vm_err("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            if !IRQCHIP_IDS.contains(&chip.chip_id) {
                return Err(VmStateError {
                    what: "KVM_SET_IRQCHIP",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
            vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// Everything of a paused machine a snapshot keeps besides guest RAM: the JSON of the state
/// file.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// The VM-wide KVM state.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The COM1 UART.
    pub serial: SerialSnapshot,
    /// Every virtio-mmio slot's transport, in slot order.
    pub transports: Vec<TransportSnapshot>,
    /// The balloon's target and held pages (`num_pages`, `actual`), if the machine has one.
    pub balloon: Option<(u32, u32)>,
    /// The disk slots (`addr`) a disk was plugged into; the restoring command line plugs
    /// the same ones.
    #[serde(default)]
    pub plugged_disks: Vec<u64>,
    /// The NIC slots (`addr`) a NIC was plugged into.
    #[serde(default)]
    pub plugged_nics: Vec<u64>,
    /// The q35 machine's PCI Express segment.
    #[serde(default)]
    pub pci: Option<pci::PciSnapshot>,
}

/// The slots a snapshot's machine had something plugged into.
#[derive(Deserialize)]
struct PluggedSlots {
    #[serde(default)]
    plugged_disks: Vec<u64>,
    #[serde(default)]
    plugged_nics: Vec<u64>,
}

/// Refuses a checked state whose machine had disks or NICs plugged into other slots than the
/// restoring command line plugs (`disks`: the disk slots of its `-device virtio-blk-device`s;
/// `nics`: the number of its `virtio-net-device`s, which fill the NIC slots in order).
/// Checked before any backend is started.
pub fn check_plugged(json: &[u8], disks: &[u64], nics: usize) -> Result<(), FormatError> {
    let saved: PluggedSlots = serde_json::from_slice(json).map_err(|e| FormatError::Io {
        file: "state",
        reason: format!("malformed state: {e}"),
    })?;
    let mut disks = disks.to_vec();
    disks.sort_unstable();
    let nics: Vec<u64> = (0..nics as u64).collect();
    if saved.plugged_disks != disks || saved.plugged_nics != nics {
        return Err(FormatError::PluggedMismatch {
            snapshot: format!(
                "disks in slots {:?} and NICs in slots {:?}",
                saved.plugged_disks, saved.plugged_nics
            ),
            command_line: format!("disks in slots {disks:?} and NICs in slots {nics:?}"),
        });
    }
    Ok(())
}

/// A virtio device type as a user knows it.
fn device_name(device_type: u32) -> String {
    match device_type {
        1 => "net".to_string(),
        2 => "blk".to_string(),
        5 => "balloon".to_string(),
        other => format!("type-{other}"),
    }
}

fn device_list(types: impl Iterator<Item = u32>) -> String {
    types.map(device_name).collect::<Vec<_>>().join(",")
}

impl MachineState {
    /// Parses checked JSON state and refuses one that does not fit the command line's
    /// machine: another vCPU count than the header's, or other devices in the slots.
    pub fn parse(json: &[u8], vcpus: u32, devices: &[u32]) -> Result<MachineState, FormatError> {
        let state: MachineState = serde_json::from_slice(json).map_err(|e| FormatError::Io {
            file: "state",
            reason: format!("malformed state: {e}"),
        })?;
        if state.vcpus.len() != vcpus as usize {
            return Err(FormatError::VcpuMismatch {
                snapshot: state.vcpus.len() as u32,
                command_line: vcpus,
            });
        }
        let saved = state.transports.iter().map(|t| t.device_type);
        if !saved.clone().eq(devices.iter().copied()) {
            return Err(FormatError::DeviceMismatch {
                snapshot: device_list(saved),
                command_line: device_list(devices.iter().copied()),
            });
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};

    #[test]
    fn the_interrupt_controllers_and_clock_move_to_another_vm() {
        let Some(kvm) = crate::test_kvm::kvm_or_skip(
            "snapshot::the_interrupt_controllers_and_clock_move_to_another_vm",
        ) else {
            return;
        };
        let build = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            vm.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .unwrap();
            vm
        };
        let vm = build();
        let mut ioapic = kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        vm.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: chip 2 is the IOAPIC, so `ioapic` is the union's live member.
        unsafe { ioapic.chip.ioapic.redirtbl[3].bits = 0x1_0031 };
        vm.set_irqchip(&ioapic).unwrap();
        let mut clock = vm.get_clock().unwrap();
        clock.clock += 1 << 40;
        clock.flags = 0;
        vm.set_clock(&clock).unwrap();

        let saved = VmState::save(&vm).unwrap();
        let json = serde_json::to_vec(&saved).unwrap();
        let back: VmState = serde_json::from_slice(&json).unwrap();
        let other = build();
        back.restore(&other).unwrap();
        let mut chip = kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        other.get_irqchip(&mut chip).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { chip.chip.ioapic.redirtbl[3].bits }, 0x1_0031);
        assert!(other.get_clock().unwrap().clock >= 1 << 40);
    }
}
