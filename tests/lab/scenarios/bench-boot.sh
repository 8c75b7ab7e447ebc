# Benchmark (needs the lab started with QEMU inside, `citadel-lab --with-qemu`): exec to the
# guest's first line of user space, and peak RSS, for Citadel and for QEMU's microvm machine on
# KVM, with the same guest kernel, initramfs, command line, RAM and vCPU, alternating runs.
runs=10
append="console=ttyS0 panic=-1 quiet lab.mode=report"
peak_kb() {
	sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"
}
# status_kb PID FIELD: a kB field of /proc/PID/status.
status_kb() {
	sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$1/status"
}
# Memory overhead: what the VMM holds besides guest RAM. Citadel's guest RAM is a shared memfd
# (RssShmem), so its overhead is RssAnon + RssFile. QEMU's guest RAM is anonymous memory, so
# its overhead is VmRSS less the guest RAM the same guest had touched under Citadel.
i=0
while [ $i -lt "$runs" ]; do
	i=$((i + 1))
	vm=citadel$i
	start=$(now_ms)
	boot_guest $vm $GUEST/vmlinux 1 256 report
	l2_wait $vm "guest: user space up" 120 && result citadel.ms $(($(now_ms) - start))
	result citadel.peak_kb "$(peak_kb $L2_PID)"
	guest_kb=$(status_kb $L2_PID RssShmem)
	result citadel.overhead_kb $(($(status_kb $L2_PID RssAnon) + $(status_kb $L2_PID RssFile)))
	stop_guest $vm

	vm=qemu$i
	start=$(now_ms)
	l2_start $vm qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 \
		-nodefaults -no-user-config -display none -serial stdio \
		-kernel $GUEST/vmlinux -initrd $GUEST/initramfs.cpio.gz -append "$append" \
		-qmp "unix:/tmp/$vm.qmp,server,nowait"
	l2_wait $vm "guest: user space up" 120 && result qemu.ms $(($(now_ms) - start))
	result qemu.peak_kb "$(peak_kb $L2_PID)"
	result qemu.overhead_kb $(($(status_kb $L2_PID VmRSS) - guest_kb))
	stop_guest $vm
done
