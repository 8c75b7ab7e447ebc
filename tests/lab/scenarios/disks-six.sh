# Six disks hot-plugged at once, one into each slot (addr 0x0..0x5), in reverse order: each
# image has its own marker and size, and the guest must find image N in slot N (vda..vdf);
# one device_del per disk then empties every slot and ends every citadel-blk.
for n in 0 1 2 3 4 5; do
	rm -f /tmp/six-$n.img
	truncate -s $((n + 1))M /tmp/six-$n.img
	printf "citadel-lab-six-slot-$n!" | dd of=/tmp/six-$n.img conv=notrunc 2>/dev/null
done

vm=six
boot_guest $vm $GUEST/vmlinux 1 256 disks-six
if l2_wait $vm "guest: disks-six waiting" 90; then
	set --
	for n in 5 4 3 2 1 0; do
		set -- "$@" \
			"{\"execute\":\"blockdev-add\",\"arguments\":{\"node-name\":\"drive-$n\",\"file\":{\"driver\":\"file\",\"filename\":\"/tmp/six-$n.img\"},\"cache\":{\"direct\":false},\"read-only\":false}}" \
			"{\"execute\":\"device_add\",\"arguments\":{\"id\":\"drive-$n\",\"driver\":\"virtio-blk-mmio\",\"addr\":\"0x$n\",\"drive\":\"drive-$n\"}}"
	done
	qmp $vm "$@" | tee /tmp/$vm.add
	# Replies after the negotiation's own.
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	result backend-count "$(pidof citadel-blk | wc -w)"
	if l2_wait $vm "guest: disks-six unplug-ready" 120; then
		for d in vda vdb vdc vdd vde vdf; do
			result $d-size "$(l2_value $vm $d-size)"
			result $d-marker "$(l2_value $vm $d-marker)"
		done
	fi
	set --
	for n in 0 1 2 3 4 5; do
		set -- "$@" "{\"execute\":\"device_del\",\"arguments\":{\"id\":\"drive-$n\"}}"
	done
	qmp $vm "$@" | tee /tmp/$vm.del
	result del-returns "$(sed '1,/"return":{}/d' /tmp/$vm.del | grep -c '"return":{}')"
	result del-events "$(grep -c '"event":"DEVICE_DELETED"' /tmp/$vm.del)"
	if l2_wait $vm "guest: disks-six unplugged" 60; then
		for d in vda vdb vdc vdd vde vdf; do
			result $d-size-after "$(l2_value $vm $d-size-after)"
		done
	fi
	left=$(pidof citadel-blk | wc -w)
	for i in $(seq 50); do
		[ "$left" = 0 ] && break
		usleep 100000
		left=$(pidof citadel-blk | wc -w)
	done
	result backends-left "$left"
fi
stop_guest $vm
