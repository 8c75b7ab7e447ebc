# Debian's unmodified cloud kernel on the q35 machine, with its own virtio-pci and virtio-blk
# modules, uses a disk hot-plugged into root port pcie.1 over QMP as q35-hotplug's guest does
# (see pci_disk_rounds in lib.sh): built-in pciehp finds the virtio-blk-pci card, virtio-pci
# and virtio-blk bind it (vda), the guest reads the host's marker, makes an ext2 file system
# and writes a file; device_del's DEVICE_DELETED follows once pciehp released the slot, and
# blockdev-del ends the backend. Two rounds, the second plugging the node the first kept;
# the file's bytes are then found in the image.
#
# A guest that triple-faults before it waits for its first disk is booted once more, and the
# test sees stock-q35hp.retried (see boot_and_report in lib.sh).
rm -f /tmp/stock-q35hp.img
truncate -s 64M /tmp/stock-q35hp.img
printf 'citadel-lab-hotplug-marker!' | dd of=/tmp/stock-q35hp.img conv=notrunc 2>/dev/null

rounds=2
vm=stock-q35hp
attempt=1
while :; do
	start=$(now_ms)
	MACHINE=q35 INITRD=/lab/stock/initramfs.cpio.gz boot_guest $vm /lab/stock/vmlinuz 1 256 \
		"pci-hotplug lab.rounds=$rounds" -device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
	if l2_wait $vm "guest: pci-hotplug waiting 1" 180; then
		result $vm.boot_ms $(($(now_ms) - start))
		break
	fi
	grep -q 'triple fault' "/tmp/$vm.log" && [ $attempt = 1 ] || break
	echo "lab: $vm triple-faulted before it waited for its disk; booting it once more"
	result $vm.retried "triple fault"
	stop_guest $vm
	attempt=2
done
pci_disk_rounds $vm /tmp/stock-q35hp.img $rounds
