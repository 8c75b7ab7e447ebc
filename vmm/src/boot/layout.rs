//! Guest physical address map shared by memory setup, kernel loading, vCPU setup and devices.
//!
//! ```text
//! 0x0000_0500  GDT (6 entries)          0x0000_0540  IDT (one empty gate)
//! 0x0000_6000  PVH hvm_start_info       0x0000_6400  PVH module list (initrd)
//! 0x0000_6800  PVH memory map           0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack (grows down)  0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD
//! 0x0002_0000  kernel command line      0x0009_fc00  .. 0x0010_0000  not RAM for the guest
//! 0x000e_0000  ACPI tables, RSDP first  0x000f_0000  MP floating pointer + configuration table
//! 0x0010_0000  HIMEM_START: kernel, then free RAM, initrd at the top of low RAM
//! 0xc000_0000  .. 0x1_0000_0000  32-bit MMIO gap (virtio-mmio slots, PCIe ECAM, IOAPIC, LAPIC)
//! 0x1_0000_0000  RAM above the gap when the guest has more than 3 GiB
//! ```
//!
//! Virtio-mmio slot `i` decodes `0xd000_0000 + i * 0x1000` (4 KiB) and raises GSI
//! `VIRTIO_MMIO_GSIS[i]` (5, 6, 7, 10, 11, 13, 14, 15, 16..23): the IOAPIC pins no legacy
//! device or ACPI uses, one per slot.

use vm_memory::GuestAddress;

/// Start of the memory the kernel is loaded into; everything below is boot scaffolding.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// Global descriptor table used by the boot vCPU.
pub const GDT_START: GuestAddress = GuestAddress(0x500);
/// Interrupt descriptor table used by the boot vCPU (a single empty gate: the kernel installs
/// its own before enabling interrupts).
pub const IDT_START: GuestAddress = GuestAddress(0x540);

/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (the initrd, when there is one).
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6400);
/// PVH memory map table.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6800);
/// Room for the PVH memory map table, in entries.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 0x800 / 24;

/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);

/// Initial stack pointer of the boot vCPU for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);

/// Level-4 page map of the boot page tables.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page directory pointer table of the boot page tables.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// Page directory (512 × 2 MiB pages = the first 1 GiB) of the boot page tables.
pub const PDE_START: GuestAddress = GuestAddress(0xb000);

/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x2_0000);
/// Largest command line, including its NUL terminator. x86 Linux keeps 2048 bytes
/// (`COMMAND_LINE_SIZE`); anything longer would be silently truncated by the guest.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// End of the conventional RAM the guest is told about below 1 MiB: the EBDA and the legacy
/// video/BIOS area above it are reported as not RAM.
pub const EBDA_START: GuestAddress = GuestAddress(0x9_fc00);

/// ACPI tables: the RSDP at the start, where the legacy scan of 0xE0000..0x100000 finds it
/// (16-byte aligned), then the XSDT, FADT, MADT and DSDT. Like the MP table above it, the area
/// is reported to the guest as reserved, never as RAM.
pub const ACPI_START: GuestAddress = GuestAddress(0xe_0000);
/// Room for the ACPI tables: up to the MP table.
pub const ACPI_MAX_SIZE: usize = 0x1_0000;

/// MP floating pointer, followed by the MP configuration table. It lives in the BIOS area
/// (0xF0000..0x100000), which Linux and other MP-spec guests scan and which is never reported
/// as RAM, so the table cannot be reclaimed by accident.
pub const MPTABLE_START: GuestAddress = GuestAddress(0xf_0000);
/// Room for the MP table.
pub const MPTABLE_MAX_SIZE: usize = 0x1_0000;

/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// First virtio-mmio transport slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio transport slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Number of virtio-mmio slots reserved in the gap.
pub const VIRTIO_MMIO_MAX_SLOTS: u64 = 64;

/// Interrupt lines (GSIs, which KVM's default routing wires to the IOAPIC pin of the same
/// number) of the virtio-mmio slots: slot `i` raises `VIRTIO_MMIO_GSIS[i]`.
///
/// Left out: 0 (PIT), 1 (i8042 keyboard), 2 (PIC cascade), 3 and 4 (serial ports), 8 (RTC),
/// 12 (i8042 mouse), and 9, where ACPI guests expect the SCI. The MP table declares every pin
/// edge-triggered, and edge-triggered lines cannot be shared safely, so each slot gets a line
/// of its own and the number of virtio-mmio devices is the number of lines here, not the
/// number of slots.
pub const VIRTIO_MMIO_GSIS: [u32; 16] =
    [5, 6, 7, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/// Interrupt lines of PCI INTx on the standard machine, which has no virtio-mmio slot but a
/// balloon's (slot 0, GSI 5): pin INTA..INTD of bus-0 device `d` raises
/// `PCI_INTX_GSIS[(d + pin) % 4]` (see [`pci_intx_gsi`]), which the DSDT's `_PRT` says, and a
/// function behind a root port reaches its port's lines through the usual bridge swizzle.
/// These lines are level-triggered and shared, as PCI's are.
pub const PCI_INTX_GSIS: [u32; 4] = [16, 17, 18, 19];

/// The line INTx pin `pin` (0 for INTA to 3 for INTD) of bus-0 device `device` raises.
pub fn pci_intx_gsi(device: u8, pin: u8) -> u32 {
    PCI_INTX_GSIS[(usize::from(device) + usize::from(pin)) % PCI_INTX_GSIS.len()]
}

/// PCIe enhanced configuration space (ECAM) of the standard machine: 256 buses × 1 MiB.
pub const PCIE_ECAM_BASE: u64 = 0xe000_0000;
/// Size of the PCIe ECAM window.
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;
/// 32-bit PCI BAR window of the standard machine: from the end of the virtio-mmio slots to the
/// ECAM window.
pub const PCI_MMIO32_BASE: u64 = VIRTIO_MMIO_BASE + VIRTIO_MMIO_MAX_SLOTS * VIRTIO_MMIO_SLOT_SIZE;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = PCIE_ECAM_BASE - PCI_MMIO32_BASE;

/// IOAPIC register window (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Number of IOAPIC input pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;

/// Smallest guest RAM accepted: room for the boot structures, a small kernel and its heap.
pub const MIN_RAM_SIZE: u64 = 16 << 20;
/// Largest guest RAM accepted: keeps the top of RAM (size + the 1 GiB gap) inside the 39-bit
/// physical address width that every KVM-capable x86 CPU offers.
pub const MAX_RAM_SIZE: u64 = 256 << 30;

/// Largest vCPU count the boot tables describe: APIC ids are 8 bits wide, 0xFF is the
/// broadcast id, and the IOAPIC takes the id after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

/// Guest RAM regions for `size` bytes: RAM below the MMIO gap, the rest above 4 GiB.
///
/// Returns (guest address, length) pairs, sorted, non-overlapping and non-empty. `size` must
/// already have been validated (see `memory::create_guest_ram`); this function only splits it.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// End (exclusive) of RAM below the MMIO gap for a guest with `size` bytes of RAM.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// Base address and interrupt line of virtio-mmio slot `slot`, or `None` when the slot has no
/// line of its own (see [`VIRTIO_MMIO_GSIS`]).
pub fn virtio_mmio_slot_plan(slot: u64) -> Option<(GuestAddress, u32)> {
    let gsi = *VIRTIO_MMIO_GSIS.get(usize::try_from(slot).ok()?)?;
    Some((virtio_mmio_slot(slot)?, gsi))
}

/// Guest address of virtio-mmio slot `slot`, or `None` past the last slot.
pub fn virtio_mmio_slot(slot: u64) -> Option<GuestAddress> {
    (slot < VIRTIO_MMIO_MAX_SLOTS)
        .then(|| GuestAddress(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SLOT_SIZE))
}

// The fixed windows are laid out consistently; checked when the crate is compiled.
const _: () = {
    // The boot stack grows down from just below the page tables, above the zero page.
    assert!(BOOT_STACK_POINTER.0 < PML4_START.0);
    assert!(BOOT_STACK_POINTER.0 > ZERO_PAGE_START.0 + 0x1000);
    // Both boot table areas sit in the BIOS area, ACPI below the MP table.
    assert!(ACPI_START.0 >= EBDA_START.0 && ACPI_START.0 & 0xf == 0);
    assert!(ACPI_START.0 + ACPI_MAX_SIZE as u64 <= MPTABLE_START.0);
    assert!(MPTABLE_START.0 + MPTABLE_MAX_SIZE as u64 <= HIMEM_START.0);
    assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START);
    assert!(PCI_MMIO32_BASE + PCI_MMIO32_SIZE <= PCIE_ECAM_BASE);
    assert!(PCIE_ECAM_BASE + PCIE_ECAM_SIZE <= IOAPIC_START);
    assert!(IOAPIC_START < LAPIC_START && LAPIC_START < MMIO_GAP_END);
    assert!(VIRTIO_MMIO_GSIS.len() as u64 <= VIRTIO_MMIO_MAX_SLOTS);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region_from_zero() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        assert_eq!(
            ram_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START as usize)]
        );
        assert_eq!(low_ram_end(64 << 20), 64 << 20);
    }

    #[test]
    fn large_ram_is_split_around_the_gap() {
        let size = 5u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(0x1_0000_0000), 2 << 30),
            ]
        );
        let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
        assert_eq!(total, size);
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }

    #[test]
    fn fixed_addresses_do_not_overlap_and_stay_out_of_ram_holes() {
        let ranges: [(u64, u64); 12] = [
            (GDT_START.0, 6 * 8),
            (IDT_START.0, 8),
            (PVH_INFO_START.0, 56),
            (PVH_MODLIST_START.0, 32),
            (PVH_MEMMAP_START.0, (PVH_MEMMAP_MAX_ENTRIES * 24) as u64),
            (ZERO_PAGE_START.0, 0x1000),
            (PML4_START.0, 0x1000),
            (PDPTE_START.0, 0x1000),
            (PDE_START.0, 0x1000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
            (ACPI_START.0, ACPI_MAX_SIZE as u64),
            (MPTABLE_START.0, MPTABLE_MAX_SIZE as u64),
        ];
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.0 + a.1 <= HIMEM_START.0, "{a:x?} reaches high memory");
            for b in &ranges[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }

    #[test]
    fn mmio_windows_sit_inside_the_gap() {
        let last = virtio_mmio_slot(VIRTIO_MMIO_MAX_SLOTS - 1).unwrap();
        assert_eq!(virtio_mmio_slot(VIRTIO_MMIO_MAX_SLOTS), None);
        assert_eq!(virtio_mmio_slot(1), Some(GuestAddress(0xd000_1000)));
        assert!(last.0 + VIRTIO_MMIO_SLOT_SIZE <= PCI_MMIO32_BASE);
    }

    #[test]
    fn virtio_mmio_slots_get_distinct_free_ioapic_pins() {
        assert_eq!(
            virtio_mmio_slot_plan(0),
            Some((GuestAddress(0xd000_0000), 5))
        );
        assert_eq!(
            virtio_mmio_slot_plan(3),
            Some((GuestAddress(0xd000_3000), 10))
        );
        let last = VIRTIO_MMIO_GSIS.len() as u64 - 1;
        assert_eq!(
            virtio_mmio_slot_plan(last),
            Some((GuestAddress(0xd000_f000), 23))
        );
        assert_eq!(virtio_mmio_slot_plan(last + 1), None);
        assert_eq!(virtio_mmio_slot_plan(u64::MAX), None);
        let mut seen = std::collections::BTreeSet::new();
        for gsi in VIRTIO_MMIO_GSIS {
            assert!(gsi < u32::from(IOAPIC_PINS), "{gsi} is not an IOAPIC pin");
            assert!(
                ![0, 1, 2, 3, 4, 8, 9, 12].contains(&gsi),
                "{gsi} belongs to a legacy device"
            );
            assert!(seen.insert(gsi), "{gsi} is given twice");
        }
    }
}
