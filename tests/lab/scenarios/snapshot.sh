# A VM snapshot of a live Linux user space: the guest counts into a tmpfs file; QMP `migrate`
# writes a snapshot mid-run (STOP, query-migrate completed), the VM quits, and two VMs
# restored from the same directory at once (`-incoming`, same command line) both carry on the
# sequence from where it stopped, without booting again and with the file holding every
# number.
dir=/tmp/snapshot-dir
rm -rf $dir
vm=snap
boot_guest $vm $GUEST/vmlinux 1 256 sequence
if l2_wait $vm "guest: seq 20" 180; then
	start=$(now_ms)
	qmp $vm "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"file:$dir\"}}" >/tmp/$vm.migrate
	result migrate-ms $(($(now_ms) - start))
	grep -q '"event":"STOP"' /tmp/$vm.migrate && result stop-event yes
	grep -q '"return":{}' /tmp/$vm.migrate && result migrate ok
	qmp $vm '{"execute":"query-migrate"}' | grep -o '"status":"[a-z-]*"' | tail -n1 >/tmp/$vm.status
	result status "$(cut -d'"' -f4 /tmp/$vm.status)"
	usleep 500000
	result last-seq "$(sed -n 's/^guest: seq \([0-9]*\)$/\1/p' /tmp/$vm.log | tail -n1)"
	result memory-bytes "$(stat -c %s $dir/memory 2>/dev/null)"
fi
stop_guest $vm

# Both restored VMs run side by side, from the same files.
for vm in snap-a snap-b; do
	start=$(now_ms)
	boot_guest $vm $GUEST/vmlinux 1 256 sequence -incoming "file:$dir"
	eval "pid_$(echo $vm | tr - _)=$L2_PID start_$(echo $vm | tr - _)=$start"
done
for vm in snap-a snap-b; do
	eval "L2_PID=\$pid_$(echo $vm | tr - _) start=\$start_$(echo $vm | tr - _)"
	if l2_wait $vm "guest: seq " 120; then
		result $vm.first-line-ms $(($(now_ms) - start))
		first=$(sed -n 's/^guest: seq \([0-9]*\)$/\1/p' /tmp/$vm.log | head -n1)
		result $vm.first-seq "$first"
		l2_wait $vm "guest: seq $((first + 20))" 60 && result $vm.continued yes
		result $vm.boots "$(l2_count $vm 'guest: user space up')"
		result $vm.broken "$(l2_count $vm 'seq-broken')"
	fi
	stop_guest $vm
done
rm -rf $dir
