# StratoVirt's guide's disk hotplug on the standard machine, against Linux: blockdev-add and
# device_add put a virtio-blk-pci card into root port pcie.1 of a running q35 guest; pciehp
# finds it and virtio-blk binds it (vda); the guest makes an ext2 file system on it and writes
# a file. device_del returns at once; DEVICE_DELETED comes only once pciehp has powered the
# slot off and the card left; blockdev-del then ends the citadel-blk. The file's bytes are
# then found in the image in L1. The card is then plugged and unplugged again, 20 times in
# all, the guest reading the host's marker each time; every second round plugs the node the
# round before kept, with its backend (see pci_disk_rounds in lib.sh).
rm -f /tmp/q35hp.img
truncate -s 64M /tmp/q35hp.img
printf 'citadel-lab-hotplug-marker!' | dd of=/tmp/q35hp.img conv=notrunc 2>/dev/null

rounds=20
vm=q35hp
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 "pci-hotplug lab.rounds=$rounds" \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
l2_wait $vm "guest: pci-hotplug waiting 1" 90
pci_disk_rounds $vm /tmp/q35hp.img $rounds
