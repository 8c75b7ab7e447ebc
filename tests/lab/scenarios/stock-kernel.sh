# Debian's unmodified cloud kernel (a bzImage with ACPI and no MP-table parser, the same one L1
# runs) boots to user space under Citadel with 1, 2 and 4 vCPUs.
for smp in 1 2 4; do
	vm=stock$smp
	start=$(now_ms)
	boot_guest $vm /lab/stock/vmlinuz $smp 256 report
	l2_wait $vm "guest: user space up" 90 && result $vm.boot_ms $(($(now_ms) - start))
	l2_wait $vm "guest: end" 10
	for key in nproc memtotal_kb cmdline dmesg-problems clocksource acpi-madt; do
		result $vm.$key "$(l2_value $vm $key)"
	done
	stop_guest $vm
done
