# Cards on the q35 command line: a virtio-blk-pci disk in root port pcie.1 and a
# virtio-net-pci NIC in pcie.2, plugged before the guest starts. Linux finds both when it
# first enumerates the bus (virtio-pci binds them, vda and eth0 exist at user space), with no
# hotplug error; the disk then leaves with device_del like a hot-plugged one, its
# DEVICE_DELETED after the guest released the slot.
rm -f /tmp/cold.img
truncate -s 32M /tmp/cold.img
vm=q35cold
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 pci \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1 \
	-device pcie-root-port,id=pcie.2,port=0x2,bus=pcie.0,addr=0x2 \
	-drive file=/tmp/cold.img,id=disk0,if=none \
	-device virtio-blk-pci,drive=disk0,id=disk0,bus=pcie.1,addr=0x0 \
	-netdev tap,id=net0,ifname=tap0 \
	-device virtio-net-pci,netdev=net0,id=net0,bus=pcie.2,addr=0x0,mac=52:54:00:12:34:57
if l2_wait $vm "guest: pci done" 120; then
	for key in disks pci-functions pci-drivers pci-problems kernel-errors; do
		result $key "$(l2_value $vm $key)"
	done
	qmp $vm '{"execute":"device_del","arguments":{"id":"disk0"}}' wait-event:DEVICE_DELETED >/tmp/$vm.del
	result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
	result del-data "$(grep -F DEVICE_DELETED /tmp/$vm.del | grep -o '"data":{[^}]*}')"
fi
stop_guest $vm
