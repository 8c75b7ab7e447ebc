//! CPUID tables: KVM's supported set, adjusted per vCPU for topology and hypervisor
//! identification, and narrowed by the CPU template.
//!
//! Topology: one package with one core per vCPU and one thread per core; the APIC id of vCPU
//! `i` is `i` (KVM's default for vCPU id `i`, which is also what the MP table and the MADT
//! say).
//!
//! Whatever the template, the XSAVE leaf (0xD) is then made to describe exactly the state
//! components whose features the guest can see, with sizes that add up, so that a guest
//! kernel's consistency checks of the XSAVE layout pass.
//!
//! Timekeeping: KVM already reports the invariant TSC (0x8000_0007 EDX bit 8, when the host
//! has it) and the stable kvmclock bit (0x4000_0001 EAX bit 24), and neither template hides
//! them, so Linux takes the TSC frequency from kvmclock and trusts the TSC without
//! calibrating. The TSC/bus frequency leaf 0x4000_0010 is not added: Linux reads it only when
//! it runs under VMware or ACRN, not under the KVM signature Citadel presents.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm};
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
/// Leaf 1 ECX: the local APIC timer has TSC-deadline mode.
const TSC_DEADLINE_BIT: u32 = bit(24);
/// Leaf 1 ECX: XSAVE/XRSTOR and XCR0.
const XSAVE_BIT: u32 = bit(26);
/// Leaf 0xD subleaf 1 EAX: XSAVEC and XSAVES (both write the compacted format; XSAVES also
/// saves the supervisor components of IA32_XSS).
const XSAVEC_BIT: u32 = bit(1);
const XSAVES_BIT: u32 = bit(3);
/// Leaf 0xD subleaf i ECX: the component is a supervisor (IA32_XSS) one; it starts 64-byte
/// aligned in the compacted format.
const XSAVE_SUPERVISOR_BIT: u32 = bit(0);
const XSAVE_ALIGNED64_BIT: u32 = bit(1);
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
/// The AVX state component (upper halves of the YMM registers).
const XSAVE_YMM: u32 = 2;
/// The AVX-512 state components (opmask, upper ZMM0-15, ZMM16-31); the architecture refuses
/// them in XCR0 without the AVX component.
const XSAVE_AVX512: [u32; 3] = [5, 6, 7];

/// User state components and the CPUID feature (leaf, subleaf, register, bit) without which
/// the guest never enables them: Linux drops a component whose feature is hidden, then checks
/// the sizes leaf 0xD reports against what remains.
const XSAVE_COMPONENT_FEATURES: &[(u32, u32, u32, Reg, u32)] = &[
    (XSAVE_YMM, LEAF_FEATURES, 0, Reg::Ecx, bit(28)), // AVX
    (3, 7, 0, Reg::Ebx, bit(14)),                     // MPX bound registers
    (4, 7, 0, Reg::Ebx, bit(14)),                     // MPX bound configuration
    (XSAVE_AVX512[0], 7, 0, Reg::Ebx, bit(16)),       // AVX512F
    (XSAVE_AVX512[1], 7, 0, Reg::Ebx, bit(16)),
    (XSAVE_AVX512[2], 7, 0, Reg::Ebx, bit(16)),
    (9, 7, 0, Reg::Ecx, bit(3)),   // PKRU: PKU
    (17, 7, 0, Reg::Edx, bit(24)), // AMX tile configuration: AMX-TILE
    (18, 7, 0, Reg::Edx, bit(24)), // AMX tile data: AMX-TILE
];

/// CPUID for vCPU `index` of `num_cpus`: KVM's supported set, APIC id and topology leaves
/// (leaf 1 APIC id and logical count, leaf 4 core counts, leaves 0xB/0x1F), the hypervisor bit
/// and KVM signature leaf, the TSC-deadline timer when KVM emulates it, the template's feature
/// mask, and an XSAVE leaf consistent with the features that remain.
pub fn cpuid(kvm: &Kvm, template: CpuTemplate, index: u8, num_cpus: u8) -> Result<CpuId, CpuError> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS || index >= num_cpus {
        return Err(CpuError::InvalidVcpu { index, num_cpus });
    }
    let mut entries = supported_entries(kvm, index)?.to_vec();
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    adjust(&mut entries, template, index, num_cpus, tsc_deadline);
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

/// Applies topology, hypervisor identification, the timer and the template to KVM's supported
/// entries, then makes the XSAVE leaf agree with the result. `tsc_deadline` says whether KVM
/// emulates the TSC-deadline timer mode of the local APIC.
pub(crate) fn adjust(
    entries: &mut Vec<kvm_cpuid_entry2>,
    template: CpuTemplate,
    index: u8,
    num_cpus: u8,
    tsc_deadline: bool,
) {
    set_topology(entries, index, num_cpus);
    set_hypervisor(entries);
    set_tsc_deadline(entries, tsc_deadline);
    if template == CpuTemplate::Baseline {
        apply_baseline(entries);
    }
    normalize_xsave(entries);
}

/// KVM_GET_SUPPORTED_CPUID leaves the TSC-deadline bit out because it depends on the in-kernel
/// local APIC rather than on the host CPU; KVM_CAP_TSC_DEADLINE_TIMER says whether it is
/// emulated. Without the bit, Linux calibrates the local APIC timer against another clock at
/// boot (100 ms, and seconds on a loaded nested host); with it, the timer is programmed in TSC
/// ticks and needs no calibration. It is part of both templates: it exposes no instruction,
/// only a timer mode KVM implements itself.
fn set_tsc_deadline(entries: &mut [kvm_cpuid_entry2], available: bool) {
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        if available {
            e.ecx |= TSC_DEADLINE_BIT;
        } else {
            e.ecx &= !TSC_DEADLINE_BIT;
        }
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
    }
}

/// Whether `bits` of `reg` in leaf `function`.`index` are set; a missing leaf has none.
fn has_feature(
    entries: &[kvm_cpuid_entry2],
    function: u32,
    index: u32,
    reg: Reg,
    bits: u32,
) -> bool {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
        .is_some_and(|e| reg_value(e, reg) & bits == bits)
}

fn xsave_entry(entries: &[kvm_cpuid_entry2], index: u32) -> Option<kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == index)
        .copied()
}

/// Component numbers set in `mask`, from 2 (the first extended one) up.
fn extended_components(mask: u64) -> impl Iterator<Item = u32> {
    (XSAVE_YMM..64).filter(move |i| mask & (1u64 << i) != 0)
}

/// Size of a standard-format XSAVE area holding the components of `mask`: each extended
/// component sits at the fixed offset its subleaf gives.
fn xsave_standard_size(entries: &[kvm_cpuid_entry2], mask: u64) -> u32 {
    extended_components(mask)
        .filter_map(|i| xsave_entry(entries, i))
        .map(|c| c.ebx.saturating_add(c.eax))
        .fold(XSAVE_LEGACY_AREA_SIZE, u32::max)
}

/// Size of a compacted-format XSAVE area (XSAVEC/XSAVES) holding the components of `mask`:
/// they follow each other in component order, some starting 64-byte aligned.
fn xsave_compacted_size(entries: &[kvm_cpuid_entry2], mask: u64) -> u32 {
    extended_components(mask)
        .filter_map(|i| xsave_entry(entries, i))
        .fold(XSAVE_LEGACY_AREA_SIZE, |end, c| {
            let start = if c.ecx & XSAVE_ALIGNED64_BIT != 0 {
                end.checked_next_multiple_of(64).unwrap_or(u32::MAX)
            } else {
                end
            };
            start.saturating_add(c.eax)
        })
}

/// Makes leaf 0xD describe exactly the state the guest can use:
///
/// - without XSAVE (leaf 1), only x87/SSE, no XSAVEOPT/XSAVEC/XSAVES and no other component;
/// - a user component whose feature is hidden (AVX for the YMM state, AVX512F for the
///   AVX-512 state, MPX, PKU, AMX-TILE), or that has no subleaf saying how large it is, is
///   not offered; nor is AVX-512 state without AVX state, which XSETBV would refuse;
/// - supervisor components are offered only with XSAVES, the only instruction that saves them;
/// - the subleaf of every component not offered is cleared;
/// - subleaf 0 EBX/ECX are the standard-format size of what is offered (KVM keeps EBX in step
///   with the guest's XCR0 afterwards), subleaf 1 EBX the compacted size when XSAVEC or XSAVES
///   is there.
///
/// KVM's own table already satisfies this for the host template on a well-behaved host;
/// templates that hide features, and hosts (nested ones especially) whose leaf 0xD offers
/// components whose features are not offered, do not. Linux checks these sizes against the
/// components it enables and warns at boot when they disagree.
fn normalize_xsave(entries: &mut [kvm_cpuid_entry2]) {
    let Some(leaf0) = xsave_entry(entries, 0) else {
        return;
    };
    let xsave = has_feature(entries, LEAF_FEATURES, 0, Reg::Ecx, XSAVE_BIT);
    let leaf1 = xsave_entry(entries, 1).unwrap_or_default();
    // Components in `mask` without a subleaf giving their size, or whose subleaf says they
    // are of the other kind (user vs supervisor).
    let unusable = |mask: u64, supervisor: bool| {
        extended_components(mask)
            .filter(|&i| {
                !xsave_entry(entries, i).is_some_and(|c| {
                    c.eax != 0 && (c.ecx & XSAVE_SUPERVISOR_BIT != 0) == supervisor
                })
            })
            .fold(0u64, |m, i| m | 1u64 << i)
    };

    let mut user = u64::from(XCR0_LEGACY) & u64::from(leaf0.eax);
    let mut supervisor = 0u64;
    let mut leaf1_eax = 0;
    if xsave {
        user = (u64::from(leaf0.edx) << 32) | u64::from(leaf0.eax);
        for &(component, function, index, reg, bits) in XSAVE_COMPONENT_FEATURES {
            if !has_feature(entries, function, index, reg, bits) {
                user &= !(1u64 << component);
            }
        }
        if user & (1u64 << XSAVE_YMM) == 0 {
            for component in XSAVE_AVX512 {
                user &= !(1u64 << component);
            }
        }
        user &= !unusable(user, false);
        leaf1_eax = leaf1.eax;
        if leaf1.eax & XSAVES_BIT != 0 {
            supervisor = (u64::from(leaf1.edx) << 32) | u64::from(leaf1.ecx);
            supervisor &= !unusable(supervisor, true);
        }
    }
    let standard = xsave_standard_size(entries, user);
    let compacted = if leaf1_eax & (XSAVEC_BIT | XSAVES_BIT) != 0 {
        xsave_compacted_size(entries, user | supervisor)
    } else {
        0
    };
    let offered = user | supervisor;
    for e in entries.iter_mut().filter(|e| e.function == LEAF_XSAVE) {
        match e.index {
            0 => {
                e.eax = user as u32;
                e.edx = (user >> 32) as u32;
                e.ebx = standard;
                e.ecx = standard;
            }
            1 => {
                e.eax = leaf1_eax;
                e.ebx = compacted;
                e.ecx = supervisor as u32;
                e.edx = (supervisor >> 32) as u32;
            }
            i if i < 64 && offered & (1u64 << i) != 0 => {}
            _ => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
}

fn reg_value(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
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
        crate::test_kvm::kvm_or_skip("cpu::cpuid tests")
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

    #[test]
    fn tsc_deadline_timer_follows_kvm_in_both_templates() {
        let Some(kvm) = kvm() else { return };
        let available = kvm.check_extension(Cap::TscDeadlineTimer);
        for template in [CpuTemplate::Host, CpuTemplate::Baseline] {
            for (index, num_cpus) in [(0u8, 1u8), (1, 2)] {
                let c = cpuid(&kvm, template, index, num_cpus).unwrap();
                let leaf1 = find(&c, LEAF_FEATURES, 0).unwrap();
                assert_eq!(leaf1.ecx & TSC_DEADLINE_BIT != 0, available, "{template}");
            }
        }
        let mut entries = vec![entry(LEAF_FEATURES, 0, [0, 0, TSC_DEADLINE_BIT, 0])];
        adjust(&mut entries, CpuTemplate::Host, 0, 1, false);
        assert_eq!(
            entries[0].ecx & TSC_DEADLINE_BIT,
            0,
            "not offered without KVM"
        );
        adjust(&mut entries, CpuTemplate::Baseline, 0, 1, true);
        assert_ne!(entries[0].ecx & TSC_DEADLINE_BIT, 0);
    }

    fn entry(function: u32, index: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == LEAF_XSAVE || function == 7 {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A host with AVX-512, PKU and AMX (user components 2, 5-7, 9, 17, 18) and the processor
    /// trace and CET supervisor components (8, 11, 12), laid out as such hosts report them.
    fn avx512_amx_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(
                LEAF_VENDOR,
                0,
                [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            ),
            entry(
                LEAF_FEATURES,
                0,
                [0x806f8, 0, XSAVE_BIT | bit(27) | bit(28), 0],
            ),
            entry(7, 0, [0, bit(14) | bit(16), bit(3), bit(24)]),
            entry(LEAF_XSAVE, 0, [0x602e7, 0x2b00, 0x2b00, 0]),
            entry(LEAF_XSAVE, 1, [0x1f, 0x2d00, 0x1900, 0]),
            entry(LEAF_XSAVE, 2, [256, 576, 0, 0]),
            entry(LEAF_XSAVE, 5, [64, 1088, 0, 0]),
            entry(LEAF_XSAVE, 6, [512, 1152, 0, 0]),
            entry(LEAF_XSAVE, 7, [1024, 1664, 0, 0]),
            entry(LEAF_XSAVE, 8, [128, 0, 1, 0]),
            entry(LEAF_XSAVE, 9, [8, 2688, 0, 0]),
            entry(LEAF_XSAVE, 11, [16, 0, 1, 0]),
            entry(LEAF_XSAVE, 12, [24, 0, 1, 0]),
            entry(LEAF_XSAVE, 17, [64, 2752, 2, 0]),
            entry(LEAF_XSAVE, 18, [8192, 2816, 6, 0]),
        ]
    }

    fn xsave_masks(entries: &[kvm_cpuid_entry2]) -> (u64, u64, u32) {
        let l0 = xsave_entry(entries, 0).unwrap();
        let l1 = xsave_entry(entries, 1).unwrap_or_default();
        (
            u64::from(l0.edx) << 32 | u64::from(l0.eax),
            u64::from(l1.edx) << 32 | u64::from(l1.ecx),
            l1.eax,
        )
    }

    /// The checks Linux's XSAVE setup makes (and the architectural rules on XCR0): every
    /// offered component has a sized subleaf of the right kind and a visible feature, user
    /// components are in offset order, supervisor ones need XSAVES, and subleaf 0 and 1 sizes
    /// match the offered components. Sizes are recomputed here from the subleaves.
    fn assert_xsave_consistent(entries: &[kvm_cpuid_entry2], what: &str) {
        let Some(l0) = xsave_entry(entries, 0) else {
            return;
        };
        let (user, supervisor, l1_eax) = xsave_masks(entries);
        let l1 = xsave_entry(entries, 1).unwrap_or_default();
        if !has_feature(entries, LEAF_FEATURES, 0, Reg::Ecx, XSAVE_BIT) {
            assert_eq!(
                user,
                u64::from(XCR0_LEGACY) & user,
                "{what}: legacy state only"
            );
            assert_eq!((l1.eax, l1.ebx, l1.ecx, l1.edx), (0, 0, 0, 0), "{what}");
            assert_eq!((l0.ebx, l0.ecx), (576, 576), "{what}");
        }
        assert_eq!(user & 3, 3, "{what}: x87 and SSE are always there");
        if l1_eax & XSAVES_BIT == 0 {
            assert_eq!(supervisor, 0, "{what}: supervisor state without XSAVES");
        }
        assert_eq!(user & supervisor, 0, "{what}");
        let mut last_offset = 0;
        let mut standard: u32 = 576;
        let mut compacted: u32 = 576;
        for i in 2..64u32 {
            let sub = xsave_entry(entries, i).unwrap_or_default();
            let is_user = user & (1 << i) != 0;
            let is_supervisor = supervisor & (1 << i) != 0;
            if !is_user && !is_supervisor {
                assert_eq!(
                    (sub.eax, sub.ebx, sub.ecx, sub.edx),
                    (0, 0, 0, 0),
                    "{what}: 0xd.{i}"
                );
                continue;
            }
            assert_ne!(sub.eax, 0, "{what}: component {i} has no size");
            assert_eq!(
                sub.ecx & 1 != 0,
                is_supervisor,
                "{what}: component {i} kind"
            );
            if is_user {
                assert!(sub.ebx >= last_offset, "{what}: component {i} out of order");
                last_offset = sub.ebx;
                standard = standard.max(sub.ebx + sub.eax);
            }
            if sub.ecx & 2 != 0 {
                compacted = compacted.next_multiple_of(64);
            }
            compacted += sub.eax;
        }
        for &(component, function, index, reg, bits) in XSAVE_COMPONENT_FEATURES {
            if user & (1 << component) != 0 {
                assert!(
                    has_feature(entries, function, index, reg, bits),
                    "{what}: component {component} offered without its feature"
                );
            }
        }
        if user & (0b111 << 5) != 0 {
            assert_eq!(user & (0b111 << 5), 0b111 << 5, "{what}");
            assert_ne!(
                user & (1 << XSAVE_YMM),
                0,
                "{what}: AVX-512 state needs AVX state"
            );
        }
        assert_eq!(
            (l0.ebx, l0.ecx),
            (standard, standard),
            "{what}: 0xd.0 sizes"
        );
        let expect_compacted = if l1_eax & (XSAVEC_BIT | XSAVES_BIT) != 0 {
            compacted
        } else {
            0
        };
        assert_eq!(l1.ebx, expect_compacted, "{what}: 0xd.1 size");
    }

    #[test]
    fn invariant_tsc_and_stable_kvmclock_survive_both_templates() {
        let Some(kvm) = kvm() else { return };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let bits = [
            (0x8000_0007, Reg::Edx, bit(8)),
            (LEAF_KVM_FEATURES, Reg::Eax, bit(24)),
        ];
        for template in [CpuTemplate::Host, CpuTemplate::Baseline] {
            let c = cpuid(&kvm, template, 0, 2).unwrap();
            for (function, reg, b) in bits {
                if has_feature(supported.as_slice(), function, 0, reg, b) {
                    assert!(
                        has_feature(c.as_slice(), function, 0, reg, b),
                        "{template}: leaf {function:#x} bit {b:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn xsave_leaf_from_kvm_is_consistent_in_both_templates() {
        let Some(kvm) = kvm() else { return };
        for template in [CpuTemplate::Host, CpuTemplate::Baseline] {
            for (index, num_cpus) in [(0u8, 1u8), (3, 4)] {
                let c = cpuid(&kvm, template, index, num_cpus).unwrap();
                assert_xsave_consistent(c.as_slice(), &format!("{template} {index}/{num_cpus}"));
            }
        }
    }

    #[test]
    fn xsave_leaf_of_a_full_host_is_kept_whole() {
        let mut entries = avx512_amx_host();
        adjust(&mut entries, CpuTemplate::Host, 0, 1, true);
        assert_xsave_consistent(&entries, "host");
        let (user, supervisor, l1_eax) = xsave_masks(&entries);
        assert_eq!(user, 0x602e7);
        assert_eq!(supervisor, 0x1900);
        assert_eq!(l1_eax, 0x1f);
        let l0 = xsave_entry(&entries, 0).unwrap();
        assert_eq!((l0.ebx, l0.ecx), (2816 + 8192, 2816 + 8192));
        // 576 + YMM 256 + opmask 64 + ZMM_Hi256 512 + Hi16_ZMM 1024 + PT 128 + PKRU 8 + CET 16
        // + 24 = 2608, tile configuration from 2624 (64-aligned), tile data from 2688.
        assert_eq!(xsave_entry(&entries, 1).unwrap().ebx, 2688 + 8192);
    }

    #[test]
    fn xsave_components_of_hidden_features_are_withdrawn() {
        // A nested host whose leaf 0xD offers AVX-512 and AMX state while leaf 7 hides their
        // features, and which offers supervisor state without XSAVES.
        let mut entries = avx512_amx_host();
        for e in entries.iter_mut() {
            match (e.function, e.index) {
                (7, 0) => {
                    e.ebx &= !bit(16);
                    e.edx &= !bit(24);
                }
                (LEAF_XSAVE, 1) => e.eax &= !XSAVES_BIT,
                _ => {}
            }
        }
        adjust(&mut entries, CpuTemplate::Host, 0, 1, true);
        assert_xsave_consistent(&entries, "hidden AVX-512/AMX");
        let (user, supervisor, _) = xsave_masks(&entries);
        assert_eq!(user, 0x207, "x87, SSE, AVX, PKRU");
        assert_eq!(supervisor, 0);
        let l0 = xsave_entry(&entries, 0).unwrap();
        assert_eq!((l0.ebx, l0.ecx), (2696, 2696));
        // XSAVEC remains: 576 + 256 + 8.
        assert_eq!(xsave_entry(&entries, 1).unwrap().ebx, 840);
        for i in [5, 6, 7, 8, 11, 12, 17, 18] {
            assert_eq!(xsave_entry(&entries, i).unwrap().eax, 0, "0xd.{i}");
        }
    }

    #[test]
    fn xsave_components_without_a_subleaf_or_with_avx_hidden_are_withdrawn() {
        let mut entries = avx512_amx_host();
        entries.retain(|e| !(e.function == LEAF_XSAVE && e.index == 9));
        for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
            e.ecx &= !bit(28);
        }
        adjust(&mut entries, CpuTemplate::Host, 0, 1, true);
        assert_xsave_consistent(&entries, "no AVX, no PKRU subleaf");
        let (user, _, _) = xsave_masks(&entries);
        assert_eq!(user, 0x60003, "AVX-512 state goes with the AVX state");
    }

    #[test]
    fn baseline_reduces_any_xsave_leaf_to_legacy_state() {
        let mut entries = avx512_amx_host();
        adjust(&mut entries, CpuTemplate::Baseline, 0, 2, true);
        assert_xsave_consistent(&entries, "baseline");
        let (user, supervisor, l1_eax) = xsave_masks(&entries);
        assert_eq!((user, supervisor, l1_eax), (3, 0, 0));
    }
}
