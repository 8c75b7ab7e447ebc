//! ACPI tables: how a guest kernel built without MP-table support (most distribution
//! kernels) learns about its vCPUs, the IOAPIC and the serial port, and on the q35 machine
//! about the PCI Express segment.
//!
//! Written at [`layout::ACPI_START`], each table 16-byte aligned: the RSDP (ACPI 2.0, pointing
//! at the XSDT), the DSDT, a hardware-reduced FADT (no PM timer, no SCI, no fixed-feature
//! hardware), the MADT and the XSDT listing the FADT and MADT. The tables themselves come from
//! the rust-vmm `acpi_tables` crate; this module decides what goes into them and where.
//!
//! On q35 the XSDT also lists an MCFG with the segment's ECAM window, and the DSDT holds the
//! host bridge `\_SB.PCI0` (PNP0A08): its bus range and windows in `_CRS`, and an `_OSC`
//! that grants the operating system every control it asks for, native PCIe hotplug among
//! them, since no firmware here would handle hotplug events in its stead.
//!
//! The MADT says what the MP table says: APIC id `i` for vCPU `i`, the IOAPIC with the id
//! after the last vCPU and GSI base 0. ISA IRQ n reaches IOAPIC pin n (KVM's default
//! routing, which the MP table also declares), which is what ACPI assumes for every ISA IRQ
//! without an interrupt source override, so there are none.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Arg, CreateDWordField, Device, EISAName, Else,
    Equal, If, Interrupt, Memory32Fixed, Method, Name, Or, Package, PackageBuilder, Path,
    ResourceTemplate, Return, Scope, Uuid, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{layout, mptable};
use crate::devices::legacy::{COM1_BASE, COM1_IRQ};

/// Errors while writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is out of range.
    #[error("cannot describe {0} vCPUs in ACPI: the MADT supports 1 to {max}", max = layout::MAX_VCPUS)]
    VcpuCount(u8),
    /// The tables do not fit in the space reserved for them.
    #[error("ACPI tables of {0} bytes exceed their {max}-byte area", max = layout::ACPI_MAX_SIZE)]
    TooLarge(usize),
    /// Guest memory refused the write.
    #[error("cannot write the ACPI tables at {addr:#x}: {source}")]
    Write {
        /// Where the tables were to go.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// OEM id in every table header.
const OEM_ID: [u8; 6] = *b"CITADL";
/// OEM table id in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Length of an ACPI table header; a table without body is just this.
const SDT_HEADER_SIZE: u32 = 36;
/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`). "Legacy devices" and "8042" stay
/// clear: there are no ISA devices to probe besides COM1 (described in the DSDT), and the
/// i8042 exists only for its reset line, so the keyboard driver need not probe it.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Alignment of each table in guest memory; the RSDP needs 16 for the legacy scan.
const TABLE_ALIGN: usize = 16;
/// Number of COM1 registers.
const COM1_PORTS: u8 = 8;

/// Writes the ACPI tables for `num_cpus` vCPUs at [`layout::ACPI_START`] and returns the
/// address of the RSDP. `devices` are extra AML device objects placed in the DSDT's `\_SB`
/// scope after COM1 (for instance one per virtio-mmio slot); with `pcie`, the PCI Express
/// host bridge and its MCFG are described too.
pub fn write(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    devices: &[&dyn Aml],
    pcie: bool,
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS {
        return Err(AcpiError::VcpuCount(num_cpus));
    }
    let start = layout::ACPI_START;
    let mut image = TableImage::default();
    // The RSDP goes first so that it sits at the aligned start of the scanned area; its XSDT
    // address is only known once the other tables are placed, so it is filled in last.
    let rsdp_offset = image.reserve(Rsdp::len());
    let host_bridge = PciHostBridge;
    let mut all_devices = devices.to_vec();
    if pcie {
        all_devices.push(&host_bridge);
    }
    let dsdt = image.place(&dsdt(&all_devices));
    let fadt = image.place(&fadt(start.0 + dsdt as u64));
    let madt = image.place(&madt(num_cpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(start.0 + fadt as u64);
    xsdt.add_entry(start.0 + madt as u64);
    if pcie {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(layout::PCIE_ECAM_BASE, 0, 0, PCIE_LAST_BUS);
        xsdt.add_entry(start.0 + image.place(&mcfg) as u64);
    }
    let xsdt = image.place(&xsdt);
    image.fill(rsdp_offset, &Rsdp::new(OEM_ID, start.0 + xsdt as u64));

    let bytes = image.bytes;
    if bytes.len() > layout::ACPI_MAX_SIZE {
        return Err(AcpiError::TooLarge(bytes.len()));
    }
    // Checked up front so that a partial set of tables is never left in guest memory.
    let write_err = |source| AcpiError::Write {
        addr: start.0,
        source,
    };
    if !mem.check_range(start, bytes.len()) {
        return Err(write_err(vm_memory::GuestMemoryError::InvalidGuestAddress(
            start,
        )));
    }
    mem.write_slice(&bytes, start).map_err(write_err)?;
    Ok(GuestAddress(start.0 + rsdp_offset as u64))
}

/// The tables laid out one after the other, each at an aligned offset.
#[derive(Default)]
struct TableImage {
    bytes: Vec<u8>,
}

impl TableImage {
    /// Reserves `len` zero bytes at the next aligned offset and returns that offset.
    fn reserve(&mut self, len: usize) -> usize {
        let offset = self.bytes.len().next_multiple_of(TABLE_ALIGN);
        self.bytes.resize(offset + len, 0);
        offset
    }

    /// Appends `table` at the next aligned offset and returns that offset.
    fn place(&mut self, table: &dyn Aml) -> usize {
        let offset = self.bytes.len().next_multiple_of(TABLE_ALIGN);
        self.bytes.resize(offset, 0);
        table.to_aml_bytes(&mut self.bytes);
        offset
    }

    /// Overwrites the space reserved at `offset` with `table`.
    fn fill(&mut self, offset: usize, table: &dyn Aml) {
        let mut data = Vec::new();
        table.to_aml_bytes(&mut data);
        self.bytes[offset..offset + data.len()].copy_from_slice(&data);
    }
}

/// The DSDT: COM1 (a 16550-compatible UART, PNP0501) and `devices` in `\_SB`.
fn dsdt(devices: &[&dyn Aml]) -> Sdt {
    let hid = EISAName::new("PNP0501");
    let hid = Name::new("_HID".into(), &hid);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let ports = IO::new(COM1_BASE, COM1_BASE, 1, COM1_PORTS);
    // Edge-triggered, active high, exclusive: an ISA interrupt, as the MP table declares it.
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let resources = ResourceTemplate::new(vec![&ports, &irq]);
    let crs = Name::new("_CRS".into(), &resources);
    let com1 = Device::new("COM1".into(), vec![&hid, &uid, &crs]);

    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend_from_slice(devices);
    let sb = Scope::new("\\_SB_".into(), children);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_SIZE,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt
}

/// A virtio-mmio slot as an ACPI device of `\_SB`: `LNRO0005` (the id Linux's virtio_mmio
/// driver matches), its register window and its interrupt. With a hardware-reduced FADT Linux
/// has no legacy interrupt lines pre-mapped, so a slot's GSI works only once ACPI declares it;
/// a `virtio_mmio.device=` command-line declaration would name an unmapped IRQ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMmioNode {
    /// Slot index, the device's `_UID` and the last two hex digits of its name (`VRnn`).
    pub index: u8,
    /// Guest-physical base of its registers.
    pub base: u32,
    /// Size of its register window.
    pub size: u32,
    /// Its GSI: edge-triggered, active high, not shared, as its IOAPIC pin is programmed.
    pub gsi: u32,
}

impl Aml for VirtioMmioNode {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid_value = u32::from(self.index);
        let uid = Name::new("_UID".into(), &uid_value);
        let window = Memory32Fixed::new(true, self.base, self.size);
        let irq = Interrupt::new(true, true, false, false, self.gsi);
        let resources = ResourceTemplate::new(vec![&window, &irq]);
        let crs = Name::new("_CRS".into(), &resources);
        let name = format!("VR{:02X}", self.index);
        Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// The last bus number of the PCI Express segment: the ECAM window covers buses 0 to 255.
const PCIE_LAST_BUS: u8 = ((layout::PCIE_ECAM_SIZE >> 20) - 1) as u8;
/// `_OSC` UUID of PCI host bridges (PCI Firmware Specification).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` status bit: unrecognized UUID.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;

/// The PCI Express host bridge `PCI0` of segment 0, bus 0: the configuration ports, bus range,
/// I/O space (all but the configuration ports) and 32-bit memory window it forwards, and an
/// `_OSC` granting the OS every control it requests.
struct PciHostBridge;

impl Aml for PciHostBridge {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let hid_value = EISAName::new("PNP0A08");
        let hid = Name::new("_HID".into(), &hid_value);
        let cid_value = EISAName::new("PNP0A03");
        let cid = Name::new("_CID".into(), &cid_value);
        let adr = Name::new("_ADR".into(), &aml::ZERO);
        let seg = Name::new("_SEG".into(), &aml::ZERO);
        let uid = Name::new("_UID".into(), &aml::ZERO);
        let bbn = Name::new("_BBN".into(), &aml::ZERO);

        let buses = AddressSpace::new_bus_number(0u16, u16::from(PCIE_LAST_BUS));
        let config_ports = IO::new(0xcf8, 0xcf8, 1, 8);
        let io_below = AddressSpace::new_io(0u16, 0x0cf7, None);
        let io_above = AddressSpace::new_io(0x0d00u16, 0xffff, None);
        let mmio32 = AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            layout::PCI_MMIO32_BASE as u32,
            (layout::PCI_MMIO32_BASE + layout::PCI_MMIO32_SIZE - 1) as u32,
            None,
        );
        let resources =
            ResourceTemplate::new(vec![&buses, &config_ports, &io_below, &io_above, &mmio32]);
        let crs = Name::new("_CRS".into(), &resources);

        // Returning the capabilities buffer unchanged grants every control requested.
        let cdw1 = Path::new("CDW1");
        let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &aml::ZERO);
        let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
        let is_pci = Equal::new(&Arg(0), &uuid);
        let granted = If::new(&is_pci, vec![]);
        let unrecognized = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
        let refused = Else::new(vec![&unrecognized]);
        let ret = Return::new(&Arg(3));
        let osc = Method::new(
            "_OSC".into(),
            4,
            false,
            vec![&create_cdw1, &granted, &refused, &ret],
        );
        // INTx routing of every bus-0 device and pin, straight to IOAPIC lines (no link
        // devices): Package { address 0xDDDDFFFF, pin, source 0, GSI }.
        let mut routes = PackageBuilder::new();
        for device in 0..32u8 {
            for pin in 0..4u8 {
                let address = (u32::from(device) << 16) | 0xffff;
                let gsi = layout::pci_intx_gsi(device, pin);
                let entry = Package::new(vec![&address, &pin, &aml::ZERO, &gsi]);
                routes.add_element(&entry);
            }
        }
        let prt = Name::new("_PRT".into(), &routes);
        Device::new(
            "PCI0".into(),
            vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &osc, &prt],
        )
        .to_aml_bytes(sink);
    }
}

/// A hardware-reduced FADT pointing at the DSDT at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        // No PM timer, SCI, GPE or PM1 blocks: the guest uses its LAPIC timer, TSC and
        // kvmclock, and does not look for the legacy PIC or PIT either.
        .flag(Flags::HwReducedAcpi)
        // There is no fixed-feature power or sleep button (hardware-reduced platforms have
        // none): these flags say so.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.finalize()
}

/// The MADT: one enabled local APIC per vCPU (APIC id and processor UID = vCPU index) and the
/// IOAPIC.
fn madt(num_cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        mptable::ioapic_id(num_cpus),
        layout::IOAPIC_START as u32,
        0,
    ));
    madt
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a guest learns from the ACPI tables it finds in memory.
    #[derive(Debug, PartialEq)]
    pub(crate) struct Parsed {
        /// Where the RSDP was found by the legacy scan.
        pub rsdp: u64,
        /// (processor UID, APIC id, flags) of each MADT local APIC entry.
        pub lapics: Vec<(u8, u8, u32)>,
        /// (id, address, GSI base) of each MADT IOAPIC entry.
        pub ioapics: Vec<(u8, u32, u32)>,
        /// Local APIC address in the MADT.
        pub lapic_addr: u32,
        /// FADT flags.
        pub fadt_flags: u32,
        /// FADT IA-PC boot architecture flags.
        pub iapc_boot_arch: u16,
        /// The DSDT's AML (after the header).
        pub dsdt_aml: Vec<u8>,
        /// (base, segment, first bus, last bus) of each MCFG allocation, if there is an MCFG.
        pub mcfg: Option<Vec<(u64, u16, u8, u8)>>,
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads the table at `addr` with signature `sig`, checking its length and checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        assert_eq!(&header[0..4], sig, "table at {addr:#x}");
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "{sig:?} length {len}");
        let mut data = vec![0u8; len];
        mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&data), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&data[10..16], b"CITADL");
        data
    }

    /// Finds the RSDP the way Linux's legacy scan does (16-byte steps over 0xE0000..0x100000)
    /// and follows it to every table, checking each signature, length and checksum.
    pub(crate) fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let mut bios = vec![0u8; 0x2_0000];
        mem.read_slice(&mut bios, GuestAddress(0xe_0000)).unwrap();
        let off = (0..bios.len())
            .step_by(16)
            .find(|&o| &bios[o..o + 8] == b"RSD PTR ")
            .expect("no RSDP in 0xE0000..0x100000");
        let rsdp = &bios[off..off + 36];
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP ACPI 1.0 checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");

        let xsdt = table(mem, u64_at(rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert!(
            matches!(entries.len(), 2 | 3),
            "XSDT lists the FADT, the MADT and perhaps the MCFG"
        );
        let fadt = table(mem, entries[0], b"FACP");
        let madt = table(mem, entries[1], b"APIC");
        let mcfg = entries.get(2).map(|&addr| {
            let mcfg = table(mem, addr, b"MCFG");
            mcfg[44..]
                .chunks(16)
                .map(|a| (u64_at(a, 0), u16::from_le_bytes([a[8], a[9]]), a[10], a[11]))
                .collect()
        });

        assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
        let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");
        assert_eq!(fadt[8], 6, "FADT major revision");

        let mut parsed = Parsed {
            rsdp: 0xe_0000 + off as u64,
            lapics: vec![],
            ioapics: vec![],
            lapic_addr: u32_at(&madt, 36),
            fadt_flags: u32_at(&fadt, 112),
            iapc_boot_arch: u16::from_le_bytes([fadt[109], fadt[110]]),
            dsdt_aml: dsdt[36..].to_vec(),
            mcfg,
        };
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            let entry = &madt[at..at + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    parsed.lapics.push((entry[2], entry[3], u32_at(entry, 4)));
                }
                1 => {
                    assert_eq!(len, 12);
                    parsed
                        .ioapics
                        .push((entry[2], u32_at(entry, 4), u32_at(entry, 8)));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            at += len;
        }
        assert_eq!(at, madt.len(), "MADT entries fill the table exactly");
        parsed
    }

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tables_parse_back_for_several_cpu_counts() {
        let mem = ram();
        for n in [1u8, 2, 7, 64, layout::MAX_VCPUS] {
            let rsdp = write(&mem, n, &[], false).unwrap();
            let parsed = parse(&mem);
            assert_eq!(parsed.rsdp, rsdp.0);
            assert_eq!(parsed.rsdp % 16, 0);
            let expected: Vec<_> = (0..n).map(|i| (i, i, 1)).collect();
            assert_eq!(parsed.lapics, expected, "{n} vCPUs");
            assert_eq!(
                parsed.ioapics,
                vec![(n, layout::IOAPIC_START as u32, 0)],
                "IOAPIC id after the last vCPU, as in the MP table"
            );
            assert_eq!(parsed.lapic_addr, layout::LAPIC_START as u32);
        }
    }

    #[test]
    fn the_pcie_host_bridge_and_its_ecam_window_are_described_only_on_request() {
        let mem = ram();
        write(&mem, 1, &[], false).unwrap();
        let plain = parse(&mem);
        assert_eq!(plain.mcfg, None);
        assert!(!contains(&plain.dsdt_aml, b"PCI0"));

        write(&mem, 2, &[], true).unwrap();
        let parsed = parse(&mem);
        assert_eq!(parsed.mcfg, Some(vec![(0xe000_0000, 0, 0, 255)]));
        let aml = &parsed.dsdt_aml;
        assert!(contains(aml, b"PCI0"));
        // PNP0A08 and PNP0A03 as compressed EISA ids.
        assert!(contains(aml, &[0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(aml, &[0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(aml, b"_OSC"));
        // INTx routes: device 3's INTB (pin 1) is GSI 16 + (3 + 1) % 4 = 16, as
        // Package (4) { 0x0003FFFF, One, Zero, 0x10 }.
        assert!(contains(aml, b"_PRT"));
        assert!(contains(
            aml,
            &[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x01, 0x00, 0x0a, 0x10]
        ));
        // The _OSC UUID as ToUUID lays it out.
        assert!(contains(
            aml,
            &[0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57]
        ));
        // The 32-bit window: DWord memory descriptor with its minimum and maximum.
        let mut window = 0xd004_0000u32.to_le_bytes().to_vec();
        window.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
        assert!(contains(aml, &window));
        // The rest of the tables is unchanged.
        assert_eq!(parsed.lapics.len(), 2);
    }

    #[test]
    fn madt_agrees_with_the_mp_table() {
        let mem = ram();
        write(&mem, 5, &[], false).unwrap();
        mptable::write(&mem, 5).unwrap();
        let acpi = parse(&mem);
        let mp = mptable::tests::parse(&mem);
        let mp_ids: Vec<u8> = mp.cpus.iter().map(|c| c.0).collect();
        let acpi_ids: Vec<u8> = acpi.lapics.iter().map(|c| c.1).collect();
        assert_eq!(acpi_ids, mp_ids);
        assert_eq!((acpi.ioapics[0].0, acpi.ioapics[0].1), mp.ioapic);
        assert_eq!(acpi.lapic_addr, mp.lapic);
    }

    #[test]
    fn fadt_is_hardware_reduced_without_legacy_devices() {
        let mem = ram();
        write(&mem, 1, &[], false).unwrap();
        let parsed = parse(&mem);
        assert_ne!(parsed.fadt_flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        // No 8042 (bit 1) and no legacy ISA devices (bit 0) to probe; no VGA, no CMOS RTC.
        assert_eq!(parsed.iapc_boot_arch & 0b11, 0);
        assert_eq!(parsed.iapc_boot_arch & (1 << 2 | 1 << 5), 1 << 2 | 1 << 5);
    }

    #[test]
    fn dsdt_declares_each_virtio_mmio_slot() {
        let mem = ram();
        let slot = VirtioMmioNode {
            index: 1,
            base: 0xd000_1000,
            size: 0x1000,
            gsi: 6,
        };
        write(&mem, 1, &[&slot], false).unwrap();
        let aml = parse(&mem).dsdt_aml;
        assert!(contains(&aml, b"VR01"));
        assert!(contains(&aml, b"LNRO0005"));
        // Memory32Fixed descriptor (0x86, length 9, read-write) with the window.
        let mut window = vec![0x86, 0x09, 0x00, 0x01];
        window.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        window.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(&aml, &window));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, GSI 6.
        assert!(contains(
            &aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00]
        ));
    }

    #[test]
    fn dsdt_describes_com1_in_the_system_bus() {
        let mem = ram();
        write(&mem, 1, &[], false).unwrap();
        let aml = parse(&mem).dsdt_aml;
        // Scope (\_SB_) opens the AML.
        assert_eq!(aml[0], 0x10, "ScopeOp");
        assert!(contains(&aml, b"\\_SB_"));
        assert!(contains(&aml, b"COM1"));
        // _HID is EISAID("PNP0501"): the DWord 0x0105D041.
        assert!(contains(&aml, b"_HID\x0c\x41\xd0\x05\x01"), "{aml:x?}");
        // I/O port descriptor: decodes 16 bits, 0x3f8..0x3f8, 8 ports.
        assert!(contains(
            &aml,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, IRQ 4.
        assert!(contains(
            &aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]
        ));
    }

    #[test]
    fn extra_devices_land_in_the_dsdt() {
        let mem = ram();
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let dev = Device::new("V000".into(), vec![&hid]);
        write(&mem, 2, &[&dev], false).unwrap();
        let aml = parse(&mem).dsdt_aml;
        let mut dev_aml = Vec::new();
        dev.to_aml_bytes(&mut dev_aml);
        assert!(contains(&aml, &dev_aml));
        assert!(contains(&aml, b"LNRO0005\0"));
    }

    #[test]
    fn refuses_bad_cpu_counts_and_memory_without_the_bios_area() {
        let mem = ram();
        assert!(matches!(
            write(&mem, 0, &[], false),
            Err(AcpiError::VcpuCount(0))
        ));
        assert!(matches!(
            write(&mem, 255, &[], false),
            Err(AcpiError::VcpuCount(255))
        ));
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            write(&small, 1, &[], false),
            Err(AcpiError::Write { .. })
        ));
    }

    #[test]
    fn too_many_devices_are_refused_not_truncated() {
        let mem = ram();
        let blob = "X".repeat(layout::ACPI_MAX_SIZE);
        let name = Name::new("BLOB".into(), &blob);
        let err = write(&mem, 1, &[&name], false).unwrap_err();
        assert!(matches!(err, AcpiError::TooLarge(_)), "{err}");
    }
}
