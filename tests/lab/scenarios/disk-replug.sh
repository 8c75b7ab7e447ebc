# One image plugged into slot 3 (vdd), written and unplugged, round after round: L1 grows it
# by 1 MiB while it is out (round R sees 8 + R MiB), and each round the guest reads the counter
# the round before wrote at 4096 and writes its own, which L1 then finds in the image.
rounds=10
img=/tmp/replug.img
rm -f $img
printf 'replug-round-00' | dd of=$img bs=4096 seek=1 conv=sync 2>/dev/null

vm=rp
boot_guest $vm $GUEST/vmlinux 1 256 disk-replug
done_rounds=0
if l2_wait $vm "guest: disk-replug waiting" 90; then
	r=1
	while [ $r -le $rounds ]; do
		truncate -s $((8 + r))M $img
		qmp $vm '{"execute":"blockdev-add","arguments":{"node-name":"drive-rp","file":{"driver":"file","filename":"/tmp/replug.img"},"cache":{"direct":false},"read-only":false}}' \
			'{"execute":"device_add","arguments":{"id":"drive-rp","driver":"virtio-blk-mmio","addr":"0x3","drive":"drive-rp"}}' \
			>/tmp/$vm.add
		result replug-$r-add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
		l2_wait $vm "guest: replug round $r written" 60 || break
		for key in size read write; do
			result replug-$r-$key "$(l2_value $vm replug-$r-$key)"
		done
		qmp $vm '{"execute":"device_del","arguments":{"id":"drive-rp"}}' >/dev/null
		l2_wait $vm "guest: replug round $r unplugged" 60 || break
		result replug-$r-image "$(dd if=$img bs=4096 skip=1 count=1 2>/dev/null | tr -d '\000')"
		done_rounds=$r
		r=$((r + 1))
	done
fi
result rounds "$done_rounds"
left=$(pidof citadel-blk | wc -w)
for i in $(seq 50); do
	[ "$left" = 0 ] && break
	usleep 100000
	left=$(pidof citadel-blk | wc -w)
done
result backends-left "$left"
stop_guest $vm
