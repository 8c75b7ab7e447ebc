/*
 * Interrupt and exception entry points. Exceptions are fatal and reported on the serial port
 * (an unexpected fault is a test failure that should say where it happened); device and
 * timer interrupts are acknowledged at the local APIC and return.
 */

#define LAPIC_EOI	0xfee000b0

	.text
	.code64

/* Vectors without a CPU-pushed error code get a zero one so every frame looks alike. */
.macro EXC_NOERR vec
	.balign 16
	pushq	$0
	pushq	$\vec
	jmp	exception_common
.endm
.macro EXC_ERR vec
	.balign 16
	pushq	$\vec
	jmp	exception_common
.endm

	.balign 16
	.globl exception_stubs
exception_stubs:
	EXC_NOERR 0
	EXC_NOERR 1
	EXC_NOERR 2
	EXC_NOERR 3
	EXC_NOERR 4
	EXC_NOERR 5
	EXC_NOERR 6
	EXC_NOERR 7
	EXC_ERR 8
	EXC_NOERR 9
	EXC_ERR 10
	EXC_ERR 11
	EXC_ERR 12
	EXC_ERR 13
	EXC_ERR 14
	EXC_NOERR 15
	EXC_NOERR 16
	EXC_ERR 17
	EXC_NOERR 18
	EXC_NOERR 19
	EXC_NOERR 20
	EXC_ERR 21
	EXC_NOERR 22
	EXC_NOERR 23
	EXC_NOERR 24
	EXC_NOERR 25
	EXC_NOERR 26
	EXC_NOERR 27
	EXC_NOERR 28
	EXC_ERR 29
	EXC_ERR 30
	EXC_NOERR 31

exception_common:
	/* Stack: vector, error code, rip, cs, rflags, rsp, ss. */
	mov	%rsp, %rdi
	and	$-16, %rsp
	call	exception_report
1:	cli
	hlt
	jmp	1b

	.globl timer_isr
timer_isr:
	push	%rax
	lock incq timer_ticks(%rip)
	mov	$LAPIC_EOI, %eax
	movl	$0, (%rax)
	pop	%rax
	iretq

	.globl irq_isr
irq_isr:
	push	%rax
	mov	$LAPIC_EOI, %eax
	movl	$0, (%rax)
	pop	%rax
	iretq

/* A spurious interrupt is not in service at the APIC, so it gets no EOI. */
	.globl spurious_isr
spurious_isr:
	iretq
