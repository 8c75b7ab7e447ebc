# The project's guest kernel (vmlinux, PVH entry) boots to user space with 1, 2 and 4 vCPUs;
# the guest reports what it sees; QMP quit ends each VM.
for smp in 1 2 4; do
	vm=smp$smp
	start=$(now_ms)
	boot_guest $vm $GUEST/vmlinux $smp 256 report
	l2_wait $vm "guest: user space up" 60 && result $vm.boot_ms $(($(now_ms) - start))
	l2_wait $vm "guest: end" 10
	for key in nproc memtotal_kb cmdline dmesg-problems clocksource acpi-madt; do
		result $vm.$key "$(l2_value $vm $key)"
	done
	stop_guest $vm
done
