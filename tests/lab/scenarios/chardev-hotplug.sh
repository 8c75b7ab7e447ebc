# A disk served by a backend the user started, plugged into a running Linux guest the way
# QEMU attaches one: chardev-add connects to the socket of a citadel-blk started in L1 (a
# stand-in for qemu-storage-daemon, which the default L1 does not carry), device_add of a
# vhost-user-blk-device puts it into slot 1 (vdb); the guest sees its new size, reads the
# marker, makes a file system and writes a file; device_del takes it out (DEVICE_DELETED
# before the return) and chardev-remove closes the chardev, with the backend still running.
rm -f /tmp/ch.img /tmp/ch.sock
truncate -s 64M /tmp/ch.img
printf 'citadel-lab-hotplug-marker!' | dd of=/tmp/ch.img conv=notrunc 2>/dev/null
citadel-blk --socket /tmp/ch.sock --image /tmp/ch.img >/tmp/ch-blk.log 2>&1 &
blk=$!
deadline=$(($(now_ms) + 10000))
while [ ! -S /tmp/ch.sock ] && [ "$(now_ms)" -lt "$deadline" ]; do
	usleep 20000
done

vm=ch
boot_guest $vm $GUEST/vmlinux 1 256 hotplug
if l2_wait $vm "guest: hotplug waiting" 90; then
	qmp $vm '{"execute":"chardev-add","arguments":{"id":"c0","backend":{"type":"socket","data":{"addr":{"type":"unix","data":{"path":"/tmp/ch.sock"}},"server":false}}}}' \
		'{"execute":"device_add","arguments":{"id":"vdisk","driver":"vhost-user-blk-device","chardev":"c0","addr":"0x1"}}' \
		| tee /tmp/$vm.add
	# Replies after the negotiation's own.
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	if l2_wait $vm "guest: hotplug unplug-ready" 120; then
		for key in vdb-size vdb-new-size-messages vdb-marker mkfs mount file-write umount; do
			result $key "$(l2_value $vm $key)"
		done
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"vdisk"}}' \
		'{"execute":"chardev-remove","arguments":{"id":"c0"}}' | tee /tmp/$vm.del
	# The event line comes before the device_del reply, then chardev-remove's.
	result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
	if l2_wait $vm "guest: hotplug unplugged" 60; then
		result vdb-size-after "$(l2_value $vm vdb-size-after)"
	fi
fi
stop_guest $vm
result image-file-bytes "$(grep -c citadel-lab-file-written-on-a-hot-plugged-disk /tmp/ch.img)"
# The backend was the user's: it outlives the device and the chardev.
kill -0 $blk 2>/dev/null && result backend-alive yes || result backend-alive no
kill $blk
wait $blk
