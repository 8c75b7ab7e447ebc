# A VM snapshot of a live Linux user space with a disk served by citadel-blk: the guest counts
# into a tmpfs file and into the disk hot-plugged as vdb with the guide's commands; QMP
# `migrate` writes a snapshot mid-run (STOP, query-migrate completed), the VM quits, and two
# VMs restored from the same directory at once (`-incoming`, the disk given on the command
# line in its slot, each VM on its own copy of the image) both carry on the sequence from
# where it stopped, without booting again, with the file holding every number and each image
# every number its VM printed. With SNAPSHOT_Q35=1 (q35-snapshot) the same on the q35 machine:
# the disk is a virtio-blk-pci card hot-plugged into root port pcie.1 (vda), given to the
# restored VMs as `-device virtio-blk-pci,bus=pcie.1`.
dir=/tmp/snapshot-dir
img=/tmp/snapshot.img
rm -rf $dir $img $img-*
truncate -s 8M $img
if [ "$SNAPSHOT_Q35" = 1 ]; then
	machine=q35 mode="sequence lab.disk=vda"
	port="-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1"
	card='"driver":"virtio-blk-pci","bus":"pcie.1","addr":"0x0"'
	restored_card="virtio-blk-pci,drive=drive-0,id=drive-0,bus=pcie.1"
else
	machine=microvm mode=sequence port=
	card='"driver":"virtio-blk-mmio","addr":"0x1"'
	restored_card="virtio-blk-device,drive=drive-0,id=drive-0,addr=0x1"
fi
vm=snap
MACHINE=$machine boot_guest $vm $GUEST/vmlinux 1 256 "$mode" $port
if l2_wait $vm "guest: seq waiting-for-disk" 120; then
	qmp $vm "{\"execute\":\"blockdev-add\",\"arguments\":{\"node-name\":\"drive-0\",\"file\":{\"driver\":\"file\",\"filename\":\"$img\"},\"cache\":{\"direct\":false},\"read-only\":false}}" \
		'{"execute":"device_add","arguments":{"id":"drive-0",'"$card"',"drive":"drive-0"}}' \
		>/tmp/$vm.add
	# Past qmp_capabilities' own reply.
	result plug-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
fi
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

# disk_missing IMAGE LAST: how many of the numbers 0 to LAST are not in their block.
disk_missing() {
	missing=0
	n=0
	while [ $n -le $2 ]; do
		[ "$(dd if=$1 bs=4096 skip=$n count=1 2>/dev/null | head -c 12)" = "$(printf 'seq %08d' $n)" ] ||
			missing=$((missing + 1))
		n=$((n + 1))
	done
	echo $missing
}

# Both restored VMs run side by side, from the same files, each on its own copy of the image.
for vm in snap-a snap-b; do
	cp $img $img-$vm
	start=$(now_ms)
	MACHINE=$machine boot_guest $vm $GUEST/vmlinux 1 256 "$mode" $port \
		-drive file=$img-$vm,id=drive-0 -device $restored_card \
		-incoming "file:$dir"
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
		result $vm.disk-errors "$(l2_count $vm 'seq-disk-error')"
	fi
	stop_guest $vm
	last=$(sed -n 's/^guest: seq \([0-9]*\)$/\1/p' /tmp/$vm.log | tail -n1)
	result $vm.last-seq "$last"
	[ -n "$last" ] && result $vm.disk-missing "$(disk_missing $img-$vm $last)"
done
rm -rf $dir $img $img-*
