# With -cpu baseline the guest's own /proc/cpuinfo lacks the features the template hides; with
# -cpu host it has what L1's KVM offers.
for template in host baseline; do
	vm=cpu-$template
	boot_guest $vm $GUEST/vmlinux 1 256 report -cpu $template
	l2_wait $vm "guest: end" 60
	result $template.vendor "$(l2_value $vm vendor)"
	result $template.flags "$(l2_value $vm flags)"
	result $template.dmesg-problems "$(l2_value $vm dmesg-problems)"
	qmp $vm '{"execute":"quit"}' >/dev/null
	exited $L2_PID 10
done
