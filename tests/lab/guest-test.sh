# The lab guest's (L2) test script, run by the guest initramfs's /init. It reports what the
# guest sees of its machine, then does what `lab.mode=` on its command line asks.
mode=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.mode=//p')
# A distribution kernel's virtio drivers are modules: the stock kernel's initramfs carries
# them in /modules, to be loaded in this order.
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
	[ -f "/modules/$m.ko" ] && insmod "/modules/$m.ko"
done
echo "guest: nproc=$(nproc)"
echo "guest: memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "guest: cmdline=$(cat /proc/cmdline)"
echo "guest: vendor=$(sed -n 's/^vendor_id[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
echo "guest: flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
# The line before a warning says what is wrong (XSAVE consistency problems among them).
dmesg | grep -B1 -E 'WARNING|BUG|Call Trace' | sed 's/^/guest: dmesg-problem: /'
echo "guest: dmesg-problems=$(dmesg | grep -cE 'WARNING|BUG|Call Trace')"
echo "guest: acpi-madt=$(dmesg | grep -c 'Using ACPI (MADT) for SMP configuration information')"
echo "guest: uptime=$(cut -d" " -f1 /proc/uptime)"
echo "guest: clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# Where the boot spent its time: every kernel message that came 0.3 s or more after the one before.
dmesg | awk -F'[][]' '{ t = $2 + 0; if (NR > 1 && t - prev >= 0.3) printf "guest: slow-step %.2f s before: %s\n", t - prev, $3; prev = t }'
echo "guest: user space up"

# disk_node NAME: makes /dev/NAME when devtmpfs has not.
disk_node() {
	if [ ! -b "/dev/$1" ] && [ -r "/sys/block/$1/dev" ]; then
		mknod "/dev/$1" b $(tr ':' ' ' <"/sys/block/$1/dev")
	fi
}

# disk_size NAME: the disk's size in 512-byte sectors ("none" without such a disk).
disk_size() {
	cat "/sys/block/$1/size" 2>/dev/null || echo none
}

# wait_size NAME TEST VALUE: waits up to 60 s until `[ size TEST VALUE ]` holds.
wait_size() {
	i=0
	while ! [ "$(disk_size "$1")" "$2" "$3" ] && [ $i -lt 600 ]; do
		usleep 100000
		i=$((i + 1))
	done
}

# wait_carrier NIC VALUE: waits up to 60 s until the NIC's carrier is VALUE.
wait_carrier() {
	i=0
	while [ "$(cat "/sys/class/net/$1/carrier" 2>/dev/null)" != "$2" ] && [ $i -lt 600 ]; do
		usleep 100000
		i=$((i + 1))
	done
}

echo "guest: disks=$(ls /sys/block | grep -c '^vd')"
case "$mode" in
counter)
	i=0
	while :; do
		echo "guest: tick $i $(cut -d' ' -f1 /proc/uptime)"
		i=$((i + 1))
		usleep 100000
	done
	;;
sequence)
	# Once a disk is plugged in as vdb (lab.disk= names another), counts one number every 100 ms into a file on the
	# root tmpfs and into the number's own 4 KiB block of vdb (an O_DIRECT write, complete
	# when the disk acknowledged it), checking at each step that the file holds every number
	# before it. A number is printed only once both hold it: a VM restored from a snapshot
	# taken mid-run carries on the sequence where it was, with nothing lost or repeated.
	disk=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.disk=//p')
	disk=${disk:-vdb}
	echo "guest: seq waiting-for-disk"
	wait_size $disk -gt 0
	disk_node $disk
	i=0
	: >/seq
	while :; do
		lines=$(wc -l </seq)
		[ "$lines" = "$i" ] || echo "guest: seq-broken at $i with $lines lines"
		printf 'seq %08d\n' $i | dd of=/dev/$disk bs=4096 seek=$i conv=sync,notrunc oflag=direct \
			2>/dev/null || echo "guest: seq-disk-error at $i"
		echo $i >>/seq
		echo "guest: seq $i"
		i=$((i + 1))
		usleep 100000
	done
	;;
nic-pings)
	# A NIC present at boot (eth0): pings L1 over it for ever, an attempt every half second
	# or so (one more second when unanswered), each printed with its number and outcome. A VM restored from a snapshot taken meanwhile
	# carries on the count through its new backend.
	ip link set eth0 up
	ip addr add 10.77.1.2/24 dev eth0
	wait_carrier eth0 1
	echo "guest: eth0-carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null)"
	i=0
	while :; do
		ping -c 1 -W 1 10.77.1.1 >/dev/null 2>&1
		echo "guest: ping $i rc=$?"
		i=$((i + 1))
		usleep 500000
	done
	;;
reboot)
	reboot -f
	;;
disk)
	# The first virtio disk that is not an empty hot-replace slot: its first 24 bytes are the
	# host's marker; the guest writes its own at 4096 and flushes it to the backend.
	echo "guest: acpi-virtio=$(ls /sys/bus/acpi/devices | grep -c '^LNRO0005')"
	disk=
	for d in $(ls /sys/block | grep '^vd'); do
		if [ "$(disk_size "$d")" != 0 ]; then
			disk=$d
			break
		fi
	done
	echo "guest: disk-name=$disk"
	[ -n "$disk" ] && disk_node "$disk"
	if [ -n "$disk" ] && [ -b "/dev/$disk" ]; then
		echo "guest: disk-marker=$(dd if=/dev/$disk bs=24 count=1 2>/dev/null)"
		printf 'written-by-the-guest' | dd of=/dev/$disk bs=4096 seek=1 conv=fsync 2>/dev/null
		echo "guest: disk-write rc=$?"
	else
		# Say why: what the kernel logged about virtio devices.
		dmesg | grep -iE 'virtio|vda' | sed 's/^/guest: virtio: /'
		echo "guest: disk-write rc=no-disk"
	fi
	;;
bench-read)
	# Reads the first disk that is not an empty slot with O_DIRECT, 4 KiB and 128 KiB at a
	# time (one request in flight: busybox dd), and reports each read's milliseconds; then
	# 4 KiB random reads with 32 and with 1 in flight (aio-randread, Linux AIO), reporting
	# IOPS and MiB/s.
	disk=
	for d in $(ls /sys/block | grep '^vd'); do
		if [ "$(disk_size "$d")" != 0 ]; then
			disk=$d
			break
		fi
	done
	disk_node "$disk"
	for spec in 4k:2048 128k:512; do
		bs=${spec%%:*}
		count=${spec##*:}
		start=$(awk '{ printf "%d", $1 * 1000 }' /proc/uptime)
		dd if=/dev/$disk of=/dev/null bs=$bs count=$count iflag=direct 2>/dev/null
		rc=$?
		end=$(awk '{ printf "%d", $1 * 1000 }' /proc/uptime)
		echo "guest: read-$bs-rc=$rc"
		echo "guest: read-$bs-ms=$((end - start))"
	done
	for spec in 32:4096 1:256; do
		depth=${spec%%:*}
		aio-randread "/dev/$disk" "${spec##*:}" "$depth" >/tmp/randread.out 2>&1
		echo "guest: randread-qd$depth-rc=$?"
		sed "s/^/guest: randread-qd$depth-/" /tmp/randread.out
	done
	echo "guest: bench done"
	;;
hotplug | hotplug-raw)
	# A disk hot-plugged into slot 1 (vdb): the guest sees its new size, reads the host's
	# marker, makes a file system on it, writes a file and unmounts it (hotplug-raw: writes
	# its own marker at 4096 instead); then it waits for the slot to empty again.
	echo "guest: vdb-size-empty=$(disk_size vdb)"
	echo "guest: hotplug waiting"
	wait_size vdb -gt 0
	echo "guest: vdb-size=$(disk_size vdb)"
	echo "guest: vdb-new-size-messages=$(dmesg | grep -c 'vdb.*new size')"
	disk_node vdb
	echo "guest: vdb-marker=$(dd if=/dev/vdb bs=27 count=1 2>/dev/null)"
	if [ "$mode" = hotplug-raw ]; then
		printf 'written-by-the-guest' | dd of=/dev/vdb bs=4096 seek=1 conv=fsync 2>/dev/null
		echo "guest: raw-write=$?"
		echo "guest: hotplug unplug-ready"
		wait_size vdb -eq 0
		echo "guest: vdb-size-after=$(disk_size vdb)"
		echo "guest: hotplug unplugged"
		exec sleep 1000000
	fi
	# busybox makes ext2, which Linux's ext4 driver mounts.
	mke2fs -q /dev/vdb >/tmp/mkfs.out 2>&1
	echo "guest: mkfs=$?"
	mkdir -p /mnt
	mount -t ext4 /dev/vdb /mnt >>/tmp/mkfs.out 2>&1
	echo "guest: mount=$?"
	sed 's/^/guest: says: /' /tmp/mkfs.out
	echo citadel-lab-file-written-on-a-hot-plugged-disk >/mnt/file && sync
	echo "guest: file-write=$?"
	umount /mnt
	echo "guest: umount=$?"
	echo "guest: hotplug unplug-ready"
	wait_size vdb -eq 0
	echo "guest: vdb-size-after=$(disk_size vdb)"
	echo "guest: hotplug unplugged"
	;;
pci-hotplug)
	# Disks hot-plugged into a PCIe root port (q35), one after the other (lab.rounds=N, 1
	# unless given): each time pciehp finds the card and virtio-blk binds it as vda, the guest
	# reads the host's marker; in the first round it also makes a file system and writes a
	# file. Then it waits for the card to leave after the host's device_del.
	rounds=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.rounds=//p')
	r=1
	while [ $r -le "${rounds:-1}" ]; do
		echo "guest: pci-hotplug waiting $r"
		i=0
		until [ "$(cat /sys/block/vda/size 2>/dev/null || echo 0)" -gt 0 ] || [ $i -ge 600 ]; do
			usleep 100000
			i=$((i + 1))
		done
		echo "guest: round$r-size=$(disk_size vda)"
		disk_node vda
		echo "guest: round$r-marker=$(dd if=/dev/vda bs=27 count=1 2>/dev/null)"
		if [ $r = 1 ]; then
			mke2fs -q /dev/vda >/tmp/mkfs.out 2>&1
			echo "guest: mkfs=$?"
			mkdir -p /mnt
			mount -t ext4 /dev/vda /mnt >>/tmp/mkfs.out 2>&1
			echo "guest: mount=$?"
			sed 's/^/guest: says: /' /tmp/mkfs.out
			echo citadel-lab-file-written-on-a-pci-disk >/mnt/file && sync
			echo "guest: file-write=$?"
			umount /mnt
			echo "guest: umount=$?"
		fi
		rm -f /dev/vda
		# The card's MSI-X vectors (sysfs says which of its interrupts are MSI-X), and how many
		# of them have fired.
		vectors=0 fired=0
		for irq in $(ls /sys/bus/pci/devices/0000:01:00.0/msi_irqs 2>/dev/null); do
			[ "$(cat /sys/bus/pci/devices/0000:01:00.0/msi_irqs/$irq)" = msix ] || continue
			vectors=$((vectors + 1))
			[ "$(awk -v irq="$irq:" '$1 == irq { print $2 }' /proc/interrupts)" -gt 0 ] 2>/dev/null &&
				fired=$((fired + 1))
		done
		echo "guest: round$r-msix-vectors=$vectors"
		echo "guest: round$r-msix-fired=$fired"
		# Its INTx line (used only without MSI and MSI-X): the interrupt controller, and how
		# often it fired.
		irq=$(cat /sys/bus/pci/devices/0000:01:00.0/irq 2>/dev/null)
		echo "guest: round$r-intx-chip=$(awk -v irq="$irq:" '$1 == irq { print $3 }' /proc/interrupts)"
		echo "guest: round$r-intx-count=$(awk -v irq="$irq:" '$1 == irq { print $2 }' /proc/interrupts)"
		echo "guest: pci-hotplug unplug-ready $r"
		wait_size vda = none
		echo "guest: round$r-after=$(disk_size vda)"
		r=$((r + 1))
	done
	echo "guest: pci-hotplug done"
	dmesg | grep -iE 'pciehp|virtio|0000:01:00' | tail -n 30 | sed 's/^/guest: dmesg: /'
	echo "guest: hotplug-errors=$(dmesg | grep -iE 'pciehp|aer|0000:01:00' | grep -ciE 'fail|error|timeout|unable|can.t')"
	;;
vfio-edu)
	# L1's edu device (1234:11e8) passed through by Citadel into a PCIe root port (q35), one
	# plug after the other (lab.rounds=N, 1 unless given): each time pciehp finds it, edu-probe
	# drives it (registers, DMA both ways, an MSI to vector 223, which no driver here owns, so
	# the kernel logs "No irq handler" for it when it arrives); its lines are reported as
	# roundN-edu-KEY. Then the guest waits for the device to leave after the host's device_del.
	rounds=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.rounds=//p')
	# The kernel's line for a message on a vector nobody handles, on CPU 0 (its format is
	# "%s: %d.%u No irq handler for vector").
	stray=' 0\.223 No irq handler for vector'
	r=1
	while [ $r -le "${rounds:-1}" ]; do
		echo "guest: vfio-edu waiting $r"
		edu=
		i=0
		while [ -z "$edu" ] && [ $i -lt 1200 ]; do
			for dev in /sys/bus/pci/devices/*; do
				[ "$(cat $dev/vendor 2>/dev/null):$(cat $dev/device 2>/dev/null)" = 0x1234:0x11e8 ] && edu=$dev
			done
			[ -n "$edu" ] || usleep 100000
			i=$((i + 1))
		done
		echo "guest: round$r-address=${edu##*/}"
		[ -n "$edu" ] || break
		before=$(dmesg | grep -c "$stray")
		edu-probe "$edu" >/tmp/edu.out 2>/tmp/edu.err
		echo "guest: round$r-probe-rc=$?"
		sed -n "s/^edu-\([a-z-]*\) /guest: round$r-edu-\1=/p" /tmp/edu.out
		sed 's/^/guest: says: /' /tmp/edu.err
		i=0
		while [ "$(dmesg | grep -c "$stray")" -le "$before" ] && [ $i -lt 50 ]; do
			usleep 100000
			i=$((i + 1))
		done
		echo "guest: round$r-edu-msi=$([ "$(dmesg | grep -c "$stray")" -gt "$before" ] && echo seen || echo none)"
		echo "guest: vfio-edu unplug-ready $r"
		i=0
		while [ -e "$edu" ] && [ $i -lt 1200 ]; do
			usleep 100000
			i=$((i + 1))
		done
		echo "guest: round$r-after=$([ -e "$edu" ] && echo present || echo gone)"
		r=$((r + 1))
	done
	echo "guest: vfio-edu done"
	dmesg | grep -iE 'pciehp|0000:01:00|No irq handler' | tail -n 30 | sed 's/^/guest: dmesg: /'
	echo "guest: hotplug-errors=$(dmesg | grep -iE 'pciehp|aer|0000:01:00' | grep -ciE 'fail|error|timeout|unable|can.t')"
	;;
pci-nic)
	# A NIC hot-plugged into a PCIe root port (q35): eth0 appears once pciehp finds the card
	# and virtio-net binds it; the guest pings L1 over the tap, sends it 4 MiB and receives
	# 4 MiB from it (busybox nc; L1 listens), reports the checksums, and then waits for eth0
	# to go after the host's device_del.
	dd if=/dev/urandom of=/tmp/tx bs=1M count=4 2>/dev/null
	echo "guest: tx-md5=$(md5sum </tmp/tx | cut -d' ' -f1)"
	mkfifo /tmp/hold
	sleep 1000000 >/tmp/hold &
	hold=$!
	echo "guest: pci-nic waiting"
	i=0
	until [ -e /sys/class/net/eth0 ] || [ $i -ge 600 ]; do
		usleep 100000
		i=$((i + 1))
	done
	echo "guest: eth0-mac=$(cat /sys/class/net/eth0/address 2>/dev/null)"
	ip link set eth0 up
	ip addr add 10.77.1.2/24 dev eth0
	wait_carrier eth0 1
	echo "guest: eth0-carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null)"
	ping -c 3 -w 30 10.77.1.1 >/tmp/ping.out 2>&1
	echo "guest: ping=$?"
	sed 's/^/guest: says: /' /tmp/ping.out
	nc 10.77.1.1 5000 </tmp/tx >/dev/null
	echo "guest: send=$?"
	nc 10.77.1.1 6000 </tmp/hold >/tmp/rx
	echo "guest: receive=$?"
	echo "guest: rx-md5=$(md5sum </tmp/rx | cut -d' ' -f1)"
	echo "guest: rx-size=$(wc -c </tmp/rx)"
	kill $hold
	echo "guest: pci-nic unplug-ready"
	i=0
	while [ -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do
		usleep 100000
		i=$((i + 1))
	done
	echo "guest: eth0-after=$([ -e /sys/class/net/eth0 ] && echo present || echo gone)"
	echo "guest: hotplug-errors=$(dmesg | grep -iE 'pciehp|aer|0000:01:00' | grep -ciE 'fail|error|timeout|unable|can.t')"
	echo "guest: pci-nic done"
	;;
blk-restart)
	# A disk hot-plugged into slot 1 (vdb; lab.disk= names another, a PCI card's vda) takes
	# 2048 numbered 4 KiB blocks from dd while L1 kills its backend: dd must succeed and the
	# kernel must log no I/O error.
	disk=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.disk=//p')
	disk=${disk:-vdb}
	awk 'BEGIN { for (i = 0; i < 2048; i++) printf "%-4095s\n", "citadel-lab-restart-block-" i }' >/tmp/blocks
	echo "guest: restart waiting"
	wait_size $disk -gt 0
	disk_node $disk
	echo "guest: restart writing"
	dd if=/tmp/blocks of=/dev/$disk bs=4k count=2048 oflag=direct 2>/tmp/dd.out
	echo "guest: dd-rc=$?"
	sed 's/^/guest: says: /' /tmp/dd.out
	echo "guest: io-errors=$(dmesg | grep $disk | grep -ciE 'error|critical')"
	echo "guest: restart written"
	;;
nic)
	# NIC slot 0 (eth0), empty at boot: its link is down until a NIC is plugged; the guest
	# then pings L1 over the tap, and waits for the unplug to take the carrier down again.
	echo "guest: nics=$(ls /sys/class/net | grep -c '^eth')"
	echo "guest: eth0-mac=$(cat /sys/class/net/eth0/address)"
	ip link set eth0 up
	ip addr add 10.77.1.2/24 dev eth0
	echo "guest: eth0-carrier-empty=$(cat /sys/class/net/eth0/carrier)"
	echo "guest: nic waiting"
	wait_carrier eth0 1
	echo "guest: eth0-carrier=$(cat /sys/class/net/eth0/carrier)"
	ping -c 3 -w 30 10.77.1.1 >/tmp/ping.out 2>&1
	echo "guest: ping=$?"
	sed 's/^/guest: says: /' /tmp/ping.out
	echo "guest: nic unplug-ready"
	wait_carrier eth0 0
	echo "guest: eth0-carrier-after=$(cat /sys/class/net/eth0/carrier)"
	echo "guest: nic unplugged"
	;;
balloon | balloon-oom)
	# The balloon. Both first back about 200 MiB of RAM (a tmpfs file written and deleted),
	# so that the pages the balloon takes are ones the host really holds.
	# balloon: without deflate-on-oom the pages the balloon holds leave MemTotal; the guest
	# reports MemTotal once it dropped below 60% (inflated) and once it is back (deflated).
	# balloon-oom: with deflate-on-oom MemTotal stays; once MemFree dropped by 100 MiB the
	# guest writes more than the target leaves it and reports whether that worked. Its
	# device reports free pages too: the file's pages go back to the host once deleted.
	memtotal() { sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
	memfree() { sed -n 's/^MemFree: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
	# wait_kb FUNCTION TEST VALUE: waits up to 180 s until `[ $(FUNCTION) TEST VALUE ]` holds.
	wait_kb() {
		i=0
		while ! [ "$($1)" "$2" "$3" ] && [ $i -lt 1800 ]; do
			usleep 100000
			i=$((i + 1))
		done
	}
	mkdir -p /fill
	mount -t tmpfs -o size=220m tmpfs /fill
	dd if=/dev/zero of=/fill/pages bs=1M count=200 2>/dev/null
	echo "guest: balloon-fill=$?"
	# The host measures its memory while the file exists.
	echo "guest: balloon written"
	sleep 3
	rm -f /fill/pages
	before=$(memtotal)
	echo "guest: balloon-memtotal-before-kb=$before"
	if [ "$mode" = balloon ]; then
		echo "guest: balloon filled"
		wait_kb memtotal -lt $((before * 6 / 10))
		# The driver inflates a MiB at a time: wait until MemTotal stops moving.
		prev=0
		while [ "$(memtotal)" != "$prev" ]; do
			prev=$(memtotal)
			sleep 1
		done
		echo "guest: balloon-memtotal-inflated-kb=$(memtotal)"
		echo "guest: balloon inflated"
		wait_kb memtotal -ge "$before"
		echo "guest: balloon-memtotal-deflated-kb=$(memtotal)"
		echo "guest: balloon deflated"
	else
		free=$(memfree)
		echo "guest: balloon filled"
		wait_kb memfree -lt $((free - 100 * 1024))
		echo "guest: balloon-oom-memfree-inflated-kb=$(memfree)"
		# 170 MiB, more than the 128 MiB the target leaves.
		dd if=/dev/zero of=/fill/pages bs=1M count=170 2>/dev/null
		echo "guest: balloon-oom-alloc=$?"
		echo "guest: balloon-oom-kills=$(dmesg | grep -c 'Killed process')"
		rm -f /fill/pages
		echo "guest: balloon oom-done"
	fi
	umount /fill
	;;
disks-six)
	# Six disks plugged at once, one per slot: the guest waits for each slot's new size and
	# reads the marker of the disk in it, then waits for every slot to empty again.
	echo "guest: disks-six waiting"
	for d in vda vdb vdc vdd vde vdf; do
		wait_size $d -gt 0
		echo "guest: $d-size=$(disk_size $d)"
		disk_node $d
		echo "guest: $d-marker=$(dd if=/dev/$d bs=23 count=1 2>/dev/null)"
	done
	echo "guest: disks-six unplug-ready"
	for d in vda vdb vdc vdd vde vdf; do
		wait_size $d -eq 0
		echo "guest: $d-size-after=$(disk_size $d)"
	done
	echo "guest: disks-six unplugged"
	;;
disk-readonly)
	# A read-only disk in slot 2 (vdc): the guest reads the host's marker, then tries an
	# O_DIRECT write, which must fail (the slot's features were negotiated at boot, so the
	# driver does not know the disk is read-only: the backend refuses the write), and reads the
	# marker again.
	echo "guest: disk-readonly waiting"
	wait_size vdc -gt 0
	echo "guest: vdc-size=$(disk_size vdc)"
	disk_node vdc
	echo "guest: ro-marker=$(dd if=/dev/vdc bs=29 count=1 2>/dev/null)"
	dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=notrunc oflag=direct >/tmp/ro.out 2>&1
	echo "guest: ro-write=$?"
	sed 's/^/guest: says: /' /tmp/ro.out
	echo "guest: ro-marker-after=$(dd if=/dev/vdc bs=4096 count=1 iflag=direct 2>/dev/null | head -c 29)"
	echo "guest: disk-readonly unplug-ready"
	wait_size vdc -eq 0
	echo "guest: vdc-size-after=$(disk_size vdc)"
	echo "guest: disk-readonly unplugged"
	;;
disk-replug)
	# The same image plugged into slot 3 (vdd) round after round: each round the guest reports
	# the size it sees and the counter the round before wrote at 4096, writes its own with
	# O_DIRECT, and waits for the unplug. L1 decides how many rounds there are.
	echo "guest: disk-replug waiting"
	round=1
	while :; do
		wait_size vdd -gt 0
		echo "guest: replug-$round-size=$(disk_size vdd)"
		disk_node vdd
		echo "guest: replug-$round-read=$(dd if=/dev/vdd bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | tr -d '\000')"
		printf 'replug-round-%02d' $round |
			dd of=/dev/vdd bs=4096 seek=1 conv=sync,notrunc oflag=direct 2>/dev/null
		echo "guest: replug-$round-write=$?"
		echo "guest: replug round $round written"
		wait_size vdd -eq 0
		echo "guest: replug round $round unplugged"
		round=$((round + 1))
	done
	;;
nic-two)
	# NICs in both slots, eth0 on 10.77.1.0/24 and eth1 on 10.77.2.0/24: over each the guest
	# pings L1, sends it 10 MiB and receives 10 MiB from it (busybox nc; L1 listens), reports
	# the checksums and the NIC's byte counters, and then waits for both carriers to drop.
	for n in 0 1; do
		ip link set eth$n up
		ip addr add 10.77.$((n + 1)).2/24 dev eth$n
	done
	dd if=/dev/urandom of=/tmp/tx bs=1M count=10 2>/dev/null
	echo "guest: tx-md5=$(md5sum </tmp/tx | cut -d' ' -f1)"
	# Busybox nc ends the connection as soon as its standard input ends: the receiving one
	# reads a FIFO that stays open and silent.
	mkfifo /tmp/hold
	sleep 1000000 >/tmp/hold &
	hold=$!
	echo "guest: nic-two waiting"
	for n in 0 1; do
		wait_carrier eth$n 1
		echo "guest: eth$n-carrier=$(cat /sys/class/net/eth$n/carrier)"
	done
	for n in 0 1; do
		l1=10.77.$((n + 1)).1
		ping -c 3 -w 30 $l1 >/tmp/ping.out 2>&1
		echo "guest: eth$n-ping=$?"
		sed 's/^/guest: says: /' /tmp/ping.out
		start=$(awk '{ printf "%d", $1 * 1000 }' /proc/uptime)
		nc $l1 500$n </tmp/tx >/dev/null
		echo "guest: eth$n-send=$?"
		mid=$(awk '{ printf "%d", $1 * 1000 }' /proc/uptime)
		nc $l1 600$n </tmp/hold >/tmp/rx
		echo "guest: eth$n-receive=$?"
		end=$(awk '{ printf "%d", $1 * 1000 }' /proc/uptime)
		echo "guest: eth$n-send-ms=$((mid - start))"
		echo "guest: eth$n-receive-ms=$((end - mid))"
		echo "guest: eth$n-rx-md5=$(md5sum </tmp/rx | cut -d' ' -f1)"
		echo "guest: eth$n-rx-size=$(wc -c </tmp/rx)"
		rm -f /tmp/rx
	done
	for n in 0 1; do
		echo "guest: eth$n-rx-bytes=$(cat /sys/class/net/eth$n/statistics/rx_bytes)"
		echo "guest: eth$n-tx-bytes=$(cat /sys/class/net/eth$n/statistics/tx_bytes)"
	done
	kill $hold
	echo "guest: nic-two unplug-ready"
	for n in 0 1; do
		wait_carrier eth$n 0
		echo "guest: eth$n-carrier-after=$(cat /sys/class/net/eth$n/carrier)"
	done
	echo "guest: nic-two unplugged"
	;;
pci)
	# What Linux made of a PCI Express machine. From sysfs: every PCI function
	# (ADDRESS=VENDOR:DEVICE/CLASS), its driver, the size of its config space (4096 once Linux
	# reaches the extended space, through ECAM), the bridge windows of each PCI bridge, the
	# PCIe port services, the hotplug slots and the interrupts of pciehp. From the kernel's
	# log: the ACPI host bridge and its windows, MMCONFIG, the _OSC negotiation, each slot
	# pciehp registered with its capabilities, and every line that says something failed.
	# `dmesg -r` keeps each line's level (`<N>`); `log` is the log without the timestamps.
	dmesg -r >/tmp/dmesg.raw
	sed 's/^<[0-9]*>//; s/^\[[^]]*\] //' /tmp/dmesg.raw >/tmp/log
	# after TEXT: what follows TEXT on the log's lines that contain it, joined by "; ".
	after() {
		grep -F -- "$1" /tmp/log | sed "s/.*$1//" | tr '\n' ';' | sed 's/;$//; s/;/; /g'
	}
	hex() { sed 's/^0x//' "$1"; }
	functions= drivers= sizes= windows=
	for dev in /sys/bus/pci/devices/*; do
		[ -e "$dev" ] || continue
		a=${dev##*/}
		functions="$functions $a=$(hex $dev/vendor):$(hex $dev/device)/$(hex $dev/class)"
		driver=none
		[ -L "$dev/driver" ] && driver=$(basename "$(readlink "$dev/driver")")
		drivers="$drivers $a=$driver"
		sizes="$sizes $a=$(wc -c <"$dev/config")"
		# A bridge's windows (I/O, memory, prefetchable) are the first three of the last four
		# lines of its `resource` file (which has SR-IOV's six lines before them or not).
		case "$(hex $dev/class)" in
		0604*)
			w=$(awk '
				{ start[NR] = $1; end[NR] = $2 }
				END {
					split("io mem pref", name)
					for (i = 1; i <= 3; i++) {
						n = NR - 4 + i
						if (end[n] != "0x0000000000000000")
							out = out (out ? "," : "") name[i] ":" start[n] "-" end[n]
					}
					print out ? out : "none"
				}' "$dev/resource" | sed 's/0x0*\([0-9a-f]\)/0x\1/g')
			windows="$windows $a=$w"
			;;
		esac
	done
	echo "guest: pci-functions=${functions# }"
	echo "guest: pci-drivers=${drivers# }"
	echo "guest: pci-config-sizes=${sizes# }"
	echo "guest: pci-bridge-windows=${windows# }"
	echo "guest: pcie-services=$(ls /sys/bus/pci_express/devices 2>/dev/null | tr '\n' ' ' | sed 's/ $//')"
	slots=
	for s in /sys/bus/pci/slots/*; do
		[ -e "$s/address" ] && slots="$slots ${s##*/}=$(cat "$s/address")"
	done
	echo "guest: pci-slots=${slots# }"
	# pciehp's own line per slot, `pcieport PORT: pciehp: Slot #N FLAGS` (`pciehp
	# PORT:pcie004: Slot #N FLAGS` before Linux 5.1), reported as `pciehp-slot-N=PORT FLAGS`.
	sed -n 's/^[a-z]* \([0-9a-f]\{4\}:[0-9a-f]\{2\}:[0-9a-f]\{2\}\.[0-7]\)[^ ]* \(pciehp: \)\{0,1\}Slot #\([0-9]*\) \(AttnBtn.*\)/guest: pciehp-slot-\3=\1 \4/p' /tmp/log
	echo "guest: pciehp-slots=$(grep -c ' Slot #[0-9]* AttnBtn' /tmp/log)"
	echo "guest: pciehp-irqs=$(grep -c pciehp /proc/interrupts)"
	echo "guest: pciehp-msi-irqs=$(grep pciehp /proc/interrupts | grep -c PCI-MSI)"
	echo "guest: acpi-pci-root=$(grep -F 'ACPI: PCI Root Bridge' /tmp/log)"
	echo "guest: acpi-host-bridge-windows=$(grep -c 'PCI: Using host bridge windows from ACPI' /tmp/log)"
	echo "guest: root-bus-resources=$(after 'root bus resource ')"
	echo "guest: mmconfig=$(after 'PCI: MMCONFIG for ')"
	echo "guest: mmconfig-reserved=$(after 'PCI: MMCONFIG at ')"
	echo "guest: config-access=$(sed -n 's/^PCI: Using configuration type \([0-9]\) for \([a-z]*\) access$/\1:\2/p' /tmp/log | tr '\n' ' ' | sed 's/ $//')"
	echo "guest: osc-supports=$(after 'PNP0A08:00: _OSC: OS supports ')"
	echo "guest: osc-controls=$(after 'PNP0A08:00: _OSC: OS now controls ')"
	echo "guest: osc-not-granted=$(after 'PNP0A08:00: _OSC: platform does not support ')"
	# What failed: a line of level warning or worse about PCI, AER, MMCONFIG or the host
	# bridge, or one saying MMCONFIG, a resource, a hotplug command, _OSC or AER failed.
	failed='PCI: Fatal|not reserved|not using MMCONFIG|fail to add MMCONFIG'
	failed="$failed|failed to assign|can.t claim|can.t assign|no space for|no compatible bridge window"
	failed="$failed|Timeout on hotplug command|no response from device|Cannot get irq"
	failed="$failed|_OSC: (not requesting|OS requested|platform willing|platform retains)|_OSC failed"
	failed="$failed|AER: .*[Ee]rror"
	{
		grep -E '^<[0-4]>' /tmp/dmesg.raw | sed 's/^<[0-9]*>//; s/^\[[^]]*\] //' |
			grep -E 'pci|PCI|AER|MMCONFIG|ECAM|PNP0A0[38]|BAR'
		grep -E "$failed" /tmp/log
	} | sort -u >/tmp/pci-problems
	# The kernel's PCI lines, for the transcript.
	grep -E 'pci|PCI|AER|MMCONFIG|ECAM|PNP0A0[38]' /tmp/log | grep -v 'command line' |
		sed 's/^/guest: pci-log: /'
	sed 's/^/guest: pci-problem: /' /tmp/pci-problems
	echo "guest: pci-problems=$(grep -c . /tmp/pci-problems)"
	# Every line of level error or worse, whatever it is about.
	grep -E '^<[0-3]>' /tmp/dmesg.raw | sed 's/^<[0-9]*>//; s/^/guest: kernel-error: /'
	echo "guest: kernel-errors=$(grep -cE '^<[0-3]>' /tmp/dmesg.raw)"
	echo "guest: pci done"
	;;
esac
echo "guest: end"
exec sleep 1000000
