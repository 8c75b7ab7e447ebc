//! Tiny kernels for tests, built in memory: an x86-64 ELF with or without a PVH note, and a
//! bzImage with a 64-bit entry. Their default code runs identically in 32-bit protected mode and in
//! 64-bit mode and reports, through port writes, which mode it runs in and what the boot
//! registers and boot structures hold:
//!
//! | port | value                                                            |
//! |------|------------------------------------------------------------------|
//! | 0x10 | 0xffff_ffff in 64-bit mode, 0xffff_fffe in 32-bit mode            |
//! | 0x11 | ESI (the zero page for the Linux entry)                           |
//! | 0x12 | EBX (hvm_start_info for PVH)                                      |
//! | 0x13 | ESP                                                               |
//! | 0x14 | dword at ESI + 0x202 ("HdrS" in a zero page)                      |
//! | 0x15 | dword at EBX (the hvm_start_info magic)                           |
//! | 0x16 | done (no more writes follow)                                      |
//!
//! then `hlt`.

use std::io::Write;

use vmm_sys_util::tempfile::TempFile;

/// Load address of the test kernels.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Port of the mode probe.
pub const PORT_MODE: u16 = 0x10;
/// Port written last.
pub const PORT_DONE: u16 = 0x16;
/// Mode probe value in 64-bit mode.
pub const MODE_64: u32 = 0xffff_ffff;
/// Mode probe value in 32-bit mode.
pub const MODE_32: u32 = 0xffff_fffe;

/// The probe code; see the module documentation.
pub fn probe_code() -> Vec<u8> {
    vec![
        0x31, 0xc0, // xor eax, eax
        0x48, // REX.W in 64-bit mode; `dec eax` in 32-bit mode
        0xff, 0xc8, // dec (r/e)ax
        0xe7, 0x10, // out 0x10, eax
        0x89, 0xf0, // mov eax, esi
        0xe7, 0x11, // out 0x11, eax
        0x89, 0xd8, // mov eax, ebx
        0xe7, 0x12, // out 0x12, eax
        0x89, 0xe0, // mov eax, esp
        0xe7, 0x13, // out 0x13, eax
        0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [(r/e)si + 0x202]
        0xe7, 0x14, // out 0x14, eax
        0x8b, 0x03, // mov eax, [(r/e)bx]
        0xe7, 0x15, // out 0x15, eax
        0xe7, 0x16, // out 0x16, eax
        0xf4, // hlt
    ]
}

/// Code that reports what the guest's own `cpuid` says: leaf 1 ECX on port 0x20, leaf 1 EBX
/// on 0x21, leaf 7.0 EBX on 0x22, then writes [`PORT_DONE`].
pub fn cpuid_code() -> Vec<u8> {
    vec![
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x31, 0xc9, // xor ecx, ecx
        0x0f, 0xa2, // cpuid
        0x89, 0xc8, // mov eax, ecx
        0xe7, 0x20, // out 0x20, eax
        0x89, 0xd8, // mov eax, ebx
        0xe7, 0x21, // out 0x21, eax
        0xb8, 0x07, 0x00, 0x00, 0x00, // mov eax, 7
        0x31, 0xc9, // xor ecx, ecx
        0x0f, 0xa2, // cpuid
        0x89, 0xd8, // mov eax, ebx
        0xe7, 0x22, // out 0x22, eax
        0xe7, 0x16, // out 0x16, eax
        0xf4, // hlt
    ]
}

/// Options for [`elf`].
pub struct ElfSpec {
    /// Add a Xen PVH entry note pointing at the code.
    pub pvh_note: bool,
    /// Extra zero-initialised memory after the code (p_memsz - p_filesz).
    pub bss: u64,
    /// ELF class byte (2 = 64-bit).
    pub class: u8,
    /// The code to load; [`probe_code`] when `None`.
    pub code: Option<Vec<u8>>,
}

impl Default for ElfSpec {
    fn default() -> Self {
        ElfSpec {
            pvh_note: false,
            bss: 0,
            class: 2,
            code: None,
        }
    }
}

/// An ELF executable with the probe code at [`LOAD_ADDR`], entry at the code.
pub fn elf(spec: &ElfSpec) -> Vec<u8> {
    let code = spec.code.clone().unwrap_or_else(probe_code);
    let code_off = 0x1000u64;
    let note_off = code_off + code.len().next_multiple_of(4) as u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&8u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    let phnum: u16 = if spec.pvh_note { 2 } else { 1 };

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', spec.class, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    assert_eq!(f.len(), 64);

    let phdr = |f: &mut Vec<u8>, p_type: u32, off: u64, filesz: u64, memsz: u64, addr: u64| {
        f.extend_from_slice(&p_type.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes()); // RWX
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        f.extend_from_slice(&filesz.to_le_bytes());
        f.extend_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(&0x1000u64.to_le_bytes());
    };
    let code_len = code.len() as u64;
    phdr(
        &mut f,
        1,
        code_off,
        code_len,
        code_len + spec.bss,
        LOAD_ADDR,
    );
    if spec.pvh_note {
        phdr(&mut f, 4, note_off, note.len() as u64, note.len() as u64, 0);
    }
    f.resize(code_off as usize, 0);
    f.extend_from_slice(&code);
    f.resize(note_off as usize, 0);
    f.extend_from_slice(&note);
    f
}

/// Options for [`bzimage`].
pub struct BzImageSpec {
    /// Set XLF_KERNEL_64 (a 64-bit entry at +0x200).
    pub kernel_64: bool,
    /// `initrd_addr_max`.
    pub initrd_addr_max: u32,
    /// `cmdline_size`.
    pub cmdline_size: u32,
    /// `init_size`.
    pub init_size: u32,
}

impl Default for BzImageSpec {
    fn default() -> Self {
        BzImageSpec {
            kernel_64: true,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            init_size: 0x10_0000,
        }
    }
}

/// A bzImage: one setup sector after the boot sector, then a protected-mode kernel whose
/// `startup_64` (offset 0x200) is the probe code.
pub fn bzimage(spec: &BzImageSpec) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    let put = |f: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        f[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut f, 0x1f1, &[1]); // setup_sects
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &0x20fu16.to_le_bytes()); // boot protocol 2.15
    put(&mut f, 0x211, &[1]); // LOADED_HIGH
    put(&mut f, 0x214, &(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    put(&mut f, 0x22c, &spec.initrd_addr_max.to_le_bytes());
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut f, 0x234, &[1]); // relocatable
    let xloadflags: u16 = if spec.kernel_64 { 1 } else { 0 };
    put(&mut f, 0x236, &xloadflags.to_le_bytes());
    put(&mut f, 0x238, &spec.cmdline_size.to_le_bytes());
    put(&mut f, 0x258, &LOAD_ADDR.to_le_bytes()); // pref_address
    put(&mut f, 0x260, &spec.init_size.to_le_bytes());
    // Protected-mode kernel: 32-bit entry at 0 (unused here), startup_64 at 0x200.
    let mut kernel = vec![0xf4u8; 0x200];
    kernel.extend_from_slice(&probe_code());
    f.extend_from_slice(&kernel);
    f
}

/// Writes `bytes` to a fresh temporary file, removed when the returned value drops.
pub fn file(bytes: &[u8]) -> TempFile {
    let tmp = TempFile::new_with_prefix(std::env::temp_dir().join("citadel-boot-test-")).unwrap();
    tmp.as_file().write_all(bytes).unwrap();
    tmp
}
