# A disk's backend killed under a Linux guest's writes: a 16 MiB image is hot-plugged into
# slot 1 (vdb), the guest writes 2048 numbered 4 KiB blocks to it with dd oflag=direct, and
# L1 kills its citadel-blk with SIGKILL in the middle. Citadel must start a new one and hand
# it the ring: dd exits 0, the guest's kernel logs no I/O error, and the image in L1 holds
# every block. With RESTART_Q35=1 (q35-blk-restart) the same on the q35 machine: the disk is
# a virtio-blk-pci card in root port pcie.1 (vda).
#
# A guest that triple-faults before dd is done is booted once more, and the test sees
# `rs.retried` (see boot_and_report in lib.sh: QEMU's TCG emulation of nested SVM here
# sometimes corrupts a guest's state on a VM exit).
awk 'BEGIN { for (i = 0; i < 2048; i++) printf "%-4095s\n", "citadel-lab-restart-block-" i }' >/tmp/rs.expected

vm=rs
attempt=1
while :; do
	rm -f /tmp/rs.img /tmp/rs.head
	truncate -s 16M /tmp/rs.img
	if [ "$RESTART_Q35" = 1 ]; then
		MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 "blk-restart lab.disk=vda" \
			-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
		device='"driver":"virtio-blk-pci","bus":"pcie.1","addr":"0x0"'
	else
		boot_guest $vm $GUEST/vmlinux 1 256 blk-restart
		device='"driver":"virtio-blk-mmio","addr":"0x1"'
	fi
	if l2_wait $vm "guest: restart waiting" 90; then
		qmp $vm '{"execute":"blockdev-add","arguments":{"node-name":"drive-0","file":{"driver":"file","filename":"/tmp/rs.img"},"cache":{"direct":false},"read-only":false}}' \
			'{"execute":"device_add","arguments":{"id":"drive-0",'"$device"',"drive":"drive-0"}}' \
			>/dev/null
		if l2_wait $vm "guest: restart writing" 120; then
			backend=$(pidof citadel-blk)
			# Into the dd, which takes several seconds here.
			usleep 500000
			result killed-mid-dd "$([ "$(l2_count $vm 'guest: restart written')" = 0 ] && echo yes || echo no)"
			kill -9 $backend
			result killed "$(echo $backend | wc -w)"
			restarted=no
			for i in $(seq 100); do
				now=$(pidof citadel-blk)
				if [ -n "$now" ] && [ "$now" != "$backend" ]; then
					restarted=yes
					break
				fi
				usleep 100000
			done
			result backend-restarted $restarted
			if l2_wait $vm "guest: restart written" 300; then
				for key in dd-rc io-errors; do
					result $key "$(l2_value $vm $key)"
				done
			fi
			result takeovers "$(l2_count $vm 'took over in')"
			result gave-up "$(l2_count $vm 'cannot be restarted')"
		fi
	fi
	[ "$(l2_count $vm 'guest: restart written')" = 0 ] && grep -q 'triple fault' /tmp/$vm.log && [ $attempt = 1 ] || break
	echo "lab: $vm triple-faulted before dd was done; booting it once more"
	result $vm.retried "triple fault"
	stop_guest $vm
	attempt=2
done
stop_guest $vm
head -c 8388608 /tmp/rs.img >/tmp/rs.head
result image-matches "$(cmp -s /tmp/rs.head /tmp/rs.expected && echo yes || echo no)"
rm -f /tmp/rs.img /tmp/rs.expected /tmp/rs.head
