//! Kernel loading and boot-time guest memory layout.
//!
//! [`load`] puts a kernel (ELF vmlinux or bzImage), its command line and initrd into guest
//! RAM, writes the boot parameters for the entry protocol the kernel supports (PVH when the
//! ELF carries a PVH note, else the 64-bit Linux boot protocol), the ACPI tables and the MP
//! table (for kernels built without ACPI), and says where the boot vCPU starts. Only the pages
//! these structures occupy are touched.

pub mod acpi;
pub mod layout;
pub mod mptable;
pub mod params;
#[cfg(test)]
pub(crate) mod test_kernel;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{setup_header, XLF_KERNEL_64};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use params::InitrdPlacement;

/// What to boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootSource {
    /// ELF vmlinux (PVH note or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// The virtio-mmio slots, declared to the guest in the DSDT.
    pub virtio_mmio: Vec<acpi::VirtioMmioNode>,
    /// Whether the machine has the PCI Express segment (q35): the ACPI tables then describe
    /// its host bridge and ECAM window, and the memory map reserves the window.
    pub pcie: bool,
}

/// The kernel and initrd, opened once at start and kept open, so that every (re)boot reads
/// the files the VM was started with, whatever happens to their paths later, and a confined
/// VMM needs no access to them by path.
#[derive(Debug)]
pub struct BootFiles {
    /// The kernel.
    pub kernel: File,
    /// The initrd, if any.
    pub initrd: Option<File>,
}

impl BootFiles {
    /// Opens the files `src` names (regular files only).
    pub fn open(src: &BootSource) -> Result<BootFiles, BootError> {
        let kernel = open_regular(&src.kernel).map_err(|source| BootError::KernelRead {
            path: src.kernel.clone(),
            source,
        })?;
        let initrd = src
            .initrd
            .as_ref()
            .map(|path| {
                open_regular(path).map_err(|source| BootError::InitrdRead {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()?;
        Ok(BootFiles { kernel, initrd })
    }
}

/// A private handle on `file` read from its start: a duplicate shares the file offset, which
/// is rewound because every load reads the file from the beginning.
fn rewound(file: &File) -> io::Result<File> {
    let mut dup = file.try_clone()?;
    dup.seek(SeekFrom::Start(0))?;
    Ok(dup)
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode, identity-mapped page tables, RSI = zero page.
    Linux64 {
        /// First instruction.
        entry: GuestAddress,
        /// Linux `boot_params`.
        zero_page: GuestAddress,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh {
        /// First instruction.
        entry: GuestAddress,
        /// `hvm_start_info`.
        start_info: GuestAddress,
    },
}

/// Errors while loading a kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The vCPU count is out of range.
    #[error("invalid vCPU count {0}: must be between 1 and {max}", max = layout::MAX_VCPUS)]
    VcpuCount(u8),
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The kernel file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel file is not a kernel Citadel can boot.
    #[error("kernel {path} is not bootable: {why}")]
    KernelFormat {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// linux-loader refused the kernel or could not copy it into guest RAM.
    #[error("cannot load kernel {path}: {source}")]
    KernelLoad {
        /// The kernel file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: loader::Error,
    },
    /// The kernel needs more RAM below the MMIO gap than the guest has.
    #[error("kernel {path} does not fit in guest RAM: it needs memory up to {end:#x}, but RAM below 4 GiB ends at {ram_end:#x}")]
    KernelTooLarge {
        /// The kernel file.
        path: PathBuf,
        /// End of the memory the kernel needs.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes, at most {max} are allowed")]
    CmdlineTooLong {
        /// Its length, without the NUL terminator.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// The command line has a character the kernel cannot take.
    #[error("kernel command line has a character that is not printable ASCII at byte {0}")]
    CmdlineCharacter(usize),
    /// The command line could not be parsed or written.
    #[error("cannot write the kernel command line: {0}")]
    Cmdline(String),
    /// The initrd file cannot be opened or read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// The initrd file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The initrd file is empty.
    #[error("initrd {0} is empty")]
    InitrdEmpty(PathBuf),
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        /// The initrd file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// Copying the initrd into guest RAM failed.
    #[error("cannot copy initrd {path} into guest RAM: {source}")]
    InitrdCopy {
        /// The initrd file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the zero page or PVH start info failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
}

const PAGE_SIZE: u64 = 4096;
/// Offset of `startup_64` from the start of a bzImage's protected-mode kernel.
const BZIMAGE_STARTUP_64_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage, and of its "HdrS" magic.
const BZIMAGE_HDRS_OFFSET: u64 = 0x202;
/// Boot protocol version from which the setup header carries `cmdline_size`.
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x206;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;

enum KernelFormat {
    Elf,
    BzImage,
}

/// Loads the kernel, command line, initrd, boot parameters, ACPI tables and MP table for
/// `num_cpus` vCPUs into `mem`, and returns where the boot vCPU starts. `system_reset` calls
/// this again, so every boot structure is rewritten the same way as at boot.
///
/// An ELF vmlinux with a PVH note boots through PVH; without one, or for a bzImage, through
/// the 64-bit Linux boot protocol. The initrd goes at the top of RAM below the MMIO gap (and
/// below the kernel's `initrd_addr_max`), page-aligned. Every error names the file at fault.
pub fn load(
    mem: &GuestMemoryMmap,
    src: &BootSource,
    num_cpus: u8,
) -> Result<EntryPoint, BootError> {
    load_from(mem, src, &BootFiles::open(src)?, num_cpus)
}

/// Like [`load`], from files opened beforehand with [`BootFiles::open`]; the paths in `src`
/// only name them in errors.
pub fn load_from(
    mem: &GuestMemoryMmap,
    src: &BootSource,
    files: &BootFiles,
    num_cpus: u8,
) -> Result<EntryPoint, BootError> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS {
        return Err(BootError::VcpuCount(num_cpus));
    }
    let cmdline = parse_cmdline(&src.cmdline)?;
    let ram_end = low_ram_end(mem);

    let kernel_path = &src.kernel;
    let kernel_err = |source| BootError::KernelRead {
        path: kernel_path.clone(),
        source,
    };
    let mut kernel = rewound(&files.kernel).map_err(kernel_err)?;
    let format = kernel_format(&mut kernel, kernel_path)?;
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, Some(layout::HIMEM_START)),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel, Some(layout::HIMEM_START)),
    }
    .map_err(|source| BootError::KernelLoad {
        path: kernel_path.clone(),
        source,
    })?;

    let kernel_end = kernel_footprint_end(&loaded);
    if kernel_end > ram_end {
        return Err(BootError::KernelTooLarge {
            path: kernel_path.clone(),
            end: kernel_end,
            ram_end,
        });
    }
    if let Some(hdr) = &loaded.setup_header {
        check_bzimage(hdr, kernel_path, cmdline_len(&cmdline)?)?;
    }

    linux_loader::loader::load_cmdline(mem, layout::CMDLINE_START, &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let initrd_limit = match &loaded.setup_header {
        // initrd_addr_max is the address of the last byte the initrd may occupy.
        Some(hdr) if hdr.initrd_addr_max != 0 => ram_end.min(u64::from(hdr.initrd_addr_max) + 1),
        _ => ram_end,
    };
    let initrd = match (&src.initrd, &files.initrd) {
        (Some(path), Some(file)) => Some(load_initrd(mem, path, file, kernel_end, initrd_limit)?),
        _ => None,
    };

    let nodes: Vec<&dyn acpi_tables::Aml> = src
        .virtio_mmio
        .iter()
        .map(|n| n as &dyn acpi_tables::Aml)
        .collect();
    let rsdp = acpi::write(mem, num_cpus, &nodes, src.pcie)?;
    let map = params::memory_map(ram_size(mem), src.pcie);
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Some(entry),
        _ => None,
    };
    let entry = match (pvh_entry, &loaded.setup_header) {
        (Some(entry), _) => {
            params::write_pvh_start_info(mem, initrd, &map, rsdp).map_err(BootError::BootParams)?;
            EntryPoint::Pvh {
                entry,
                start_info: layout::PVH_INFO_START,
            }
        }
        (None, header) => {
            params::write_zero_page(mem, *header, cmdline_len(&cmdline)?, initrd, &map, rsdp)
                .map_err(BootError::BootParams)?;
            let entry = if header.is_some() {
                loaded.kernel_load.unchecked_add(BZIMAGE_STARTUP_64_OFFSET)
            } else {
                loaded.kernel_load
            };
            EntryPoint::Linux64 {
                entry,
                zero_page: layout::ZERO_PAGE_START,
            }
        }
    };

    let (EntryPoint::Pvh { entry: first, .. } | EntryPoint::Linux64 { entry: first, .. }) = entry;
    if first.raw_value() >= ram_end {
        return Err(BootError::KernelFormat {
            path: kernel_path.clone(),
            why: "its entry point is outside guest RAM",
        });
    }
    mptable::write(mem, num_cpus)?;
    log::debug!(
        "loaded kernel {} ({:#x}..{:#x}), entry {:?}",
        kernel_path.display(),
        loaded.kernel_load.raw_value(),
        kernel_end,
        entry
    );
    Ok(entry)
}

fn open_regular(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Tells an ELF from a bzImage by their magic numbers, so the error for anything else is about
/// the file rather than about whichever loader happened to be tried last.
fn kernel_format(kernel: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let format_err = |why| BootError::KernelFormat {
        path: path.to_path_buf(),
        why,
    };
    let mut ident = [0u8; 20];
    let n = read_up_to(kernel, &mut ident).map_err(read_err)?;
    if n >= 4 && ident[..4] == ELF_MAGIC {
        if n < ident.len() {
            return Err(format_err("truncated ELF header"));
        }
        if ident[4] != ELFCLASS64 || u16::from_le_bytes([ident[18], ident[19]]) != EM_X86_64 {
            return Err(format_err("ELF file is not a 64-bit x86-64 image"));
        }
        return Ok(KernelFormat::Elf);
    }
    kernel
        .seek(SeekFrom::Start(BZIMAGE_HDRS_OFFSET))
        .map_err(read_err)?;
    let mut magic = [0u8; 4];
    let n = read_up_to(kernel, &mut magic).map_err(read_err)?;
    if n == magic.len() && &magic == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(format_err("neither an ELF vmlinux nor a bzImage"))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// End of the memory the kernel occupies once running. A bzImage decompresses itself and
/// needs `init_size` bytes from where it runs: `pref_address` for a relocatable kernel loaded
/// below it, else its load address.
fn kernel_footprint_end(loaded: &KernelLoaderResult) -> u64 {
    match &loaded.setup_header {
        Some(hdr) => {
            let start = loaded.kernel_load.raw_value().max(hdr.pref_address);
            let needed = start.saturating_add(u64::from(hdr.init_size));
            needed.max(loaded.kernel_end)
        }
        None => loaded.kernel_end,
    }
}

fn check_bzimage(hdr: &setup_header, path: &Path, cmdline_len: usize) -> Result<(), BootError> {
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::KernelFormat {
            path: path.to_path_buf(),
            why: "bzImage has no 64-bit entry point",
        });
    }
    let version = hdr.version;
    let max = hdr.cmdline_size as usize;
    if version >= BOOT_PROTOCOL_CMDLINE_SIZE && cmdline_len > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline_len,
            max,
        });
    }
    Ok(())
}

fn parse_cmdline(raw: &str) -> Result<Cmdline, BootError> {
    let max = layout::CMDLINE_MAX_SIZE - 1;
    if raw.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: raw.len(),
            max,
        });
    }
    if let Some(pos) = raw
        .bytes()
        .position(|b| !(b == b' ' || b.is_ascii_graphic()))
    {
        return Err(BootError::CmdlineCharacter(pos));
    }
    Cmdline::try_from(raw, layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

fn cmdline_len(cmdline: &Cmdline) -> Result<usize, BootError> {
    cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| BootError::Cmdline(e.to_string()))
}

/// End (exclusive) of the RAM region starting at 0.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(0))
        .map_or(0, vm_memory::GuestMemoryRegion::len)
}

fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

/// Copies the initrd at the highest page-aligned address that keeps it below `limit`, straight
/// from the file into guest RAM.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &File,
    kernel_end: u64,
    limit: u64,
) -> Result<InitrdPlacement, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = rewound(file).map_err(read_err)?;
    // The size by seeking rather than fstat: a reset runs where only the seek is allowed.
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if size == 0 {
        return Err(BootError::InitrdEmpty(path.to_path_buf()));
    }
    let lowest = kernel_end.next_multiple_of(PAGE_SIZE);
    let start = limit
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= lowest)
        .ok_or_else(|| BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            kernel_end,
            limit,
        })?;
    let addr = GuestAddress(start);
    // `size` < `limit` <= 3 GiB here, so it fits in usize.
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|source| BootError::InitrdCopy {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(InitrdPlacement { addr, size })
}

#[cfg(test)]
mod tests {
    use super::test_kernel::{self, BzImageSpec, ElfSpec, LOAD_ADDR};
    use super::*;
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
    use vm_memory::Bytes;

    fn ram(size: u64) -> GuestMemoryMmap {
        crate::memory::create_guest_ram(size).unwrap().memory
    }

    fn source(kernel: &Path) -> BootSource {
        BootSource {
            kernel: kernel.to_path_buf(),
            pcie: false,
            initrd: None,
            cmdline: "console=ttyS0 reboot=k panic=1".to_string(),
            virtio_mmio: Vec::new(),
        }
    }

    fn cmdline_in(mem: &GuestMemoryMmap) -> String {
        let mut buf = vec![0u8; layout::CMDLINE_MAX_SIZE];
        mem.read_slice(&mut buf, layout::CMDLINE_START).unwrap();
        let end = buf.iter().position(|&b| b == 0).expect("NUL-terminated");
        String::from_utf8(buf[..end].to_vec()).unwrap()
    }

    fn code_in(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut buf = vec![0u8; test_kernel::probe_code().len()];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn elf_with_pvh_note_boots_through_pvh() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec {
            pvh_note: true,
            ..Default::default()
        }));
        let mem = ram(32 << 20);
        let src = source(kernel.as_path());
        let entry = load(&mem, &src, 3).unwrap();
        assert_eq!(
            entry,
            EntryPoint::Pvh {
                entry: GuestAddress(LOAD_ADDR),
                start_info: layout::PVH_INFO_START
            }
        );
        assert_eq!(code_in(&mem, LOAD_ADDR), test_kernel::probe_code());
        let info: hvm_start_info = mem.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE_START.0);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 0);
        assert_eq!(cmdline_in(&mem), src.cmdline);
        assert_eq!(mptable::tests::parse(&mem).cpus.len(), 3);
        let tables = acpi::tests::parse(&mem);
        assert_eq!(tables.lapics.len(), 3);
        assert_eq!(info.rsdp_paddr, tables.rsdp);
    }

    #[test]
    fn elf_without_note_uses_the_64_bit_linux_entry() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        let mem = ram(32 << 20);
        let entry = load(&mem, &source(kernel.as_path()), 1).unwrap();
        assert_eq!(
            entry,
            EntryPoint::Linux64 {
                entry: GuestAddress(LOAD_ADDR),
                zero_page: layout::ZERO_PAGE_START
            }
        );
        let params: boot_params = mem.read_obj(layout::ZERO_PAGE_START).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START.0 as u32);
        assert_eq!(params.e820_entries, 3);
        assert_eq!(mptable::tests::parse(&mem).cpus.len(), 1);
        let tables = acpi::tests::parse(&mem);
        assert_eq!(tables.lapics.len(), 1);
        assert_eq!({ params.acpi_rsdp_addr }, tables.rsdp);
    }

    #[test]
    fn bzimage_enters_at_startup_64_with_its_own_header() {
        let kernel = test_kernel::file(&test_kernel::bzimage(&BzImageSpec::default()));
        let mem = ram(64 << 20);
        let entry = load(&mem, &source(kernel.as_path()), 2).unwrap();
        assert_eq!(
            entry,
            EntryPoint::Linux64 {
                entry: GuestAddress(LOAD_ADDR + 0x200),
                zero_page: layout::ZERO_PAGE_START
            }
        );
        assert_eq!(code_in(&mem, LOAD_ADDR + 0x200), test_kernel::probe_code());
        let params: boot_params = mem.read_obj(layout::ZERO_PAGE_START).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x20f);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmdline_size }, 2047);
        assert_eq!({ hdr.code32_start }, LOAD_ADDR as u32);
        let tables = acpi::tests::parse(&mem);
        assert_eq!(tables.lapics.len(), 2);
        assert_eq!({ params.acpi_rsdp_addr }, tables.rsdp);
    }

    #[test]
    fn loading_again_rewrites_clobbered_boot_tables() {
        // system_reset goes through `load` again: a guest that scribbled over its ACPI and MP
        // tables gets them back as they were at boot.
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        let mem = ram(32 << 20);
        let src = source(kernel.as_path());
        load(&mem, &src, 4).unwrap();
        let mut before = vec![0u8; 0x2_0000];
        mem.read_slice(&mut before, layout::ACPI_START).unwrap();
        mem.write_slice(&[0xa5; 0x2_0000], layout::ACPI_START)
            .unwrap();
        load(&mem, &src, 4).unwrap();
        let mut after = vec![0u8; 0x2_0000];
        mem.read_slice(&mut after, layout::ACPI_START).unwrap();
        let tables = acpi::tests::parse(&mem);
        assert_eq!(tables.lapics.len(), 4);
        assert_eq!(mptable::tests::parse(&mem).cpus.len(), 4);
        let written = |b: &[u8]| b.iter().filter(|&&x| x != 0xa5).count();
        assert!(written(&after) > 0);
        // Every byte of the tables is back (the gaps between them stay as the guest left
        // them, as on a real reset).
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if *b != 0xa5 {
                assert_eq!(a, b, "byte {i:#x}");
            }
        }
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let kernel = test_kernel::file(&test_kernel::bzimage(&BzImageSpec {
            kernel_64: false,
            ..Default::default()
        }));
        let err = load(&ram(32 << 20), &source(kernel.as_path()), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        assert!(err
            .to_string()
            .contains(&kernel.as_path().display().to_string()));
    }

    #[test]
    fn bzimage_needing_more_memory_than_ram_is_refused() {
        let kernel = test_kernel::file(&test_kernel::bzimage(&BzImageSpec {
            init_size: 64 << 20,
            ..Default::default()
        }));
        let err = load(&ram(32 << 20), &source(kernel.as_path()), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelTooLarge { .. }), "{err}");
    }

    #[test]
    fn bzimage_cmdline_limit_is_honoured() {
        let kernel = test_kernel::file(&test_kernel::bzimage(&BzImageSpec {
            cmdline_size: 16,
            ..Default::default()
        }));
        let mut src = source(kernel.as_path());
        src.cmdline = "x".repeat(17);
        let err = load(&ram(32 << 20), &src, 1).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { len: 17, max: 16 }),
            "{err}"
        );
        src.cmdline = "x".repeat(16);
        load(&ram(32 << 20), &src, 1).unwrap();
    }

    #[test]
    fn cmdline_too_long_or_not_printable_is_refused() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        let mem = ram(32 << 20);
        let mut src = source(kernel.as_path());

        src.cmdline = "a".repeat(layout::CMDLINE_MAX_SIZE);
        let err = load(&mem, &src, 1).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::CmdlineTooLong {
                    len: 2048,
                    max: 2047
                }
            ),
            "{err}"
        );

        src.cmdline = "a".repeat(layout::CMDLINE_MAX_SIZE - 1);
        load(&mem, &src, 1).unwrap();
        assert_eq!(cmdline_in(&mem), src.cmdline);

        src.cmdline = "console=ttyS0\nroot=/dev/vda".to_string();
        let err = load(&mem, &src, 1).unwrap_err();
        assert!(matches!(err, BootError::CmdlineCharacter(13)), "{err}");

        src.cmdline = String::new();
        load(&mem, &src, 1).unwrap();
        assert_eq!(cmdline_in(&mem), "");
    }

    #[test]
    fn missing_empty_and_garbage_kernels_are_refused_by_name() {
        let mem = ram(32 << 20);
        let missing = std::env::temp_dir().join("citadel-boot-test-does-not-exist");
        let err = load(&mem, &source(&missing), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelRead { .. }), "{err}");
        assert!(err.to_string().contains("citadel-boot-test-does-not-exist"));

        let dir = load(&mem, &source(&std::env::temp_dir()), 1).unwrap_err();
        assert!(matches!(dir, BootError::KernelRead { .. }), "{dir}");

        let empty = test_kernel::file(b"");
        let garbage = test_kernel::file(&[0x5a; 4096]);
        for f in [&empty, &garbage] {
            let err = load(&mem, &source(f.as_path()), 1).unwrap_err();
            assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
            assert!(err.to_string().contains(&f.as_path().display().to_string()));
        }

        let elf32 = test_kernel::file(&test_kernel::elf(&ElfSpec {
            class: 1,
            ..Default::default()
        }));
        let err = load(&mem, &source(elf32.as_path()), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");

        let mut truncated = test_kernel::elf(&ElfSpec::default());
        truncated.truncate(0x1004);
        let truncated = test_kernel::file(&truncated);
        let err = load(&mem, &source(truncated.as_path()), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
    }

    #[test]
    fn entry_point_outside_ram_is_refused() {
        let mut image = test_kernel::elf(&ElfSpec {
            pvh_note: true,
            ..Default::default()
        });
        // Point the PVH note's descriptor (the last 8 bytes) past the end of RAM.
        let len = image.len();
        image[len - 8..].copy_from_slice(&(64u64 << 20).to_le_bytes());
        let kernel = test_kernel::file(&image);
        let err = load(&ram(32 << 20), &source(kernel.as_path()), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        assert!(err.to_string().contains("entry point"), "{err}");
    }

    #[test]
    fn kernel_larger_than_ram_is_refused() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec {
            bss: 64 << 20,
            ..Default::default()
        }));
        let err = load(&ram(32 << 20), &source(kernel.as_path()), 1).unwrap_err();
        assert!(matches!(err, BootError::KernelTooLarge { .. }), "{err}");
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_ram() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let initrd = test_kernel::file(&content);
        let size = 64u64 << 20;
        let mem = ram(size);
        let mut src = source(kernel.as_path());
        src.initrd = Some(initrd.as_path().to_path_buf());
        load(&mem, &src, 1).unwrap();

        let params: boot_params = mem.read_obj(layout::ZERO_PAGE_START).unwrap();
        let (addr, len) = (
            u64::from(params.hdr.ramdisk_image),
            u64::from(params.hdr.ramdisk_size),
        );
        assert_eq!(len, content.len() as u64);
        assert_eq!(addr % 4096, 0);
        assert!(addr + len <= size && addr + len + 4096 > size, "{addr:#x}");
        let mut back = vec![0u8; content.len()];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, content);
    }

    #[test]
    fn pvh_initrd_is_a_module() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec {
            pvh_note: true,
            ..Default::default()
        }));
        let initrd = test_kernel::file(&[7u8; 5000]);
        let mem = ram(32 << 20);
        let mut src = source(kernel.as_path());
        src.initrd = Some(initrd.as_path().to_path_buf());
        load(&mem, &src, 1).unwrap();
        let info: hvm_start_info = mem.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 5000);
        assert_eq!(module.paddr, (32 << 20) - 8192);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(module.paddr + 4999))
                .unwrap(),
            7
        );
    }

    #[test]
    fn initrd_stays_below_the_gap_and_initrd_addr_max() {
        let kernel = test_kernel::file(&test_kernel::bzimage(&BzImageSpec {
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        }));
        let initrd = test_kernel::file(&[1u8; 4096]);
        let mut src = source(kernel.as_path());
        src.initrd = Some(initrd.as_path().to_path_buf());
        let mem = ram((4u64 << 30) + (16 << 20));
        load(&mem, &src, 1).unwrap();
        let params: boot_params = mem.read_obj(layout::ZERO_PAGE_START).unwrap();
        assert_eq!({ params.hdr.ramdisk_image }, 0x3800_0000 - 4096);
        assert_eq!(params.e820_entries, 4);

        let plain = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        src.kernel = plain.as_path().to_path_buf();
        load(&mem, &src, 1).unwrap();
        let params: boot_params = mem.read_obj(layout::ZERO_PAGE_START).unwrap();
        assert_eq!(
            u64::from(params.hdr.ramdisk_image),
            layout::MMIO_GAP_START - 4096
        );
    }

    #[test]
    fn initrd_that_does_not_fit_or_is_missing_is_refused_by_name() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        let mut src = source(kernel.as_path());
        let big = test_kernel::file(&vec![0u8; 32 << 20]);
        src.initrd = Some(big.as_path().to_path_buf());
        let err = load(&ram(32 << 20), &src, 1).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        assert!(err
            .to_string()
            .contains(&big.as_path().display().to_string()));

        let empty = test_kernel::file(b"");
        src.initrd = Some(empty.as_path().to_path_buf());
        let err = load(&ram(32 << 20), &src, 1).unwrap_err();
        assert!(matches!(err, BootError::InitrdEmpty(_)), "{err}");

        src.initrd = Some(std::env::temp_dir().join("citadel-boot-test-no-initrd"));
        let err = load(&ram(32 << 20), &src, 1).unwrap_err();
        assert!(matches!(err, BootError::InitrdRead { .. }), "{err}");
        assert!(err.to_string().contains("citadel-boot-test-no-initrd"));
    }

    #[test]
    fn vcpu_count_is_checked() {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec::default()));
        let mem = ram(32 << 20);
        for n in [0u8, 255] {
            let err = load(&mem, &source(kernel.as_path()), n).unwrap_err();
            assert!(matches!(err, BootError::VcpuCount(_)), "{err}");
        }
    }
}
