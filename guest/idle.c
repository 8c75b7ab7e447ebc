/*
 * idle: announces itself as early as possible, then sleeps in hlt with interrupts enabled,
 * woken only by a 100 Hz local APIC timer, like an idle kernel. The start-latency benchmark
 * measures the time until "ready".
 */
#include "guest.h"

void guest_main(void)
{
	report("ready");
	report_entry();
	interrupts_init();
	lapic_timer_start(10000);
	for (;;)
		__asm__ volatile("sti; hlt");
}
