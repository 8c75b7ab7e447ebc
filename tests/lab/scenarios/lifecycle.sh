# stop/cont against a live Linux user space printing a tick every 100 ms, query-cpus thread
# ids, and system_reset twice in a row.
vm=life
boot_guest $vm $GUEST/vmlinux 2 256 counter
pid=$L2_PID
l2_wait $vm "guest: tick 10 " 60 || exit 1

stopped_at=$(now_ms)
qmp $vm '{"execute":"stop"}' >/dev/null && result stop ok
usleep 300000
before=$(l2_count $vm "guest: tick")
sleep 1
after=$(l2_count $vm "guest: tick")
result ticks-while-stopped $((after - before))
last_before=$(grep -F "guest: tick" /tmp/$vm.log | tail -n1 | cut -d' ' -f4)

qmp $vm '{"execute":"cont"}' >/dev/null && result cont ok
result paused-ms $(($(now_ms) - stopped_at))
l2_wait $vm "guest: tick $((after + 10)) " 10 && result ticks-after-cont yes
first_after=$(grep -F "guest: tick $after " /tmp/$vm.log | cut -d' ' -f4)
# Guest uptime elapsed across the pause, in milliseconds, against the L1 time it was paused.
result guest-ms-across-pause "$(awk -v a="$last_before" -v b="$first_after" 'BEGIN { printf "%d", (b - a) * 1000 }')"

# Every thread id query-cpus reports is a live thread of this citadel process.
qmp $vm '{"execute":"query-cpus"}' >/tmp/$vm.cpus
ids=$(grep -o '"thread_id":[0-9]*' /tmp/$vm.cpus | cut -d: -f2 | tr '\n' ' ')
result cpu-thread-ids "$ids"
live=0
for id in $ids; do
	[ -d /proc/$pid/task/$id ] && live=$((live + 1))
done
result live-cpu-threads $live

# system_reset reboots Linux to user space, twice in a row.
for n in 1 2; do
	qmp $vm '{"execute":"system_reset"}' wait-event:RESET >/dev/null && result reset$n.qmp ok
	l2_wait $vm "guest: tick 0 " 1 >/dev/null 2>&1
	deadline=$(($(now_ms) + 60000))
	while [ "$(l2_count $vm 'guest: user space up')" -le "$n" ]; do
		[ "$(now_ms)" -ge "$deadline" ] && break
		usleep 50000
	done
	result reset$n.boots "$(l2_count $vm 'guest: user space up')"
done
qmp $vm '{"execute":"quit"}' >/dev/null
exited $pid 10 && result exited yes
