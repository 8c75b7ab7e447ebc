//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns how many
//! CPUs it has, their APIC ids, where the IOAPIC is and how ISA interrupts reach it.
//!
//! Layout written at [`layout::MPTABLE_START`]: the 16-byte floating pointer structure, then
//! the configuration table header, one processor entry per vCPU, one ISA bus, the IOAPIC, an
//! I/O interrupt entry per IOAPIC pin (ISA IRQ n → pin n, as KVM's default GSI routing wires
//! them) and the two local interrupt entries of virtual wire mode (ExtINT on LINT0, NMI on
//! LINT1). Each part is built byte by byte in little-endian order, so no packed structs or
//! unsafe casts are needed.

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The vCPU count is out of range.
    #[error("cannot describe {0} vCPUs: the MP table supports 1 to {max}", max = layout::MAX_VCPUS)]
    VcpuCount(u8),
    /// The table does not fit in the space reserved for it.
    #[error("MP table of {0} bytes exceeds its {max}-byte area", max = layout::MPTABLE_MAX_SIZE)]
    TooLarge(usize),
    /// Guest memory refused the write.
    #[error("cannot write the MP table at {addr:#x}: {source}")]
    Write {
        /// Where the table was to go.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Interrupt types.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Integrated local APIC (what KVM emulates).
const LAPIC_VERSION: u8 = 0x14;
/// Version KVM's in-kernel IOAPIC reports.
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags for the processor entries; guests read the
/// real values through CPUID, these only have to be plausible.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_BUS_ID: u8 = 0;
/// Destination "all local APICs" for local interrupt entries.
const ALL_LAPICS: u8 = 0xff;

/// Size in bytes of the MP table (floating pointer included) for `num_cpus` vCPUs.
pub fn table_size(num_cpus: u8) -> usize {
    FLOATING_POINTER_SIZE
        + HEADER_SIZE
        + 20 * usize::from(num_cpus)
        + 8 // ISA bus
        + 8 // IOAPIC
        + 8 * usize::from(layout::IOAPIC_PINS)
        + 8 * 2 // LINT0, LINT1
}

/// APIC id given to the IOAPIC: the first id after the vCPUs' (which are 0..num_cpus).
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Writes the MP floating pointer and configuration table for `num_cpus` vCPUs (APIC ids
/// 0..num_cpus, vCPU 0 the bootstrap processor) at [`layout::MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let table = build(num_cpus)?;
    let addr = layout::MPTABLE_START;
    // Checked up front so a partial table is never left in guest memory.
    if !mem.check_range(addr, table.len()) {
        return Err(MpTableError::Write {
            addr: addr.0,
            source: vm_memory::GuestMemoryError::InvalidGuestAddress(addr),
        });
    }
    mem.write_slice(&table, addr)
        .map_err(|source| MpTableError::Write {
            addr: addr.0,
            source,
        })
}

fn build(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS {
        return Err(MpTableError::VcpuCount(num_cpus));
    }
    let size = table_size(num_cpus);
    if size > layout::MPTABLE_MAX_SIZE {
        return Err(MpTableError::TooLarge(size));
    }
    let config_addr = layout::MPTABLE_START.0 + FLOATING_POINTER_SIZE as u64;

    let mut fp = Vec::with_capacity(FLOATING_POINTER_SIZE);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(config_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV);
    fp.push(0); // checksum, fixed below
                // Feature byte 1 = 0: a configuration table is present. Feature byte 2 bit 7 clear:
                // no IMCR, virtual wire mode.
    fp.extend_from_slice(&[0; 5]);
    set_checksum(&mut fp, 10);

    let mut entries = Vec::with_capacity(size - FLOATING_POINTER_SIZE - HEADER_SIZE);
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;

    let ioapic = ioapic_id(num_cpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;

    for pin in 0..layout::IOAPIC_PINS {
        // Flags 0: polarity and trigger mode conform to the bus (ISA: edge, active high).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, pin]);
        entries.extend_from_slice(&[ioapic, pin]);
        count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type, 0, 0, ISA_BUS_ID, 0]);
        entries.extend_from_slice(&[ALL_LAPICS, lint]);
        count += 1;
    }

    let base_len = (HEADER_SIZE + entries.len()) as u16;
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&base_len.to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, fixed below
    header.extend_from_slice(b"CITADEL ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(layout::LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    header.push(0);
    header.push(0);

    let mut config = header;
    config.extend_from_slice(&entries);
    set_checksum(&mut config, 7);

    let mut table = fp;
    table.extend_from_slice(&config);
    debug_assert_eq!(table.len(), size);
    Ok(table)
}

/// Sets byte `at` so that all bytes of `data` sum to zero modulo 256.
fn set_checksum(data: &mut [u8], at: usize) {
    data[at] = 0;
    let sum = data.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    data[at] = sum.wrapping_neg();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// What a guest learns from the MP table it finds in memory.
    #[derive(Debug, PartialEq)]
    pub(crate) struct Parsed {
        pub cpus: Vec<(u8, u8)>,
        pub ioapic: (u8, u32),
        pub lapic: u32,
        pub io_interrupts: usize,
        pub local_interrupts: Vec<(u8, u8)>,
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Scans the BIOS area the way an MP-spec guest does and parses what it finds, checking
    /// both checksums.
    pub(crate) fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let mut bios = vec![0u8; 0x1_0000];
        mem.read_slice(&mut bios, GuestAddress(0xf_0000)).unwrap();
        let fp_off = (0..bios.len())
            .step_by(16)
            .find(|&o| &bios[o..o + 4] == b"_MP_")
            .expect("no MP floating pointer in 0xF0000..0x100000");
        let fp = &bios[fp_off..fp_off + 16];
        assert_eq!(sum(fp), 0, "floating pointer checksum");
        assert_eq!(fp[9], SPEC_REV);
        let config_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap());

        let mut header = [0u8; HEADER_SIZE];
        mem.read_slice(&mut header, GuestAddress(config_addr.into()))
            .unwrap();
        assert_eq!(&header[0..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut config = vec![0u8; len];
        mem.read_slice(&mut config, GuestAddress(config_addr.into()))
            .unwrap();
        assert_eq!(sum(&config), 0, "configuration table checksum");
        let count = u16::from_le_bytes([config[34], config[35]]);
        let lapic = u32::from_le_bytes(config[36..40].try_into().unwrap());

        let mut parsed = Parsed {
            cpus: vec![],
            ioapic: (0, 0),
            lapic,
            io_interrupts: 0,
            local_interrupts: vec![],
        };
        let mut off = HEADER_SIZE;
        for _ in 0..count {
            match config[off] {
                ENTRY_PROCESSOR => {
                    parsed.cpus.push((config[off + 1], config[off + 3]));
                    off += 20;
                }
                ENTRY_BUS => {
                    assert_eq!(&config[off + 2..off + 8], b"ISA   ");
                    off += 8;
                }
                ENTRY_IOAPIC => {
                    let addr = u32::from_le_bytes(config[off + 4..off + 8].try_into().unwrap());
                    parsed.ioapic = (config[off + 1], addr);
                    off += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(config[off + 5], config[off + 7], "ISA IRQ n goes to pin n");
                    parsed.io_interrupts += 1;
                    off += 8;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    parsed
                        .local_interrupts
                        .push((config[off + 1], config[off + 7]));
                    off += 8;
                }
                other => panic!("unknown MP entry type {other}"),
            }
        }
        assert_eq!(off, len, "entries fill the table exactly");
        parsed
    }

    #[test]
    fn table_parses_back_for_several_cpu_counts() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        for n in [1u8, 2, 7, 64, layout::MAX_VCPUS] {
            write(&mem, n).unwrap();
            let parsed = parse(&mem);
            assert_eq!(parsed.cpus.len(), usize::from(n));
            for (i, (id, flags)) in parsed.cpus.iter().enumerate() {
                assert_eq!(usize::from(*id), i);
                let bsp = if i == 0 { CPU_BOOTSTRAP } else { 0 };
                assert_eq!(*flags, CPU_ENABLED | bsp);
            }
            assert_eq!(parsed.ioapic, (n, layout::IOAPIC_START as u32));
            assert_eq!(parsed.lapic, layout::LAPIC_START as u32);
            assert_eq!(parsed.io_interrupts, usize::from(layout::IOAPIC_PINS));
            assert_eq!(
                parsed.local_interrupts,
                vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]
            );
        }
    }

    #[test]
    fn refuses_zero_and_too_many_cpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        assert!(matches!(write(&mem, 0), Err(MpTableError::VcpuCount(0))));
        assert!(matches!(
            write(&mem, 255),
            Err(MpTableError::VcpuCount(255))
        ));
    }

    #[test]
    fn refuses_memory_without_the_bios_area() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(write(&mem, 1), Err(MpTableError::Write { .. })));
    }
}
