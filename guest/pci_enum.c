/*
 * pci_enum: enumerates PCI segment 0 the way a kernel's PCI core does, through ECAM
 * (MMCONFIG at 0xe0000000, 1 MiB per bus) and the legacy 0xCF8/0xCFC mechanism, and
 * reports what it finds:
 *
 *  - every function on bus 0 (honouring the multifunction bit of function 0), whether
 *    both mechanisms read the same registers for every device and function of bus 0, and
 *    each function's identity and class after the guest wrote over them;
 *  - for each PCI-to-PCI bridge (header type 1): its capability list, whether its extended
 *    configuration space answers through ECAM, the PCI Express
 *    capability decoded (port type, slot and link capabilities, presence detect, data link
 *    layer active), then bus numbers programmed (1, 2, ... in scan order) and read back, the
 *    empty bus behind it, and a power-off written to its slot control and read back;
 *  - functions and buses where nothing is (all-ones), and how many functions answer on buses
 *    1 to 255 once the bridges are programmed.
 *
 * The fourth GiB, which holds the ECAM window, is identity-mapped uncached by start.S, so
 * config space is reached with plain loads and stores. Every access is a single mov or in/out
 * of the register's own width, which KVM decodes into an MMIO or port exit.
 */
#include "guest.h"

#define ECAM_BASE 0xe0000000UL
#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define CF8_ENABLE 0x80000000U

#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_CLASS_REVISION 0x08
#define PCI_HEADER_WORD 0x0c
#define PCI_HEADER_TYPE 0x0e
#define PCI_PRIMARY_BUS 0x18
#define PCI_CAPABILITY_LIST 0x34

#define PCI_STATUS_CAP_LIST 0x10
#define HEADER_MULTIFUNCTION 0x80
#define HEADER_LAYOUT 0x7f
#define HEADER_BRIDGE 1

#define CAP_ID_MSI 0x05
#define CAP_ID_EXP 0x10
#define MSI_FLAGS 2
#define MSI_64BIT 0x80

/* PCI Express capability registers, as offsets from the capability. */
#define EXP_FLAGS 0x02
#define EXP_LNKCAP 0x0c
#define EXP_LNKSTA 0x12
#define EXP_SLTCAP 0x14
#define EXP_SLTCTL 0x18
#define EXP_SLTSTA 0x1a
#define EXP_FLAGS_TYPE_SHIFT 4
#define EXP_FLAGS_SLOT 0x100
#define EXP_TYPE_ROOT_PORT 4
#define LNKCAP_DLLLARC (1U << 20)
#define LNKCAP_PORT_SHIFT 24
#define LNKSTA_DLLLA (1U << 13)
#define SLTCAP_PSN_SHIFT 19
#define SLTCTL_PCC (1U << 10)
#define SLTSTA_PDS (1U << 6)

#define MAX_FUNCTIONS 256
#define MAX_CAPS 48
#define ALL_ONES 0xffffffffU

struct function {
	u8 bus;
	u8 dev;
	u8 fn;
	u8 header;
};

static struct function found[MAX_FUNCTIONS];
static int nfound;

static inline void outw(u16 port, u16 val)
{
	__asm__ volatile("outw %0, %1" : : "a"(val), "Nd"(port));
}

static inline u16 inw(u16 port)
{
	u16 val;
	__asm__ volatile("inw %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline void outl(u16 port, u32 val)
{
	__asm__ volatile("outl %0, %1" : : "a"(val), "Nd"(port));
}

static inline u32 inl(u16 port)
{
	u32 val;
	__asm__ volatile("inl %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static u64 ecam_addr(u8 bus, u8 dev, u8 fn, u16 reg)
{
	return ECAM_BASE | (u64)bus << 20 | (u64)dev << 15 | (u64)fn << 12 | reg;
}

static u32 ecam_read32(u8 bus, u8 dev, u8 fn, u16 reg)
{
	return *(volatile u32 *)ecam_addr(bus, dev, fn, reg);
}

static u16 ecam_read16(u8 bus, u8 dev, u8 fn, u16 reg)
{
	return *(volatile u16 *)ecam_addr(bus, dev, fn, reg);
}

static u8 ecam_read8(u8 bus, u8 dev, u8 fn, u16 reg)
{
	return *(volatile u8 *)ecam_addr(bus, dev, fn, reg);
}

static void ecam_write32(u8 bus, u8 dev, u8 fn, u16 reg, u32 val)
{
	*(volatile u32 *)ecam_addr(bus, dev, fn, reg) = val;
}

static void ecam_write16(u8 bus, u8 dev, u8 fn, u16 reg, u16 val)
{
	*(volatile u16 *)ecam_addr(bus, dev, fn, reg) = val;
}

static void cf8_select(u8 bus, u8 dev, u8 fn, u8 reg)
{
	outl(PCI_CONFIG_ADDRESS,
	     CF8_ENABLE | (u32)bus << 16 | (u32)dev << 11 | (u32)fn << 8 | (reg & 0xfc));
}

static u32 cf8_read32(u8 bus, u8 dev, u8 fn, u8 reg)
{
	cf8_select(bus, dev, fn, reg);
	return inl(PCI_CONFIG_DATA);
}

/* Narrow accesses use the data port byte matching the register's low address bits. */
static u16 cf8_read16(u8 bus, u8 dev, u8 fn, u8 reg)
{
	cf8_select(bus, dev, fn, reg);
	return inw(PCI_CONFIG_DATA + (reg & 2));
}

static u8 cf8_read8(u8 bus, u8 dev, u8 fn, u8 reg)
{
	cf8_select(bus, dev, fn, reg);
	return inb(PCI_CONFIG_DATA + (reg & 3));
}

static void cf8_write16(u8 bus, u8 dev, u8 fn, u8 reg, u16 val)
{
	cf8_select(bus, dev, fn, reg);
	outw(PCI_CONFIG_DATA + (reg & 2), val);
}

/* Hex with exactly `digits` digits, no prefix: "1b36", "060400". */
static void put_hex_fixed(u64 v, int digits)
{
	char buf[17];
	int i;

	for (i = digits - 1; i >= 0; i--) {
		buf[i] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	}
	buf[digits] = 0;
	serial_puts(buf);
}

static void put_bdf(u8 bus, u8 dev, u8 fn)
{
	put_hex_fixed(bus, 2);
	serial_puts(":");
	put_hex_fixed(dev, 2);
	serial_puts(".");
	put_hex_fixed(fn, 1);
}

static void line_start(const char *what, const struct function *f)
{
	serial_puts("citadel-guest: ");
	serial_puts(what);
	serial_puts(" ");
	put_bdf(f->bus, f->dev, f->fn);
}

/* Reports whether the address register holds what was written to it, as the kernel's
 * type-1 probe checks before it trusts the mechanism. */
static void check_cf8_latch(void)
{
	u32 back;

	outl(PCI_CONFIG_ADDRESS, CF8_ENABLE);
	back = inl(PCI_CONFIG_ADDRESS);
	serial_puts("citadel-guest: pci cf8 address-register ");
	serial_put_hex(back);
	serial_puts("\n");
	/* With the enable bit clear the data port addresses no configuration space. */
	outl(PCI_CONFIG_ADDRESS, 0);
	serial_puts("citadel-guest: pci cf8 disabled-data ");
	serial_put_hex(inl(PCI_CONFIG_DATA));
	serial_puts("\n");
}

static void scan_bus0(void)
{
	u8 dev, fn;

	for (dev = 0; dev < 32; dev++) {
		for (fn = 0; fn < 8; fn++) {
			u32 id = ecam_read32(0, dev, fn, PCI_VENDOR_ID);
			u32 class;
			u8 header;
			struct function *f;

			if ((id & 0xffff) == 0xffff) {
				/* No function 0: the device is not there at all. */
				if (fn == 0)
					break;
				continue;
			}
			class = ecam_read32(0, dev, fn, PCI_CLASS_REVISION);
			header = ecam_read8(0, dev, fn, PCI_HEADER_TYPE);
			if (nfound < MAX_FUNCTIONS) {
				f = &found[nfound++];
				f->bus = 0;
				f->dev = dev;
				f->fn = fn;
				f->header = header;
				line_start("pci", f);
				serial_puts(" ");
				put_hex_fixed(id & 0xffff, 4);
				serial_puts(":");
				put_hex_fixed(id >> 16, 4);
				serial_puts(" class ");
				put_hex_fixed(class >> 8, 6);
				serial_puts(" hdr ");
				put_hex_fixed(header, 2);
				serial_puts("\n");
			}
			if (fn == 0 && !(header & HEADER_MULTIFUNCTION))
				break;
		}
	}
}

/* Mismatches reported one per line; the rest are only counted, so that a mechanism that
 * reads nothing at all yields a short report. */
#define MISMATCH_LINES 16

static int cf8_mismatch(u8 dev, u8 fn, u8 reg, u32 ecam, u32 cf8)
{
	static int reported;

	if (ecam == cf8)
		return 0;
	if (reported++ >= MISMATCH_LINES)
		return 1;
	serial_puts("citadel-guest: pci cf8 mismatch ");
	put_bdf(0, dev, fn);
	serial_puts(" reg ");
	serial_put_hex(reg);
	serial_puts(" ecam ");
	serial_put_hex(ecam);
	serial_puts(" cf8 ");
	serial_put_hex(cf8);
	serial_puts("\n");
	return 1;
}

/* Both mechanisms must show the same bus 0, empty slots included: identity, class and the
 * header dword at full width, and the device id and header type through narrow accesses. */
static void compare_cf8(void)
{
	int mismatches = 0;
	u8 dev, fn;

	for (dev = 0; dev < 32; dev++) {
		for (fn = 0; fn < 8; fn++) {
			u32 id = ecam_read32(0, dev, fn, PCI_VENDOR_ID);

			mismatches += cf8_mismatch(dev, fn, PCI_VENDOR_ID, id,
						   cf8_read32(0, dev, fn, PCI_VENDOR_ID));
			if (id == ALL_ONES)
				continue;
			mismatches += cf8_mismatch(dev, fn, PCI_CLASS_REVISION,
						   ecam_read32(0, dev, fn, PCI_CLASS_REVISION),
						   cf8_read32(0, dev, fn, PCI_CLASS_REVISION));
			mismatches += cf8_mismatch(dev, fn, PCI_HEADER_WORD,
						   ecam_read32(0, dev, fn, PCI_HEADER_WORD),
						   cf8_read32(0, dev, fn, PCI_HEADER_WORD));
			mismatches += cf8_mismatch(dev, fn, PCI_DEVICE_ID,
						   ecam_read16(0, dev, fn, PCI_DEVICE_ID),
						   cf8_read16(0, dev, fn, PCI_DEVICE_ID));
			mismatches += cf8_mismatch(dev, fn, PCI_HEADER_TYPE,
						   ecam_read8(0, dev, fn, PCI_HEADER_TYPE),
						   cf8_read8(0, dev, fn, PCI_HEADER_TYPE));
		}
	}
	if (mismatches == 0)
		report("pci cf8 agrees");
	else
		report_dec("pci cf8 mismatches", (u64)mismatches);
}

/* Writes over the identity and class registers and reports what they read afterwards:
 * they are read-only, so the function keeps its identity whatever a guest writes there. */
static void check_readonly(const struct function *f)
{
	u32 id, class;

	ecam_write32(f->bus, f->dev, f->fn, PCI_VENDOR_ID, 0);
	ecam_write32(f->bus, f->dev, f->fn, PCI_CLASS_REVISION, ALL_ONES);
	id = ecam_read32(f->bus, f->dev, f->fn, PCI_VENDOR_ID);
	class = ecam_read32(f->bus, f->dev, f->fn, PCI_CLASS_REVISION);
	line_start("readonly", f);
	serial_puts(" ");
	put_hex_fixed(id & 0xffff, 4);
	serial_puts(":");
	put_hex_fixed(id >> 16, 4);
	serial_puts(" class ");
	put_hex_fixed(class >> 8, 6);
	serial_puts("\n");
}

/* Whether the first dword of the extended configuration space (0x100, beyond what 0xCFC
 * reaches) answers through ECAM: the kernel reads it to decide whether a function has
 * 4 KiB of configuration space or only 256 bytes. */
static void check_extended_space(const struct function *f)
{
	line_start("extcfg", f);
	serial_puts(" readable ");
	serial_put_dec(ecam_read32(f->bus, f->dev, f->fn, 0x100) != ALL_ONES);
	serial_puts("\n");
}

/* Walks the capability list; returns the offsets of the PCI Express and MSI capabilities
 * (0 when absent). */
static void walk_caps(const struct function *f, u8 *exp, u8 *msi)
{
	u16 status = ecam_read16(f->bus, f->dev, f->fn, PCI_STATUS);
	u8 ptr = ecam_read8(f->bus, f->dev, f->fn, PCI_CAPABILITY_LIST);
	int n;

	*exp = 0;
	*msi = 0;
	line_start("caps", f);
	serial_puts(" status-cap-list ");
	serial_put_dec(!!(status & PCI_STATUS_CAP_LIST));
	for (n = 0; n < MAX_CAPS && ptr >= 0x40; n++) {
		u8 id;

		ptr &= 0xfc;
		id = ecam_read8(f->bus, f->dev, f->fn, ptr);
		serial_puts(" ");
		serial_put_hex(ptr);
		serial_puts(":");
		put_hex_fixed(id, 2);
		if (id == CAP_ID_EXP && !*exp)
			*exp = ptr;
		if (id == CAP_ID_MSI && !*msi)
			*msi = ptr;
		ptr = ecam_read8(f->bus, f->dev, f->fn, ptr + 1);
	}
	if (ptr != 0) {
		serial_puts(" bad-next ");
		serial_put_hex(ptr);
	}
	serial_puts("\n");
}

static void flag(u32 value, u32 bit, const char *name)
{
	if (value & bit) {
		serial_puts(" ");
		serial_puts(name);
	}
}

static void report_msi(const struct function *f, u8 msi)
{
	u16 flags;

	if (!msi)
		return;
	flags = ecam_read16(f->bus, f->dev, f->fn, msi + MSI_FLAGS);
	line_start("msi", f);
	serial_puts(" at ");
	serial_put_hex(msi);
	serial_puts(" 64bit ");
	serial_put_dec(!!(flags & MSI_64BIT));
	serial_puts("\n");
}

/* Decodes the PCI Express capability: port type, slot and link capabilities, then the
 * presence-detect and data-link-layer-active states of the slot. */
static void report_exp(const struct function *f, u8 exp)
{
	u16 flags = ecam_read16(f->bus, f->dev, f->fn, exp + EXP_FLAGS);
	u32 lnkcap = ecam_read32(f->bus, f->dev, f->fn, exp + EXP_LNKCAP);
	u32 sltcap = ecam_read32(f->bus, f->dev, f->fn, exp + EXP_SLTCAP);
	u16 lnksta = ecam_read16(f->bus, f->dev, f->fn, exp + EXP_LNKSTA);
	u16 sltsta = ecam_read16(f->bus, f->dev, f->fn, exp + EXP_SLTSTA);

	line_start("pcie", f);
	serial_puts(" at ");
	serial_put_hex(exp);
	serial_puts(" type ");
	serial_put_dec((flags >> EXP_FLAGS_TYPE_SHIFT) & 0xf);
	serial_puts(" slot-implemented ");
	serial_put_dec(!!(flags & EXP_FLAGS_SLOT));
	serial_puts("\n");

	line_start("slotcap", f);
	flag(sltcap, 1U << 0, "abp");
	flag(sltcap, 1U << 1, "pcp");
	flag(sltcap, 1U << 2, "mrlsp");
	flag(sltcap, 1U << 3, "aip");
	flag(sltcap, 1U << 4, "pip");
	flag(sltcap, 1U << 5, "hps");
	flag(sltcap, 1U << 6, "hpc");
	flag(sltcap, 1U << 17, "eip");
	flag(sltcap, 1U << 18, "nccs");
	serial_puts(" psn ");
	serial_put_dec(sltcap >> SLTCAP_PSN_SHIFT);
	serial_puts("\n");

	line_start("linkcap", f);
	flag(lnkcap, LNKCAP_DLLLARC, "dll-active-reporting");
	serial_puts(" port ");
	serial_put_dec(lnkcap >> LNKCAP_PORT_SHIFT);
	serial_puts("\n");

	line_start("slot", f);
	serial_puts(" presence ");
	serial_put_dec(!!(sltsta & SLTSTA_PDS));
	serial_puts(" dll-active ");
	serial_put_dec(!!(lnksta & LNKSTA_DLLLA));
	serial_puts("\n");
}

/* Primary/secondary/subordinate bus numbers from the dword at PCI_PRIMARY_BUS. */
static void put_buses(u32 v)
{
	put_hex_fixed(v & 0xff, 2);
	serial_puts("/");
	put_hex_fixed((v >> 8) & 0xff, 2);
	serial_puts("/");
	put_hex_fixed((v >> 16) & 0xff, 2);
}

/* Gives the bridge bus `bus` as both secondary and subordinate bus (reporting the numbers
 * it had before), reads them back through both mechanisms, and reads what answers behind
 * it. */
static void program_bridge(const struct function *f, u8 bus)
{
	u32 old = ecam_read32(f->bus, f->dev, f->fn, PCI_PRIMARY_BUS);
	u32 want = (old & 0xff000000U) | (u32)bus << 16 | (u32)bus << 8 | f->bus;
	u32 back, back_cf8;

	ecam_write32(f->bus, f->dev, f->fn, PCI_PRIMARY_BUS, want);
	back = ecam_read32(f->bus, f->dev, f->fn, PCI_PRIMARY_BUS);
	back_cf8 = cf8_read32(f->bus, f->dev, f->fn, PCI_PRIMARY_BUS);
	line_start("bridge", f);
	serial_puts(" buses ");
	put_buses(old);
	serial_puts(" -> ");
	put_buses(back);
	serial_puts(back_cf8 == back ? " cf8-same" : " cf8-differs");
	serial_puts("\n");

	line_start("behind", f);
	serial_puts(" ");
	put_bdf(bus, 0, 0);
	serial_puts(" ecam ");
	serial_put_hex(ecam_read32(bus, 0, 0, PCI_VENDOR_ID));
	serial_puts(" cf8 ");
	serial_put_hex(cf8_read32(bus, 0, 0, PCI_VENDOR_ID));
	serial_puts("\n");
}

/* Turns the slot's power controller off through ECAM and on again through 0xCFC, reading
 * the control bit back after each write. */
static void toggle_slot_power(const struct function *f, u8 exp)
{
	u16 ctl = ecam_read16(f->bus, f->dev, f->fn, exp + EXP_SLTCTL);
	u16 off, on;

	ecam_write16(f->bus, f->dev, f->fn, exp + EXP_SLTCTL, ctl | SLTCTL_PCC);
	off = ecam_read16(f->bus, f->dev, f->fn, exp + EXP_SLTCTL);
	cf8_write16(f->bus, f->dev, f->fn, exp + EXP_SLTCTL, off & ~SLTCTL_PCC);
	on = cf8_read16(f->bus, f->dev, f->fn, exp + EXP_SLTCTL);
	line_start("slotctl", f);
	serial_puts(" power-off ");
	serial_put_dec(!!(off & SLTCTL_PCC));
	serial_puts(" power-on ");
	serial_put_dec(!(on & SLTCTL_PCC));
	serial_puts("\n");
}

static void probe(u8 bus, u8 dev, u8 fn)
{
	serial_puts("citadel-guest: probe ");
	put_bdf(bus, dev, fn);
	serial_puts(" ecam ");
	serial_put_hex(ecam_read32(bus, dev, fn, PCI_VENDOR_ID));
	serial_puts(" cf8 ");
	serial_put_hex(cf8_read32(bus, dev, fn, PCI_VENDOR_ID));
	serial_puts("\n");
}

/* Counts the functions 0 of every device on buses 1 to 255: with nothing plugged behind
 * the bridges, none may answer, whichever bus numbers they were given. */
static void scan_other_buses(void)
{
	u64 ecam_found = 0, cf8_found = 0;
	int bus;
	u8 dev;

	for (bus = 1; bus < 256; bus++) {
		for (dev = 0; dev < 32; dev++) {
			if (ecam_read32((u8)bus, dev, 0, PCI_VENDOR_ID) != ALL_ONES)
				ecam_found++;
			if (cf8_read32((u8)bus, dev, 0, PCI_VENDOR_ID) != ALL_ONES)
				cf8_found++;
		}
	}
	serial_puts("citadel-guest: pci buses 1-255 ecam ");
	serial_put_dec(ecam_found);
	serial_puts(" cf8 ");
	serial_put_dec(cf8_found);
	serial_puts("\n");
}

void guest_main(void)
{
	int i, bridges = 0, root_ports = 0;

	report_entry();
	check_cf8_latch();
	scan_bus0();
	compare_cf8();
	for (i = 0; i < nfound; i++)
		check_readonly(&found[i]);
	for (i = 0; i < nfound; i++) {
		const struct function *f = &found[i];
		u8 exp, msi;

		if ((f->header & HEADER_LAYOUT) != HEADER_BRIDGE)
			continue;
		bridges++;
		walk_caps(f, &exp, &msi);
		check_extended_space(f);
		report_msi(f, msi);
		if (exp) {
			report_exp(f, exp);
			if (((ecam_read16(f->bus, f->dev, f->fn, exp + EXP_FLAGS) >>
			      EXP_FLAGS_TYPE_SHIFT) & 0xf) == EXP_TYPE_ROOT_PORT)
				root_ports++;
		}
		program_bridge(f, (u8)bridges);
		if (exp)
			toggle_slot_power(f, exp);
	}
	probe(0, 0, 0);
	probe(0, 2, 1);
	probe(0, 0x1f, 0);
	probe(200, 0, 0);
	scan_other_buses();
	serial_puts("citadel-guest: pci-enum done functions=");
	serial_put_dec((u64)nfound);
	serial_puts(" bridges=");
	serial_put_dec((u64)bridges);
	serial_puts(" root-ports=");
	serial_put_dec((u64)root_ports);
	serial_puts("\n");
	halt_forever();
}
