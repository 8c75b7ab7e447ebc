/*
 * virtio_balloon: drives the first virtio-balloon device announced on the command line as
 * Linux's driver would, on a pool of 16 MiB of its own RAM (from 16 MiB): negotiates
 * VIRTIO_F_VERSION_1 only, starts the inflate and deflate queues, fills the pool with a
 * pattern (so that the host has it backed), then follows the next two targets the host sets
 * (num_pages, read at each configuration change): it inflates or deflates the pool's pages,
 * 256 frame numbers per buffer, waits for each to be used, and writes `actual`. After a
 * deflate it reports whether the pages it got back read as zero.
 */
#include "virtio_mmio.h"

#define VIRTIO_ID_BALLOON 5
#define INFLATE_QUEUE 0
#define DEFLATE_QUEUE 1
#define CONFIG_NUM_PAGES 0
#define CONFIG_ACTUAL 4

#define POOL_BASE (16UL << 20)
#define POOL_PAGES 4096U
#define PAGE_SIZE 4096UL
#define PFNS_PER_BUFFER 256U
#define MAX_BALLOON_DEVICES 16
#define IO_TIMEOUT_MS 5000
#define CHANGE_TIMEOUT_MS 60000
#define PATTERN 0x5au

static struct virtq inflateq;
static struct virtq deflateq;
static u16 inflate_sent;
static u16 deflate_sent;
static u32 pfns[PFNS_PER_BUFFER];
static u32 actual;

static int start_balloon(u64 base)
{
	reg_write(base, REG_STATUS, 0);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	reg_write(base, REG_DEVICE_FEATURES_SEL, 1);
	if (!(reg_read(base, REG_DEVICE_FEATURES) & VIRTIO_F_VERSION_1_WORD)) {
		report("virtio-balloon error=missing-features");
		return 0;
	}
	reg_write(base, REG_DRIVER_FEATURES_SEL, 0);
	reg_write(base, REG_DRIVER_FEATURES, 0);
	reg_write(base, REG_DRIVER_FEATURES_SEL, 1);
	reg_write(base, REG_DRIVER_FEATURES, VIRTIO_F_VERSION_1_WORD);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(reg_read(base, REG_STATUS) & STATUS_FEATURES_OK)) {
		report("virtio-balloon error=features-rejected");
		return 0;
	}
	if (!setup_queue(base, INFLATE_QUEUE, &inflateq) ||
	    !setup_queue(base, DEFLATE_QUEUE, &deflateq)) {
		report("virtio-balloon error=queue-too-small");
		return 0;
	}
	reg_write(base, REG_STATUS,
		  STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return 1;
}

/* Hands pool pages [first, first + count) to queue `index` (count <= PFNS_PER_BUFFER) and
 * waits until the device used the buffer. */
static int send_pfns(u64 base, u32 index, u32 first, u32 count)
{
	struct virtq *q = index == INFLATE_QUEUE ? &inflateq : &deflateq;
	u16 *sent = index == INFLATE_QUEUE ? &inflate_sent : &deflate_sent;
	u32 i;

	for (i = 0; i < count; i++)
		pfns[i] = (u32)(POOL_BASE / PAGE_SIZE) + first + i;
	q->desc[*sent % QUEUE_SIZE] = (struct virtq_desc){ (u64)pfns, count * 4, 0, 0 };
	q->avail.ring[*sent % QUEUE_SIZE] = *sent % QUEUE_SIZE;
	(*sent)++;
	barrier();
	q->avail.idx = *sent;
	barrier();
	reg_write(base, REG_QUEUE_NOTIFY, index);
	if (!wait_used(q, *sent, IO_TIMEOUT_MS)) {
		report("virtio-balloon error=used-timeout");
		return 0;
	}
	return 1;
}

/* Whether every page of pool pages [first, first + count) reads as zero. */
static int pages_zero(u32 first, u32 count)
{
	u32 page;
	u64 off;

	for (page = first; page < first + count; page++)
		for (off = 0; off < PAGE_SIZE; off += 512)
			if (*(volatile u8 *)(POOL_BASE + page * PAGE_SIZE + off) != 0)
				return 0;
	return 1;
}

/* Moves the balloon to `target` pages (capped at the pool) and writes `actual`. */
static int follow(u64 base, u32 target)
{
	int deflated = 0;
	u32 from = actual;

	if (target > POOL_PAGES)
		target = POOL_PAGES;
	while (actual < target) {
		u32 n = target - actual < PFNS_PER_BUFFER ? target - actual : PFNS_PER_BUFFER;

		if (!send_pfns(base, INFLATE_QUEUE, actual, n))
			return 0;
		actual += n;
	}
	while (actual > target) {
		u32 n = actual - target < PFNS_PER_BUFFER ? actual - target : PFNS_PER_BUFFER;

		if (!send_pfns(base, DEFLATE_QUEUE, actual - n, n))
			return 0;
		actual -= n;
		deflated = 1;
	}
	mmio_write32(base + REG_CONFIG + CONFIG_ACTUAL, actual);
	report_dec("virtio-balloon actual", actual);
	if (deflated)
		report_dec("virtio-balloon deflated-zeroed", (u64)pages_zero(actual, from - actual));
	return 1;
}

static void drive_balloon(u64 base)
{
	u64 off;
	int change;

	if (!start_balloon(base))
		return;
	for (off = 0; off < POOL_PAGES * PAGE_SIZE; off += 512)
		*(volatile u8 *)(POOL_BASE + off) = PATTERN;
	report_dec("virtio-balloon pool-pages", POOL_PAGES);
	for (change = 1; change <= 2; change++) {
		report("virtio-balloon waiting");
		if (!wait_config_change(base, CHANGE_TIMEOUT_MS)) {
			report("virtio-balloon error=no-change");
			return;
		}
		report_dec("virtio-balloon num-pages",
			   mmio_read32(base + REG_CONFIG + CONFIG_NUM_PAGES));
		if (!follow(base, mmio_read32(base + REG_CONFIG + CONFIG_NUM_PAGES)))
			return;
	}
}

void guest_main(void)
{
	u64 bases[MAX_BALLOON_DEVICES];
	int n, i;

	report_entry();
	interrupts_init();
	lapic_timer_start(TICK_US);

	n = find_devices(boot_cmdline(), bases, MAX_BALLOON_DEVICES);
	report_dec("virtio-mmio devices", (u64)n);
	for (i = 0; i < n; i++) {
		if (reg_read(bases[i], REG_MAGIC) == VIRTIO_MMIO_MAGIC &&
		    reg_read(bases[i], REG_DEVICE_ID) == VIRTIO_ID_BALLOON &&
		    reg_read(bases[i], REG_VERSION) == 2) {
			drive_balloon(bases[i]);
			break;
		}
	}
	report("done");
	halt_forever();
}
