/*
 * What the virtio guest programs share: the virtio-mmio (version 2) registers, the split
 * ring layout, device discovery on the command line and waiting for a configuration change.
 */
#ifndef CITADEL_VIRTIO_MMIO_H
#define CITADEL_VIRTIO_MMIO_H

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

#define VIRTIO_F_VERSION_1_WORD 1 /* feature bit 32: bit 0 of feature word 1 */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

#define QUEUE_SIZE 4
#define MAX_DEVICES 8
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

/* One split ring in static memory, zeroed at boot with the rest of .bss. */
struct virtq {
	struct virtq_desc desc[QUEUE_SIZE] __attribute__((aligned(16)));
	struct virtq_avail avail __attribute__((aligned(2)));
	struct virtq_used used __attribute__((aligned(4)));
};

static inline u32 reg_read(u64 base, u32 off)
{
	return mmio_read32(base + off);
}

static inline void reg_write(u64 base, u32 off, u32 val)
{
	mmio_write32(base + off, val);
}

static inline void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* Collects the base addresses of "virtio_mmio.device=<size>@<base>:<irq>" entries. */
int find_devices(const char *cmdline, u64 *bases, int max);
/* Whether the command line has `word` as a whole word. */
int has_word(const char *cmdline, const char *word);
/* Reports the device at `base` (magic, version, device, vendor); returns its device id, or
 * 0 when the magic value is wrong. */
u32 report_device(u64 base);
/* Waits, timer-driven, up to timeout_ms for a configuration-change interrupt, and
 * acknowledges it; returns 0 on a timeout. */
int wait_config_change(u64 base, u64 timeout_ms);
/* Sleeps with interrupts on (the LAPIC timer's ticks) for `ms` milliseconds. */
void pause_ms(u64 ms);
/* Waits, timer-driven, up to timeout_ms until the device has used `q` up to `expected`;
 * returns 0 on a timeout. */
int wait_used(struct virtq *q, u16 expected, u64 timeout_ms);
/* Sets queue `index` of the device at `base` to `q`, QUEUE_SIZE entries, and makes it ready;
 * returns 0 when the device offers a smaller queue. */
int setup_queue(u64 base, u32 index, struct virtq *q);

#endif
