/*
 * memscan: fills SCAN_BYTES of its RAM from SCAN_BASE with a pattern once, reports "filled",
 * then reads the whole region over and over, reporting each pass and its checksum. Restored
 * from a snapshot taken after "filled", each pass touches every page of the region again,
 * which a VM restored from a shared snapshot file reads from that file's pages.
 */
#include "guest.h"

/* 32 MiB from 64 MiB: inside the first GiB the runtime identity-maps, clear of the program,
 * and small enough to fill in seconds where each first touch of a page costs a millisecond. */
#define SCAN_BASE (64UL << 20)
#define SCAN_BYTES (32UL << 20)

void guest_main(void)
{
	volatile u64 *region = (volatile u64 *)SCAN_BASE;
	u64 words = SCAN_BYTES / sizeof(u64);
	u64 pass;

	report_entry();
	for (u64 i = 0; i < words; i++)
		region[i] = i * 0x9e3779b97f4a7c15UL;
	report("filled");
	for (pass = 1;; pass++) {
		u64 sum = 0;

		for (u64 i = 0; i < words; i++)
			sum ^= region[i];
		report_dec("pass", pass);
		report_dec("sum", sum);
	}
}
