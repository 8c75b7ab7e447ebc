# VFIO passthrough inside a jail, in the lab's VFIO variant. A jail the jailer was not told
# about sees no PCI function: device_add vfio-pci of the edu is refused there. A jail made with
# --vfio-device for the edu (and a locked-memory limit covering guest RAM, which the
# unprivileged VMM's DMA mapping pins) shows exactly that function's sysfs directory and its
# group's node, and the guest drives the edu through it (registers, DMA, MSI).
edu=$(l1_function 0x1234:0x11e8)
result edu-address "$edu"
[ -n "$edu" ] || exit 1
group=$(basename "$(readlink /sys/bus/pci/devices/$edu/iommu_group)")

# jail ID EXTRA-JAILER-ARGS...: starts a jailed q35 VM with root port pcie.1 in vfio-edu mode.
jail() {
	id=$1
	shift
	root=/srv/jailer/citadel/$id/root
	mkdir -p $root
	cp $GUEST/vmlinux $GUEST/initramfs.cpio.gz $root/
	l2_start $id citadel-jailer --id $id --exec-file /lab/bin/citadel --uid 1000 --gid 1000 \
		--backend-file /lab/bin/citadel-blk --backend-file /lab/bin/citadel-net \
		--new-pid-ns --new-netns --userns --landlock --keep-stdio "$@" -- \
		-machine q35 -kernel /vmlinux -initrd /initramfs.cpio.gz \
		-append "console=ttyS0 panic=-1 quiet lab.mode=vfio-edu lab.rounds=1" -smp 1 -m 256 \
		-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1 \
		-qmp unix:/qmp.sock,server,nowait -serial stdio
}
add='{"execute":"device_add","arguments":{"driver":"vfio-pci","id":"edu0","bus":"pcie.1","addr":"0x0","host":"'$edu'"}}'
quit='{"execute":"quit"}'

jail vfio-closed
if l2_wait vfio-closed "guest: vfio-edu waiting 1" 90; then
	citadel-qmp --tag "qmp vfio-closed" /srv/jailer/citadel/vfio-closed/root/qmp.sock "$add" "$quit" \
		>/tmp/vfio-closed.qmp
	cat /tmp/vfio-closed.qmp
	result closed-refused "$(qmp_desc /tmp/vfio-closed.qmp)"
fi
exited "$L2_PID" 10 || kill -9 "$L2_PID"

jail vfio-open --vfio-device "$edu" --resource-limit memlock=$((512 << 20))
if l2_wait vfio-open "guest: vfio-edu waiting 1" 90; then
	pid=$(cat /srv/jailer/citadel/vfio-open/citadel.pid 2>/dev/null)
	result jail-vfio-nodes "$(ls /proc/$pid/root/dev/vfio | sort | tr '\n' ' ')"
	result jail-pci-devices "$(ls /proc/$pid/root/sys/bus/pci/devices | tr '\n' ' ')"
	result jail-sys "$(ls /proc/$pid/root/sys | tr '\n' ' ')"
	result expected-nodes "$(printf '%s\n' $group vfio | sort | tr '\n' ' ')"
	result uid "$(sed -n 's/^Uid:[[:space:]]*//p' /proc/$pid/status | tr '\t' ' ')"
	citadel-qmp --tag "qmp vfio-open" /srv/jailer/citadel/vfio-open/root/qmp.sock "$add" \
		>/tmp/vfio-open.qmp
	cat /tmp/vfio-open.qmp
	result open-returns "$(sed '1,/"return":{}/d' /tmp/vfio-open.qmp | grep -c '"return":{}')"
	if l2_wait vfio-open "guest: vfio-edu unplug-ready 1" 120; then
		for key in edu-id edu-not edu-fact edu-dma edu-msi; do
			result $key "$(l2_value vfio-open round1-$key)"
		done
	fi
	citadel-qmp --tag "qmp vfio-open" /srv/jailer/citadel/vfio-open/root/qmp.sock "$quit" >/dev/null
	exited "$pid" 10 && result exited yes
fi
result l1-driver-after "$(l1_driver $edu)"
