/*
 * smp: counts the processors the VMM announced in its MP table, wakes the application
 * processors with INIT-SIPI-SIPI into a real-mode trampoline below 1 MiB, and counts those
 * that check in. Each AP adds itself to a counter inside the trampoline page with
 * `lock xadd`, then halts.
 */
#include "guest.h"

/* Start-up vector 0x08: the APs begin at 0x0800:0000 = 0x8000. */
#define TRAMPOLINE_ADDR 0x8000UL
#define SIPI_VECTOR (TRAMPOLINE_ADDR >> 12)

#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define ICR_DELIVERY_PENDING (1 << 12)
#define ICR_INIT 0x500
#define ICR_STARTUP 0x600
#define ICR_LEVEL_ASSERT (1 << 14)
#define ICR_ALL_BUT_SELF (3 << 18)

/* Upper bounds that keep a corrupt table from sending the scan anywhere. */
#define MP_MAX_ENTRIES 1024
#define MP_MAX_TABLE_LEN 0x10000

/* Timer period while waiting: 1 ms. */
#define TICK_US 1000
#define AP_WAIT_MS 1000

extern const char ap_trampoline_start[];
extern const char ap_trampoline_end[];
extern const char ap_trampoline_counter[];

static void copy(void *dst, const void *src, u64 n)
{
	volatile u8 *d = dst;
	const u8 *s = src;

	while (n--)
		*d++ = *s++;
}

static int checksum_ok(u64 addr, u64 len)
{
	u8 sum = 0;

	while (len--)
		sum += *(volatile u8 *)addr++;
	return sum == 0;
}

/* Finds the MP floating pointer structure ("_MP_", 16 bytes, 16-byte aligned). */
static u64 mp_find_in(u64 start, u64 len)
{
	u64 a;

	for (a = start; a + 16 <= start + len; a += 16) {
		if (*(volatile u32 *)a == 0x5f504d5f && checksum_ok(a, 16))
			return a;
	}
	return 0;
}

static u64 mp_find(void)
{
	u64 ebda = (u64)(*(volatile u16 *)0x40e) << 4;
	u64 fp = 0;

	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = mp_find_in(ebda, 1024);
	if (!fp)
		fp = mp_find_in(0x9fc00, 1024);
	if (!fp)
		fp = mp_find_in(0xf0000, 0x10000);
	return fp;
}

/*
 * Number of enabled processor entries in the MP configuration table; 0 when absent. The
 * entries are walked by the table's length, as Linux does: some firmware (qboot) leaves
 * the entry count at zero.
 */
static u64 mp_count_cpus(void)
{
	u64 fp = mp_find();
	u64 table, len, p, end, seen = 0, cpus = 0;

	if (!fp) {
		report("mptable=absent");
		return 0;
	}
	table = *(volatile u32 *)(fp + 4);
	if (table == 0 || table >= 0x100000 || *(volatile u32 *)table != 0x504d4350) {
		report("mptable=bad-config-table");
		return 0;
	}
	len = *(volatile u16 *)(table + 4);
	if (len < 44 || len > MP_MAX_TABLE_LEN || !checksum_ok(table, len)) {
		report("mptable=bad-checksum");
		return 0;
	}
	p = table + 44;
	end = table + len;
	while (p < end && seen++ < MP_MAX_ENTRIES) {
		u8 type = *(volatile u8 *)p;

		if (type == 0) {
			if (p + 20 > end)
				break;
			if (*(volatile u8 *)(p + 3) & 1)
				cpus++;
			p += 20;
		} else if (type <= 4) {
			p += 8;
		} else {
			report("mptable=unknown-entry");
			break;
		}
	}
	return cpus;
}

static void icr_send(u32 low)
{
	mmio_write32(LAPIC_BASE + LAPIC_ICR_HIGH, 0);
	mmio_write32(LAPIC_BASE + LAPIC_ICR_LOW, low);
	while (mmio_read32(LAPIC_BASE + LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING)
		;
}

static void sleep_ms(u64 ms)
{
	u64 until = timer_ticks_now() + ms;

	while (timer_ticks_now() < until)
		__asm__ volatile("sti; hlt; cli");
}

void guest_main(void)
{
	volatile u16 *checked_in;
	u64 expected_aps, mp_cpus, deadline;

	report_entry();
	mp_cpus = mp_count_cpus();
	expected_aps = mp_cpus > 1 ? mp_cpus - 1 : 0;

	copy((void *)TRAMPOLINE_ADDR, ap_trampoline_start,
	     (u64)(ap_trampoline_end - ap_trampoline_start));
	checked_in = (volatile u16 *)(TRAMPOLINE_ADDR +
				      (u64)(ap_trampoline_counter - ap_trampoline_start));
	*checked_in = 0;

	interrupts_init();
	lapic_timer_start(TICK_US);

	icr_send(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_INIT);
	sleep_ms(10);
	icr_send(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR);
	sleep_ms(1);
	icr_send(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR);

	/* Without an MP table the number of APs is unknown: wait the whole time. */
	deadline = timer_ticks_now() + AP_WAIT_MS;
	while (timer_ticks_now() < deadline && (expected_aps == 0 || *checked_in < expected_aps))
		__asm__ volatile("sti; hlt; cli");

	report_dec("cpus", 1 + *checked_in);
	report_dec("mptable-cpus", mp_cpus);
	halt_forever();
}
