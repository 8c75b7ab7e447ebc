//! A vCPU's architectural state, saved once the vCPU is configured for boot and restored on
//! `system_reset`, so that a reset machine starts exactly as a fresh one does.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    Msrs,
};
use kvm_ioctls::VcpuFd;

use super::CpuError;

/// MSRs whose boot values are restored on reset: those `configure` sets, plus KVM's
/// paravirtual MSRs, which a guest points at its own memory and which must not keep writing
/// there after the guest has been reset.
const RESET_MSRS: [u32; 17] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x2ff,       // MTRR_DEF_TYPE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0x12,        // KVM_SYSTEM_TIME (old)
    0x4b56_4d01, // KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // KVM_ASYNC_PF_EN
    0x4b56_4d03, // KVM_STEAL_TIME
    0x4b56_4d04, // KVM_PV_EOI_EN
    0x4b56_4d06, // KVM_ASYNC_PF_INT
];

/// Everything `restore` puts back.
#[derive(Clone)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Msrs,
}

fn kvm_err(what: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm {
        what,
        index,
        source,
    }
}

impl VcpuState {
    /// Reads the state of vCPU `index`.
    pub fn save(vcpu: &VcpuFd, index: u8) -> Result<VcpuState, CpuError> {
        let entries: Vec<kvm_msr_entry> = RESET_MSRS
            .iter()
            .map(|&msr| kvm_msr_entry {
                index: msr,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::MsrRefused {
            msr: RESET_MSRS[0],
            index,
        })?;
        // KVM reads MSRs in order and stops at the first one this host does not have; only
        // those read are restored.
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS", index))?;
        let msrs =
            Msrs::from_entries(&msrs.as_slice()[..read]).map_err(|_| CpuError::MsrRefused {
                msr: RESET_MSRS[read.min(RESET_MSRS.len() - 1)],
                index,
            })?;
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS", index))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS", index))?,
            fpu: vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU", index))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC", index))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(kvm_err("KVM_GET_MP_STATE", index))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS", index))?,
            msrs,
        })
    }

    /// Puts the saved state back on vCPU `index`, which must not be running.
    pub fn restore(&self, vcpu: &VcpuFd, index: u8) -> Result<(), CpuError> {
        // The MP state goes first: setting it can reset parts of the vCPU (INIT handling).
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE", index))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS", index))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_err("KVM_SET_REGS", index))?;
        vcpu.set_fpu(&self.fpu)
            .map_err(kvm_err("KVM_SET_FPU", index))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC", index))?;
        let written = vcpu
            .set_msrs(&self.msrs)
            .map_err(kvm_err("KVM_SET_MSRS", index))?;
        if written < self.msrs.as_slice().len() {
            return Err(CpuError::MsrRefused {
                msr: self.msrs.as_slice()[written].index,
                index,
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS", index))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_undoes_what_the_guest_changed() {
        let Some(kvm) =
            crate::test_kvm::kvm_or_skip("cpu::state::restore_undoes_what_the_guest_changed")
        else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rbx = 42;
        vcpu.set_regs(&regs).unwrap();
        let saved = VcpuState::save(&vcpu, 0).unwrap();
        assert!(!saved.msrs.as_slice().is_empty());

        regs.rip = 0xdead;
        regs.rbx = 7;
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr4 ^= 1 << 9;
        vcpu.set_sregs(&sregs).unwrap();

        saved.restore(&vcpu, 0).unwrap();
        let back = vcpu.get_regs().unwrap();
        assert_eq!((back.rip, back.rbx), (0x1000, 42));
        assert_eq!(vcpu.get_sregs().unwrap().cr4, saved.sregs.cr4);
    }
}
