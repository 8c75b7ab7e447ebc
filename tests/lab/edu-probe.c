/*
 * edu-probe: drives QEMU's educational PCI device (1234:11e8, QEMU's docs/specs/edu.rst) from
 * the lab's guest (L2), where it is L1's device passed through by Citadel over VFIO. Linux has
 * no driver for it, so the probe works through the device's sysfs files:
 *
 *   edu-probe /sys/bus/pci/devices/BDF
 *
 * It enables the device (memory decoding, bus mastering) and, through BAR0 (resource0), reads
 * its identification, its liveness register and a factorial it computes; moves 2 KiB from a
 * page of guest RAM into the device's buffer and back into another page by DMA, and compares;
 * then points the device's MSI at vector 223 of CPU 0 and has the device raise an interrupt.
 * No Linux driver owns that vector on the lab's small guest, so the kernel logs
 * "__common_interrupt: 0.223 No irq handler for vector" when the message arrives: the caller
 * looks for that line in the kernel log. It prints, one per line:
 *
 *   edu-id 0x010000ed
 *   edu-not 0xedcba987
 *   edu-fact 3628800
 *   edu-dma-pages 0xSOURCE 0xDESTINATION
 *   edu-dma ok                      (or: edu-dma mismatch at N)
 *   edu-irq-status 0x1
 *
 * and exits 0 when the device answered each as it must, 1 otherwise, with a line on stderr
 * saying what went wrong. Every wait is bounded.
 *
 * It is freestanding like aio-randread.c (raw system calls, no C library): the guest has only
 * busybox.
 */
#include <stddef.h>

#include <asm/unistd.h>
#include <linux/fcntl.h>
#include <linux/mman.h>
#include <linux/time_types.h>

#include "freestanding.h"

#define PAGE 4096
#define CLOCK_MONOTONIC 1

/* BAR0 registers (edu.rst). */
#define EDU_ID 0x00
#define EDU_NOT 0x04
#define EDU_FACT 0x08
#define EDU_STATUS 0x20
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_STATUS_COMPUTING 0x1
#define EDU_DMA_RUN 0x1
#define EDU_DMA_TO_RAM 0x2
/* The device's own buffer, as DMA addresses it. */
#define EDU_BUFFER 0x40000
/*
 * Bytes moved each way: half the device's 4 KiB buffer. QEMU 7.2's edu (Debian 12's, the
 * lab's L1) takes a transfer that ends at the buffer's end for one past it and stops the whole
 * machine (hw_error), which here is L1.
 */
#define DMA_BYTES (PAGE / 2)
/* The device drops address bits above 28 (its DMA mask): pages above are out of its reach. */
#define EDU_DMA_LIMIT (1ULL << 28)

#define EDU_IDENTIFICATION 0x010000edU
#define LIVENESS_PROBE 0x12345678U

/* An MSI message to vector 223 of the CPU with APIC ID 0: fixed delivery, edge. */
#define MSI_ADDRESS 0xfee00000U
#define MSI_VECTOR 0xdf

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAPABILITY_LIST 0x34
#define PCI_CAP_ID_MSI 0x05
#define MSI_FLAGS_ENABLE 0x1
#define MSI_FLAGS_QSIZE 0x70
#define MSI_FLAGS_64BIT 0x80

static unsigned char pages[2][PAGE] __attribute__((aligned(PAGE)));

#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

static unsigned long length(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void put_to(int fd, const char *s)
{
	sys3(__NR_write, fd, s, length(s));
}

static void put(const char *s)
{
	put_to(1, s);
}

static void put_unsigned_to(int fd, unsigned long long value, unsigned base, int digits)
{
	char text[24];
	int i = sizeof(text) - 1;

	text[i] = 0;
	do {
		text[--i] = "0123456789abcdef"[value % base];
		value /= base;
		digits--;
	} while (value || digits > 0);
	put_to(fd, text + i);
}

static void put_hex(unsigned long long value, int digits)
{
	put("0x");
	put_unsigned_to(1, value, 16, digits);
}

static void exit_with(int status)
{
	sys3(__NR_exit_group, status, 0, 0);
	__builtin_unreachable();
}

/* One line on stderr: "edu-probe: WHAT[ SUBJECT][ (errno N)]". */
static void complain(const char *what, const char *subject, long code)
{
	put_to(2, "edu-probe: ");
	put_to(2, what);
	if (subject) {
		put_to(2, " ");
		put_to(2, subject);
	}
	if (code < 0) {
		put_to(2, " (errno ");
		put_unsigned_to(2, (unsigned long long)-code, 10, 1);
		put_to(2, ")");
	}
	put_to(2, "\n");
}

static void fail(const char *what, const char *subject, long code)
{
	complain(what, subject, code);
	exit_with(1);
}

static void pause_ms(long ms)
{
	struct __kernel_timespec t = { .tv_sec = ms / 1000, .tv_nsec = ms % 1000 * 1000000 };

	sys3(__NR_nanosleep, &t, 0, 0);
}

static unsigned long long nanoseconds(void)
{
	struct __kernel_timespec t;

	sys3(__NR_clock_gettime, CLOCK_MONOTONIC, &t, 0);
	return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

/* DEVICE/NAME, which must fit. */
static char *device_file(const char *device, const char *name)
{
	static char path[256];
	unsigned long d = length(device), n = length(name), i;

	if (d + 1 + n + 1 > sizeof(path))
		fail("path too long:", device, 0);
	for (i = 0; i < d; i++)
		path[i] = device[i];
	path[d] = '/';
	for (i = 0; i <= n; i++)
		path[d + 1 + i] = name[i];
	return path;
}

static long open_or_fail(const char *path, int flags)
{
	long fd = sys3(__NR_open, path, flags | O_CLOEXEC, 0);

	if (fd < 0)
		fail("cannot open", path, fd);
	return fd;
}

/* Writes TEXT to the sysfs file DEVICE/NAME. */
static void write_attribute(const char *device, const char *name, const char *text)
{
	const char *path = device_file(device, name);
	long fd = open_or_fail(path, O_WRONLY), rc;

	rc = sys3(__NR_write, fd, text, length(text));
	if (rc != (long)length(text))
		fail("cannot write", path, rc);
	sys3(__NR_close, fd, 0, 0);
}

/* Configuration space accesses of SIZE bytes (1, 2 or 4) through DEVICE/config. */
static long config_fd;

static unsigned config_read(long offset, int size)
{
	unsigned value = 0;
	long rc = sys4(__NR_pread64, config_fd, &value, size, offset);

	if (rc != size)
		fail("cannot read the configuration space", 0, rc);
	return value;
}

static void config_write(long offset, int size, unsigned value)
{
	long rc = sys4(__NR_pwrite64, config_fd, &value, size, offset);

	if (rc != size)
		fail("cannot write the configuration space", 0, rc);
}

/* BAR0. Registers below 0x80 take 32-bit accesses only; the DMA ones 32 or 64. */
static volatile unsigned *bar;

static unsigned reg_read(unsigned offset)
{
	return bar[offset / 4];
}

static void reg_write(unsigned offset, unsigned value)
{
	bar[offset / 4] = value;
}

/* Waits until BAR0 register OFFSET has BIT clear, polling every millisecond, at most MS. */
static int wait_clear(unsigned offset, unsigned bit, unsigned long long ms)
{
	unsigned long long deadline = nanoseconds() + ms * 1000000ULL;

	while (reg_read(offset) & bit) {
		if (nanoseconds() >= deadline)
			return 0;
		pause_ms(1);
	}
	return 1;
}

/* The physical address of the (locked, present) page at VIRTUAL, from /proc/self/pagemap. */
static unsigned long long physical(void *virtual)
{
	unsigned long long entry = 0;
	long fd = open_or_fail("/proc/self/pagemap", O_RDONLY), rc;

	rc = sys4(__NR_pread64, fd, &entry, sizeof(entry), (unsigned long)virtual / PAGE * 8);
	sys3(__NR_close, fd, 0, 0);
	if (rc != sizeof(entry))
		fail("cannot read /proc/self/pagemap", 0, rc);
	/* Bit 63: present; bits 0-54: the frame, which reads as 0 without CAP_SYS_ADMIN. */
	if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1)))
		fail("/proc/self/pagemap gives no frame for a locked page", 0, 0);
	return (entry & ((1ULL << 55) - 1)) * PAGE;
}

static unsigned long long dma_page(void *page)
{
	unsigned long long address = physical(page);

	if (address + PAGE > EDU_DMA_LIMIT)
		fail("a DMA page lies above the device's 28-bit reach: give the guest 256 MiB or less", 0, 0);
	return address;
}

/* Runs one transfer and waits for its end (the device takes 100 ms of its clock). */
static void dma(unsigned long long source, unsigned long long destination, unsigned direction)
{
	reg_write(EDU_DMA_SRC, (unsigned)source);
	reg_write(EDU_DMA_DST, (unsigned)destination);
	reg_write(EDU_DMA_COUNT, DMA_BYTES);
	reg_write(EDU_DMA_CMD, EDU_DMA_RUN | direction);
	if (!wait_clear(EDU_DMA_CMD, EDU_DMA_RUN, 10000))
		fail("DMA did not complete within 10 s", direction ? "(device to RAM)" : "(RAM to device)", 0);
}

/* The offset of the MSI capability in configuration space. */
static unsigned msi_capability(void)
{
	unsigned at, hops;

	if (!(config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST))
		fail("the device has no capability list", 0, 0);
	at = config_read(PCI_CAPABILITY_LIST, 1) & 0xfc;
	/* A looping list must not hang the probe: 48 is as many as 256 bytes hold. */
	for (hops = 0; at && hops < 48; hops++) {
		if (config_read(at, 1) == PCI_CAP_ID_MSI)
			return at;
		at = config_read(at + 1, 1) & 0xfc;
	}
	fail("the device has no MSI capability", 0, 0);
	return 0;
}

static int run(int argc, char **argv)
{
	const char *device;
	unsigned value, msi, flags, data_at, i;
	unsigned long long src, dst, seed;
	long fd;
	void *map;
	int bad = 0;

	if (argc != 2)
		fail("usage: edu-probe /sys/bus/pci/devices/BDF", 0, 0);
	device = argv[1];

	/* pci_enable_device: memory decoding. Bus mastering is the probe's to set. */
	write_attribute(device, "enable", "1");
	config_fd = open_or_fail(device_file(device, "config"), O_RDWR);
	config_write(PCI_COMMAND, 2, config_read(PCI_COMMAND, 2) | PCI_COMMAND_MASTER);

	fd = open_or_fail(device_file(device, "resource0"), O_RDWR | O_SYNC);
	map = (void *)sys6(__NR_mmap, 0, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if ((unsigned long)map > -4096UL)
		fail("cannot map BAR0", device, (long)map);
	bar = map;

	value = reg_read(EDU_ID);
	put("edu-id ");
	put_hex(value, 8);
	put("\n");
	if (value != EDU_IDENTIFICATION)
		fail("BAR0 does not answer as an edu device does", device, 0);

	reg_write(EDU_NOT, LIVENESS_PROBE);
	value = reg_read(EDU_NOT);
	put("edu-not ");
	put_hex(value, 8);
	put("\n");
	if (value != ~LIVENESS_PROBE) {
		complain("the liveness register did not invert what was written", 0, 0);
		bad = 1;
	}

	if (!wait_clear(EDU_STATUS, EDU_STATUS_COMPUTING, 5000))
		fail("the device was still computing after 5 s", 0, 0);
	reg_write(EDU_FACT, 10);
	if (!wait_clear(EDU_STATUS, EDU_STATUS_COMPUTING, 5000))
		fail("the factorial took more than 5 s", 0, 0);
	value = reg_read(EDU_FACT);
	put("edu-fact ");
	put_unsigned_to(1, value, 10, 1);
	put("\n");
	if (value != 3628800) {
		complain("10! is not 3628800", 0, 0);
		bad = 1;
	}

	/* The pages must stay where pagemap says while the device writes them. */
	if (sys3(__NR_mlock, pages, sizeof(pages), 0) < 0)
		fail("cannot lock the DMA pages", 0, 0);
	src = dma_page(pages[0]);
	dst = dma_page(pages[1]);
	put("edu-dma-pages ");
	put_hex(src, 1);
	put(" ");
	put_hex(dst, 1);
	put("\n");
	/*
	 * A pattern of this run's own: the device keeps its buffer across a hot-unplug, so a
	 * transfer into it that did nothing would otherwise pass on an earlier run's bytes.
	 */
	seed = nanoseconds() | 1;
	for (i = 0; i < PAGE; i++) {
		seed ^= seed << 13;
		seed ^= seed >> 7;
		seed ^= seed << 17;
		pages[0][i] = (unsigned char)seed;
		pages[1][i] = (unsigned char)~seed;
	}
	dma(src, EDU_BUFFER, 0);
	dma(EDU_BUFFER, dst, EDU_DMA_TO_RAM);
	/* The device wrote behind the compiler's back. */
	__asm__ volatile("" ::: "memory");
	for (i = 0; i < DMA_BYTES && pages[0][i] == pages[1][i]; i++)
		;
	if (i == DMA_BYTES) {
		put("edu-dma ok\n");
	} else {
		put("edu-dma mismatch at ");
		put_unsigned_to(1, i, 10, 1);
		put("\n");
		complain("the page that came back from the device differs", 0, 0);
		bad = 1;
	}

	msi = msi_capability();
	flags = config_read(msi + 2, 2);
	config_write(msi + 4, 4, MSI_ADDRESS);
	data_at = msi + 8;
	if (flags & MSI_FLAGS_64BIT) {
		config_write(msi + 8, 4, 0);
		data_at = msi + 12;
	}
	config_write(data_at, 2, MSI_VECTOR);
	config_write(msi + 2, 2, (flags & ~MSI_FLAGS_QSIZE) | MSI_FLAGS_ENABLE);
	if (!(config_read(msi + 2, 2) & MSI_FLAGS_ENABLE))
		fail("MSI did not stay enabled", 0, 0);
	reg_write(EDU_IRQ_RAISE, 1);
	/* The message crosses L1 and both levels of KVM before the guest's CPU takes it. */
	pause_ms(500);
	value = reg_read(EDU_IRQ_STATUS);
	put("edu-irq-status ");
	put_hex(value, 1);
	put("\n");
	reg_write(EDU_IRQ_ACK, value);
	config_write(msi + 2, 2, flags & ~MSI_FLAGS_ENABLE);
	if (value != 1) {
		complain("the interrupt status is not the one raised", 0, 0);
		bad = 1;
	}
	if (reg_read(EDU_IRQ_STATUS)) {
		complain("the acknowledged interrupt is still pending", 0, 0);
		bad = 1;
	}

	/* Leaves the device as Linux had it: the host unplugs it next. */
	sys3(__NR_munmap, map, PAGE, 0);
	sys3(__NR_close, fd, 0, 0);
	sys3(__NR_close, config_fd, 0, 0);
	write_attribute(device, "enable", "0");
	return bad;
}
