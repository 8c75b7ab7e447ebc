# Debian's unmodified cloud kernel, with its own virtio modules, finds the hot-replace disk
# slots through ACPI (no command-line devices) and uses a disk plugged into slot 1 over QMP:
# it reads the host's marker and writes its own, which L1 finds in the image after device_del.
rm -f /tmp/shp.img
truncate -s 32M /tmp/shp.img
printf 'citadel-lab-hotplug-marker!' | dd of=/tmp/shp.img conv=notrunc 2>/dev/null

vm=shp
INITRD=/lab/stock/initramfs.cpio.gz boot_guest $vm /lab/stock/vmlinuz 1 256 hotplug-raw
if l2_wait $vm "guest: hotplug waiting" 120; then
	result disks "$(l2_value $vm disks)"
	qmp $vm '{"execute":"blockdev-add","arguments":{"node-name":"drive-0","file":{"driver":"file","filename":"/tmp/shp.img"},"cache":{"direct":false},"read-only":false}}' \
		'{"execute":"device_add","arguments":{"id":"drive-0","driver":"virtio-blk-mmio","addr":"0x1","drive":"drive-0"}}' \
		| tee /tmp/$vm.add
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	if l2_wait $vm "guest: hotplug unplug-ready" 120; then
		for key in vdb-size vdb-marker raw-write; do
			result $key "$(l2_value $vm $key)"
		done
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"drive-0"}}' >/dev/null
	l2_wait $vm "guest: hotplug unplugged" 60 && result vdb-size-after "$(l2_value $vm vdb-size-after)"
fi
stop_guest $vm
result image "$(dd if=/tmp/shp.img bs=1 skip=4096 count=20 2>/dev/null)"
