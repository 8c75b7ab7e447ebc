# A disk served by citadel-blk in L1 reaches the Linux guest as /dev/vdg (after the six
# hot-replace slots) through Citadel's
# vhost-user-blk device: the guest reads the marker the host wrote and writes its own, which
# L1 then finds in the image file.
rm -f /tmp/disk.img /tmp/blk.sock
truncate -s 64M /tmp/disk.img
printf 'citadel-lab-disk-marker!' | dd of=/tmp/disk.img conv=notrunc 2>/dev/null
citadel-blk --socket /tmp/blk.sock --image /tmp/disk.img >/tmp/blk.log 2>&1 &
blk=$!
deadline=$(($(now_ms) + 10000))
while [ ! -S /tmp/blk.sock ] && [ "$(now_ms)" -lt "$deadline" ]; do
	usleep 20000
done

vm=disk
boot_guest $vm $GUEST/vmlinux 1 256 disk \
	-chardev socket,id=c0,path=/tmp/blk.sock -device vhost-user-blk-device,chardev=c0
if l2_wait $vm "guest: disk-write rc=" 90; then
	result disk.marker "$(l2_value $vm disk-marker)"
	result disk.write-rc "$(sed -n 's/^guest: disk-write rc=//p' /tmp/$vm.log | tail -n1)"
fi
result disk.acpi-virtio "$(l2_value $vm acpi-virtio)"
result disk.name "$(l2_value $vm disk-name)"
stop_guest $vm
result disk.image "$(dd if=/tmp/disk.img bs=1 skip=4096 count=20 2>/dev/null)"
kill $blk
wait $blk
result disk.backend-exit-code $?
