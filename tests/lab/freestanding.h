/*
 * What the lab's freestanding guest tools (no C library) share: raw Linux system calls (the
 * x86-64 calling convention: number in rax, arguments in rdi, rsi, rdx, r10, r8, r9; the
 * kernel clobbers rcx and r11; a negative return is -errno) and the program entry, which
 * calls the tool's `run(argc, argv)` and exits with what it returns.
 */
#ifndef LAB_FREESTANDING_H
#define LAB_FREESTANDING_H

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

static int run(int argc, char **argv);

void start_c(long *stack)
{
	sys3(__NR_exit_group, run((int)stack[0], (char **)(stack + 1)), 0, 0);
}

/* The kernel enters with argc at the stack pointer; the ABI wants a 16-byte aligned call. */
__asm__(".globl _start\n"
	"_start:\n"
	"\txor %rbp, %rbp\n"
	"\tmov %rsp, %rdi\n"
	"\tand $-16, %rsp\n"
	"\tcall start_c\n"
	"\thlt\n");

#endif
