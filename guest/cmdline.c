/*
 * cmdline: prints the kernel command line it was given, through the hvm_start_info (PVH)
 * or the boot_params zero page (64-bit Linux boot protocol).
 */
#include "guest.h"

/* Output stops at this many characters even if the VMM forgot the terminator. */
#define PRINT_MAX 4095

void guest_main(void)
{
	const char *line = boot_cmdline();
	char buf[2];
	int i;

	report_entry();
	serial_puts("citadel-guest: cmdline=");
	buf[1] = 0;
	for (i = 0; i < PRINT_MAX && line[i]; i++) {
		buf[0] = line[i];
		serial_puts(buf);
	}
	serial_puts("\n");
	halt_forever();
}
