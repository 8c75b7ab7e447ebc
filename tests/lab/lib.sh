# Helpers for lab scenarios (sourced in L1's busybox sh). A scenario runs Citadel (L2), drives
# it with citadel-qmp, and reports with `result KEY VALUE`; the test on the host asserts the
# results. Every L2 serial line reaches L1's console as `[L2 NAME] ...` and every QMP exchange
# as `[qmp NAME >] ...` / `[qmp NAME <] ...`.

GUEST=/lab/guest
# Citadel's info lines (a triple fault, a guest reset) go into the transcript too.
export RUST_LOG="${RUST_LOG:-info}"

# result KEY VALUE: one line the host-side test reads.
result() {
	echo "lab-result: $SCENARIO $1=$2"
}

# Milliseconds since L1 booted.
now_ms() {
	awk '{ printf "%d", $1 * 1000 }' /proc/uptime
}

# l2_start NAME COMMAND...: runs COMMAND (citadel with -serial stdio, or the jailer) in the
# background; its output is tagged on the console and kept in /tmp/NAME.log. Sets L2_PID.
# The guest's serial output (stdout) and Citadel's log (stderr) are read as two streams: a
# log line written while the guest is in the middle of a line must not split that line.
l2_start() {
	name=$1
	shift
	rm -f "/tmp/$name.log" "/tmp/$name.fifo" "/tmp/$name.err.fifo"
	: >"/tmp/$name.log"
	mkfifo "/tmp/$name.fifo" "/tmp/$name.err.fifo"
	l2_tag "$name" "/tmp/$name.fifo" &
	l2_tag "$name" "/tmp/$name.err.fifo" &
	"$@" >"/tmp/$name.fifo" 2>"/tmp/$name.err.fifo" &
	L2_PID=$!
	echo "$L2_PID" >"/tmp/$name.pid"
}

# l2_tag NAME FIFO: copies FIFO's lines to NAME's log and, tagged, to the console.
l2_tag() {
	tr -d '\r' <"$2" | while IFS= read -r line; do
		echo "$line" >>"/tmp/$1.log"
		echo "[L2 $1] $line"
	done
}

# l2_wait NAME TEXT SECONDS: waits until NAME's output has a line containing TEXT, at most
# SECONDS, and no longer than a second after NAME's process ended (a guest that triple-faulted
# or a Citadel that died says nothing more; waiting out the time only delays a retry). Its
# deadline has a name of its own: `exited` sets `deadline`, and sh functions share variables.
l2_wait() {
	until_ms=$(($(now_ms) + $3 * 1000))
	ended=
	while ! grep -qF -- "$2" "/tmp/$1.log"; do
		if [ -n "$ended" ]; then
			echo "lab: $1 ended without saying '$2'"
			dmesg | grep -E 'type=1326|Killed process|oom-kill|segfault|traps:' | tail -n 5 |
				sed 's/^/lab: kernel: /'
			return 1
		fi
		if exited "$(cat "/tmp/$1.pid" 2>/dev/null)" 0; then
			# Its last lines may still be on their way through the tagging readers.
			sleep 1
			ended=yes
			continue
		fi
		if [ "$(now_ms)" -ge "$until_ms" ]; then
			echo "lab: timed out after $3 s waiting for '$2' from $1"
			# A Citadel or backend killed by the kernel (a seccomp kill, the OOM killer, a
			# fault) leaves no line of its own: the kernel's log says which and why.
			dmesg | grep -E 'type=1326|Killed process|oom-kill|segfault|traps:' | tail -n 5 |
				sed 's/^/lab: kernel: /'
			return 1
		fi
		usleep 20000
	done
}

# l2_count NAME TEXT: how many lines of NAME's output contain TEXT.
l2_count() {
	grep -cF -- "$2" "/tmp/$1.log"
}

# l2_value NAME KEY: the value of the last `guest: KEY=value` line of NAME's output.
l2_value() {
	sed -n "s/^guest: $2=//p" "/tmp/$1.log" | tail -n1
}

# qmp NAME STEP...: citadel-qmp against /tmp/NAME.qmp (see citadel-qmp for the steps).
qmp() {
	name=$1
	shift
	citadel-qmp --tag "qmp $name" --timeout 30 "/tmp/$name.qmp" "$@"
}

# exited PID SECONDS: waits for PID to end; true if it did.
exited() {
	deadline=$(($(now_ms) + $2 * 1000))
	while [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; do
		[ "$(now_ms)" -ge "$deadline" ] && return 1
		usleep 20000
	done
}

# gone_within PID SECONDS: "yes" once process PID no longer exists, within SECONDS; "no"
# otherwise, and for an empty PID.
gone_within() {
	deadline=$(($(now_ms) + $2 * 1000))
	while [ -n "$1" ] && [ "$(now_ms)" -lt "$deadline" ]; do
		[ -d "/proc/$1" ] || {
			echo yes
			return
		}
		usleep 100000
	done
	echo no
}

# l1_function VENDOR:DEVICE: the address of L1's PCI function with these ids (as sysfs writes
# them, 0x1234:0x11e8), empty if there is none.
l1_function() {
	for dev in /sys/bus/pci/devices/*; do
		[ "$(cat $dev/vendor):$(cat $dev/device)" = "$1" ] && echo "${dev##*/}" && return
	done
}

# l1_driver ADDRESS: the driver L1's PCI function ADDRESS is bound to (empty if none).
l1_driver() {
	basename "$(readlink /sys/bus/pci/devices/$1/driver)"
}

# qmp_desc FILE: the desc of the last error reply in a citadel-qmp transcript.
qmp_desc() {
	grep -o '"desc":"[^"]*"' "$1" | tail -n1 | sed 's/^"desc":"//; s/"$//'
}

# boot_guest NAME KERNEL SMP MEMORY_MIB MODE [EXTRA CITADEL ARGS...]: boots the guest
# initramfs (or $INITRD) under Citadel, on the $MACHINE machine type (microvm unless set);
# MODE selects what the guest's test script does (see guest-test.sh).
# The kernel boots `quiet`: every console byte is a port-I/O exit through two levels of
# virtualization, and the guest's own dmesg is checked by its test script.
boot_guest() {
	name=$1 kernel=$2 smp=$3 mem=$4 mode=$5
	shift 5
	l2_start "$name" citadel -machine "${MACHINE:-microvm}" -kernel "$kernel" -initrd "${INITRD:-$GUEST/initramfs.cpio.gz}" \
		-append "console=ttyS0 panic=-1 quiet lab.mode=$mode" -smp "$smp" -m "$mem" \
		-qmp "unix:/tmp/$name.qmp,server,nowait" -serial stdio "$@"
}

# stop_guest NAME: QMP quit, then records whether the VM ended and its exit status (a signal
# shows as 128 + its number).
stop_guest() {
	exited "$L2_PID" 0 || qmp "$1" '{"execute":"quit"}' >/dev/null
	if exited "$L2_PID" 10; then
		wait "$L2_PID"
		result "$1.exit-code" $?
	fi
}

# shutdown_data FILE: the data of the SHUTDOWN event in a citadel-qmp transcript.
shutdown_data() {
	grep -F '"event":"SHUTDOWN"' "$1" | grep -o '"data":{[^}]*}' | head -n1
}

# boot_and_report NAME KERNEL SMP SECONDS: boots KERNEL with SMP vCPUs and 256 MiB in report
# mode, reports how long it took to reach user space and what the guest saw, then quits it.
#
# A guest that triple-faults before its report is done is booted once more, and the test sees
# `NAME.retried`: QEMU's TCG emulation of nested SVM here sometimes corrupts L1's own state on
# a VM exit (L1 has died of it with a bad GS base in its page-fault entry), and an L2 guest's
# state can suffer the same. A guest that fails twice fails the test.
boot_and_report() {
	attempt=1
	while :; do
		start=$(now_ms)
		boot_guest "$1" "$2" "$3" 256 report
		l2_wait "$1" "guest: user space up" "$4" && result "$1.boot_ms" $(($(now_ms) - start))
		l2_wait "$1" "guest: end" 10 && break
		grep -q 'triple fault' "/tmp/$1.log" && [ $attempt = 1 ] || break
		echo "lab: $1 triple-faulted before its report; booting it once more"
		result "$1.retried" "triple fault"
		stop_guest "$1"
		attempt=2
	done
	for key in nproc memtotal_kb cmdline dmesg-problems clocksource acpi-madt; do
		result "$1.$key" "$(l2_value "$1" $key)"
	done
	stop_guest "$1"
}

# pci_disk_rounds NAME IMAGE ROUNDS: NAME's q35 guest runs in pci-hotplug mode with
# lab.rounds=ROUNDS and root port pcie.1; once it waits for its first disk (the caller waited
# for that), plugs IMAGE into the port as virtio-blk-pci card drive-0 (blockdev-add and
# device_add), waits for the guest to be done with it, unplugs it (device_del, answered at
# once, DEVICE_DELETED following once the guest released the slot; then blockdev-del), and
# does so ROUNDS times. Each odd round but the last keeps the node (no blockdev-del), and the
# round after plugs that same node, its backend still connected, with device_add alone.
# Reports what the guest saw each round, the QMP answers, whether blockdev-del ended the
# backend, and, once QMP quit ended the VM, how often the file the guest wrote through its
# file system is found in IMAGE.
pci_disk_rounds() {
	vm=$1 image=$2 rounds=$3
	added=0
	deleted_after=0
	plug_ms=""
	backend=
	if [ "$(l2_count $vm "guest: pci-hotplug waiting 1")" -gt 0 ]; then
		r=1
		while [ $r -le $rounds ]; do
			start=$(now_ms)
			# Odd rounds start with a new node; even ones plug the node the round before kept
			# (its citadel-blk still connected) into the slot again.
			node='{"execute":"blockdev-add","arguments":{"node-name":"drive-0","file":{"driver":"file","filename":"'"$image"'"},"cache":{"direct":false},"read-only":false}}'
			returns=2
			if [ $((r % 2)) = 0 ]; then
				node=
				returns=1
			fi
			qmp $vm ${node:+"$node"} \
				'{"execute":"device_add","arguments":{"id":"drive-0","driver":"virtio-blk-pci","drive":"drive-0","bus":"pcie.1","addr":"0x0"}}' \
				>/tmp/$vm.add.$r
			[ "$(sed '1,/"return":{}/d' /tmp/$vm.add.$r | grep -c '"return":{}')" = $returns ] && added=$((added + 1))
			# The backend of the node this round plugs, to be ended by its blockdev-del.
			[ -n "$node" ] && backend=$(pidof citadel-blk)
			if [ $r = 1 ]; then
				cat /tmp/$vm.add.1
				result backend-count "$(echo $backend | wc -w)"
			fi
			l2_wait $vm "guest: pci-hotplug unplug-ready $r" 120 || break
			plug_ms="$plug_ms $(($(now_ms) - start))"
			# device_del answers at once; the event follows once the guest let the card go.
			qmp $vm '{"execute":"device_del","arguments":{"id":"drive-0"}}' \
				wait-event:DEVICE_DELETED >/tmp/$vm.del.$r
			if [ $r = 1 ]; then
				cat /tmp/$vm.del.1
				result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del.1 | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
				result del-data "$(grep -F DEVICE_DELETED /tmp/$vm.del.1 | grep -o '"data":{[^}]*}')"
			fi
			grep -q DEVICE_DELETED /tmp/$vm.del.$r && deleted_after=$((deleted_after + 1))
			if [ $((r % 2)) = 1 ] && [ $r -lt $rounds ]; then
				[ $r = 1 ] && result node-kept-backend "$(pidof citadel-blk | wc -w) $([ -d /proc/$backend ] && echo alive)"
			else
				qmp $vm '{"execute":"blockdev-del","arguments":{"node-name":"drive-0"}}' >/tmp/$vm.bdel.$r
			fi
			l2_wait $vm "guest: round$r-after=" 60 || break
			r=$((r + 1))
		done
		l2_wait $vm "guest: pci-hotplug done" 30 && result guest-done yes
		# The guest's last word, after its dmesg excerpt.
		l2_wait $vm "guest: hotplug-errors=" 30
		for key in round1-size round1-marker mkfs mount file-write umount round1-after round$rounds-marker round$rounds-after hotplug-errors; do
			result $key "$(l2_value $vm $key)"
		done
	fi
	result added "$added"
	result deleted-after-release "$deleted_after"
	result plug-to-ready-ms "$plug_ms"
	result backend-gone "$(gone_within "$backend" 5)"
	stop_guest $vm
	result image-file-bytes "$(grep -c citadel-lab-file-written-on-a-pci-disk "$image")"
}
