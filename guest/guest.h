/*
 * The runtime every Citadel guest test program links against: serial output on COM1,
 * the boot information the VMM handed over, interrupts and the local APIC.
 */
#ifndef CITADEL_GUEST_H
#define CITADEL_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define LAPIC_BASE 0xfee00000UL

/* Each program's own code, entered once the runtime is set up. */
void guest_main(void);

static inline void outb(u16 port, u8 val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 val;
	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}

static inline void mmio_write32(u64 addr, u32 val)
{
	*(volatile u32 *)addr = val;
}

static inline void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Serial output; every line a program prints starts with "citadel-guest: ". */
void serial_puts(const char *s);
void serial_put_dec(u64 v);
void serial_put_hex(u64 v);
/* Prints "citadel-guest: <s>\n". */
void report(const char *s);
/* Prints "citadel-guest: <key>=<decimal>\n". */
void report_dec(const char *key, u64 v);
/* Prints "citadel-guest: entry=pvh" or "entry=linux64". */
void report_entry(void);

/* The kernel command line the VMM passed, or "" when there is none. */
const char *boot_cmdline(void);

/* Installs the IDT, masks the legacy PICs and software-enables the local APIC. */
void interrupts_init(void);
/* Starts the local APIC timer firing every period_us microseconds (vector TIMER_VECTOR). */
void lapic_timer_start(u32 period_us);
/* Number of timer interrupts taken since lapic_timer_start. */
u64 timer_ticks_now(void);
#define TIMER_VECTOR 0x40

#endif
