/*
 * smp: counts the processors the VMM announced in its ACPI MADT and in its MP table, wakes
 * the application processors with INIT-SIPI-SIPI into a real-mode trampoline below 1 MiB,
 * and counts those that check in. Each AP adds itself to a counter inside the trampoline
 * page with `lock xadd`, then halts.
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
#define ACPI_MAX_TABLE_LEN 0x10000
#define ACPI_MAX_TABLES 64
/* ACPI tables are followed only inside the identity-mapped first GiB. */
#define ACPI_ADDR_LIMIT 0x40000000UL

/* Table signatures as little-endian words: "RSD ", "PTR ", "XSDT", "APIC". */
#define SIG_RSD 0x20445352
#define SIG_PTR 0x20525450
#define SIG_XSDT 0x54445358
#define SIG_MADT 0x43495041

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

/* Finds the ACPI RSDP (16-byte aligned, "RSD PTR ", ACPI 1.0 checksum) in the BIOS area. */
static u64 rsdp_find(void)
{
	u64 a;

	for (a = 0xe0000; a + 20 <= 0x100000; a += 16) {
		if (*(volatile u32 *)a == SIG_RSD && *(volatile u32 *)(a + 4) == SIG_PTR &&
		    checksum_ok(a, 20))
			return a;
	}
	return 0;
}

/* Length of the ACPI table at `addr` if it has signature `sig` and sums to zero, else 0. */
static u64 acpi_table_len(u64 addr, u32 sig)
{
	u64 len;

	if (addr == 0 || addr + 36 > ACPI_ADDR_LIMIT || *(volatile u32 *)addr != sig)
		return 0;
	len = *(volatile u32 *)(addr + 4);
	if (len < 36 || len > ACPI_MAX_TABLE_LEN || addr + len > ACPI_ADDR_LIMIT ||
	    !checksum_ok(addr, len))
		return 0;
	return len;
}

/*
 * Number of enabled local APIC entries in the MADT the RSDP leads to (ACPI 2.0: through
 * the XSDT); 0 when absent. Every table on the way must pass its checksum.
 */
static u64 acpi_count_cpus(void)
{
	u64 rsdp = rsdp_find();
	u64 xsdt, xsdt_len, madt = 0, madt_len = 0, i, p, end, cpus = 0, seen = 0;

	if (!rsdp) {
		report("acpi=absent");
		return 0;
	}
	xsdt = *(volatile u64 *)(rsdp + 24);
	if (*(volatile u8 *)(rsdp + 15) < 2 || !checksum_ok(rsdp, 36) ||
	    !(xsdt_len = acpi_table_len(xsdt, SIG_XSDT))) {
		report("acpi=bad-xsdt");
		return 0;
	}
	for (i = 0; i < (xsdt_len - 36) / 8 && i < ACPI_MAX_TABLES && !madt_len; i++) {
		madt = *(volatile u64 *)(xsdt + 36 + 8 * i);
		madt_len = acpi_table_len(madt, SIG_MADT);
	}
	if (!madt_len) {
		report("acpi=no-madt");
		return 0;
	}
	p = madt + 44;
	end = madt + madt_len;
	while (p + 2 <= end && seen++ < MP_MAX_ENTRIES) {
		u8 type = *(volatile u8 *)p, len = *(volatile u8 *)(p + 1);

		if (len < 2 || p + len > end) {
			report("acpi=bad-madt");
			break;
		}
		/* Processor local APIC: flags bit 0 = enabled. */
		if (type == 0 && len >= 8 && (*(volatile u32 *)(p + 4) & 1))
			cpus++;
		p += len;
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
	u64 expected_aps, acpi_cpus, mp_cpus, deadline;

	report_entry();
	acpi_cpus = acpi_count_cpus();
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
	report_dec("acpi-cpus", acpi_cpus);
	report_dec("mptable-cpus", mp_cpus);
	halt_forever();
}
