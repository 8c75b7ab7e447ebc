//! vCPU configuration: CPUID templates and boot registers.
//!
//! [`cpuid`] builds the CPUID table a vCPU gets (KVM's supported set, the vCPU's topology,
//! the TSC-deadline timer when KVM emulates it, for [`CpuTemplate::Baseline`] a conservative
//! feature set, and an XSAVE leaf that matches the features left); [`configure`] loads it into
//! the vCPU with the MSRs, FPU and local APIC setup, and puts the boot vCPU at the kernel's
//! entry point.

mod cpuid;
mod regs;
mod state;

use std::fmt;
use std::str::FromStr;

pub use self::cpuid::cpuid;
pub use self::regs::{configure, rewrite_boot_tables};
pub use self::state::VcpuState;

/// Which CPU features the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Everything KVM can offer on this host.
    #[default]
    Host,
    /// A conservative x86-64 feature set: no SMAP/SMEP/UMIP, no XSAVE family (hence no
    /// AVX/AVX2/AVX-512/AMX/MPX/PKU), no FMA/F16C, CX16, POPCNT, MOVBE, AES, PCLMULQDQ,
    /// RDRAND/RDSEED, SHA, BMI1/2, ERMS/FSRM, ADX, LZCNT/ABM, PCID/INVPCID, FSGSBASE, RDPID,
    /// CLFLUSHOPT, CLWB, SSE4.1/4.2, SSSE3, and no hypercall-based KVM paravirtual features
    /// (PV IPIs, PV spinlock kicks, PV yield). Guests behave the same across hosts of
    /// different generations, and hosts whose instruction emulator lacks those instructions
    /// can still run them.
    Baseline,
}

impl FromStr for CpuTemplate {
    type Err = CpuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "baseline" => Ok(CpuTemplate::Baseline),
            other => Err(CpuError::UnknownTemplate(other.to_string())),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
        })
    }
}

/// Errors while building CPUID or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A CPU template name that does not exist.
    #[error("unknown CPU template {0:?}: expected \"host\" or \"baseline\"")]
    UnknownTemplate(String),
    /// The vCPU index or count is out of range.
    #[error("invalid vCPU {index} of {num_cpus}: the count must be 1 to {max} and the index below it", max = crate::boot::layout::MAX_VCPUS)]
    InvalidVcpu {
        /// The vCPU index.
        index: u8,
        /// The vCPU count.
        num_cpus: u8,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed for vCPU {index}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The vCPU index (0 for VM-wide queries).
        index: u8,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table has more entries than KVM accepts.
    #[error("CPUID table of {0} entries exceeds KVM's limit")]
    CpuidTooLarge(usize),
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM refused boot MSR {msr:#x} for vCPU {index}")]
    MsrRefused {
        /// The first MSR KVM did not set.
        msr: u32,
        /// The vCPU index.
        index: u8,
    },
    /// A snapshot holds an MSR this host's KVM does not list.
    #[error("snapshot holds MSR {msr:#x} for vCPU {index}, which this host's KVM does not list")]
    UnlistedMsr {
        /// The MSR.
        msr: u32,
        /// The vCPU index.
        index: u8,
    },
    /// Writing a boot structure (GDT, IDT, page tables) into guest memory failed.
    #[error("cannot write the boot {what} at {addr:#x}: {source}")]
    GuestMemory {
        /// The structure.
        what: &'static str,
        /// Its guest address.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_round_trip() {
        for t in [CpuTemplate::Host, CpuTemplate::Baseline] {
            assert_eq!(t.to_string().parse::<CpuTemplate>().unwrap(), t);
        }
        let err = "T2".parse::<CpuTemplate>().unwrap_err();
        assert!(err.to_string().contains("\"T2\""));
    }
}
