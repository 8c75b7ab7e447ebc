# The balloon against Linux's virtio_balloon driver. In the first VM (no deflate-on-oom), QMP
# `balloon` asks for half of the guest's 256 MiB: the guest's MemTotal drops by ~128 MiB,
# query-balloon and BALLOON_CHANGE report the new size, and the guest RAM memfd in L1 loses
# the pages (its allocated blocks, `stat -L -c %b` of the descriptor); `balloon` back to
# 256 MiB gives MemTotal back. In the second (deflate-on-oom=on, free-page-reporting=on) the
# 200 MiB the guest wrote and deleted go back to the host without any balloon command, then
# the guest writes more than the target leaves it and survives: its driver deflates instead
# of the OOM killer killing.
ram=$((256 << 20))
half=$((ram / 2))

# memfd_bytes PID: bytes L1 holds for the guest RAM memfd of Citadel process PID.
memfd_bytes() {
	fd=$(ls -l /proc/$1/fd 2>/dev/null | grep citadel-guest-ram | head -n1 | sed 's/.* \([0-9]*\) -> .*/\1/')
	echo $(($(stat -L -c %b /proc/$1/fd/$fd) * 512))
}

# actual NAME: the guest's size as query-balloon reports it (an empty value on an error).
actual() {
	qmp $1 '{"execute":"query-balloon"}' | grep -o '"return":{"actual":[0-9]*}' | grep -o '[0-9]*' | tail -n1
}

# wait_actual NAME VALUE: polls query-balloon for up to 120 s until it reports VALUE.
wait_actual() {
	deadline=$(($(now_ms) + 120000))
	while [ "$(actual $1)" != "$2" ] && [ "$(now_ms)" -lt $deadline ]; do
		usleep 100000
	done
}

# listen NAME: a QMP client that stays connected and prints every event NAME raises into
# /tmp/NAME.events. Sets LISTENER.
listen() {
	citadel-qmp --tag "qmp $1 events" --timeout 900 "/tmp/$1.qmp" 'wait-event:NOT-AN-EVENT' \
		>/tmp/$1.events 2>&1 &
	LISTENER=$!
}

# balloon_changes NAME: the `actual` of every BALLOON_CHANGE the listener saw, in order.
balloon_changes() {
	grep -F '"event":"BALLOON_CHANGE"' /tmp/$1.events | grep -o '"actual":[0-9]*' | grep -o '[0-9]*' | tr '\n' ' '
}

vm=balloon
boot_guest $vm $GUEST/vmlinux 1 256 balloon -device virtio-balloon-device,id=balloon0
if l2_wait $vm "guest: balloon filled" 180; then
	listen $vm
	result fill "$(l2_value $vm balloon-fill)"
	result memtotal-before "$(l2_value $vm balloon-memtotal-before-kb)"
	result actual-before "$(actual $vm)"
	before=$(memfd_bytes $L2_PID)
	result memfd-before-mib $((before >> 20))
	start=$(now_ms)
	qmp $vm "{\"execute\":\"balloon\",\"arguments\":{\"value\":$half}}" >/dev/null
	wait_actual $vm $half
	inflate_ms=$(($(now_ms) - start))
	result inflate-ms $inflate_ms
	if l2_wait $vm "guest: balloon inflated" 60; then
		result memtotal-inflated "$(l2_value $vm balloon-memtotal-inflated-kb)"
	fi
	result actual-inflated "$(actual $vm)"
	after=$(memfd_bytes $L2_PID)
	result memfd-inflated-mib $((after >> 20))
	result returned-mib $(((before - after) >> 20))
	# The benchmark: host memory returned per second, from the command to the guest
	# reporting the target (polled every 0.1 s).
	[ $inflate_ms -gt 0 ] && result returned-mib-per-s $((((before - after) >> 20) * 1000 / inflate_ms))
	# A change inside the rate limit's second is reported when it ends.
	sleep 2
	result changes-inflated "$(balloon_changes $vm)"
	qmp $vm "{\"execute\":\"balloon\",\"arguments\":{\"value\":$ram}}" >/dev/null
	wait_actual $vm $ram
	if l2_wait $vm "guest: balloon deflated" 60; then
		result memtotal-deflated "$(l2_value $vm balloon-memtotal-deflated-kb)"
	fi
	result actual-deflated "$(actual $vm)"
	sleep 2
	result last-change "$(balloon_changes $vm | awk '{ print $NF }')"
	kill $LISTENER
fi
stop_guest $vm

vm=balloon-oom
boot_guest $vm $GUEST/vmlinux 1 256 balloon-oom \
	-device virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on
if l2_wait $vm "guest: balloon written" 180; then
	written=$(memfd_bytes $L2_PID)
	result written-mib $((written >> 20))
fi
if l2_wait $vm "guest: balloon filled" 60; then
	# Linux reports free memory in 2 MiB blocks, a batch every 2 s once some gathered: wait
	# up to 90 s (the lab's load stretches that) for 100 MiB to have gone back.
	deadline=$(($(now_ms) + 90000))
	while [ $(((written - $(memfd_bytes $L2_PID)) >> 20)) -lt 100 ] && [ "$(now_ms)" -lt $deadline ]; do
		usleep 500000
	done
	result reported-mib $(((written - $(memfd_bytes $L2_PID)) >> 20))
	qmp $vm "{\"execute\":\"balloon\",\"arguments\":{\"value\":$half}}" >/dev/null
	wait_actual $vm $half
	result oom-actual-inflated "$(actual $vm)"
	if l2_wait $vm "guest: balloon oom-done" 180; then
		result oom-alloc "$(l2_value $vm balloon-oom-alloc)"
		result oom-kills "$(l2_value $vm balloon-oom-kills)"
	fi
	result oom-actual-after "$(actual $vm)"
fi
stop_guest $vm
