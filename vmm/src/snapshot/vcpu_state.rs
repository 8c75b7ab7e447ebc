//! The whole architectural state of one vCPU as a snapshot holds it, read and written on the
//! vCPU's own thread (the only one holding its fd).
//!
//! Unlike the reset state ([`crate::cpu::VcpuState`], a fixed list of MSRs the monitor set at
//! boot), a snapshot keeps every MSR KVM lists for the host (`KVM_GET_MSR_INDEX_LIST`), the
//! XSAVE area (which holds the FPU and SSE state), the XCRs and the debug registers.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::cpu::CpuError;

/// KVM's `KVM_MAX_MSR_ENTRIES`: the most MSRs one `KVM_GET_MSRS`/`KVM_SET_MSRS` takes.
const MSR_BATCH: usize = 255;

/// Everything a snapshot keeps of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Vec<kvm_msr_entry>,
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The register file is too large to be useful in a log line.
        f.debug_struct("VcpuSnapshot")
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn kvm_err(what: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm {
        what,
        index,
        source,
    }
}

fn msr_batch(entries: &[kvm_msr_entry], index: u8) -> Result<Msrs, CpuError> {
    Msrs::from_entries(entries).map_err(|_| CpuError::MsrRefused {
        msr: entries.first().map_or(0, |e| e.index),
        index,
    })
}

/// Reads every MSR of `msr_indices` the vCPU has. KVM stops a batch at the first MSR it cannot
/// read (one it lists but this vCPU's CPUID does not expose): that MSR is left out and the
/// batch goes on after it.
fn read_msrs(
    vcpu: &VcpuFd,
    index: u8,
    msr_indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, CpuError> {
    let mut out = Vec::with_capacity(msr_indices.len());
    let mut rest = msr_indices;
    while !rest.is_empty() {
        let batch: Vec<kvm_msr_entry> = rest[..rest.len().min(MSR_BATCH)]
            .iter()
            .map(|&msr| kvm_msr_entry {
                index: msr,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_batch(&batch, index)?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS", index))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < batch.len() {
            log::debug!(
                "vCPU {index}: MSR {:#x} is listed by KVM but not readable; not saved",
                batch[read].index
            );
            rest = &rest[read + 1..];
        } else {
            rest = &rest[read..];
        }
    }
    Ok(out)
}

impl VcpuSnapshot {
    /// Reads the state of paused vCPU `index`, with the MSRs of `msr_indices` it has.
    pub fn save(vcpu: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuSnapshot, CpuError> {
        // The MP state first: reading it makes KVM finish any pending INIT/SIPI processing, so
        // the registers read after it are the ones the vCPU resumes with.
        let mp_state = vcpu
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE", index))?;
        Ok(VcpuSnapshot {
            mp_state,
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS", index))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS", index))?,
            xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE", index))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS", index))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS", index))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC", index))?,
            msrs: read_msrs(vcpu, index, msr_indices)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS", index))?,
        })
    }

    /// Puts the state on vCPU `index`, which must have the CPUID it had when saved and must
    /// not be running. The state comes from a file: an MSR outside `msr_indices` (what this
    /// host's KVM lists, all a snapshot saves) is refused before anything is set, as host
    /// writes reach MSRs the guest itself cannot write.
    pub fn restore(&self, vcpu: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<(), CpuError> {
        if let Some(msr) = self.msrs.iter().find(|m| !msr_indices.contains(&m.index)) {
            return Err(CpuError::UnlistedMsr {
                msr: msr.index,
                index,
            });
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE", index))?;
        // Segment and control registers before the general ones and before the LAPIC, whose
        // base the APIC_BASE MSR in the sregs decides.
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS", index))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_err("KVM_SET_REGS", index))?;
        // SAFETY: KVM reads its user-ABI XSAVE size from the pointer, which exceeds the 4 KiB of
        // `kvm_xsave` only once the process asked for larger guest XSAVE features
        // (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM, for AMX), which Citadel never does. The
        // contents come from a snapshot file and are untrusted: KVM validates the XSAVE header
        // and refuses features the vCPU does not have.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE", index))?;
        // On a host without XSAVE, KVM saves no XCR (nr_xcrs 0) and refuses KVM_SET_XCRS
        // altogether: there is nothing to put back.
        if self.xcrs.nr_xcrs > 0 {
            vcpu.set_xcrs(&self.xcrs)
                .map_err(kvm_err("KVM_SET_XCRS", index))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS", index))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC", index))?;
        for batch in self.msrs.chunks(MSR_BATCH) {
            let msrs = msr_batch(batch, index)?;
            let written = vcpu
                .set_msrs(&msrs)
                .map_err(kvm_err("KVM_SET_MSRS", index))?;
            if written < batch.len() {
                return Err(CpuError::MsrRefused {
                    msr: batch[written].index,
                    index,
                });
            }
        }
        // Last: pending exceptions and interrupts are injected on top of the state above.
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS", index))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_moves_to_another_vm_with_its_state() {
        let Some(kvm) = crate::test_kvm::kvm_or_skip(
            "snapshot::vcpu_state::a_vcpu_moves_to_another_vm_with_its_state",
        ) else {
            return;
        };
        let msr_indices = kvm.get_msr_index_list().unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let build = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
            (vm, vcpu)
        };
        let (_vm, vcpu) = build();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1234;
        regs.r15 = 0xfeed;
        vcpu.set_regs(&regs).unwrap();
        let sysenter_eip = kvm_msr_entry {
            index: 0x176,
            data: 0xabcd_0000,
            ..Default::default()
        };
        vcpu.set_msrs(&Msrs::from_entries(&[sysenter_eip]).unwrap())
            .unwrap();
        let saved = VcpuSnapshot::save(&vcpu, 0, msr_indices.as_slice()).unwrap();
        let json = serde_json::to_vec(&saved).unwrap();
        let back: VcpuSnapshot = serde_json::from_slice(&json).unwrap();

        let (_vm2, fresh) = build();
        let mut forged: VcpuSnapshot = serde_json::from_slice(&json).unwrap();
        forged.msrs.push(kvm_msr_entry {
            index: 0xdead_0001,
            ..Default::default()
        });
        let (_vm3, untouched) = build();
        let err = forged
            .restore(&untouched, 0, msr_indices.as_slice())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot holds MSR 0xdead0001 for vCPU 0, which this host's KVM does not list"
        );
        assert_ne!(untouched.get_regs().unwrap().rip, 0x1234);

        back.restore(&fresh, 0, msr_indices.as_slice()).unwrap();
        let regs = fresh.get_regs().unwrap();
        assert_eq!((regs.rip, regs.r15), (0x1234, 0xfeed));
        let mut probe = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x176,
            ..Default::default()
        }])
        .unwrap();
        fresh.get_msrs(&mut probe).unwrap();
        assert_eq!(probe.as_slice()[0].data, 0xabcd_0000);
        assert_eq!(fresh.get_sregs().unwrap().cr0, saved.sregs.cr0);
        assert!(
            saved.msrs.len() > 20,
            "only {} MSRs saved",
            saved.msrs.len()
        );
    }
}
