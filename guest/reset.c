/*
 * reset: asks the i8042 to pulse the CPU reset line. A VMM that implements it resets or
 * stops the VM; reaching the next line means the request was ignored.
 */
#include "guest.h"

void guest_main(void)
{
	report_entry();
	report("resetting");
	outb(0x64, 0xfe);
	report("reset-failed");
	halt_forever();
}
