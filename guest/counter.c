/*
 * counter: increments a 64-bit counter in a tight loop and reports it every COUNTER_STEP
 * iterations. While the VM is paused the reported value must not advance.
 */
#include "guest.h"

/* A few lines per second where each guest instruction costs microseconds (KVM with an
 * emulating nested hypervisor); far more on hardware virtualization. */
#define COUNTER_STEP (1UL << 15)

void guest_main(void)
{
	volatile u64 counter = 0;

	report_entry();
	report("ready");
	for (;;) {
		u64 next = counter + 1;

		counter = next;
		if ((next & (COUNTER_STEP - 1)) == 0)
			report_dec("counter", next);
	}
}
