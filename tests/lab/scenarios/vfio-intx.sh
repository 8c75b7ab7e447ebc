# INTx passthrough, in the lab's VFIO variant: L0's virtio-blk disk (bound to vfio-pci in L1)
# given to a q35 guest on the command line (-device vfio-pci), whose kernel runs with
# pci=nomsi: the guest's virtio-pci driver can only use the function's INTx pin, which reaches
# the guest's IOAPIC through the root port's line (the DSDT's _PRT), a KVM irqfd with a
# resample eventfd and VFIO's unmask. The guest reads the disk's marker and makes and writes a
# file system on it, and its /proc/interrupts shows the line firing.
vm=vfiointx
disk=$(l1_function 0x1af4:0x1042)
result disk-address "$disk"
[ -n "$disk" ] || exit 1
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 "pci-hotplug lab.rounds=1 pci=nomsi" \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1 \
	-device vfio-pci,host=$disk,id=disk0,bus=pcie.1,addr=0x0
if l2_wait $vm "guest: pci-hotplug unplug-ready 1" 120; then
	for key in round1-size round1-marker mkfs mount file-write round1-msix-vectors \
		round1-intx-chip round1-intx-count; do
		result $key "$(l2_value $vm $key)"
	done
fi
stop_guest $vm
result l1-driver-after "$(l1_driver $disk)"
