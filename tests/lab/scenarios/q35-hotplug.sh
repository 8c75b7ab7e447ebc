# StratoVirt's guide's disk hotplug on the standard machine, against Linux: blockdev-add and
# device_add put a virtio-blk-pci card into root port pcie.1 of a running q35 guest; pciehp
# finds it and virtio-blk binds it (vda); the guest makes an ext2 file system on it and writes
# a file. device_del returns at once; DEVICE_DELETED comes only once pciehp has powered the
# slot off and the card left; blockdev-del then ends the citadel-blk. The file's bytes are
# then found in the image in L1. The card is then plugged and unplugged again, 20 times in
# all, the guest reading the host's marker each time.
rm -f /tmp/q35hp.img
truncate -s 64M /tmp/q35hp.img
printf 'citadel-lab-hotplug-marker!' | dd of=/tmp/q35hp.img conv=notrunc 2>/dev/null

rounds=20
vm=q35hp
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 "pci-hotplug lab.rounds=$rounds" \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
added=0
deleted_after=0
plug_ms=""
if l2_wait $vm "guest: pci-hotplug waiting 1" 90; then
	r=1
	while [ $r -le $rounds ]; do
		start=$(now_ms)
		qmp $vm '{"execute":"blockdev-add","arguments":{"node-name":"drive-0","file":{"driver":"file","filename":"/tmp/q35hp.img"},"cache":{"direct":false},"read-only":false}}' \
			'{"execute":"device_add","arguments":{"id":"drive-0","driver":"virtio-blk-pci","drive":"drive-0","bus":"pcie.1","addr":"0x0"}}' \
			>/tmp/$vm.add.$r
		[ "$(sed '1,/"return":{}/d' /tmp/$vm.add.$r | grep -c '"return":{}')" = 2 ] && added=$((added + 1))
		if [ $r = 1 ]; then
			cat /tmp/$vm.add.1
			backend=$(pidof citadel-blk)
			result backend-count "$(echo $backend | wc -w)"
		fi
		l2_wait $vm "guest: pci-hotplug unplug-ready $r" 120 || break
		plug_ms="$plug_ms $(($(now_ms) - start))"
		# device_del answers at once; the event follows once the guest let the card go.
		qmp $vm '{"execute":"device_del","arguments":{"id":"drive-0"}}' \
			wait-event:DEVICE_DELETED >/tmp/$vm.del.$r
		if [ $r = 1 ]; then
			cat /tmp/$vm.del.1
			result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del.1 | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
			result del-data "$(grep -F DEVICE_DELETED /tmp/$vm.del.1 | grep -o '"data":{[^}]*}')"
		fi
		grep -q DEVICE_DELETED /tmp/$vm.del.$r && deleted_after=$((deleted_after + 1))
		qmp $vm '{"execute":"blockdev-del","arguments":{"node-name":"drive-0"}}' >/tmp/$vm.bdel.$r
		l2_wait $vm "guest: round$r-after=" 60 || break
		r=$((r + 1))
	done
	for key in round1-size round1-marker mkfs mount file-write umount round1-after round$rounds-marker round$rounds-after hotplug-errors; do
		result $key "$(l2_value $vm $key)"
	done
	l2_wait $vm "guest: pci-hotplug done" 30 && result guest-done yes
fi
result added "$added"
result deleted-after-release "$deleted_after"
result plug-to-ready-ms "$plug_ms"
gone=no
for i in $(seq 50); do
	if [ -n "$backend" ] && [ ! -d /proc/$backend ]; then
		gone=yes
		break
	fi
	usleep 100000
done
result backend-gone $gone
stop_guest $vm
result image-file-bytes "$(grep -c citadel-lab-file-written-on-a-pci-disk /tmp/q35hp.img)"
