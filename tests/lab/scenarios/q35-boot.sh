# The q35 machine: the project's guest kernel (vmlinux, PVH entry) with two PCIe root ports,
# and Debian's unmodified cloud kernel (bzImage) with one, boot to user space; each finds the
# PCI host bridge through ACPI (MCFG and the DSDT's PCI0), reaches config space through ECAM,
# binds pcieport to the root ports and registers their hotplug slots with pciehp (see the
# guest's `pci` mode). QMP query-status answers and QMP quit ends each VM.

# Everything the guest's `pci` mode reports, passed on as NAME.KEY.
PCI_KEYS="nproc memtotal_kb dmesg-problems pci-functions pci-drivers pci-config-sizes
	pci-bridge-windows pcie-services pci-slots pciehp-slots pciehp-slot-1 pciehp-slot-2
	pciehp-irqs pciehp-msi-irqs acpi-pci-root acpi-host-bridge-windows root-bus-resources
	mmconfig mmconfig-reserved config-access osc-supports osc-controls osc-not-granted
	pci-problems kernel-errors"

# boot_pci NAME KERNEL SECONDS [CITADEL ARGS...]: boots KERNEL on q35 in pci mode, reports
# what the guest saw, the VM's QMP status and its exit. A guest that triple-faults before its
# report is booted once more (see boot_and_report in lib.sh), and the test sees NAME.retried.
boot_pci() {
	vm=$1 image=$2 seconds=$3
	shift 3
	attempt=1
	while :; do
		start=$(now_ms)
		MACHINE=q35 boot_guest $vm "$image" 1 256 pci "$@"
		l2_wait $vm "guest: user space up" "$seconds" && result $vm.boot_ms $(($(now_ms) - start))
		l2_wait $vm "guest: pci done" 30 && break
		grep -q 'triple fault' "/tmp/$vm.log" && [ $attempt = 1 ] || break
		echo "lab: $vm triple-faulted before its report; booting it once more"
		result $vm.retried "triple fault"
		stop_guest $vm
		attempt=2
	done
	for key in $PCI_KEYS; do
		result $vm.$key "$(l2_value $vm $key)"
	done
	qmp $vm '{"execute":"query-status"}' >/tmp/$vm.status
	result $vm.status "$(grep -o '"status":"[a-z-]*"' /tmp/$vm.status | tail -n1)"
	stop_guest $vm
}

boot_pci q35 $GUEST/vmlinux 90 \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1 \
	-device pcie-root-port,id=pcie.2,port=0x2,bus=pcie.0,addr=0x2
INITRD=/lab/stock/initramfs.cpio.gz boot_pci stock-q35 /lab/stock/vmlinuz 150 \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
