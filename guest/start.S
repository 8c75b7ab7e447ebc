/*
 * Entry code shared by every guest program. Two ways in, one 64-bit C runtime:
 *
 *  - pvh_entry: 32-bit protected mode, paging off, %ebx = hvm_start_info (Xen PVH ABI). It
 *    builds identity page tables, enables long mode and continues in 64-bit code.
 *  - linux64_entry (e_entry): the 64-bit Linux boot protocol, long mode on with the VMM's
 *    identity map, %rsi = boot_params. It switches to the program's own GDT and page tables
 *    so both paths run the C code in the same environment.
 *
 * The program's page tables identity-map the first GiB (RAM) and the fourth GiB (uncached:
 * local APIC, I/O APIC, device MMIO) with 2 MiB pages, whatever the VMM mapped. They are
 * built by the assembler rather than at run time: on hosts where guest code runs through
 * an instruction emulator every executed instruction counts towards the time to "ready".
 */

#define BOOT_PVH	1
#define BOOT_LINUX64	2

#define SEL_CODE64	0x08
#define SEL_DATA	0x10

#define MSR_EFER	0xc0000080
#define EFER_LME	(1 << 8)
#define CR0_PE		(1 << 0)
#define CR0_PG		(1 << 31)
#define CR4_PAE		(1 << 5)

#define PTE_PRESENT_RW	0x03
#define PDE_2M		0x83	/* present, writable, 2 MiB page */
#define PDE_UNCACHED	0x18	/* PWT | PCD */

/* XEN_ELFNOTE_PHYS32_ENTRY: the note QEMU, Firecracker and Citadel look for. */
	.section .note.xen, "a"
	.balign 4
	.long 4			/* namesz */
	.long 8			/* descsz */
	.long 18		/* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry

	.section .text.entry, "ax"

	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	/* No stack exists yet; only %ebx carries information. */
	mov	%ebx, boot_info
	movl	$BOOT_PVH, boot_kind

	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	shr	$2, %ecx
	xor	%eax, %eax
	rep stosl

	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	%cr4, %eax
	or	$CR4_PAE, %eax
	mov	%eax, %cr4
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$EFER_LME, %eax
	wrmsr
	lgdt	gdt_desc
	mov	%cr0, %eax
	or	$(CR0_PE | CR0_PG), %eax
	mov	%eax, %cr0
	ljmp	$SEL_CODE64, $pvh_long_mode

	.code64
pvh_long_mode:
	jmp	common64

	.globl linux64_entry
linux64_entry:
	cli
	cld
	mov	%rsi, boot_info(%rip)
	movl	$BOOT_LINUX64, boot_kind(%rip)

	lea	__bss_start(%rip), %rdi
	lea	__bss_end(%rip), %rcx
	sub	%rdi, %rcx
	shr	$3, %rcx
	xor	%eax, %eax
	rep stosq

	lea	pml4(%rip), %rax
	mov	%rax, %cr3
	lgdt	gdt_desc(%rip)
	/* Reload %cs from the new GDT with a far return. */
	pushq	$SEL_CODE64
	lea	common64(%rip), %rax
	push	%rax
	lretq

common64:
	mov	$SEL_DATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	lea	stack_top(%rip), %rsp
	xor	%ebp, %ebp
	call	runtime_start
4:	cli
	hlt
	jmp	4b

	.section .rodata
	.balign 8
gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x10: flat data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.data
	.balign 8
	.globl boot_info, boot_kind
/* Kept out of .bss: both entries store them before clearing it. */
boot_info:
	.quad 0
boot_kind:
	.long 0

	.section .data.pagetables, "aw"
	.balign 4096
pml4:
	.quad pdpt + PTE_PRESENT_RW
	.fill 511, 8, 0
pdpt:
	.quad pd_low + PTE_PRESENT_RW
	.quad 0, 0
	.quad pd_high + PTE_PRESENT_RW
	.fill 508, 8, 0
pd_low:
	.set addr, 0
	.rept 512
	.quad addr + PDE_2M
	.set addr, addr + 0x200000
	.endr
pd_high:
	.set addr, 0xc0000000
	.rept 512
	.quad addr + PDE_2M + PDE_UNCACHED
	.set addr, addr + 0x200000
	.endr

/* Not cleared at boot: nothing reads the stack before writing it. */
	.section .noinit, "aw", @nobits
	.balign 16
	.skip 16384
stack_top:
