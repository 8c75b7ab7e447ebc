# MSI-X passthrough, in the lab's VFIO variant: L0's virtio-blk-pci disk (1af4:1042, behind
# L0's IOMMU, bound to vfio-pci in L1) goes into root port pcie.1 of a running q35 guest with
# QMP device_add vfio-pci. The guest's own virtio-pci and virtio-blk drivers take it with
# MSI-X (Citadel's table; the function signals the vectors' eventfds, irqfds of their GSIs),
# read the marker the lab wrote at the disk's start, make a file system on it and write a file
# (DMA both ways through the IOMMU); the guest's /proc/interrupts shows which MSI-X vectors
# fired. device_del then hands the disk back to L1's vfio-pci.
vm=vfiomsix
disk=$(l1_function 0x1af4:0x1042)
result disk-address "$disk"
[ -n "$disk" ] || exit 1
result l1-driver "$(l1_driver $disk)"
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 "pci-hotplug lab.rounds=1" \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
if l2_wait $vm "guest: pci-hotplug waiting 1" 90; then
	qmp $vm '{"execute":"device_add","arguments":{"driver":"vfio-pci","id":"disk0","bus":"pcie.1","addr":"0x0","host":"'$disk'"}}' \
		>/tmp/$vm.add
	cat /tmp/$vm.add
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	if l2_wait $vm "guest: pci-hotplug unplug-ready 1" 120; then
		for key in round1-size round1-marker mkfs mount file-write round1-msix-vectors round1-msix-fired; do
			result $key "$(l2_value $vm $key)"
		done
		result bars-mapped "$(l2_count $vm 'mapped into the guest (memory slot')"
		qmp $vm '{"execute":"device_del","arguments":{"id":"disk0"}}' wait-event:DEVICE_DELETED \
			>/tmp/$vm.del
		cat /tmp/$vm.del
		result deleted "$(grep -c '"event":"DEVICE_DELETED"' /tmp/$vm.del)"
		l2_wait $vm "guest: pci-hotplug done" 60 && result guest-done yes
		l2_wait $vm "guest: hotplug-errors=" 30 && result hotplug-errors "$(l2_value $vm hotplug-errors)"
	fi
fi
result l1-driver-after "$(l1_driver $disk)"
stop_guest $vm
