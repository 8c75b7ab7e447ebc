/*
 * virtio_pci_blk: drives a virtio-blk-pci card hot-plugged into the q35 machine's root port at
 * 00:01.0 the way Linux's pciehp and virtio-pci drivers do, reporting each step:
 *
 *  - the root port: bus 1 behind it, a memory window for the card's BAR, its MSI aimed at
 *    this CPU's local APIC, the slot's presence-detect, data-link-layer and attention-button
 *    events and the hot-plug interrupt enabled; then "pci-blk waiting" for the plug;
 *  - the plug: the port's MSI (counted by its own handler), the slot status (presence and
 *    what changed), the events acknowledged (write 1 to clear), the slot powered on with its
 *    power indicator on;
 *  - the card at 01:00.0 through ECAM: identity, class, capability list (virtio structures,
 *    MSI-X, PCI Express), BAR 0 sized and placed in the window, memory decoding and bus
 *    mastering on, MSI-X with vector 0 for configuration changes and vector 1 for queue 0;
 *    virtio 1.x negotiated through the common configuration, the capacity read from the
 *    device configuration, then a read of sector 0, a write of sector 1 and a flush, each
 *    kicked through the queue's notification address and completed with the queue's MSI-X
 *    interrupt (counted by its own handler);
 *  - the unplug: the attention button (the port's MSI again), the device reset, the slot
 *    powered off and, a pause later as pciehp does, its power indicator turned off; then the
 *    card's absence (the port's MSI once more), and the empty bus.
 *
 * Every interrupt is a message to local APIC 0: the port's MSI and the card's MSI-X vectors
 * each have an IDT vector of their own, whose handler counts and sends the EOI. The ECAM
 * window and the BAR window are in the fourth GiB, identity-mapped uncached by start.S.
 */
#include "virtio_mmio.h"

#define ECAM_BASE 0xe0000000UL

/* The root port and the card behind it. */
#define PORT_DEV 1
#define CARD_BUS 1
/* The port's memory window, and where the card's BAR 0 goes in it. */
#define WINDOW_BASE 0xd0100000U
#define WINDOW_LIMIT 0xd01fffffU
#define BAR_BASE WINDOW_BASE

#define PCI_VENDOR_ID 0x00
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_CLASS_REVISION 0x08
#define PCI_HEADER_TYPE 0x0e
#define PCI_BAR0 0x10
#define PCI_PRIMARY_BUS 0x18
#define PCI_MEMORY_BASE 0x20
#define PCI_PREF_MEMORY_BASE 0x24
#define PCI_CAPABILITY_LIST 0x34
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS_CAP_LIST 0x10

#define CAP_ID_MSI 0x05
#define CAP_ID_VENDOR 0x09
#define CAP_ID_EXP 0x10
#define CAP_ID_MSIX 0x11

/* The root port's MSI capability (64-bit): control, address low and high, data. */
#define MSI_FLAGS 2
#define MSI_ADDRESS_LO 4
#define MSI_ADDRESS_HI 8
#define MSI_DATA_64 12
#define MSI_ENABLE 1

/* PCI Express capability registers, as offsets from the capability. */
#define EXP_FLAGS 0x02
#define EXP_LNKSTA 0x12
#define EXP_SLTCTL 0x18
#define EXP_SLTSTA 0x1a
#define SLTCTL_ABPE (1U << 0)
#define SLTCTL_PDCE (1U << 3)
#define SLTCTL_HPIE (1U << 5)
#define SLTCTL_PIC_MASK (3U << 8)
#define SLTCTL_PIC_ON (1U << 8)
#define SLTCTL_PIC_OFF (3U << 8)
#define SLTCTL_PCC (1U << 10)
#define SLTCTL_DLLSCE (1U << 12)
#define SLTSTA_ABP (1U << 0)
#define SLTSTA_PDC (1U << 3)
#define SLTSTA_PDS (1U << 6)
#define SLTSTA_DLLSC (1U << 8)
#define SLTSTA_EVENTS 0x011f
#define LNKSTA_DLLLA (1U << 13)

/* MSI-X capability: message control, table offset/BIR, PBA offset/BIR. */
#define MSIX_FLAGS 2
#define MSIX_TABLE 4
#define MSIX_PBA 8
#define MSIX_ENABLE (1U << 15)
#define MSIX_MASKALL (1U << 14)
#define MSIX_TABLE_SIZE_MASK 0x7ff

/* virtio_pci_cap: cfg_type, bar, offset, length; notify_off_multiplier after it. */
#define VCAP_CFG_TYPE 3
#define VCAP_BAR 4
#define VCAP_OFFSET 8
#define VCAP_LENGTH 12
#define VCAP_NOTIFY_MULT 16
#define CFG_COMMON 1
#define CFG_NOTIFY 2
#define CFG_ISR 3
#define CFG_DEVICE 4

/* virtio_pci_common_cfg fields. */
#define COMMON_DFSELECT 0x00
#define COMMON_DF 0x04
#define COMMON_GFSELECT 0x08
#define COMMON_GF 0x0c
#define COMMON_MSIX 0x10
#define COMMON_NUMQ 0x12
#define COMMON_STATUS 0x14
#define COMMON_Q_SELECT 0x16
#define COMMON_Q_SIZE 0x18
#define COMMON_Q_MSIX 0x1a
#define COMMON_Q_ENABLE 0x1c
#define COMMON_Q_NOFF 0x1e
#define COMMON_Q_DESCLO 0x20
#define COMMON_Q_DESCHI 0x24
#define COMMON_Q_AVAILLO 0x28
#define COMMON_Q_AVAILHI 0x2c
#define COMMON_Q_USEDLO 0x30
#define COMMON_Q_USEDHI 0x34

#define VIRTIO_BLK_F_FLUSH 9
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define WRITE_SECTOR 1

/* IDT vectors of the port's MSI and the card's two MSI-X vectors. */
#define PORT_VECTOR 0x50
#define CONFIG_VECTOR 0x51
#define QUEUE_VECTOR 0x52
/* Message address of local APIC 0, fixed delivery, physical destination. */
#define MSI_ADDRESS 0xfee00000U

#define PLUG_TIMEOUT_MS 120000
#define IO_TIMEOUT_MS 10000
/* pciehp leaves a second between powering a slot off and turning its power indicator off;
 * the pause here is longer, so the host sees a powered-off slot whose card stays. */
#define INDICATOR_PAUSE_MS 2000

/* Interrupt counts, incremented by the handlers below. */
volatile u64 port_irqs;
volatile u64 config_irqs;
volatile u64 queue_irqs;

extern void port_isr(void);
extern void config_isr(void);
extern void queue_isr(void);

/* Each handler counts its interrupt and sends the local APIC its EOI. */
__asm__(".text\n"
	".globl port_isr\n"
	"port_isr:\n"
	"	push %rax\n"
	"	lock incq port_irqs(%rip)\n"
	"	mov $0xfee000b0, %eax\n"
	"	movl $0, (%rax)\n"
	"	pop %rax\n"
	"	iretq\n"
	".globl config_isr\n"
	"config_isr:\n"
	"	push %rax\n"
	"	lock incq config_irqs(%rip)\n"
	"	mov $0xfee000b0, %eax\n"
	"	movl $0, (%rax)\n"
	"	pop %rax\n"
	"	iretq\n"
	".globl queue_isr\n"
	"queue_isr:\n"
	"	push %rax\n"
	"	lock incq queue_irqs(%rip)\n"
	"	mov $0xfee000b0, %eax\n"
	"	movl $0, (%rax)\n"
	"	pop %rax\n"
	"	iretq\n");

struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_high;
	u32 reserved;
} __attribute__((packed));

/* Points IDT entry `vec` of the runtime's table (found with sidt) at `handler`. */
static void idt_install(int vec, void (*handler)(void))
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc;
	struct idt_gate *gate;
	u64 addr = (u64)handler;

	__asm__ volatile("sidt %0" : "=m"(desc));
	gate = (struct idt_gate *)desc.base + vec;
	gate->offset_low = (u16)addr;
	gate->selector = 0x08;
	gate->ist = 0;
	gate->type_attr = 0x8e;
	gate->offset_mid = (u16)(addr >> 16);
	gate->offset_high = (u32)(addr >> 32);
	gate->reserved = 0;
}

/* Configuration space through ECAM, one access of the register's own width. */
static u64 ecam_addr(u8 bus, u8 dev, u16 reg)
{
	return ECAM_BASE | (u64)bus << 20 | (u64)dev << 15 | reg;
}

static u32 cfg_read32(u8 bus, u8 dev, u16 reg)
{
	return *(volatile u32 *)ecam_addr(bus, dev, reg);
}

static u16 cfg_read16(u8 bus, u8 dev, u16 reg)
{
	return *(volatile u16 *)ecam_addr(bus, dev, reg);
}

static u8 cfg_read8(u8 bus, u8 dev, u16 reg)
{
	return *(volatile u8 *)ecam_addr(bus, dev, reg);
}

static void cfg_write32(u8 bus, u8 dev, u16 reg, u32 val)
{
	*(volatile u32 *)ecam_addr(bus, dev, reg) = val;
}

static void cfg_write16(u8 bus, u8 dev, u16 reg, u16 val)
{
	*(volatile u16 *)ecam_addr(bus, dev, reg) = val;
}

/* BAR 0 registers. */
static u8 bar_read8(u32 off)
{
	return *(volatile u8 *)((u64)BAR_BASE + off);
}

static u16 bar_read16(u32 off)
{
	return *(volatile u16 *)((u64)BAR_BASE + off);
}

static u32 bar_read32(u32 off)
{
	return *(volatile u32 *)((u64)BAR_BASE + off);
}

static void bar_write8(u32 off, u8 val)
{
	*(volatile u8 *)((u64)BAR_BASE + off) = val;
}

static void bar_write16(u32 off, u16 val)
{
	*(volatile u16 *)((u64)BAR_BASE + off) = val;
}

static void bar_write32(u32 off, u32 val)
{
	*(volatile u32 *)((u64)BAR_BASE + off) = val;
}

/* Hex with exactly `digits` digits, no prefix. */
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

static void line(const char *s)
{
	serial_puts("citadel-guest: pci-blk ");
	serial_puts(s);
}

static void hex(const char *key, u64 v)
{
	serial_puts(" ");
	serial_puts(key);
	serial_puts(" ");
	serial_put_hex(v);
}

static void dec(const char *key, u64 v)
{
	serial_puts(" ");
	serial_puts(key);
	serial_puts(" ");
	serial_put_dec(v);
}

static void end(void)
{
	serial_puts("\n");
}

/* Sleeps until `*counter` exceeds `seen` or `timeout_ms` passes; returns whether it did. */
static int wait_count(volatile u64 *counter, u64 seen, u64 timeout_ms)
{
	u64 deadline = timer_ticks_now() + timeout_ms;

	while (*counter <= seen) {
		if (timer_ticks_now() >= deadline)
			return 0;
		__asm__ volatile("sti; hlt; cli");
	}
	return 1;
}

/* Offsets of the root port's capabilities. */
static u8 port_exp, port_msi;

static u8 find_cap(u8 bus, u8 dev, u8 id)
{
	u8 ptr = cfg_read8(bus, dev, PCI_CAPABILITY_LIST);
	int n;

	for (n = 0; n < 48 && ptr >= 0x40; n++) {
		ptr &= 0xfc;
		if (cfg_read8(bus, dev, ptr) == id)
			return ptr;
		ptr = cfg_read8(bus, dev, ptr + 1);
	}
	return 0;
}

static u16 slot_status(void)
{
	return cfg_read16(0, PORT_DEV, port_exp + EXP_SLTSTA);
}

static u16 slot_control(void)
{
	return cfg_read16(0, PORT_DEV, port_exp + EXP_SLTCTL);
}

static void set_slot_control(u16 v)
{
	cfg_write16(0, PORT_DEV, port_exp + EXP_SLTCTL, v);
}

static u16 link_status(void)
{
	return cfg_read16(0, PORT_DEV, port_exp + EXP_LNKSTA);
}

/* "slot status <s> presence <p> presence-changed <c> dll-changed <d> link-active <l>" */
static void report_slot(const char *what, u16 status)
{
	line(what);
	serial_puts(" status ");
	put_hex_fixed(status, 4);
	dec("presence", !!(status & SLTSTA_PDS));
	dec("presence-changed", !!(status & SLTSTA_PDC));
	dec("dll-changed", !!(status & SLTSTA_DLLSC));
	dec("attention", !!(status & SLTSTA_ABP));
	dec("link-active", !!(link_status() & LNKSTA_DLLLA));
	dec("port-interrupts", port_irqs);
	end();
}

static int setup_port(void)
{
	u32 id = cfg_read32(0, PORT_DEV, PCI_VENDOR_ID);
	u32 buses, window;
	u16 ctl;

	line("port 00:01.0 ");
	put_hex_fixed(id & 0xffff, 4);
	serial_puts(":");
	put_hex_fixed(id >> 16, 4);
	port_exp = find_cap(0, PORT_DEV, CAP_ID_EXP);
	port_msi = find_cap(0, PORT_DEV, CAP_ID_MSI);
	hex("pcie", port_exp);
	hex("msi", port_msi);
	end();
	if (!port_exp || !port_msi) {
		report("pci-blk error=root-port-capabilities");
		return 0;
	}

	/* Bus 1 behind the port, the memory window, no prefetchable window. */
	cfg_write32(0, PORT_DEV, PCI_PRIMARY_BUS, (u32)CARD_BUS << 16 | (u32)CARD_BUS << 8);
	cfg_write32(0, PORT_DEV, PCI_MEMORY_BASE,
		    (WINDOW_LIMIT & 0xfff00000U) | (WINDOW_BASE >> 16));
	cfg_write32(0, PORT_DEV, PCI_PREF_MEMORY_BASE, 0x0000fff0U);
	cfg_write16(0, PORT_DEV, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	buses = cfg_read32(0, PORT_DEV, PCI_PRIMARY_BUS);
	window = cfg_read32(0, PORT_DEV, PCI_MEMORY_BASE);
	line("port buses ");
	put_hex_fixed(buses & 0xff, 2);
	serial_puts("/");
	put_hex_fixed((buses >> 8) & 0xff, 2);
	serial_puts("/");
	put_hex_fixed((buses >> 16) & 0xff, 2);
	serial_puts(" window ");
	serial_put_hex((window & 0xfff0) << 16);
	serial_puts("-");
	serial_put_hex((window & 0xfff00000U) | 0xfffff);
	end();

	/* MSI to local APIC 0 with the port's vector. */
	cfg_write32(0, PORT_DEV, port_msi + MSI_ADDRESS_LO, MSI_ADDRESS);
	cfg_write32(0, PORT_DEV, port_msi + MSI_ADDRESS_HI, 0);
	cfg_write16(0, PORT_DEV, port_msi + MSI_DATA_64, PORT_VECTOR);
	cfg_write16(0, PORT_DEV, port_msi + MSI_FLAGS,
		    cfg_read16(0, PORT_DEV, port_msi + MSI_FLAGS) | MSI_ENABLE);
	line("port msi");
	hex("address", cfg_read32(0, PORT_DEV, port_msi + MSI_ADDRESS_LO));
	hex("data", cfg_read16(0, PORT_DEV, port_msi + MSI_DATA_64));
	dec("enabled", cfg_read16(0, PORT_DEV, port_msi + MSI_FLAGS) & MSI_ENABLE);
	end();

	/* The slot's events and the hot-plug interrupt. */
	ctl = slot_control();
	line("slot control ");
	put_hex_fixed(ctl, 4);
	set_slot_control(ctl | SLTCTL_ABPE | SLTCTL_PDCE | SLTCTL_DLLSCE | SLTCTL_HPIE);
	serial_puts(" -> ");
	put_hex_fixed(slot_control(), 4);
	end();
	report_slot("slot empty", slot_status());
	return 1;
}

/* Waits for the plug, acknowledges it and powers the slot on. */
static int accept_plug(void)
{
	u16 status, ctl;

	report("pci-blk waiting");
	if (!wait_count(&port_irqs, 0, PLUG_TIMEOUT_MS)) {
		report("pci-blk error=no-plug-interrupt");
		return 0;
	}
	status = slot_status();
	report_slot("slot plugged", status);
	cfg_write16(0, PORT_DEV, port_exp + EXP_SLTSTA, status & SLTSTA_EVENTS);
	ctl = (slot_control() & ~(SLTCTL_PCC | SLTCTL_PIC_MASK)) | SLTCTL_PIC_ON;
	set_slot_control(ctl);
	line("slot acknowledged status ");
	put_hex_fixed(slot_status(), 4);
	serial_puts(" control ");
	put_hex_fixed(slot_control(), 4);
	end();
	return 1;
}

/* Where the card's virtio structures are, from its vendor capabilities. */
static u32 common_off, notify_off, isr_off, device_off, notify_mult;
static u8 card_msix;

static const char *cfg_type_name(u8 type)
{
	switch (type) {
	case CFG_COMMON:
		return "common";
	case CFG_NOTIFY:
		return "notify";
	case CFG_ISR:
		return "isr";
	case CFG_DEVICE:
		return "device";
	default:
		return "other";
	}
}

static void walk_card_caps(void)
{
	u16 status = cfg_read16(CARD_BUS, 0, PCI_STATUS);
	u8 ptr = cfg_read8(CARD_BUS, 0, PCI_CAPABILITY_LIST);
	u8 vendor[8], exp = 0;
	int n, nvendor = 0;

	line("caps");
	dec("status-cap-list", !!(status & PCI_STATUS_CAP_LIST));
	for (n = 0; n < 48 && ptr >= 0x40; n++) {
		u8 id;

		ptr &= 0xfc;
		id = cfg_read8(CARD_BUS, 0, ptr);
		serial_puts(" ");
		serial_put_hex(ptr);
		serial_puts(":");
		put_hex_fixed(id, 2);
		if (id == CAP_ID_VENDOR && nvendor < 8)
			vendor[nvendor++] = ptr;
		if (id == CAP_ID_MSIX && !card_msix)
			card_msix = ptr;
		if (id == CAP_ID_EXP && !exp)
			exp = ptr;
		ptr = cfg_read8(CARD_BUS, 0, ptr + 1);
	}
	end();

	for (n = 0; n < nvendor; n++) {
		u8 at = vendor[n];
		u8 type = cfg_read8(CARD_BUS, 0, at + VCAP_CFG_TYPE);
		u32 offset = cfg_read32(CARD_BUS, 0, at + VCAP_OFFSET);
		u32 length = cfg_read32(CARD_BUS, 0, at + VCAP_LENGTH);

		line("virtio-cap ");
		serial_puts(cfg_type_name(type));
		dec("bar", cfg_read8(CARD_BUS, 0, at + VCAP_BAR));
		hex("offset", offset);
		hex("length", length);
		switch (type) {
		case CFG_COMMON:
			common_off = offset;
			break;
		case CFG_NOTIFY:
			notify_off = offset;
			notify_mult = cfg_read32(CARD_BUS, 0, at + VCAP_NOTIFY_MULT);
			dec("multiplier", notify_mult);
			break;
		case CFG_ISR:
			isr_off = offset;
			break;
		case CFG_DEVICE:
			device_off = offset;
			break;
		}
		end();
	}

	if (card_msix) {
		u16 flags = cfg_read16(CARD_BUS, 0, card_msix + MSIX_FLAGS);
		u32 table = cfg_read32(CARD_BUS, 0, card_msix + MSIX_TABLE);
		u32 pba = cfg_read32(CARD_BUS, 0, card_msix + MSIX_PBA);

		line("msix");
		dec("table-size", (flags & MSIX_TABLE_SIZE_MASK) + 1U);
		dec("table-bar", table & 7);
		hex("table-offset", table & ~7U);
		dec("pba-bar", pba & 7);
		hex("pba-offset", pba & ~7U);
		end();
	}
	if (exp) {
		line("pcie");
		dec("type", (cfg_read16(CARD_BUS, 0, exp + EXP_FLAGS) >> 4) & 0xf);
		end();
	}
}

static void place_bar(void)
{
	u32 sizing;

	cfg_write32(CARD_BUS, 0, PCI_BAR0, 0xffffffffU);
	sizing = cfg_read32(CARD_BUS, 0, PCI_BAR0);
	cfg_write32(CARD_BUS, 0, PCI_BAR0, BAR_BASE);
	line("bar0");
	hex("sizing", sizing);
	hex("size", (u32)(~(sizing & ~0xfU) + 1));
	hex("at", cfg_read32(CARD_BUS, 0, PCI_BAR0));
	cfg_write16(CARD_BUS, 0, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	hex("command", cfg_read16(CARD_BUS, 0, PCI_COMMAND));
	end();
}

/* One MSI-X table entry: message to local APIC 0 with IDT vector `vec`, unmasked. */
static void msix_entry(u32 table, int entry, u8 vec)
{
	u32 at = table + 16 * (u32)entry;

	bar_write32(at + 0, MSI_ADDRESS);
	bar_write32(at + 4, 0);
	bar_write32(at + 8, vec);
	bar_write32(at + 12, 0);
}

static void enable_msix(void)
{
	u16 flags = cfg_read16(CARD_BUS, 0, card_msix + MSIX_FLAGS);
	u32 table = cfg_read32(CARD_BUS, 0, card_msix + MSIX_TABLE) & ~7U;

	/* Enabled with the function masked while the table is written, as Linux does. */
	cfg_write16(CARD_BUS, 0, card_msix + MSIX_FLAGS, flags | MSIX_ENABLE | MSIX_MASKALL);
	msix_entry(table, 0, CONFIG_VECTOR);
	msix_entry(table, 1, QUEUE_VECTOR);
	cfg_write16(CARD_BUS, 0, card_msix + MSIX_FLAGS, (flags | MSIX_ENABLE) & ~MSIX_MASKALL);
	line("msix");
	hex("control", cfg_read16(CARD_BUS, 0, card_msix + MSIX_FLAGS));
	serial_puts(" entry0");
	hex("address", bar_read32(table + 0));
	hex("data", bar_read32(table + 8));
	hex("control", bar_read32(table + 12));
	serial_puts(" entry1");
	hex("address", bar_read32(table + 16));
	hex("data", bar_read32(table + 24));
	hex("control", bar_read32(table + 28));
	end();
}

static struct virtq vq;
static struct blk_req_header {
	u32 type;
	u32 reserved;
	u64 sector;
} header;
static u8 sector[512];
static volatile u8 req_status;
static u16 used_seen;
static u32 queue_notify_addr;
/* What the program writes over sector WRITE_SECTOR, repeated. */
static const char write_pattern[] = "citadel-guest-pci-blk-wrote-sector-one.";

static u8 dev_status(void)
{
	return bar_read8(common_off + COMMON_STATUS);
}

static void set_status(u8 s)
{
	bar_write8(common_off + COMMON_STATUS, s);
}

static int start_virtio(void)
{
	u32 features_lo, features_hi, want_lo;
	u16 qmax;

	set_status(0);
	line("reset");
	hex("status", dev_status());
	end();
	set_status(STATUS_ACKNOWLEDGE);
	set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);

	bar_write32(common_off + COMMON_DFSELECT, 0);
	features_lo = bar_read32(common_off + COMMON_DF);
	bar_write32(common_off + COMMON_DFSELECT, 1);
	features_hi = bar_read32(common_off + COMMON_DF);
	want_lo = features_lo & (1U << VIRTIO_BLK_F_FLUSH);
	line("features");
	hex("device", (u64)features_hi << 32 | features_lo);
	hex("driver", (u64)VIRTIO_F_VERSION_1_WORD << 32 | want_lo);
	end();
	if (!(features_hi & VIRTIO_F_VERSION_1_WORD)) {
		report("pci-blk error=no-version-1");
		return 0;
	}
	bar_write32(common_off + COMMON_GFSELECT, 0);
	bar_write32(common_off + COMMON_GF, want_lo);
	bar_write32(common_off + COMMON_GFSELECT, 1);
	bar_write32(common_off + COMMON_GF, VIRTIO_F_VERSION_1_WORD);
	set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	line("features-ok");
	dec("set", !!(dev_status() & STATUS_FEATURES_OK));
	end();
	if (!(dev_status() & STATUS_FEATURES_OK)) {
		report("pci-blk error=features-rejected");
		return 0;
	}

	bar_write16(common_off + COMMON_MSIX, 0);
	bar_write16(common_off + COMMON_Q_SELECT, 0);
	qmax = bar_read16(common_off + COMMON_Q_SIZE);
	if (qmax < QUEUE_SIZE) {
		report("pci-blk error=queue-too-small");
		return 0;
	}
	bar_write16(common_off + COMMON_Q_SIZE, QUEUE_SIZE);
	bar_write16(common_off + COMMON_Q_MSIX, 1);
	bar_write32(common_off + COMMON_Q_DESCLO, (u32)(u64)vq.desc);
	bar_write32(common_off + COMMON_Q_DESCHI, (u32)((u64)vq.desc >> 32));
	bar_write32(common_off + COMMON_Q_AVAILLO, (u32)(u64)&vq.avail);
	bar_write32(common_off + COMMON_Q_AVAILHI, (u32)((u64)&vq.avail >> 32));
	bar_write32(common_off + COMMON_Q_USEDLO, (u32)(u64)&vq.used);
	bar_write32(common_off + COMMON_Q_USEDHI, (u32)((u64)&vq.used >> 32));
	bar_write16(common_off + COMMON_Q_ENABLE, 1);
	queue_notify_addr =
		BAR_BASE + notify_off + bar_read16(common_off + COMMON_Q_NOFF) * notify_mult;
	line("queue 0");
	dec("queues", bar_read16(common_off + COMMON_NUMQ));
	dec("size-max", qmax);
	dec("size", bar_read16(common_off + COMMON_Q_SIZE));
	dec("msix-vector", bar_read16(common_off + COMMON_Q_MSIX));
	dec("enabled", bar_read16(common_off + COMMON_Q_ENABLE));
	hex("notify", queue_notify_addr - BAR_BASE);
	dec("config-vector", bar_read16(common_off + COMMON_MSIX));
	end();

	set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	line("driver-ok");
	hex("status", dev_status());
	end();
	return 1;
}

/*
 * Sends one request on descriptors 0-2 (header, the sector buffer unless `with_data` is 0,
 * status), kicks the queue through its notification address and waits for the used ring to
 * take it and for the queue's interrupt. Reports and returns 0 on a timeout.
 */
static int blk_request(u32 type, u64 sector_no, int with_data)
{
	u16 data_flags = type == BLK_T_OUT ? DESC_F_NEXT : DESC_F_NEXT | DESC_F_WRITE;
	u64 irqs = queue_irqs;
	u64 deadline;
	u16 idx = (u16)(used_seen + 1);

	header.type = type;
	header.reserved = 0;
	header.sector = sector_no;
	req_status = 0xff;
	vq.desc[0] = (struct virtq_desc){ (u64)&header, sizeof(header), DESC_F_NEXT, 1 };
	if (with_data) {
		vq.desc[1] = (struct virtq_desc){ (u64)sector, sizeof(sector), data_flags, 2 };
		vq.desc[2] = (struct virtq_desc){ (u64)&req_status, 1, DESC_F_WRITE, 0 };
	} else {
		vq.desc[0].next = 2;
		vq.desc[2] = (struct virtq_desc){ (u64)&req_status, 1, DESC_F_WRITE, 0 };
	}
	vq.avail.ring[used_seen % QUEUE_SIZE] = 0;
	barrier();
	vq.avail.idx = idx;
	barrier();
	*(volatile u16 *)(u64)queue_notify_addr = 0;

	deadline = timer_ticks_now() + IO_TIMEOUT_MS;
	while (*(volatile u16 *)&vq.used.idx != idx || queue_irqs == irqs) {
		if (timer_ticks_now() >= deadline) {
			line("error=timeout");
			dec("used", *(volatile u16 *)&vq.used.idx);
			dec("queue-interrupts", queue_irqs);
			end();
			return 0;
		}
		__asm__ volatile("sti; hlt; cli");
	}
	barrier();
	used_seen = idx;
	return 1;
}

/* Prints "<what> status=<s> <label>=<first 32 bytes of the sector buffer, printable>". */
static void report_sector(const char *what, const char *label)
{
	int i;

	line(what);
	serial_puts(" status=");
	serial_put_dec(req_status);
	serial_puts(" ");
	serial_puts(label);
	serial_puts("=");
	for (i = 0; i < 32; i++) {
		char c[2] = { (char)sector[i], 0 };

		if (c[0] < 0x20 || c[0] > 0x7e)
			c[0] = '.';
		serial_puts(c);
	}
	end();
}

static void report_status(const char *what)
{
	line(what);
	serial_puts(" status=");
	serial_put_dec(req_status);
	end();
}

static int drive_card(void)
{
	u32 id, class;
	int i;

	id = cfg_read32(CARD_BUS, 0, PCI_VENDOR_ID);
	class = cfg_read32(CARD_BUS, 0, PCI_CLASS_REVISION);
	line("card 01:00.0 ");
	put_hex_fixed(id & 0xffff, 4);
	serial_puts(":");
	put_hex_fixed(id >> 16, 4);
	serial_puts(" class ");
	put_hex_fixed(class >> 8, 6);
	serial_puts(" hdr ");
	put_hex_fixed(cfg_read8(CARD_BUS, 0, PCI_HEADER_TYPE), 2);
	end();
	if (id == 0xffffffffU) {
		report("pci-blk error=no-card");
		return 0;
	}
	walk_card_caps();
	if (!card_msix || !notify_mult || !device_off) {
		report("pci-blk error=card-capabilities");
		return 0;
	}
	place_bar();
	enable_msix();
	if (!start_virtio())
		return 0;
	line("capacity");
	serial_puts("=");
	serial_put_dec(bar_read32(device_off) | (u64)bar_read32(device_off + 4) << 32);
	end();

	if (!blk_request(BLK_T_IN, 0, 1))
		return 0;
	report_sector("read", "sector0");

	for (i = 0; i < (int)sizeof(sector); i++)
		sector[i] = (u8)write_pattern[i % (sizeof(write_pattern) - 1)];
	if (!blk_request(BLK_T_OUT, WRITE_SECTOR, 1))
		return 0;
	report_status("write");
	if (!blk_request(BLK_T_FLUSH, 0, 0))
		return 0;
	report_status("flush");
	line("interrupts");
	dec("port", port_irqs);
	dec("config", config_irqs);
	dec("queue", queue_irqs);
	end();
	return 1;
}

/* Waits for the attention button, lets go of the card and releases the slot as pciehp does:
 * device reset, power off, then the power indicator off. Then waits for the card to go. */
static void release_card(void)
{
	u64 seen = port_irqs;
	u16 status;
	u32 id;

	if (!wait_count(&port_irqs, seen, PLUG_TIMEOUT_MS)) {
		report("pci-blk error=no-unplug-request");
		return;
	}
	status = slot_status();
	report_slot("unplug requested", status);
	cfg_write16(0, PORT_DEV, port_exp + EXP_SLTSTA, status & SLTSTA_EVENTS);

	set_status(0);
	while (dev_status() != 0)
		__asm__ volatile("pause");
	line("device reset");
	hex("status", dev_status());
	end();

	seen = port_irqs;
	set_slot_control(slot_control() | SLTCTL_PCC);
	line("slot powered-off control ");
	put_hex_fixed(slot_control(), 4);
	end();
	pause_ms(INDICATOR_PAUSE_MS);
	set_slot_control((slot_control() & ~SLTCTL_PIC_MASK) | SLTCTL_PIC_OFF);
	line("released control ");
	put_hex_fixed(slot_control(), 4);
	end();

	if (!wait_count(&port_irqs, seen, PLUG_TIMEOUT_MS)) {
		report("pci-blk error=no-removal-interrupt");
		return;
	}
	status = slot_status();
	report_slot("slot removed", status);
	cfg_write16(0, PORT_DEV, port_exp + EXP_SLTSTA, status & SLTSTA_EVENTS);
	id = cfg_read32(CARD_BUS, 0, PCI_VENDOR_ID);
	line("gone");
	hex("status", slot_status());
	hex("card", id);
	end();
}

void guest_main(void)
{
	report_entry();
	interrupts_init();
	idt_install(PORT_VECTOR, port_isr);
	idt_install(CONFIG_VECTOR, config_isr);
	idt_install(QUEUE_VECTOR, queue_isr);
	lapic_timer_start(TICK_US);

	if (setup_port() && accept_plug() && drive_card()) {
		report("pci-blk done");
		release_card();
	}
	report("pci-blk idle");
	for (;;)
		__asm__ volatile("sti; hlt; cli");
}
