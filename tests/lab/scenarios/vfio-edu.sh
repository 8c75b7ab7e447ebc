# The lab's VFIO variant (`LabOptions::vfio`): L1 has an IOMMU and QEMU's educational PCI
# device (1234:11e8) bound to vfio-pci, so a VFIO group is there to pass through.
for dev in /sys/bus/pci/devices/*; do
	[ "$(cat $dev/vendor):$(cat $dev/device)" = "0x1234:0x11e8" ] || continue
	result edu-address "${dev##*/}"
	result edu-driver "$(basename "$(readlink $dev/driver)")"
	group=$(basename "$(readlink $dev/iommu_group)")
	result edu-group "$group"
	[ -c /dev/vfio/$group ] && result group-node yes
done
[ -c /dev/vfio/vfio ] && result container-node yes
