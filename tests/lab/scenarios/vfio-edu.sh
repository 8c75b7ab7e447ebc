# The lab's VFIO variant (`LabOptions::vfio`): L1 has an IOMMU and QEMU's educational PCI
# device (1234:11e8) bound to vfio-pci, so a VFIO group is there to pass through; and a
# two-function virtio-rng device (1af4:1044) whose functions share a group, function 0 bound
# to vfio-pci and function 1 to virtio-pci, so that group is not viable.
edu=$(l1_function 0x1234:0x11e8)
if [ -n "$edu" ]; then
	result edu-address "$edu"
	result edu-driver "$(l1_driver $edu)"
	group=$(basename "$(readlink /sys/bus/pci/devices/$edu/iommu_group)")
	result edu-group "$group"
	[ -c /dev/vfio/$group ] && result group-node yes
fi
[ -c /dev/vfio/vfio ] && result container-node yes
shared=$(l1_function 0x1af4:0x1044)
if [ -n "$shared" ]; then
	result shared-address "$shared"
	group=/sys/bus/pci/devices/$shared/iommu_group
	drivers=
	for dev in $group/devices/*; do
		drivers="$drivers ${dev##*/}=$(l1_driver ${dev##*/})"
	done
	result shared-group "${drivers# }"
fi
