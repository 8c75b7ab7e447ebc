# A disk plugged with "read-only":true into slot 2 (vdc): the guest reads the host's marker,
# its O_DIRECT write fails, and after the unplug the image in L1 is byte for byte what it was
# (its checksum before and after; the image file itself stays writable, so only the backend
# stands between the guest and it).
img=/tmp/ro.img
rm -f $img
dd if=/dev/urandom of=$img bs=1M count=16 2>/dev/null
printf 'citadel-lab-read-only-marker!' | dd of=$img conv=notrunc 2>/dev/null
before=$(md5sum <$img | cut -d' ' -f1)

vm=ro
boot_guest $vm $GUEST/vmlinux 1 256 disk-readonly
if l2_wait $vm "guest: disk-readonly waiting" 90; then
	qmp $vm '{"execute":"blockdev-add","arguments":{"node-name":"drive-ro","file":{"driver":"file","filename":"/tmp/ro.img"},"cache":{"direct":false},"read-only":true}}' \
		'{"execute":"device_add","arguments":{"id":"drive-ro","driver":"virtio-blk-mmio","addr":"0x2","drive":"drive-ro"}}' \
		| tee /tmp/$vm.add
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	if l2_wait $vm "guest: disk-readonly unplug-ready" 120; then
		for key in vdc-size ro-marker ro-write ro-marker-after; do
			result $key "$(l2_value $vm $key)"
		done
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"drive-ro"}}' >/dev/null
	l2_wait $vm "guest: disk-readonly unplugged" 60 && result vdc-size-after "$(l2_value $vm vdc-size-after)"
fi
stop_guest $vm
after=$(md5sum <$img | cut -d' ' -f1)
result image-md5-before "$before"
result image-md5-after "$after"
