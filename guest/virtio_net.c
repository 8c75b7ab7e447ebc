/*
 * virtio_net: drives the first virtio-net device announced on the command line
 * ("virtio_mmio.device=<size>@<base>:<irq>") as a hot-replace NIC slot: negotiates
 * VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS, starts the RX ring (one
 * buffer) and the TX ring, reports the MAC and the link status, then sends one frame at boot,
 * one after the next configuration change (a plug, or an unplug of a NIC plugged at boot)
 * and one after the change after that, reporting the link status and the TX used index at
 * each step. Each frame is a broadcast of EtherType 0x88b5 (local experimental) whose
 * payload names the step.
 *
 * With "restart" on the command line it also sends a numbered frame every TICK_PAUSE_MS
 * between the first and the second change ("citadel-guest-frame-tick-N"), reporting the
 * count every 10 frames, so that the host can kill the NIC's backend under a steady stream.
 */
#include "virtio_mmio.h"

#define VIRTIO_ID_NET 1
#define NET_F_MAC (1u << 5)
#define NET_F_STATUS (1u << 16)
#define NET_S_LINK_UP 1
#define CONFIG_STATUS 6

#define IO_TIMEOUT_MS 5000
#define PLUG_TIMEOUT_MS 60000
#define TICK_PAUSE_MS 20
#define RX_QUEUE 0
#define TX_QUEUE 1

/* virtio_net_hdr with VIRTIO_F_VERSION_1: 12 bytes, all zero for a plain frame. */
#define NET_HDR_LEN 12
#define ETH_HLEN 14
#define FRAME_LEN 64

static struct virtq rxq;
static struct virtq txq;
static u8 rx_buffer[NET_HDR_LEN + 1514];
static u8 tx_buffer[NET_HDR_LEN + FRAME_LEN];
static u8 mac[6];
static u16 tx_sent;

static u8 config_byte(u64 base, u32 off)
{
	return *(volatile u8 *)(base + REG_CONFIG + off);
}

static u32 link_status(u64 base)
{
	return (config_byte(base, CONFIG_STATUS) | config_byte(base, CONFIG_STATUS + 1) << 8) &
	       NET_S_LINK_UP;
}

static int start_net(u64 base)
{
	u32 features_lo, features_hi;

	reg_write(base, REG_STATUS, 0);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	reg_write(base, REG_DEVICE_FEATURES_SEL, 0);
	features_lo = reg_read(base, REG_DEVICE_FEATURES);
	reg_write(base, REG_DEVICE_FEATURES_SEL, 1);
	features_hi = reg_read(base, REG_DEVICE_FEATURES);
	if (!(features_hi & VIRTIO_F_VERSION_1_WORD) || !(features_lo & NET_F_MAC) ||
	    !(features_lo & NET_F_STATUS)) {
		report("virtio-net error=missing-features");
		return 0;
	}
	reg_write(base, REG_DRIVER_FEATURES_SEL, 0);
	reg_write(base, REG_DRIVER_FEATURES, NET_F_MAC | NET_F_STATUS);
	reg_write(base, REG_DRIVER_FEATURES_SEL, 1);
	reg_write(base, REG_DRIVER_FEATURES, VIRTIO_F_VERSION_1_WORD);
	reg_write(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(reg_read(base, REG_STATUS) & STATUS_FEATURES_OK)) {
		report("virtio-net error=features-rejected");
		return 0;
	}
	if (!setup_queue(base, RX_QUEUE, &rxq) || !setup_queue(base, TX_QUEUE, &txq)) {
		report("virtio-net error=queue-too-small");
		return 0;
	}
	/* One receive buffer, so that a backend has somewhere to put what the tap sends. */
	rxq.desc[0] = (struct virtq_desc){ (u64)rx_buffer, sizeof(rx_buffer), DESC_F_WRITE, 0 };
	rxq.avail.ring[0] = 0;
	barrier();
	rxq.avail.idx = 1;
	reg_write(base, REG_STATUS,
		  STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return 1;
}

static void report_mac(void)
{
	int i;

	serial_puts("citadel-guest: virtio-net mac=");
	for (i = 0; i < 6; i++) {
		static const char hex[] = "0123456789abcdef";
		char c[4] = { hex[mac[i] >> 4], hex[mac[i] & 15], i < 5 ? ':' : 0, 0 };

		serial_puts(c);
	}
	serial_puts("\n");
}

/* Sends one broadcast frame whose payload is `payload` and waits until the device used it. */
static int send_frame(u64 base, const char *payload)
{
	u8 *frame = tx_buffer + NET_HDR_LEN;
	int i;

	for (i = 0; i < (int)sizeof(tx_buffer); i++)
		tx_buffer[i] = 0;
	for (i = 0; i < 6; i++) {
		frame[i] = 0xff;
		frame[6 + i] = mac[i];
	}
	frame[12] = 0x88;
	frame[13] = 0xb5;
	for (i = 0; payload[i] && ETH_HLEN + i < FRAME_LEN; i++)
		frame[ETH_HLEN + i] = (u8)payload[i];

	txq.desc[tx_sent % QUEUE_SIZE] =
		(struct virtq_desc){ (u64)tx_buffer, sizeof(tx_buffer), 0, 0 };
	txq.avail.ring[tx_sent % QUEUE_SIZE] = tx_sent % QUEUE_SIZE;
	tx_sent++;
	barrier();
	txq.avail.idx = tx_sent;
	barrier();
	reg_write(base, REG_QUEUE_NOTIFY, TX_QUEUE);
	if (!wait_used(&txq, tx_sent, IO_TIMEOUT_MS)) {
		report("virtio-net error=tx-timeout");
		return 0;
	}
	return 1;
}

/* Sends numbered frames until the next configuration change; 0 on a TX timeout. */
static int send_ticks(u64 base)
{
	static char payload[] = "citadel-guest-frame-tick-00000";
	u64 n, v;
	int i;

	for (n = 0; !(reg_read(base, REG_INTERRUPT_STATUS) & ISR_CONFIG); n++) {
		for (v = n, i = sizeof(payload) - 2; i >= (int)sizeof(payload) - 6; i--, v /= 10)
			payload[i] = (char)('0' + v % 10);
		if (!send_frame(base, payload))
			return 0;
		if (n % 10 == 0)
			report_dec("virtio-net ticks", n);
		pause_ms(TICK_PAUSE_MS);
	}
	return 1;
}

static void drive_net(u64 base, int restart)
{
	int i;

	if (!start_net(base))
		return;
	for (i = 0; i < 6; i++)
		mac[i] = config_byte(base, (u32)i);
	report_mac();
	report_dec("virtio-net boot link", link_status(base));
	if (!send_frame(base, "citadel-guest-frame-at-boot"))
		return;
	report_dec("virtio-net boot tx-used", txq.used.idx);

	report("virtio-net waiting-for-change-1");
	if (!wait_config_change(base, PLUG_TIMEOUT_MS)) {
		report("virtio-net error=no-change-1");
		return;
	}
	report_dec("virtio-net change-1 link", link_status(base));
	if (!send_frame(base, "citadel-guest-frame-after-change-1"))
		return;
	report_dec("virtio-net change-1 tx-used", txq.used.idx);
	if (restart && !send_ticks(base))
		return;

	report("virtio-net waiting-for-change-2");
	if (!wait_config_change(base, PLUG_TIMEOUT_MS)) {
		report("virtio-net error=no-change-2");
		return;
	}
	report_dec("virtio-net change-2 link", link_status(base));
	if (!send_frame(base, "citadel-guest-frame-after-change-2"))
		return;
	report_dec("virtio-net change-2 tx-used", txq.used.idx);
}

void guest_main(void)
{
	u64 bases[MAX_DEVICES];
	int n, i;

	report_entry();
	interrupts_init();
	lapic_timer_start(TICK_US);

	n = find_devices(boot_cmdline(), bases, MAX_DEVICES);
	report_dec("virtio-mmio devices", (u64)n);
	for (i = 0; i < n; i++) {
		if (report_device(bases[i]) == VIRTIO_ID_NET &&
		    reg_read(bases[i], REG_VERSION) == 2) {
			drive_net(bases[i], has_word(boot_cmdline(), "restart"));
			break;
		}
	}
	report("done");
	halt_forever();
}
