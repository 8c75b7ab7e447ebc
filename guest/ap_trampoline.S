/*
 * Real-mode code the application processors start in. smp.c copies it to a page below
 * 1 MiB and points the start-up IPI at it; the AP arrives with %cs = page >> 4, %ip = 0,
 * so everything here is addressed relative to the start of the copy.
 */
	.section .rodata
	.code16
	.globl ap_trampoline_start, ap_trampoline_end, ap_trampoline_counter
ap_trampoline_start:
	cli
	mov	%cs, %ax
	mov	%ax, %ds
	mov	$1, %ax
	lock xaddw %ax, ap_trampoline_counter - ap_trampoline_start
1:	hlt
	jmp	1b
	.balign 2
ap_trampoline_counter:
	.word 0
ap_trampoline_end:
	.code64
