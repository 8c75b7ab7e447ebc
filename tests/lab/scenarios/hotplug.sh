# StratoVirt's guide's disk hotplug on the lightweight machine, against Linux: blockdev-add
# and device_add plug a 64 MiB image into slot 1 (vdb) of a running guest, which makes an ext2
# file system on it and writes a file; device_del takes it out (DEVICE_DELETED before the
# return) and its citadel-blk ends; the file's bytes are then found in the image in L1.
# The guide asks for cache.direct, which L1's tmpfs refuses (no O_DIRECT there): the lab
# opens the image through the page cache.
rm -f /tmp/hp.img
truncate -s 64M /tmp/hp.img
printf 'citadel-lab-hotplug-marker!' | dd of=/tmp/hp.img conv=notrunc 2>/dev/null

vm=hp
boot_guest $vm $GUEST/vmlinux 1 256 hotplug
if l2_wait $vm "guest: hotplug waiting" 90; then
	result disks "$(l2_value $vm disks)"
	result vdb-size-empty "$(l2_value $vm vdb-size-empty)"
	qmp $vm '{"execute":"blockdev-add","arguments":{"node-name":"drive-0","file":{"driver":"file","filename":"/tmp/hp.img"},"cache":{"direct":false},"read-only":false}}' \
		'{"execute":"device_add","arguments":{"id":"drive-0","driver":"virtio-blk-mmio","addr":"0x1","drive":"drive-0"}}' \
		| tee /tmp/$vm.add
	# Replies after the negotiation's own.
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	backend=$(pidof citadel-blk)
	result backend-count "$(echo $backend | wc -w)"
	if [ -n "$backend" ]; then
		result backend-seccomp "$(sed -n 's/^Seccomp:[[:space:]]*//p' /proc/$backend/status)"
		result backend-no-new-privs "$(sed -n 's/^NoNewPrivs:[[:space:]]*//p' /proc/$backend/status)"
	fi
	if l2_wait $vm "guest: hotplug unplug-ready" 120; then
		for key in vdb-size vdb-new-size-messages vdb-marker mkfs mount file-write umount; do
			result $key "$(l2_value $vm $key)"
		done
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"drive-0"}}' | tee /tmp/$vm.del
	# The event line comes before the reply line.
	result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
	result del-data "$(grep -F DEVICE_DELETED /tmp/$vm.del | grep -o '"data":{[^}]*}')"
	if l2_wait $vm "guest: hotplug unplugged" 60; then
		result vdb-size-after "$(l2_value $vm vdb-size-after)"
	fi
	result backend-gone "$(gone_within "$backend" 5)"
fi
stop_guest $vm
result image-file-bytes "$(grep -c citadel-lab-file-written-on-a-hot-plugged-disk /tmp/hp.img)"
