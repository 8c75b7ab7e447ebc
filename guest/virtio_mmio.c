/* Device discovery and register handling shared by the virtio guest programs. */
#include "virtio_mmio.h"

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

int find_devices(const char *cmdline, u64 *bases, int max)
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

int has_word(const char *cmdline, const char *word)
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

static void report_hex(const char *key, u64 v)
{
	serial_puts(" ");
	serial_puts(key);
	serial_puts("=");
	serial_put_hex(v);
}

u32 report_device(u64 base)
{
	u32 device;

	serial_puts("citadel-guest: virtio-mmio");
	report_hex("base", base);
	if (reg_read(base, REG_MAGIC) != VIRTIO_MMIO_MAGIC) {
		serial_puts(" magic=bad\n");
		return 0;
	}
	device = reg_read(base, REG_DEVICE_ID);
	serial_puts(" version=");
	serial_put_dec(reg_read(base, REG_VERSION));
	serial_puts(" device=");
	serial_put_dec(device);
	report_hex("vendor", reg_read(base, REG_VENDOR_ID));
	serial_puts("\n");
	return device;
}

int wait_config_change(u64 base, u64 timeout_ms)
{
	u64 deadline = timer_ticks_now() + timeout_ms;

	while (!(reg_read(base, REG_INTERRUPT_STATUS) & ISR_CONFIG)) {
		if (timer_ticks_now() >= deadline)
			return 0;
		__asm__ volatile("sti; hlt; cli");
	}
	reg_write(base, REG_INTERRUPT_ACK, ISR_CONFIG);
	return 1;
}

void pause_ms(u64 ms)
{
	u64 deadline = timer_ticks_now() + ms;

	while (timer_ticks_now() < deadline)
		__asm__ volatile("sti; hlt; cli");
}

int setup_queue(u64 base, u32 index, struct virtq *q)
{
	reg_write(base, REG_QUEUE_SEL, index);
	if (reg_read(base, REG_QUEUE_NUM_MAX) < QUEUE_SIZE)
		return 0;
	reg_write(base, REG_QUEUE_NUM, QUEUE_SIZE);
	reg_write(base, REG_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	reg_write(base, REG_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	reg_write(base, REG_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail);
	reg_write(base, REG_QUEUE_DRIVER_HIGH, (u32)((u64)&q->avail >> 32));
	reg_write(base, REG_QUEUE_DEVICE_LOW, (u32)(u64)&q->used);
	reg_write(base, REG_QUEUE_DEVICE_HIGH, (u32)((u64)&q->used >> 32));
	reg_write(base, REG_QUEUE_READY, 1);
	return 1;
}

int wait_used(struct virtq *q, u16 expected, u64 timeout_ms)
{
	u64 deadline = timer_ticks_now() + timeout_ms;

	while (*(volatile u16 *)&q->used.idx != expected) {
		if (timer_ticks_now() >= deadline)
			return 0;
		__asm__ volatile("sti; pause; cli");
	}
	barrier();
	return 1;
}
