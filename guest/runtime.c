/*
 * Runtime shared by the guest programs: COM1 output, boot information from either entry,
 * IDT and local APIC setup. No libc: everything here is freestanding.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_THR_EMPTY 0x20

#define BOOT_PVH 1
#define BOOT_LINUX64 2
#define HVM_START_MAGIC 0x336ec578
/* hvm_start_info.cmdline_paddr; boot_params.hdr.cmd_line_ptr and ext_cmd_line_ptr. */
#define HVM_CMDLINE_OFF 24
#define BP_CMD_LINE_PTR_OFF 0x228
#define BP_EXT_CMD_LINE_PTR_OFF 0x0c8
/* Only the identity-mapped first 4 GiB is addressable. */
#define ADDR_LIMIT 0x100000000UL
#define CMDLINE_MAX 4096

#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_SPURIOUS_VECTOR 0xff
#define LAPIC_TIMER_PERIODIC (1 << 17)
#define LAPIC_DIV_1 0xb
/* KVM's and QEMU's local APIC timers both count at 1 GHz. */
#define LAPIC_TICKS_PER_US 1000

extern u64 boot_info;
extern u32 boot_kind;
extern char exception_stubs[];
extern void timer_isr(void);
extern void irq_isr(void);
extern void spurious_isr(void);

volatile u64 timer_ticks;

struct idt_entry {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_high;
	u32 reserved;
} __attribute__((packed));

/* Every entry is written by interrupts_init, so the table need not be cleared at boot. */
static struct idt_entry idt[256] __attribute__((aligned(16), section(".noinit")));

static void serial_putc(char c)
{
	while (!(inb(COM1 + 5) & LSR_THR_EMPTY))
		;
	outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
	while (*s) {
		if (*s == '\n')
			serial_putc('\r');
		serial_putc(*s++);
	}
}

void serial_put_dec(u64 v)
{
	char buf[21];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	serial_puts(&buf[i]);
}

void serial_put_hex(u64 v)
{
	char buf[19];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	serial_puts(&buf[i]);
}

void report(const char *s)
{
	serial_puts("citadel-guest: ");
	serial_puts(s);
	serial_puts("\n");
}

void report_dec(const char *key, u64 v)
{
	serial_puts("citadel-guest: ");
	serial_puts(key);
	serial_puts("=");
	serial_put_dec(v);
	serial_puts("\n");
}

void report_entry(void)
{
	report(boot_kind == BOOT_PVH ? "entry=pvh" : "entry=linux64");
}

static u64 read_u64(u64 addr)
{
	return *(volatile u64 *)addr;
}

static u32 read_u32(u64 addr)
{
	return *(volatile u32 *)addr;
}

const char *boot_cmdline(void)
{
	u64 addr = 0;

	if (boot_info == 0 || boot_info >= ADDR_LIMIT - 0x1000)
		return "";
	if (boot_kind == BOOT_PVH) {
		if (read_u32(boot_info) != HVM_START_MAGIC)
			return "";
		addr = read_u64(boot_info + HVM_CMDLINE_OFF);
	} else {
		addr = read_u32(boot_info + BP_CMD_LINE_PTR_OFF) |
		       (u64)read_u32(boot_info + BP_EXT_CMD_LINE_PTR_OFF) << 32;
	}
	if (addr == 0 || addr >= ADDR_LIMIT - CMDLINE_MAX)
		return "";
	return (const char *)addr;
}

static void idt_set(int vec, void (*handler)(void))
{
	u64 addr = (u64)handler;

	idt[vec].offset_low = (u16)addr;
	idt[vec].selector = 0x08;
	idt[vec].ist = 0;
	idt[vec].type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
	idt[vec].offset_mid = (u16)(addr >> 16);
	idt[vec].offset_high = (u32)(addr >> 32);
	idt[vec].reserved = 0;
}

/* Remaps the 8259s away from the exception vectors, then masks every line: this runtime
 * takes interrupts only through the local APIC. */
static void pic_mask_all(void)
{
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

void interrupts_init(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (u64)idt };
	int vec;

	for (vec = 0; vec < 32; vec++)
		idt_set(vec, (void (*)(void))(exception_stubs + 16 * vec));
	for (; vec < 256; vec++)
		idt_set(vec, irq_isr);
	idt_set(TIMER_VECTOR, timer_isr);
	idt_set(LAPIC_SPURIOUS_VECTOR, spurious_isr);
	__asm__ volatile("lidt %0" : : "m"(desc));

	pic_mask_all();
	mmio_write32(LAPIC_BASE + LAPIC_SVR, LAPIC_SVR_ENABLE | LAPIC_SPURIOUS_VECTOR);
}

void lapic_timer_start(u32 period_us)
{
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIV, LAPIC_DIV_1);
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | TIMER_VECTOR);
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, period_us * LAPIC_TICKS_PER_US);
}

u64 timer_ticks_now(void)
{
	return timer_ticks;
}

struct exception_frame {
	u64 vector;
	u64 error;
	u64 rip;
	u64 cs;
	u64 rflags;
	u64 rsp;
	u64 ss;
};

void exception_report(const struct exception_frame *f)
{
	u64 cr2;

	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	serial_puts("citadel-guest: exception vector=");
	serial_put_dec(f->vector);
	serial_puts(" error=");
	serial_put_hex(f->error);
	serial_puts(" rip=");
	serial_put_hex(f->rip);
	serial_puts(" cr2=");
	serial_put_hex(cr2);
	serial_puts("\n");
}

void runtime_start(void)
{
	guest_main();
	halt_forever();
}
