# VFIO passthrough hotplug on the q35 machine, in the lab's VFIO variant: L1's edu device
# (1234:11e8, bound to vfio-pci) goes into root port pcie.1 of a running guest with QMP
# device_add vfio-pci; pciehp finds it and the guest's edu-probe drives it through its BAR,
# has it move 2 KiB each way by DMA through guest RAM and send an MSI that reaches the guest's
# CPU (see the guest's vfio-edu mode). device_del returns at once, DEVICE_DELETED follows once
# the guest released the slot, the edu is still vfio-pci's in L1, and it goes in and out once
# more. First, device_add refuses what it must: a host device that does not exist, one that
# is not vfio-pci's, one whose IOMMU group is not viable, an addr other than 0x0 and the root
# bus.
vm=vfiohp
rounds=2

edu=$(l1_function 0x1234:0x11e8)
result edu-address "$edu"
[ -n "$edu" ] || exit 1
group=$(basename "$(readlink /sys/bus/pci/devices/$edu/iommu_group)")
# group_users [GROUP]: how many open files of all processes are VFIO group GROUP (the edu's
# when not given).
group_users() {
	ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c " -> /dev/vfio/${1:-$group}\$"
}
# edu_add ARGUMENTS FILE: device_add of vfio-pci with the JSON members ARGUMENTS.
edu_add() {
	qmp $vm '{"execute":"device_add","arguments":{"driver":"vfio-pci","id":"edu0",'"$1"'}}' >"$2"
	cat "$2"
}

result l1-driver "$(l1_driver $edu)"
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 "vfio-edu lab.rounds=$rounds" \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1 \
	-device pcie-root-port,id=pcie.2,port=0x2,bus=pcie.0,addr=0x2
if l2_wait $vm "guest: vfio-edu waiting 1" 90; then
	edu_add '"bus":"pcie.1","addr":"0x0","host":"0000:00:1f.7"' /tmp/$vm.err1
	result err-unknown-host "$(qmp_desc /tmp/$vm.err1)"
	edu_add '"bus":"pcie.1","addr":"0x0","host":"0000:00:00.0"' /tmp/$vm.err2
	result err-not-vfio "$(qmp_desc /tmp/$vm.err2)"
	# Function 0 of L1's two-function virtio-rng device is vfio-pci's, its sibling in the
	# same IOMMU group is not.
	shared=$(l1_function 0x1af4:0x1044)
	edu_add '"bus":"pcie.1","addr":"0x0","host":"'$shared'"' /tmp/$vm.err8
	result err-not-viable "$(qmp_desc /tmp/$vm.err8)"
	shared_group=$(basename "$(readlink /sys/bus/pci/devices/$shared/iommu_group)")
	result shared-group-users "$(group_users $shared_group)"
	edu_add '"bus":"pcie.1","addr":"0x1","host":"'$edu'"' /tmp/$vm.err3
	result err-addr "$(qmp_desc /tmp/$vm.err3)"
	edu_add '"bus":"pcie.0","addr":"0x0","host":"'$edu'"' /tmp/$vm.err4
	result err-bus "$(qmp_desc /tmp/$vm.err4)"
	result group-users-refused "$(group_users)"

	added=0 deleted=0 after=
	r=1
	while [ $r -le $rounds ]; do
		edu_add '"bus":"pcie.1","addr":"0x0","host":"'$edu'"' /tmp/$vm.add.$r
		# The first `"return":{}` answers qmp_capabilities.
		if [ "$(sed '1,/"return":{}/d' /tmp/$vm.add.$r | grep -c '"return":{}')" != 1 ]; then
			result round$r-add-error "$(qmp_desc /tmp/$vm.add.$r)"
			break
		fi
		added=$((added + 1))
		l2_wait $vm "guest: vfio-edu unplug-ready $r" 120 || break
		result round$r-group-users "$(group_users)"
		if [ $r = 1 ]; then
			# While plugged: its slot is occupied, and the function cannot go in twice.
			qmp $vm '{"execute":"device_add","arguments":{"driver":"vfio-pci","id":"edu1","bus":"pcie.1","addr":"0x0","host":"'$edu'"}}' >/tmp/$vm.err5
			result err-occupied "$(qmp_desc /tmp/$vm.err5)"
			qmp $vm '{"execute":"device_add","arguments":{"driver":"vfio-pci","id":"edu1","bus":"pcie.2","addr":"0x0","host":"'$edu'"}}' >/tmp/$vm.err6
			result err-twice "$(qmp_desc /tmp/$vm.err6)"
			# A passed-through function's state is the hardware's: no snapshot while it is in.
			qmp $vm '{"execute":"migrate","arguments":{"uri":"file:/tmp/vfio-snap"}}' >/tmp/$vm.err7
			result err-migrate "$(qmp_desc /tmp/$vm.err7)"
			result snapshot-written "$([ -e /tmp/vfio-snap/state ] && echo yes || echo no)"
		fi
		# device_del answers at once; the event follows once the guest let the device go.
		qmp $vm '{"execute":"device_del","arguments":{"id":"edu0"}}' \
			wait-event:DEVICE_DELETED >/tmp/$vm.del.$r
		cat /tmp/$vm.del.$r
		if [ $r = 1 ]; then
			result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del.1 | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
			result del-data "$(grep -F DEVICE_DELETED /tmp/$vm.del.1 | grep -o '"data":{[^}]*}')"
		fi
		grep -q DEVICE_DELETED /tmp/$vm.del.$r && deleted=$((deleted + 1))
		after="$after $(l1_driver $edu)"
		l2_wait $vm "guest: round$r-after=" 60 || break
		r=$((r + 1))
	done
	result added "$added"
	result deleted-after-release "$deleted"
	result l1-driver-after-unplug "${after# }"
	result group-users-after-unplug "$(group_users)"
	for key in edu-id edu-not edu-fact edu-dma edu-irq-status edu-msi probe-rc after; do
		result $key "$(l2_value $vm round1-$key)"
		result round$rounds-$key "$(l2_value $vm round$rounds-$key)"
	done
	# A round cut short leaves the guest waiting for a device that does not come.
	if [ $r -gt $rounds ]; then
		# Each plug's BAR 0 became a memory slot at the guest's first access.
	result bars-mapped "$(l2_count $vm 'mapped into the guest (memory slot')"
	l2_wait $vm "guest: vfio-edu done" 30 && result guest-done yes
		# The guest's last word, after its dmesg excerpt.
		l2_wait $vm "guest: hotplug-errors=" 30 && result hotplug-errors "$(l2_value $vm hotplug-errors)"
	fi
fi
stop_guest $vm
