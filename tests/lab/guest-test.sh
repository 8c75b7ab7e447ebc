# The lab guest's (L2) test script, run by the guest initramfs's /init. It reports what the
# guest sees of its machine, then does what `lab.mode=` on its command line asks.
mode=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.mode=//p')
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
case "$mode" in
counter)
	i=0
	while :; do
		echo "guest: tick $i $(cut -d' ' -f1 /proc/uptime)"
		i=$((i + 1))
		usleep 100000
	done
	;;
reboot)
	reboot -f
	;;
disk)
	# The first virtio disk: its first 24 bytes are the host's marker; the guest writes its
	# own at 4096 and flushes it to the backend.
	if [ ! -b /dev/vda ] && [ -r /sys/block/vda/dev ]; then
		mknod /dev/vda b $(tr ':' ' ' </sys/block/vda/dev)
	fi
	echo "guest: acpi-virtio=$(ls /sys/bus/acpi/devices | grep -c '^LNRO0005')"
	if [ -b /dev/vda ]; then
		echo "guest: disk-marker=$(dd if=/dev/vda bs=24 count=1 2>/dev/null)"
		printf 'written-by-the-guest' | dd of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null
		echo "guest: disk-write rc=$?"
	else
		# Say why: what the kernel logged about virtio devices.
		dmesg | grep -iE 'virtio|vda' | sed 's/^/guest: virtio: /'
		echo "guest: disk-write rc=no-disk"
	fi
	;;
esac
echo "guest: end"
exec sleep 1000000
