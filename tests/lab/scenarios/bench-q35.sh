# Benchmark (needs the lab started with QEMU inside, `citadel-lab --with-qemu`): exec to the
# guest's first line of user space ("guest: user space up", as in bench-boot), and peak RSS,
# for Citadel's microvm machine, Citadel's q35 machine with one PCIe root port, and QEMU's q35
# machine on KVM with one PCIe root port, with the same guest kernel, initramfs, command line,
# RAM and vCPU, in alternating rounds (each round starts with the next machine of the three,
# so that no machine always runs first or after the same one).
#
# All three boot the project's guest kernel as a PVH ELF (`vmlinux`), the form bench-boot
# boots too: Citadel enters it at its PVH entry point on either machine, and QEMU's q35, given
# an ELF with a PVH note through -kernel, boots it with its `pvh.bin` option ROM run by the
# firmware. QEMU's q35 firmware is SeaBIOS (`bios-256k.bin`, QEMU's default for q35), which
# the lab carries with QEMU when the host has it. Without SeaBIOS in L1 QEMU's q35 boots with
# qboot (`bios-microvm.bin`) instead, and `qemu-q35.firmware` says so.
runs=10
append="console=ttyS0 panic=-1 quiet lab.mode=report"
root_port="-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1"
# QEMU's spelling of the same root port; QEMU places it at 00:01.0 too, the first free slot
# without default devices (its q35 keeps only its built-in ICH9 functions at 00:1f).
qemu_root_port="-device pcie-root-port,id=pcie.1,chassis=1,slot=1,bus=pcie.0"

firmware=
for path in /usr/share/qemu/bios-256k.bin; do
	if [ -f "$path" ]; then
		firmware=$path
		result qemu-q35.firmware seabios
		break
	fi
done
if [ -z "$firmware" ]; then
	echo "lab: no SeaBIOS (bios-256k.bin) in L1: QEMU's q35 boots with qboot"
	firmware=/usr/share/qemu/bios-microvm.bin
	result qemu-q35.firmware qboot
fi

# status_kb PID FIELD: a kB field of /proc/PID/status.
status_kb() {
	sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$1/status"
}

# Rounds stop after 6 minutes, or earlier under the scenario's own time limit (from L1's
# command line): no round starts that might not end within that, and the rounds done are
# reported. L1 sometimes dies under QEMU's TCG, and the lab then runs the scenario again from
# its start in a new L1 boot: the shorter each try, the shorter the whole run.
limit_s=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab.scenario_timeout=//p' | tail -n1)
limit_ms=$((${limit_s:-300} * 1000 - 20000))
[ $limit_ms -le 360000 ] || limit_ms=360000
begin=$(now_ms)

# measure KEY NAME START: once NAME's guest said it reached user space, reports KEY.ms (exec
# to that line), KEY.guest_ms (the guest kernel's own uptime in its `guest: uptime=` line,
# printed a few lines before: its clock starts early in the kernel's setup),
# KEY.before_kernel_ms (exec to that line's arrival less that uptime: the VMM's and the
# firmware's part, with the kernel's setup before its clock starts) and KEY.peak_kb. False if
# the guest never got there.
measure() {
	l2_wait "$2" "guest: uptime=" 60 || return 1
	uptime_line_ms=$(now_ms)
	l2_wait "$2" "guest: user space up" 30 || return 1
	ms=$(($(now_ms) - $3))
	result "$1.ms" $ms
	guest_ms=$(l2_value "$2" uptime | awk '{ printf "%d", $1 * 1000 }')
	if [ -n "$guest_ms" ]; then
		result "$1.guest_ms" "$guest_ms"
		result "$1.before_kernel_ms" $((uptime_line_ms - $3 - guest_ms))
	fi
	result "$1.peak_kb" "$(status_kb $L2_PID VmHWM)"
}

# start_citadel NAME, start_citadel_q35 NAME, start_qemu NAME: starts one VM of each kind.
start_citadel() {
	boot_guest $1 $GUEST/vmlinux 1 256 report
}
start_citadel_q35() {
	MACHINE=q35 boot_guest $1 $GUEST/vmlinux 1 256 report $root_port
}
# -no-reboot: a guest that resets (a triple fault, a panic) ends QEMU as it ends Citadel,
# instead of booting again inside the same measurement.
start_qemu() {
	l2_start $1 qemu-system-x86_64 -M q35 -accel kvm -cpu host -m 256 -smp 1 \
		-nodefaults -no-user-config -display none -serial stdio -bios "$firmware" -no-reboot \
		-kernel $GUEST/vmlinux -initrd $GUEST/initramfs.cpio.gz -append "$append" \
		$qemu_root_port -qmp "unix:/tmp/$1.qmp,server,nowait"
}

# run KEY ROUND: one measured boot of KEY's machine (microvm, q35 or qemu-q35), named
# KEY-ROUND. Citadel's memory besides guest RAM is RssAnon + RssFile (its guest RAM is a shared
# memfd, RssShmem); QEMU's guest RAM is anonymous memory, so its VmRSS is kept (qemu_rss) and
# its overhead reported once the round's Citadel q35 guest has said how much guest RAM it
# touched (q35_shmem). A guest that did not reach user space (QEMU's TCG emulation of nested
# SVM here sometimes corrupts an L2 guest's state, see boot_and_report in lib.sh: it ends, or
# stays silent) is booted once more, and KEY.retried names it and why; one that fails twice is
# KEY.failed. Boots take well under 30 s here, even on a busy host: a minute of silence is
# a hang.
run() {
	key=$1
	vm=$1-$2
	attempt=1
	while :; do
		start=$(now_ms)
		case $key in
		microvm) start_citadel $vm ;;
		q35) start_citadel_q35 $vm ;;
		qemu-q35) start_qemu $vm ;;
		esac
		if measure $key $vm $start; then
			case $key in
			microvm | q35)
				[ $key = q35 ] && q35_shmem=$(status_kb $L2_PID RssShmem)
				result $key.overhead_kb $(($(status_kb $L2_PID RssAnon) + $(status_kb $L2_PID RssFile)))
				;;
			qemu-q35) qemu_rss=$(status_kb $L2_PID VmRSS) ;;
			esac
			stop_guest $vm
			return 0
		fi
		if grep -q 'triple fault' /tmp/$vm.log; then
			why=triple-fault
		elif exited $L2_PID 0; then
			why=ended
		else
			why=silent
		fi
		stop_guest $vm
		if [ $attempt = 2 ]; then
			result $key.failed $vm:$why
			return 1
		fi
		echo "lab: $vm did not reach user space ($why); booting it once more"
		result $key.retried $vm:$why
		vm=$vm-again
		attempt=2
	done
}

i=0
last_round_ms=0
while [ $i -lt "$runs" ]; do
	# Room for one more round, as long as the last one took, and a margin of a fifth.
	if [ $(($(now_ms) - begin + last_round_ms * 6 / 5 + 10000)) -ge "$limit_ms" ]; then
		echo "lab: stopping after $i rounds: another would not end within the time limit"
		break
	fi
	round_start=$(now_ms)
	i=$((i + 1))
	q35_shmem= qemu_rss=
	case $((i % 3)) in
	1) order="microvm q35 qemu-q35" ;;
	2) order="q35 qemu-q35 microvm" ;;
	0) order="qemu-q35 microvm q35" ;;
	esac
	for machine in $order; do
		run $machine $i
	done
	if [ -n "$q35_shmem" ] && [ -n "$qemu_rss" ]; then
		result qemu-q35.overhead_kb $((qemu_rss - q35_shmem))
	fi
	last_round_ms=$(($(now_ms) - round_start))
	result round_ms $last_round_ms
done
result rounds $i
