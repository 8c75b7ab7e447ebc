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
 */
#include "guest.h"

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_VENDOR_ID 0x00c
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_F_VERSION_1_WORD 1 /* feature bit 32: bit 0 of feature word 1 */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_GET_ID 8
#define WRITE_SECTOR 1

#define QUEUE_SIZE 4
#define MAX_DEVICES 8
#define IO_TIMEOUT_MS 5000
#define PLUG_TIMEOUT_MS 60000
#define ISR_CONFIG 2
#define TICK_US 1000

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[QUEUE_SIZE];
	u16 used_event;
};

struct virtq_used_elem {
	u32 id;
	u32 len;
};

struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[QUEUE_SIZE];
	u16 avail_event;
};

struct blk_req_header {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* Zeroed at boot with the rest of .bss, which is what a fresh queue needs. */
static struct virtq_desc desc[QUEUE_SIZE] __attribute__((aligned(16)));
static struct virtq_avail avail __attribute__((aligned(2)));
static struct virtq_used used __attribute__((aligned(4)));
static struct blk_req_header header;
static u8 sector[512];
static volatile u8 req_status;
/* What the program writes to sector WRITE_SECTOR, repeated over the sector. */
static const char write_pattern[] = "citadel-guest-wrote-sector-one.";

static u32 reg_read(u64 base, u32 off)
{
	return mmio_read32(base + off);
}

static void reg_write(u64 base, u32 off, u32 val)
{
	mmio_write32(base + off, val);
}

static void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* Parses a C-style unsigned number (0x prefix for hex); *end gets the first unused char. */
static u64 parse_number(const char *s, const char **end)
{
	u64 v = 0;
	int base = 10;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++) {
		int digit;

		if (*s >= '0' && *s <= '9')
			digit = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			digit = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			digit = *s - 'A' + 10;
		else
			break;
		v = v * (u64)base + (u64)digit;
	}
	*end = s;
	return v;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* Collects the base addresses of "virtio_mmio.device=<size>@<base>:<irq>" entries. */
static int find_devices(const char *cmdline, u64 *bases, int max)
{
	static const char key[] = "virtio_mmio.device=";
	const char *p = cmdline;
	int n = 0;

	while (*p && n < max) {
		if ((p == cmdline || p[-1] == ' ') && starts_with(p, key)) {
			const char *q = p + sizeof(key) - 1;

			while (*q && *q != '@' && *q != ' ')
				q++;
			if (*q == '@') {
				u64 base = parse_number(q + 1, &q);

				/* Only the identity-mapped MMIO GiB or low RAM can be reached. */
				if (*q == ':' && base != 0 && base < 0xfffff000UL)
					bases[n++] = base;
			}
			p = q;
			continue;
		}
		p++;
	}
	return n;
}

static void report_hex(const char *key, u64 v)
{
	serial_puts(" ");
	serial_puts(key);
	serial_puts("=");
	serial_put_hex(v);
}

/* Waits, timer-driven, until the device has used one more buffer. */
static int wait_used(u16 expected)
{
	u64 deadline = timer_ticks_now() + IO_TIMEOUT_MS;

	while (*(volatile u16 *)&used.idx != expected) {
		if (timer_ticks_now() >= deadline)
			return 0;
		__asm__ volatile("sti; pause; cli");
	}
	return 1;
}

/*
 * Sends one request on descriptors 0-2 (header, the sector buffer, status) and waits until
 * the used ring reaches used_idx. Reports and returns 0 on a timeout.
 */
static int blk_request(u64 base, u32 type, u64 sector_no, u16 used_idx)
{
	u16 data_flags = type == BLK_T_OUT ? DESC_F_NEXT : DESC_F_NEXT | DESC_F_WRITE;

	header.type = type;
	header.sector = sector_no;
	req_status = 0xff;
	desc[0] = (struct virtq_desc){ (u64)&header, sizeof(header), DESC_F_NEXT, 1 };
	desc[1] = (struct virtq_desc){ (u64)sector, sizeof(sector), data_flags, 2 };
	desc[2] = (struct virtq_desc){ (u64)&req_status, 1, DESC_F_WRITE, 0 };
	avail.ring[(used_idx - 1) % QUEUE_SIZE] = 0;
	barrier();
	avail.idx = used_idx;
	barrier();
	reg_write(base, REG_QUEUE_NOTIFY, 0);

	if (!wait_used(used_idx)) {
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

	reg_write(base, REG_QUEUE_SEL, 0);
	if (reg_read(base, REG_QUEUE_NUM_MAX) < QUEUE_SIZE) {
		report("virtio-blk error=queue-too-small");
		return 0;
	}
	reg_write(base, REG_QUEUE_NUM, QUEUE_SIZE);
	reg_write(base, REG_QUEUE_DESC_LOW, (u32)(u64)desc);
	reg_write(base, REG_QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
	reg_write(base, REG_QUEUE_DRIVER_LOW, (u32)(u64)&avail);
	reg_write(base, REG_QUEUE_DRIVER_HIGH, (u32)((u64)&avail >> 32));
	reg_write(base, REG_QUEUE_DEVICE_LOW, (u32)(u64)&used);
	reg_write(base, REG_QUEUE_DEVICE_HIGH, (u32)((u64)&used >> 32));
	reg_write(base, REG_QUEUE_READY, 1);
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

/* Waits, timer-driven, for a configuration-change interrupt, and acknowledges it. */
static int wait_config_change(u64 base)
{
	u64 deadline = timer_ticks_now() + PLUG_TIMEOUT_MS;

	while (!(reg_read(base, REG_INTERRUPT_STATUS) & ISR_CONFIG)) {
		if (timer_ticks_now() >= deadline)
			return 0;
		__asm__ volatile("sti; hlt; cli");
	}
	reg_write(base, REG_INTERRUPT_ACK, ISR_CONFIG);
	return 1;
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
	if (!wait_config_change(base)) {
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
	if (!wait_config_change(base)) {
		report("hotplug error=no-unplug");
		return;
	}
	report_dec("hotplug unplugged capacity", read_capacity(base));
	if (!blk_request(base, BLK_T_IN, 0, 4))
		return;
	report_dec("hotplug unplugged-read status", req_status);
}

static int has_word(const char *cmdline, const char *word)
{
	const char *p;
	int len = 0;

	while (word[len])
		len++;
	for (p = cmdline; *p; p++) {
		if ((p == cmdline || p[-1] == ' ') && starts_with(p, word)) {
			char after = p[len];

			if (after == 0 || after == ' ')
				return 1;
		}
	}
	return 0;
}

void guest_main(void)
{
	u64 bases[MAX_DEVICES];
	int n, i, blk_done = 0;
	int hotplug = has_word(boot_cmdline(), "hotplug");

	report_entry();
	interrupts_init();
	lapic_timer_start(TICK_US);

	n = find_devices(boot_cmdline(), bases, MAX_DEVICES);
	report_dec("virtio-mmio devices", (u64)n);
	for (i = 0; i < n; i++) {
		u64 base = bases[i];
		u32 version;
		u32 device;

		serial_puts("citadel-guest: virtio-mmio");
		report_hex("base", base);
		if (reg_read(base, REG_MAGIC) != VIRTIO_MMIO_MAGIC) {
			serial_puts(" magic=bad\n");
			continue;
		}
		version = reg_read(base, REG_VERSION);
		device = reg_read(base, REG_DEVICE_ID);
		serial_puts(" version=");
		serial_put_dec(version);
		serial_puts(" device=");
		serial_put_dec(device);
		report_hex("vendor", reg_read(base, REG_VENDOR_ID));
		serial_puts("\n");
		/* One queue in static memory: the first modern block device gets it. */
		if (device == VIRTIO_ID_BLOCK && version != 2) {
			report("virtio-blk error=legacy-transport-unsupported");
		} else if (device == VIRTIO_ID_BLOCK && !blk_done) {
			if (hotplug)
				hotplug_blk(base);
			else
				drive_blk(base);
			blk_done = 1;
		}
	}
	report("done");
	halt_forever();
}
