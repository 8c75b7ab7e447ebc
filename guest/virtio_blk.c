/*
 * virtio_blk: finds the virtio-mmio devices announced on the command line
 * ("virtio_mmio.device=<size>@<base>:<irq>", as Linux reads them), reports each one, and
 * drives the first block device the way a driver does: status handshake, VIRTIO_F_VERSION_1,
 * one virtqueue, a read of sector 0, then a write of sector 1 and a read of it back, then
 * the disk's serial number (GET_ID), each completed through the used ring (polled).
 *
 * With "hotplug" on the command line it treats the device as a hot-replace slot instead: it
 * starts the empty slot, reads from it, waits for the configuration change of a plug, reads
 * and writes the plugged disk, waits for the change of an unplug and reads the empty slot
 * again, reporting the capacity and status at each step.
 *
 * With "restart" on the command line it waits for a plug if the slot is empty, then writes sectors 0 to
 * RESTART_SECTORS - 1 one at a time, each filled with its own number, pausing between writes
 * so that the host has time to kill the disk's backend under it; it counts every status that
 * is not OK and reports progress, the count and the device status register at the end.
 *
 * With "snapshot" on the command line it starts the empty slot and reads from it, then waits
 * for a byte on the serial line: the host has stopped serving the slot meanwhile. It queues a
 * second read, kicks and reports "snapshot queued", and waits for the answer while the host
 * pauses the machine, snapshots it and restores it in another process. Once answered, it
 * reads a third time, reporting the status of each read.
 */
#include "virtio_mmio.h"

#define VIRTIO_ID_BLOCK 2
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_GET_ID 8
#define WRITE_SECTOR 1

#define IO_TIMEOUT_MS 5000
#define PLUG_TIMEOUT_MS 60000
#define RESTART_SECTORS 1024
#define RESTART_PAUSE_MS 3
#define SNAPSHOT_TIMEOUT_MS 60000

#define COM1_DATA 0x3f8
#define COM1_LSR 0x3fd
#define LSR_DATA_READY 0x01

struct blk_req_header {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct virtq vq;
static struct blk_req_header header;
static u8 sector[512];
static volatile u8 req_status;
/* What the program writes to sector WRITE_SECTOR, repeated over the sector. */
static const char write_pattern[] = "citadel-guest-wrote-sector-one.";

/*
 * Queues one request on descriptors 0-2 (header, the sector buffer, status) as the driver's
 * used_idx-th and kicks the queue.
 */
static void blk_submit(u64 base, u32 type, u64 sector_no, u16 used_idx)
{
	u16 data_flags = type == BLK_T_OUT ? DESC_F_NEXT : DESC_F_NEXT | DESC_F_WRITE;

	header.type = type;
	header.sector = sector_no;
	req_status = 0xff;
	vq.desc[0] = (struct virtq_desc){ (u64)&header, sizeof(header), DESC_F_NEXT, 1 };
	vq.desc[1] = (struct virtq_desc){ (u64)sector, sizeof(sector), data_flags, 2 };
	vq.desc[2] = (struct virtq_desc){ (u64)&req_status, 1, DESC_F_WRITE, 0 };
	vq.avail.ring[(used_idx - 1) % QUEUE_SIZE] = 0;
	barrier();
	vq.avail.idx = used_idx;
	barrier();
	reg_write(base, REG_QUEUE_NOTIFY, 0);
}

/*
 * Sends one request (see blk_submit) and waits until the used ring reaches used_idx. Reports
 * and returns 0 on a timeout.
 */
static int blk_request(u64 base, u32 type, u64 sector_no, u16 used_idx)
{
	blk_submit(base, type, sector_no, used_idx);
	if (!wait_used(&vq, used_idx, IO_TIMEOUT_MS)) {
		report("virtio-blk error=timeout");
		return 0;
	}
	barrier();
	return 1;
}

/* Prints "<what><status><label><first 32 bytes of the sector buffer, printable>". */
static void report_sector(const char *what, const char *label)
{
	int i;

	serial_puts("citadel-guest: ");
	serial_puts(what);
	serial_put_dec(req_status);
	serial_puts(label);
	for (i = 0; i < 32; i++) {
		char c[2] = { (char)sector[i], 0 };

		if (c[0] < 0x20 || c[0] > 0x7e)
			c[0] = '.';
		serial_puts(c);
	}
	serial_puts("\n");
}

/* Negotiates VIRTIO_F_VERSION_1 and starts queue 0; reports and returns 0 on a refusal. */
static int start_blk(u64 base)
{
	u32 features_hi;

	reg_write(base, REG_STATUS, 0);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

	reg_write(base, REG_DEVICE_FEATURES_SEL, 1);
	features_hi = reg_read(base, REG_DEVICE_FEATURES);
	if (!(features_hi & VIRTIO_F_VERSION_1_WORD)) {
		report("virtio-blk error=no-version-1");
		return 0;
	}
	/* Only VIRTIO_F_VERSION_1: the simplest driver a device must accept. */
	reg_write(base, REG_DRIVER_FEATURES_SEL, 0);
	reg_write(base, REG_DRIVER_FEATURES, 0);
	reg_write(base, REG_DRIVER_FEATURES_SEL, 1);
	reg_write(base, REG_DRIVER_FEATURES, VIRTIO_F_VERSION_1_WORD);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(reg_read(base, REG_STATUS) & STATUS_FEATURES_OK)) {
		report("virtio-blk error=features-rejected");
		return 0;
	}

	if (!setup_queue(base, 0, &vq)) {
		report("virtio-blk error=queue-too-small");
		return 0;
	}
	reg_write(base, REG_STATUS,
		  STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return 1;
}

static u64 read_capacity(u64 base)
{
	return reg_read(base, REG_CONFIG) | (u64)reg_read(base, REG_CONFIG + 4) << 32;
}

/* Fills the sector buffer with the pattern the host checks in the image. */
static void fill_pattern(void)
{
	int i;

	for (i = 0; i < (int)sizeof(sector); i++)
		sector[i] = (u8)write_pattern[i % (sizeof(write_pattern) - 1)];
}

static void drive_blk(u64 base)
{
	int i;

	if (!start_blk(base))
		return;
	report_dec("virtio-blk capacity", read_capacity(base));

	if (!blk_request(base, BLK_T_IN, 0, 1))
		return;
	report_dec("virtio-blk isr", reg_read(base, REG_INTERRUPT_STATUS));
	reg_write(base, REG_INTERRUPT_ACK, reg_read(base, REG_INTERRUPT_STATUS));
	report_sector("virtio-blk status=", " sector0=");

	fill_pattern();
	if (!blk_request(base, BLK_T_OUT, WRITE_SECTOR, 2))
		return;
	report_dec("virtio-blk write status", req_status);
	for (i = 0; i < (int)sizeof(sector); i++)
		sector[i] = 0;
	if (!blk_request(base, BLK_T_IN, WRITE_SECTOR, 3))
		return;
	report_sector("virtio-blk write-readback status=", " sector1=");

	for (i = 0; i < (int)sizeof(sector); i++)
		sector[i] = 0;
	if (!blk_request(base, BLK_T_GET_ID, 0, 4))
		return;
	report_sector("virtio-blk id status=", " serial=");
}

static void hotplug_blk(u64 base)
{
	if (!start_blk(base))
		return;
	report_dec("hotplug empty capacity", read_capacity(base));
	if (!blk_request(base, BLK_T_IN, 0, 1))
		return;
	report_dec("hotplug empty-read status", req_status);

	report("hotplug waiting-for-plug");
	if (!wait_config_change(base, PLUG_TIMEOUT_MS)) {
		report("hotplug error=no-plug");
		return;
	}
	report_dec("hotplug plugged capacity", read_capacity(base));
	if (!blk_request(base, BLK_T_IN, 0, 2))
		return;
	report_sector("hotplug read status=", " sector0=");
	fill_pattern();
	if (!blk_request(base, BLK_T_OUT, WRITE_SECTOR, 3))
		return;
	report_dec("hotplug write status", req_status);

	report("hotplug waiting-for-unplug");
	if (!wait_config_change(base, PLUG_TIMEOUT_MS)) {
		report("hotplug error=no-unplug");
		return;
	}
	report_dec("hotplug unplugged capacity", read_capacity(base));
	if (!blk_request(base, BLK_T_IN, 0, 4))
		return;
	report_dec("hotplug unplugged-read status", req_status);
}

/* Sector n holds n (little-endian, 8 bytes) and then the byte n ^ 0x5a repeated. */
static void fill_numbered(u64 n)
{
	int i;

	for (i = 0; i < 8; i++)
		sector[i] = (u8)(n >> (8 * i));
	for (i = 8; i < (int)sizeof(sector); i++)
		sector[i] = (u8)(n ^ 0x5a);
}

static void restart_blk(u64 base)
{
	u64 n, errors = 0;

	if (!start_blk(base))
		return;
	/* A disk of the command line is there at probe; a hot-plugged one comes later. */
	if (read_capacity(base) == 0) {
		report("restart waiting-for-plug");
		if (!wait_config_change(base, PLUG_TIMEOUT_MS)) {
			report("restart error=no-plug");
			return;
		}
	}
	report_dec("restart plugged capacity", read_capacity(base));
	for (n = 0; n < RESTART_SECTORS; n++) {
		fill_numbered(n);
		if (!blk_request(base, BLK_T_OUT, n, (u16)(n + 1))) {
			report_dec("restart timeout sector", n);
			return;
		}
		if (req_status != 0) {
			if (errors == 0)
				report_dec("restart first-error sector", n);
			errors++;
		}
		if (n % 64 == 0)
			report_dec("restart progress", n);
		pause_ms(RESTART_PAUSE_MS);
	}
	report_dec("restart errors", errors);
	report_dec("restart device-status", reg_read(base, REG_STATUS));
}

static void snapshot_blk(u64 base)
{
	if (!start_blk(base))
		return;
	if (!blk_request(base, BLK_T_IN, 0, 1))
		return;
	report_dec("snapshot first-read status", req_status);

	/* The host's go-ahead: from here on it leaves the slot's kicks unserved. */
	while (!(inb(COM1_LSR) & LSR_DATA_READY))
		__asm__ volatile("pause");
	(void)inb(COM1_DATA);

	blk_submit(base, BLK_T_IN, 0, 2);
	report("snapshot queued");
	if (!wait_used(&vq, 2, SNAPSHOT_TIMEOUT_MS)) {
		report("snapshot error=queued-read-unanswered");
		return;
	}
	barrier();
	report_dec("snapshot queued-read status", req_status);
	if (!blk_request(base, BLK_T_IN, 0, 3))
		return;
	report_dec("snapshot last-read status", req_status);
}

void guest_main(void)
{
	u64 bases[MAX_DEVICES];
	int n, i, blk_done = 0;
	int hotplug = has_word(boot_cmdline(), "hotplug");
	int restart = has_word(boot_cmdline(), "restart");
	int snapshot = has_word(boot_cmdline(), "snapshot");

	report_entry();
	interrupts_init();
	lapic_timer_start(TICK_US);

	n = find_devices(boot_cmdline(), bases, MAX_DEVICES);
	report_dec("virtio-mmio devices", (u64)n);
	for (i = 0; i < n; i++) {
		u64 base = bases[i];
		u32 device = report_device(base);
		u32 version = reg_read(base, REG_VERSION);

		/* One queue in static memory: the first modern block device gets it. */
		if (device == VIRTIO_ID_BLOCK && version != 2) {
			report("virtio-blk error=legacy-transport-unsupported");
		} else if (device == VIRTIO_ID_BLOCK && !blk_done) {
			if (restart)
				restart_blk(base);
			else if (snapshot)
				snapshot_blk(base);
			else if (hotplug)
				hotplug_blk(base);
			else
				drive_blk(base);
			blk_done = 1;
		}
	}
	report("done");
	halt_forever();
}
