//! Boot state of a vCPU: MSRs, FPU, local APIC, and for the boot vCPU its segments, control
//! registers, page tables and general registers for the kernel's entry protocol.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::CpuError;
use crate::boot::{layout, EntryPoint};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: the kernel's MTRR code and KVM both see
/// all of RAM as cacheable.
const MTRR_ENABLE_WB_DEFAULT: u64 = (1 << 11) | 6;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// LVT registers of the local APIC and their delivery mode field.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Descriptor flags as in the second dword of a GDT entry, bits 8..15 and 20..23 packed into
/// 16 bits: G, D/B, L, AVL in the top nibble, the access byte in the low byte.
const GDT_CODE64: u16 = 0xa09b;
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x008b;
const FLAT_LIMIT: u32 = 0xf_ffff;
const TSS_LIMIT: u32 = 0x67;
/// Selectors the Linux boot protocol asks for (__BOOT_CS, __BOOT_DS); PVH accepts any.
const CODE_SELECTOR_INDEX: u16 = 2;
const DATA_SELECTOR_INDEX: u16 = 3;
const TSS_SELECTOR_INDEX: u16 = 4;
/// Null, null, code, data, and the two halves of a 64-bit TSS descriptor.
const GDT_ENTRIES: usize = 6;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Configures vCPU `index` for boot: CPUID, MSRs, FPU and the local APIC (LINT0 ExtINT,
/// LINT1 NMI) for every vCPU; for the boot vCPU (index 0) also the registers for `entry`:
///
/// * [`EntryPoint::Linux64`]: GDT with __BOOT_CS/__BOOT_DS, empty IDT, 4-level identity page
///   tables for the first 1 GiB (2 MiB pages), long mode, RIP = entry, RSI = zero page,
///   RSP = RBP = [`layout::BOOT_STACK_POINTER`].
/// * [`EntryPoint::Pvh`]: flat 32-bit segments, CR0.PE only, RIP = entry, RBX = start info.
///
/// Other vCPUs keep their reset registers and wait for INIT/SIPI. The VM's in-kernel irqchip
/// must exist before this is called (the local APIC is set up here).
pub fn configure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: &EntryPoint,
    index: u8,
    cpuid: &CpuId,
) -> Result<(), CpuError> {
    let kvm_err = |what| {
        move |source| CpuError::Kvm {
            what,
            index,
            source,
        }
    };
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    set_msrs(vcpu, index)?;
    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    set_lint(vcpu, index)?;
    if index != 0 {
        return Ok(());
    }

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match *entry {
        EntryPoint::Linux64 { entry, zero_page } => {
            write_gdt_idt(mem, GDT_CODE64, &mut sregs)?;
            write_page_tables(mem)?;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4_START.0;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry.0;
            regs.rsi = zero_page.0;
            regs.rsp = layout::BOOT_STACK_POINTER.0;
            regs.rbp = layout::BOOT_STACK_POINTER.0;
        }
        EntryPoint::Pvh { entry, start_info } => {
            write_gdt_idt(mem, GDT_CODE32, &mut sregs)?;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = start_info.0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

/// Writes again the boot-time tables `configure` put in guest memory for `entry` (GDT, IDT
/// and, for the 64-bit entry, the identity page tables), for a reset guest whose memory no
/// longer holds them. The boot vCPU's saved registers already point at them.
pub fn rewrite_boot_tables(mem: &GuestMemoryMmap, entry: &EntryPoint) -> Result<(), CpuError> {
    // Only the memory matters here; the descriptor-table registers were saved at boot.
    let mut scratch = kvm_sregs::default();
    match entry {
        EntryPoint::Linux64 { .. } => {
            write_gdt_idt(mem, GDT_CODE64, &mut scratch)?;
            write_page_tables(mem)
        }
        EntryPoint::Pvh { .. } => write_gdt_idt(mem, GDT_CODE32, &mut scratch),
    }
}

fn set_msrs(vcpu: &VcpuFd, index: u8) -> Result<(), CpuError> {
    let values = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB_DEFAULT),
    ];
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::MsrRefused {
        msr: values[0].0,
        index,
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(|source| CpuError::Kvm {
        what: "KVM_SET_MSRS",
        index,
        source,
    })?;
    // KVM stops at the first MSR it refuses and reports how many it set.
    if written < values.len() {
        return Err(CpuError::MsrRefused {
            msr: values[written].0,
            index,
        });
    }
    Ok(())
}

fn set_lint(vcpu: &VcpuFd, index: u8) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(|source| CpuError::Kvm {
        what: "KVM_GET_LAPIC (is the in-kernel irqchip created?)",
        index,
        source,
    })?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| CpuError::Kvm {
        what: "KVM_SET_LAPIC",
        index,
        source,
    })
}

/// Encodes a GDT descriptor.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The hidden part of a segment register that KVM loads, matching descriptor `entry` at GDT
/// index `gdt_index`.
fn segment_from_gdt(entry: u64, gdt_index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: gdt_index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_gdt_idt(mem: &GuestMemoryMmap, code: u16, sregs: &mut kvm_sregs) -> Result<(), CpuError> {
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[usize::from(CODE_SELECTOR_INDEX)] = gdt_entry(code, 0, FLAT_LIMIT);
    gdt[usize::from(DATA_SELECTOR_INDEX)] = gdt_entry(GDT_DATA, 0, FLAT_LIMIT);
    gdt[usize::from(TSS_SELECTOR_INDEX)] = gdt_entry(GDT_TSS, 0, TSS_LIMIT);
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "GDT", layout::GDT_START, &bytes)?;
    write(mem, "IDT", layout::IDT_START, &0u64.to_le_bytes())?;

    let code_seg = segment_from_gdt(gdt[usize::from(CODE_SELECTOR_INDEX)], CODE_SELECTOR_INDEX);
    let data_seg = segment_from_gdt(gdt[usize::from(DATA_SELECTOR_INDEX)], DATA_SELECTOR_INDEX);
    sregs.gdt.base = layout::GDT_START.0;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = layout::IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment_from_gdt(gdt[usize::from(TSS_SELECTOR_INDEX)], TSS_SELECTOR_INDEX);
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages: PML4[0] → PDPT[0] → 512 PD entries.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(layout::PDPTE_START.0 | PAGE_PRESENT_RW).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    pdpt[..8].copy_from_slice(&(layout::PDE_START.0 | PAGE_PRESENT_RW).to_le_bytes());
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PAGE_PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
        .collect();
    write(mem, "PML4", layout::PML4_START, &pml4)?;
    write(mem, "PDPT", layout::PDPTE_START, &pdpt)?;
    write(mem, "page directory", layout::PDE_START, &pd)
}

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: GuestAddress,
    data: &[u8],
) -> Result<(), CpuError> {
    mem.write_slice(data, addr)
        .map_err(|source| CpuError::GuestMemory {
            what,
            addr: addr.0,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::test_kernel::{self, BzImageSpec, ElfSpec, LOAD_ADDR, MODE_32, MODE_64};
    use crate::boot::{self, BootSource};
    use crate::cpu::{cpuid, CpuTemplate};
    use crate::memory::{self, GuestRam};
    use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_UNINITIALIZED};
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use std::collections::BTreeMap;

    struct Booted {
        kvm: Kvm,
        vm: VmFd,
        ram: GuestRam,
        entry: EntryPoint,
        _kernel: vmm_sys_util::tempfile::TempFile,
    }

    /// Loads `kernel` into a fresh VM with an in-kernel irqchip, or `None` without /dev/kvm.
    fn boot(kernel: &[u8], num_cpus: u8) -> Option<Booted> {
        let kvm = crate::test_kvm::kvm_or_skip("cpu::regs tests")?;
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let ram = memory::create_guest_ram(32 << 20).unwrap();
        memory::register(&vm, &ram).unwrap();
        let file = test_kernel::file(kernel);
        let src = BootSource {
            kernel: file.as_path().to_path_buf(),
            pcie: false,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            virtio_mmio: Vec::new(),
        };
        let entry = boot::load(&ram.memory, &src, num_cpus).unwrap();
        Some(Booted {
            kvm,
            vm,
            ram,
            entry,
            _kernel: file,
        })
    }

    /// Runs the probe code to its last port write and returns port → value.
    fn run_probe(vcpu: &mut VcpuFd) -> BTreeMap<u16, u32> {
        let mut seen = BTreeMap::new();
        for _ in 0..32 {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(port, data) => {
                    assert_eq!(data.len(), 4);
                    seen.insert(port, u32::from_le_bytes(data.try_into().unwrap()));
                    if port == test_kernel::PORT_DONE {
                        return seen;
                    }
                }
                other => panic!("unexpected exit {other:?} after {seen:x?}"),
            }
        }
        panic!("probe did not finish: {seen:x?}");
    }

    #[test]
    fn linux64_boot_vcpu_starts_in_long_mode_at_the_entry() {
        let Some(b) = boot(&test_kernel::elf(&ElfSpec::default()), 2) else {
            return;
        };
        let mut vcpu = b.vm.create_vcpu(0).unwrap();
        let cpuid = cpuid(&b.kvm, CpuTemplate::Baseline, 0, 2).unwrap();
        configure(&vcpu, &b.ram.memory, &b.entry, 0, &cpuid).unwrap();

        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, LOAD_ADDR);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START.0);
        assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER.0);
        assert_eq!(regs.rflags, RFLAGS_RESERVED);
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, layout::PML4_START.0);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.cr0 & CR0_PE, 0);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x10, 1));
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.gdt.base, layout::GDT_START.0);

        let seen = run_probe(&mut vcpu);
        assert_eq!(seen[&test_kernel::PORT_MODE], MODE_64);
        assert_eq!(seen[&0x11], layout::ZERO_PAGE_START.0 as u32);
        assert_eq!(seen[&0x13], layout::BOOT_STACK_POINTER.0 as u32);
        assert_eq!(
            seen[&0x14], 0x5372_6448,
            "the zero page is readable through the page tables"
        );
    }

    #[test]
    fn bzimage_boot_vcpu_reads_its_setup_header() {
        let Some(b) = boot(&test_kernel::bzimage(&BzImageSpec::default()), 1) else {
            return;
        };
        let mut vcpu = b.vm.create_vcpu(0).unwrap();
        let cpuid = cpuid(&b.kvm, CpuTemplate::Host, 0, 1).unwrap();
        configure(&vcpu, &b.ram.memory, &b.entry, 0, &cpuid).unwrap();
        assert_eq!(vcpu.get_regs().unwrap().rip, LOAD_ADDR + 0x200);
        let seen = run_probe(&mut vcpu);
        assert_eq!(seen[&test_kernel::PORT_MODE], MODE_64);
        assert_eq!(seen[&0x14], 0x5372_6448);
    }

    #[test]
    fn pvh_boot_vcpu_starts_in_flat_protected_mode() {
        let spec = ElfSpec {
            pvh_note: true,
            ..Default::default()
        };
        let Some(b) = boot(&test_kernel::elf(&spec), 1) else {
            return;
        };
        let mut vcpu = b.vm.create_vcpu(0).unwrap();
        let cpuid = cpuid(&b.kvm, CpuTemplate::Host, 0, 1).unwrap();
        configure(&vcpu, &b.ram.memory, &b.entry, 0, &cpuid).unwrap();

        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, LOAD_ADDR);
        assert_eq!(regs.rbx, layout::PVH_INFO_START.0);
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer & EFER_LMA, 0);
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!((sregs.ss.base, sregs.ss.limit), (0, 0xffff_ffff));

        let seen = run_probe(&mut vcpu);
        assert_eq!(seen[&test_kernel::PORT_MODE], MODE_32);
        assert_eq!(seen[&0x12], layout::PVH_INFO_START.0 as u32);
        assert_eq!(seen[&0x15], 0x336e_c578, "hvm_start_info magic");
    }

    #[test]
    fn application_processors_wait_for_sipi_with_cpuid_msrs_and_lapic_set() {
        let Some(b) = boot(&test_kernel::elf(&ElfSpec::default()), 2) else {
            return;
        };
        let bsp = b.vm.create_vcpu(0).unwrap();
        let ap = b.vm.create_vcpu(1).unwrap();
        let reset_regs = ap.get_regs().unwrap();
        let reset_sregs = ap.get_sregs().unwrap();
        for (index, vcpu) in [(0u8, &bsp), (1, &ap)] {
            let cpuid = cpuid(&b.kvm, CpuTemplate::Baseline, index, 2).unwrap();
            configure(vcpu, &b.ram.memory, &b.entry, index, &cpuid).unwrap();
        }

        assert_eq!(
            ap.get_mp_state().unwrap().mp_state,
            KVM_MP_STATE_UNINITIALIZED
        );
        assert_eq!(ap.get_regs().unwrap().rip, reset_regs.rip);
        let sregs = ap.get_sregs().unwrap();
        assert_eq!(
            (sregs.cr0, sregs.cs.selector),
            (reset_sregs.cr0, reset_sregs.cs.selector)
        );

        let set = ap.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = set.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1, "APIC id of vCPU 1");
        assert_eq!(
            leaf1.ecx & (1 << 13),
            0,
            "CX16 hidden by the baseline template"
        );

        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(ap.get_msrs(&mut msrs).unwrap(), 2);
        assert_ne!(msrs.as_slice()[0].data & MISC_ENABLE_FAST_STRING, 0);
        assert_eq!(msrs.as_slice()[1].data, MTRR_ENABLE_WB_DEFAULT);

        for vcpu in [&bsp, &ap] {
            let lapic = vcpu.get_lapic().unwrap();
            let read =
                |off: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8));
            assert_eq!((read(APIC_LVT_LINT0) >> 8) & 7, APIC_MODE_EXTINT);
            assert_eq!((read(APIC_LVT_LINT1) >> 8) & 7, APIC_MODE_NMI);
        }
    }

    #[test]
    fn guest_cpuid_shows_its_apic_id_and_the_template() {
        let spec = ElfSpec {
            code: Some(test_kernel::cpuid_code()),
            ..Default::default()
        };
        let Some(b) = boot(&test_kernel::elf(&spec), 2) else {
            return;
        };
        let bsp = b.vm.create_vcpu(0).unwrap();
        let mut ap = b.vm.create_vcpu(1).unwrap();
        let cpuid0 = cpuid(&b.kvm, CpuTemplate::Baseline, 0, 2).unwrap();
        configure(&bsp, &b.ram.memory, &b.entry, 0, &cpuid0).unwrap();
        // Run the probe on vCPU 1 with the boot registers of vCPU 0, to see its own CPUID.
        let cpuid1 = cpuid(&b.kvm, CpuTemplate::Baseline, 1, 2).unwrap();
        configure(&ap, &b.ram.memory, &b.entry, 1, &cpuid1).unwrap();
        ap.set_sregs(&bsp.get_sregs().unwrap()).unwrap();
        ap.set_regs(&bsp.get_regs().unwrap()).unwrap();
        ap.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .unwrap();

        let seen = run_probe(&mut ap);
        let (leaf1_ecx, leaf1_ebx) = (seen[&0x20], seen[&0x21]);
        assert_eq!(leaf1_ebx >> 24, 1, "APIC id");
        assert_eq!((leaf1_ebx >> 16) & 0xff, 2, "logical processor count");
        assert_ne!(leaf1_ecx & (1 << 31), 0, "hypervisor bit");
        // CX16 is one bit every KVM host, nested or not, hides when asked to (measured: on
        // nested hosts some other cleared bits still show through to the guest).
        assert_eq!(leaf1_ecx & (1 << 13), 0, "CX16");
        assert_eq!(
            leaf1_ecx & (1 << 24) != 0,
            b.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
            "TSC-deadline timer"
        );
    }

    #[test]
    fn configure_without_irqchip_names_the_cause() {
        let Some(kvm) =
            crate::test_kvm::kvm_or_skip("cpu::regs::configure_without_irqchip_names_the_cause")
        else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let ram = memory::create_guest_ram(16 << 20).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = cpuid(&kvm, CpuTemplate::Host, 0, 1).unwrap();
        let entry = EntryPoint::Pvh {
            entry: GuestAddress(LOAD_ADDR),
            start_info: layout::PVH_INFO_START,
        };
        let err = configure(&vcpu, &ram.memory, &entry, 0, &cpuid).unwrap_err();
        assert!(err.to_string().contains("irqchip"), "{err}");
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(GDT_CODE64, 0, FLAT_LIMIT), 2);
        assert_eq!(
            (code.base, code.limit, code.selector),
            (0, 0xffff_ffff, 0x10)
        );
        assert_eq!((code.type_, code.s, code.present, code.dpl), (0xb, 1, 1, 0));
        assert_eq!((code.l, code.db, code.g, code.unusable), (1, 0, 1, 0));

        let code32 = segment_from_gdt(gdt_entry(GDT_CODE32, 0, FLAT_LIMIT), 2);
        assert_eq!((code32.l, code32.db, code32.limit), (0, 1, 0xffff_ffff));

        let data = segment_from_gdt(gdt_entry(GDT_DATA, 0, FLAT_LIMIT), 3);
        assert_eq!(
            (data.type_, data.selector, data.db, data.g),
            (0x3, 0x18, 1, 1)
        );

        let tss = segment_from_gdt(gdt_entry(GDT_TSS, 0x1234_5678, TSS_LIMIT), 4);
        assert_eq!(
            (tss.base, tss.limit, tss.type_, tss.s, tss.g),
            (0x1234_5678, 0x67, 0xb, 0, 0)
        );

        // A known encoding: the flat 64-bit kernel code descriptor every x86-64 OS uses.
        assert_eq!(gdt_entry(GDT_CODE64, 0, FLAT_LIMIT), 0x00af_9b00_0000_ffff);
    }
}
