/*
 * internal_error: announces itself, then calls into guest-physical 512 MiB, inside the
 * identity-mapped first GiB but beyond the RAM the VM is given (run it with less than
 * 512 MiB). Nothing backs that address: KVM has to emulate the instruction fetch from it,
 * cannot, and stops the vCPU with KVM_EXIT_INTERNAL_ERROR (emulation failure).
 */
#include "guest.h"

#define NOWHERE 0x20000000UL

void guest_main(void)
{
	report("ready");
	((void (*)(void))NOWHERE)();
	report("still-running");
	halt_forever();
}
