//! Boot parameters handed to the kernel: the memory map, and either the Linux zero page
//! (`boot_params`) or the PVH `hvm_start_info` with its module list and memory map table.
//! The structures come from linux-loader and are written by its boot configurators, which
//! check every write against guest memory.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::layout;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of memory the guest must leave alone.
pub const E820_RESERVED: u32 = 2;
/// `boot_flag` every Linux setup header carries.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot loader id "undefined" (Documentation/x86/boot.rst).
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment a relocatable kernel is told about when there is no setup header (ELF vmlinux).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// A memory map entry: (start, size, E820 type).
pub type MemoryMapEntry = (u64, u64, u32);

/// The memory map the guest is told about for `ram_size` bytes: conventional memory below the
/// EBDA, RAM from 1 MiB to the MMIO gap (or the end of RAM), and RAM above 4 GiB. The legacy
/// area between the EBDA and 1 MiB is never reported as RAM; the part of it holding the ACPI
/// and MP tables is reported as reserved, as firmware does, so that nothing is placed over
/// the tables. With `pcie`, the ECAM window is reserved too: Linux uses an MCFG window only
/// once firmware has reserved it.
pub fn memory_map(ram_size: u64, pcie: bool) -> Vec<MemoryMapEntry> {
    let low_end = layout::low_ram_end(ram_size);
    let mut map = vec![
        (0, layout::EBDA_START.0, E820_RAM),
        (
            layout::ACPI_START.0,
            layout::HIMEM_START.0 - layout::ACPI_START.0,
            E820_RESERVED,
        ),
        (
            layout::HIMEM_START.0,
            low_end - layout::HIMEM_START.0,
            E820_RAM,
        ),
    ];
    if pcie {
        map.push((
            layout::PCIE_ECAM_BASE,
            layout::PCIE_ECAM_SIZE,
            E820_RESERVED,
        ));
    }
    if ram_size > layout::MMIO_GAP_START {
        map.push((
            layout::MMIO_GAP_END,
            ram_size - layout::MMIO_GAP_START,
            E820_RAM,
        ));
    }
    map
}

/// Where the initrd landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address of the first byte.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Writes the Linux zero page at [`layout::ZERO_PAGE_START`].
///
/// `header` is the bzImage's own setup header; for an ELF vmlinux, which has none, a minimal
/// valid header is made up. `rsdp` is the ACPI root pointer, handed over directly so that the
/// kernel need not scan the BIOS area for it.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    map: &[MemoryMapEntry],
    rsdp: GuestAddress,
) -> Result<(), linux_loader::configurator::Error> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.raw_value(),
        ..Default::default()
    };
    match header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.cmdline_size = cmdline_len as u32;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START.raw_value() as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, layout::ZERO_PAGE_START), mem)
}

/// Writes the PVH `hvm_start_info` at [`layout::PVH_INFO_START`], the memory map table at
/// [`layout::PVH_MEMMAP_START`] and, with an initrd, a one-entry module list at
/// [`layout::PVH_MODLIST_START`]. `rsdp` is the ACPI root pointer.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    map: &[MemoryMapEntry],
    rsdp: GuestAddress,
) -> Result<(), linux_loader::configurator::Error> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .take(layout::PVH_MEMMAP_MAX_ENTRIES)
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START.raw_value(),
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: layout::PVH_MEMMAP_START.raw_value(),
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|initrd| hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size,
            ..Default::default()
        })
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = layout::PVH_MODLIST_START.raw_value();
    }
    let mut params = BootParams::new(&info, layout::PVH_INFO_START);
    params.set_sections(&memmap, layout::PVH_MEMMAP_START);
    if !modules.is_empty() {
        params.set_modules(&modules, layout::PVH_MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{ByteValued, Bytes};

    fn ram_total(map: &[MemoryMapEntry]) -> u64 {
        map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum()
    }

    #[test]
    fn memory_map_for_small_ram() {
        let size = 64 << 20;
        let map = memory_map(size, false);
        assert_eq!(
            map,
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0xe_0000, 0x2_0000, E820_RESERVED),
                (0x10_0000, size - 0x10_0000, E820_RAM)
            ]
        );
    }

    #[test]
    fn boot_tables_are_reserved_and_never_ram() {
        for size in [16u64 << 20, 3 << 30, 6 << 30] {
            let map = memory_map(size, false);
            for (start, len) in [
                (layout::ACPI_START.0, layout::ACPI_MAX_SIZE as u64),
                (layout::MPTABLE_START.0, layout::MPTABLE_MAX_SIZE as u64),
            ] {
                assert!(
                    map.iter()
                        .filter(|e| e.2 == E820_RAM)
                        .all(|e| e.0 + e.1 <= start || e.0 >= start + len),
                    "{start:#x} is in RAM: {map:x?}"
                );
                assert!(
                    map.iter()
                        .any(|e| e.2 == E820_RESERVED && e.0 <= start && e.0 + e.1 >= start + len),
                    "{start:#x} is not reserved: {map:x?}"
                );
            }
        }
    }

    #[test]
    fn the_ecam_window_is_reserved_only_with_pcie() {
        let reserved = (
            layout::PCIE_ECAM_BASE,
            layout::PCIE_ECAM_SIZE,
            E820_RESERVED,
        );
        assert!(!memory_map(64 << 20, false).contains(&reserved));
        let map = memory_map(4 << 30, true);
        assert!(map.contains(&reserved));
        assert!(
            map.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "entries are sorted and disjoint: {map:x?}"
        );
    }

    #[test]
    fn memory_map_for_exactly_three_gib() {
        let map = memory_map(3 << 30, false);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
    }

    #[test]
    fn memory_map_across_the_gap() {
        for size in [(3u64 << 30) + 4096, 4 << 30, (6 << 30) + (2 << 20)] {
            let map = memory_map(size, false);
            assert_eq!(map.len(), 4, "{size:#x}");
            assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
            assert_eq!(map[3], (0x1_0000_0000, size - 0xc000_0000, E820_RAM));
            // Everything but the legacy hole below 1 MiB is reported.
            assert_eq!(ram_total(&map), size - (0x10_0000 - 0x9_fc00));
            for e in &map {
                let end = e.0 + e.1;
                assert!(
                    end <= layout::MMIO_GAP_START || e.0 >= layout::MMIO_GAP_END,
                    "{e:x?} overlaps the MMIO gap"
                );
            }
        }
    }

    #[test]
    fn zero_page_carries_header_cmdline_initrd_and_e820() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(64 << 20, false);
        let initrd = InitrdPlacement {
            addr: GuestAddress(0x3f0_0000),
            size: 0x1234,
        };
        write_zero_page(&mem, None, 11, Some(initrd), &map, GuestAddress(0xe_0000)).unwrap();
        let params: boot_params = mem.read_obj(layout::ZERO_PAGE_START).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 11);
        assert_eq!({ hdr.ramdisk_image }, 0x3f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(params.e820_entries, 3);
        let e820 = params.e820_table;
        for (entry, expected) in e820.iter().zip(&map) {
            assert_eq!(
                ({ entry.addr }, { entry.size }, { entry.r#type }),
                *expected
            );
        }
        assert_eq!(params.as_slice().len(), 4096);
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_module() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(64 << 20, false);
        let initrd = InitrdPlacement {
            addr: GuestAddress(0x3f0_0000),
            size: 0x1234,
        };
        let rsdp = GuestAddress(0xe_0000);
        write_pvh_start_info(&mem, Some(initrd), &map, rsdp).unwrap();
        let info: hvm_start_info = mem.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x2_0000);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x3f0_0000, 0x1234));
        let second: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(info.memmap_paddr + 24)).unwrap();
        assert_eq!((second.addr, second.size, second.type_), map[1]);

        write_pvh_start_info(&mem, None, &map, rsdp).unwrap();
        let info: hvm_start_info = mem.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
