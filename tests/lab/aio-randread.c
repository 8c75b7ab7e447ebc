/*
 * aio-randread: a queue-depth benchmark for the lab's guest, whose busybox has only `dd` (one
 * request in flight) and no fio.
 *
 *   aio-randread DEVICE REQUESTS DEPTH
 *
 * Reads REQUESTS blocks of 4 KiB at random 4 KiB-aligned offsets of DEVICE (a block device or
 * a file), opened with O_DIRECT, keeping DEPTH (1..64) requests in flight through Linux AIO
 * (io_setup, io_submit, io_getevents). The offsets come from a fixed seed, so every run and
 * every VMM reads the same blocks in the same order. It prints, one per line:
 *
 *   depth=N  requests=N  us=N  iops=N  mib_per_s=N.NN
 *
 * and exits 0, or prints `error=...` and exits 1 (a failed or short read fails the run: a
 * benchmark that counts errors as completions measures nothing).
 *
 * It is freestanding (raw system calls, no C library), so the static binary is a few KiB: the
 * guest initramfs it rides in is unpacked by a CPU that is itself emulated.
 */
#include <stddef.h>

#include <asm/unistd.h>
#include <linux/aio_abi.h>
#include <linux/fcntl.h>
#include <linux/fs.h>
#include <linux/time_types.h>

#include "freestanding.h"

#define BLOCK 4096
#define MAX_DEPTH 64
#define CLOCK_MONOTONIC 1

static unsigned char buffers[MAX_DEPTH][BLOCK] __attribute__((aligned(BLOCK)));
static struct iocb iocbs[MAX_DEPTH];
static struct io_event events[MAX_DEPTH];

#define sys5(n, a, b, c, d, e) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* The compiler may turn a structure's zeroing into a call to memset. */
void *memset(void *s, int c, size_t n)
{
	unsigned char *p = s;

	while (n--)
		*p++ = (unsigned char)c;
	return s;
}

static unsigned long length(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void put(const char *s)
{
	sys3(__NR_write, 1, s, length(s));
}

/* Writes `value` in decimal, with `decimals` digits after a point taken from its low end. */
static void put_number(unsigned long value, int decimals)
{
	char text[32];
	int i = sizeof(text) - 1, digits = 0;

	text[i] = 0;
	do {
		if (decimals && digits == decimals)
			text[--i] = '.';
		text[--i] = (char)('0' + value % 10);
		value /= 10;
		digits++;
	} while (value || digits <= decimals);
	put(text + i);
}

static void put_field(const char *key, unsigned long value, int decimals)
{
	put(key);
	put("=");
	put_number(value, decimals);
	put("\n");
}

static void fail(const char *what, long code)
{
	put("error=");
	put(what);
	if (code) {
		put(" errno ");
		put_number((unsigned long)-code, 0);
	}
	put("\n");
	sys3(__NR_exit_group, 1, 0, 0);
	__builtin_unreachable();
}

/* Most requests a run makes: keeps the MiB/s arithmetic below in 64 bits. */
#define MAX_REQUESTS 10000000UL

/* A decimal from 1 to MAX_REQUESTS, or 0 for anything else. */
static unsigned long parse(const char *s)
{
	unsigned long n = 0;

	if (!*s)
		return 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || n > MAX_REQUESTS)
			return 0;
		n = n * 10 + (unsigned long)(*s - '0');
	}
	return n > MAX_REQUESTS ? 0 : n;
}

static unsigned long long microseconds(void)
{
	struct __kernel_timespec t;

	if (sys3(__NR_clock_gettime, CLOCK_MONOTONIC, &t, 0) < 0)
		fail("clock_gettime", 0);
	return (unsigned long long)t.tv_sec * 1000000ULL + (unsigned long long)t.tv_nsec / 1000ULL;
}

/* xorshift64*: a fixed, well-spread sequence of offsets without a library. */
static unsigned long long state = 0x9e3779b97f4a7c15ULL;

static unsigned long long next_random(void)
{
	state ^= state >> 12;
	state ^= state << 25;
	state ^= state >> 27;
	return state * 0x2545f4914f6cdd1dULL;
}

static int run(int argc, char **argv)
{
	aio_context_t ctx = 0;
	unsigned long long size, blocks, start, elapsed;
	unsigned long requests, depth, submitted = 0, completed = 0, i;
	struct iocb *batch[MAX_DEPTH];
	long fd, rc;

	if (argc != 4)
		fail("usage: aio-randread DEVICE REQUESTS DEPTH", 0);
	requests = parse(argv[2]);
	depth = parse(argv[3]);
	if (!requests || !depth || depth > MAX_DEPTH)
		fail("REQUESTS must be 1..10000000 and DEPTH 1..64", 0);

	fd = sys3(__NR_open, argv[1], O_RDONLY | O_DIRECT, 0);
	if (fd < 0)
		fail("open", fd);
	rc = sys3(__NR_ioctl, fd, BLKGETSIZE64, &size);
	if (rc < 0) {
		/* Not a block device: a file's size is its end. */
		rc = sys3(__NR_lseek, fd, 0, 2);
		if (rc < 0)
			fail("size", rc);
		size = (unsigned long long)rc;
	}
	blocks = size / BLOCK;
	if (!blocks)
		fail("the device is smaller than one block", 0);
	rc = sys3(__NR_io_setup, depth, &ctx, 0);
	if (rc < 0)
		fail("io_setup", rc);

	start = microseconds();
	while (completed < requests) {
		unsigned long want = 0, in_flight = submitted - completed;
		long got;

		/* Refill every free slot: a slot's buffer is free once its event came back. */
		for (i = 0; i < depth && submitted + want < requests && in_flight + want < depth; i++) {
			struct iocb *cb = &iocbs[i];

			if (cb->aio_data)
				continue;
			memset(cb, 0, sizeof(*cb));
			cb->aio_data = i + 1;
			cb->aio_lio_opcode = IOCB_CMD_PREAD;
			cb->aio_fildes = (unsigned int)fd;
			cb->aio_buf = (unsigned long)buffers[i];
			cb->aio_nbytes = BLOCK;
			cb->aio_offset = (long long)(next_random() % blocks * BLOCK);
			batch[want++] = cb;
		}
		if (want) {
			rc = sys3(__NR_io_submit, ctx, want, batch);
			if (rc <= 0)
				fail("io_submit", rc);
			/* Slots the kernel did not take are free again. */
			for (i = (unsigned long)rc; i < want; i++)
				batch[i]->aio_data = 0;
			submitted += (unsigned long)rc;
		}
		got = sys5(__NR_io_getevents, ctx, 1, MAX_DEPTH, events, 0);
		if (got < 0)
			fail("io_getevents", got);
		for (i = 0; i < (unsigned long)got; i++) {
			unsigned long slot = (unsigned long)events[i].data;

			if (events[i].res < 0)
				fail("read", events[i].res);
			if (events[i].res != BLOCK)
				fail("short read", 0);
			if (slot < 1 || slot > depth)
				fail("unknown completion", 0);
			iocbs[slot - 1].aio_data = 0;
		}
		completed += (unsigned long)got;
	}
	elapsed = microseconds() - start;
	if (!elapsed)
		elapsed = 1;
	sys3(__NR_io_destroy, ctx, 0, 0);

	put_field("depth", depth, 0);
	put_field("requests", requests, 0);
	put_field("us", elapsed, 0);
	put_field("iops", requests * 1000000ULL / elapsed, 0);
	/* Hundredths of a MiB per second. */
	put_field("mib_per_s", requests * BLOCK * 100ULL * 1000000ULL / elapsed / (1 << 20), 2);
	return 0;
}
