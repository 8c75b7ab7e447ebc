//! CPUID tables: KVM's supported set, adjusted per vCPU for topology and hypervisor
//! identification, and narrowed by the CPU template.
//!
//! Topology: one package with one core per vCPU and one thread per core; the APIC id of vCPU
//! `i` is `i` (KVM's default for vCPU id `i`, which is also what the MP table says).

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;
use std::sync::OnceLock;

use super::{CpuError, CpuTemplate};
use crate::boot::layout;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Feature bits the Baseline template hides: (leaf, subleaf, register, bits).
pub(crate) const BASELINE_HIDDEN: &[(u32, u32, Reg, u32)] = &[
    (
        1,
        0,
        Reg::Ecx,
        bit(1) // PCLMULQDQ
            | bit(9) // SSSE3
            | bit(12) // FMA
            | bit(13) // CX16
            | bit(17) // PCID
            | bit(19) // SSE4.1
            | bit(20) // SSE4.2
            | bit(22) // MOVBE
            | bit(23) // POPCNT
            | bit(25) // AES
            | bit(26) // XSAVE
            | bit(27) // OSXSAVE
            | bit(28) // AVX
            | bit(29) // F16C
            | bit(30), // RDRAND
    ),
    (
        7,
        0,
        Reg::Ebx,
        bit(0) // FSGSBASE
            | bit(3) // BMI1
            | bit(4) // HLE
            | bit(5) // AVX2
            | bit(7) // SMEP
            | bit(8) // BMI2
            | bit(9) // ERMS
            | bit(10) // INVPCID
            | bit(11) // RTM
            | bit(14) // MPX (XSAVE state)
            | bit(16) // AVX512F
            | bit(17) // AVX512DQ
            | bit(18) // RDSEED
            | bit(19) // ADX
            | bit(20) // SMAP
            | bit(21) // AVX512_IFMA
            | bit(23) // CLFLUSHOPT
            | bit(24) // CLWB
            | bit(26) // AVX512PF
            | bit(27) // AVX512ER
            | bit(28) // AVX512CD
            | bit(29) // SHA
            | bit(30) // AVX512BW
            | bit(31), // AVX512VL
    ),
    (
        7,
        0,
        Reg::Ecx,
        bit(1) // AVX512_VBMI
            | bit(2) // UMIP
            | bit(3) // PKU (XSAVE state)
            | bit(4) // OSPKE
            | bit(6) // AVX512_VBMI2
            | bit(8) // GFNI
            | bit(9) // VAES
            | bit(10) // VPCLMULQDQ
            | bit(11) // AVX512_VNNI
            | bit(12) // AVX512_BITALG
            | bit(14) // AVX512_VPOPCNTDQ
            | bit(22), // RDPID
    ),
    (
        7,
        0,
        Reg::Edx,
        bit(2) // AVX512_4VNNIW
            | bit(3) // AVX512_4FMAPS
            | bit(4) // FSRM
            | bit(8) // AVX512_VP2INTERSECT
            | bit(22) // AMX_BF16
            | bit(23) // AVX512_FP16
            | bit(24) // AMX_TILE
            | bit(25), // AMX_INT8
    ),
    (
        7,
        1,
        Reg::Eax,
        bit(4) // AVX_VNNI
            | bit(5) // AVX512_BF16
            | bit(10) // fast zero-length REP MOVSB
            | bit(11) // fast short REP STOSB
            | bit(12), // fast short REP CMPSB/SCASB
    ),
    (
        0x4000_0001,
        0,
        Reg::Eax,
        // KVM paravirtual features that work through the VMCALL hypercall: measured on a
        // nested host, a Linux AP sending its first paravirtual IPI hangs in VMCALL and the
        // boot stalls; without them Linux uses the APIC and plain HLT/PAUSE and brings all
        // vCPUs up.
        bit(7) // KVM_FEATURE_PV_UNHALT (KVM_HC_KICK_CPU)
            | bit(11) // KVM_FEATURE_PV_SEND_IPI (KVM_HC_SEND_IPI)
            | bit(13), // KVM_FEATURE_PV_SCHED_YIELD (KVM_HC_SCHED_YIELD)
    ),
    (
        0x8000_0001,
        0,
        Reg::Ecx,
        bit(5) // LZCNT / ABM
            | bit(6) // SSE4A
            | bit(7) // misaligned SSE
            | bit(11) // XOP
            | bit(16) // FMA4
            | bit(21), // TBM
    ),
];

const fn bit(n: u32) -> u32 {
    1 << n
}

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const HYPERVISOR_BIT: u32 = bit(31);
const HTT_BIT: u32 = bit(28);
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// "AuthenticAMD" / "HygonGenuine" EBX.
const VENDOR_AMD_EBX: u32 = 0x6874_7541;
const VENDOR_HYGON_EBX: u32 = 0x6f67_7948;
/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
/// Size of the legacy x87 + SSE XSAVE area (512) plus the XSAVE header (64).
const XSAVE_LEGACY_AREA_SIZE: u32 = 576;
/// x87 and SSE state components.
const XCR0_LEGACY: u32 = 0x3;

/// CPUID for vCPU `index` of `num_cpus`: KVM's supported set, APIC id and topology leaves
/// (leaf 1 APIC id and logical count, leaf 4 core counts, leaves 0xB/0x1F), the hypervisor bit
/// and KVM signature leaf, and the template's feature mask.
pub fn cpuid(kvm: &Kvm, template: CpuTemplate, index: u8, num_cpus: u8) -> Result<CpuId, CpuError> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS || index >= num_cpus {
        return Err(CpuError::InvalidVcpu { index, num_cpus });
    }
    let mut entries = supported_entries(kvm, index)?.to_vec();
    adjust(&mut entries, template, index, num_cpus);
    CpuId::from_entries(&entries).map_err(|_| CpuError::CpuidTooLarge(entries.len()))
}

/// KVM's supported CPUID, fetched once per process: it depends only on the host CPU and the
/// KVM module, and fetching it costs hundreds of microseconds on nested hosts, where each
/// host `cpuid` the kernel executes is a VM exit.
fn supported_entries(kvm: &Kvm, index: u8) -> Result<&'static [kvm_cpuid_entry2], CpuError> {
    static SUPPORTED: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();
    if let Some(entries) = SUPPORTED.get() {
        return Ok(entries);
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| CpuError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            index,
            source,
        })?;
    Ok(SUPPORTED.get_or_init(|| supported.as_slice().to_vec()))
}

/// Applies topology, hypervisor identification and the template to KVM's supported entries.
pub(crate) fn adjust(
    entries: &mut Vec<kvm_cpuid_entry2>,
    template: CpuTemplate,
    index: u8,
    num_cpus: u8,
) {
    set_topology(entries, index, num_cpus);
    set_hypervisor(entries);
    if template == CpuTemplate::Baseline {
        apply_baseline(entries);
    }
}

/// Number of APIC id bits that distinguish cores in the package.
fn core_id_bits(num_cpus: u8) -> u32 {
    u32::from(num_cpus).next_power_of_two().trailing_zeros()
}

fn set_topology(entries: &mut Vec<kvm_cpuid_entry2>, index: u8, num_cpus: u8) {
    let apic_id = u32::from(index);
    let shift = core_id_bits(num_cpus);
    let max_basic = entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax);
    let is_amd = entries.iter().any(|e| {
        e.function == LEAF_VENDOR && (e.ebx == VENDOR_AMD_EBX || e.ebx == VENDOR_HYGON_EBX)
    });

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(num_cpus) << 16) | (apic_id << 24);
                if num_cpus > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26] addressable core ids - 1; EAX[25:14] logical processors sharing
                // this cache - 1: L1/L2 belong to one core, L3 to the whole package.
                let level = (e.eax >> 5) & 0x7;
                let cores = (1u32 << shift) - 1;
                let sharing = if level >= 3 { cores } else { 0 };
                e.eax = (e.eax & 0x0000_3fff) | (cores.min(0x3f) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_AMD_SIZES if is_amd => {
                // ECX[15:12] APIC id bits for cores, ECX[7:0] cores in the package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (u32::from(num_cpus) - 1);
            }
            _ => {}
        }
    }

    let had_v2 = entries.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);
    entries.retain(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2);
    let mut leaves = Vec::new();
    if max_basic >= LEAF_TOPOLOGY {
        leaves.push(LEAF_TOPOLOGY);
    }
    if had_v2 && max_basic >= LEAF_TOPOLOGY_V2 {
        leaves.push(LEAF_TOPOLOGY_V2);
    }
    for function in leaves {
        let levels = [
            // SMT: one thread per core, so no id bits below the core level.
            (0, 1, LEVEL_SMT),
            (shift, u32::from(num_cpus), LEVEL_CORE),
            // Terminating invalid level.
            (0, 0, 0),
        ];
        for (subleaf, (eax, ebx, kind)) in levels.into_iter().enumerate() {
            entries.push(kvm_cpuid_entry2 {
                function,
                index: subleaf as u32,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx: (kind << 8) | subleaf as u32,
                edx: apic_id,
                ..Default::default()
            });
        }
    }
}

fn set_hypervisor(entries: &mut Vec<kvm_cpuid_entry2>) {
    for e in entries.iter_mut() {
        if e.function == LEAF_FEATURES {
            e.ecx |= HYPERVISOR_BIT;
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.function == LEAF_KVM_SIGNATURE)
    {
        Some(e) => {
            e.eax = e.eax.max(LEAF_KVM_FEATURES);
            [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: LEAF_KVM_SIGNATURE,
            eax: LEAF_KVM_SIGNATURE,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        }),
    }
}

fn apply_baseline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut() {
        for &(function, subleaf, reg, bits) in BASELINE_HIDDEN {
            if e.function == function && e.index == subleaf {
                *reg_mut(e, reg) &= !bits;
            }
        }
        // Without XSAVE only the legacy x87/SSE state exists: describe exactly that, so no
        // XSAVEOPT/XSAVEC/XSAVES or extended state component is advertised either.
        if e.function == LEAF_XSAVE {
            match e.index {
                0 => {
                    e.eax &= XCR0_LEGACY;
                    e.ebx = XSAVE_LEGACY_AREA_SIZE;
                    e.ecx = XSAVE_LEGACY_AREA_SIZE;
                    e.edx = 0;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
            }
        }
    }
}

pub(crate) fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm() -> Option<Kvm> {
        match Kvm::new() {
            Ok(kvm) => Some(kvm),
            Err(e) => {
                eprintln!("skipped: /dev/kvm is not available: {e}");
                None
            }
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    #[test]
    fn baseline_hides_every_listed_bit() {
        let Some(kvm) = kvm() else { return };
        let host = cpuid(&kvm, CpuTemplate::Host, 0, 1).unwrap();
        let base = cpuid(&kvm, CpuTemplate::Baseline, 0, 1).unwrap();
        let mut hidden_somewhere = 0;
        for &(function, subleaf, reg, bits) in BASELINE_HIDDEN {
            if let Some(mut e) = find(&base, function, subleaf) {
                assert_eq!(
                    *reg_mut(&mut e, reg) & bits,
                    0,
                    "leaf {function:#x}.{subleaf} {reg:?}"
                );
            }
            if let Some(mut e) = find(&host, function, subleaf) {
                hidden_somewhere |= *reg_mut(&mut e, reg) & bits;
            }
        }
        // The host template keeps what KVM offers, so the comparison above is not vacuous
        // on any x86-64 host with SSSE3 or later.
        assert_ne!(
            hidden_somewhere, 0,
            "host template exposes none of the baseline-hidden bits"
        );
        let leaf1 = find(&base, 1, 0).unwrap();
        // The baseline still has SSE2 and the basic x86-64 features.
        assert_ne!(leaf1.edx & bit(26), 0, "SSE2");
        for e in base.as_slice().iter().filter(|e| e.function == LEAF_XSAVE) {
            if e.index == 0 {
                assert_eq!(e.eax & !XCR0_LEGACY, 0);
                assert_eq!(e.edx, 0);
            } else {
                assert_eq!(
                    (e.eax, e.ebx, e.ecx, e.edx),
                    (0, 0, 0, 0),
                    "0xd.{}",
                    e.index
                );
            }
        }
    }

    #[test]
    fn topology_and_apic_ids_follow_the_vcpu() {
        let Some(kvm) = kvm() else { return };
        for (index, num_cpus) in [(0u8, 1u8), (0, 4), (3, 4), (4, 5), (200, 254)] {
            let c = cpuid(&kvm, CpuTemplate::Host, index, num_cpus).unwrap();
            let leaf1 = find(&c, 1, 0).unwrap();
            assert_eq!(leaf1.ebx >> 24, u32::from(index));
            assert_eq!((leaf1.ebx >> 16) & 0xff, u32::from(num_cpus));
            assert_eq!(leaf1.edx & HTT_BIT != 0, num_cpus > 1);
            assert_ne!(leaf1.ecx & HYPERVISOR_BIT, 0);

            if let Some(smt) = find(&c, LEAF_TOPOLOGY, 0) {
                let core = find(&c, LEAF_TOPOLOGY, 1).unwrap();
                let end = find(&c, LEAF_TOPOLOGY, 2).unwrap();
                assert_eq!((smt.ebx, (smt.ecx >> 8) & 0xff), (1, LEVEL_SMT));
                assert_eq!(
                    (core.ebx, (core.ecx >> 8) & 0xff),
                    (u32::from(num_cpus), LEVEL_CORE)
                );
                assert!(1u32 << core.eax >= u32::from(num_cpus));
                assert_eq!((end.ecx >> 8) & 0xff, 0);
                for e in [smt, core, end] {
                    assert_eq!(e.edx, u32::from(index));
                }
            }
            for e in c
                .as_slice()
                .iter()
                .filter(|e| e.function == LEAF_CACHE && e.eax & 0x1f != 0)
            {
                let cores = (e.eax >> 26) + 1;
                assert!(cores >= u32::from(num_cpus).min(64), "leaf 4 cores {cores}");
            }
            let sig = find(&c, LEAF_KVM_SIGNATURE, 0).unwrap();
            assert_eq!([sig.ebx, sig.ecx, sig.edx], KVM_SIGNATURE);
        }
    }

    #[test]
    fn refuses_bad_vcpu_numbers() {
        let Some(kvm) = kvm() else { return };
        for (index, num_cpus) in [(0u8, 0u8), (2, 2), (0, 255)] {
            assert!(matches!(
                cpuid(&kvm, CpuTemplate::Host, index, num_cpus),
                Err(CpuError::InvalidVcpu { .. })
            ));
        }
    }
}
