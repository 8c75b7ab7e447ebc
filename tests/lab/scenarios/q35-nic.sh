# StratoVirt's guide's NIC hotplug on the standard machine, against Linux: netdev_add starts a
# citadel-net on tap0 and device_add puts a virtio-net-pci card with the given MAC into root
# port pcie.1 of a running q35 guest; pciehp finds it, virtio-net binds it (eth0), and the
# guest pings L1 and moves 4 MiB each way with busybox nc (L1 listens on 5000 for what the
# guest sends and 6000 for what it receives), both ends checking checksums. device_del
# returns at once, DEVICE_DELETED follows once the guest released the slot, the netdev keeps
# its backend for a second device_add and device_del, and netdev_del then ends it. Once the
# guest's first bytes reach L1 (its ping is done), L1 kills the citadel-net with SIGKILL:
# Citadel starts another on the same tap and hands it the card's rings mid-transfer, and all
# of the above still holds. The launcher created tap0, and the netdev holds its queue: the
# very interface (same index, same MAC, the address L1 gave it) outlives the dead backend,
# untouched by L1.
vm=q35nic
dd if=/dev/urandom of=/tmp/q35nic.tx bs=1M count=4 2>/dev/null
result l1-tx-md5 "$(md5sum </tmp/q35nic.tx | cut -d' ' -f1)"
# Busybox nc ends the connection as soon as its standard input ends: the receiving one reads
# a FIFO that stays open and silent.
rm -f /tmp/q35nic.hold /tmp/q35nic.rx
mkfifo /tmp/q35nic.hold
sleep 1000000 >/tmp/q35nic.hold &
helpers=$!
nc -l -p 5000 </tmp/q35nic.hold >/tmp/q35nic.rx &
helpers="$helpers $!"
nc -l -p 6000 </tmp/q35nic.tx >/dev/null &
helpers="$helpers $!"

MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 pci-nic \
	-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1
if l2_wait $vm "guest: pci-nic waiting" 90; then
	result guest-tx-md5 "$(l2_value $vm tx-md5)"
	qmp $vm '{"execute":"netdev_add","arguments":{"id":"net-0","ifname":"tap0"}}' \
		'{"execute":"device_add","arguments":{"id":"net-0","driver":"virtio-net-pci","netdev":"net-0","bus":"pcie.1","addr":"0x0","mac":"52:54:00:12:34:56"}}' \
		>/tmp/$vm.add
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	ip addr add 10.77.1.1/24 dev tap0
	ip link set tap0 up
	tap_before="$(cat /sys/class/net/tap0/ifindex) $(cat /sys/class/net/tap0/address)"
	backend=$(pidof citadel-net)
	result backend-count "$(echo $backend | wc -w)"
	if l2_wait $vm "guest: eth0-carrier=" 120; then
		for i in $(seq 6000); do
			[ -s /tmp/q35nic.rx ] && break
			usleep 10000
		done
		kill -9 $backend
		# What L1 had received when the backend died: some of the 4 MiB, not all.
		result rx-at-kill "$(wc -c </tmp/q35nic.rx)"
		restarted=no
		for i in $(seq 100); do
			now=$(pidof citadel-net)
			if [ -n "$now" ] && [ "$now" != "$backend" ]; then
				restarted=yes
				backend=$now
				break
			fi
			usleep 100000
		done
		result backend-restarted $restarted
		tap_after="$(cat /sys/class/net/tap0/ifindex) $(cat /sys/class/net/tap0/address)"
		if [ "$tap_after" = "$tap_before" ]; then
			result tap-kept yes
		else
			result tap-kept "no: $tap_before, then $tap_after"
		fi
		result tap-address "$(ip -4 addr show dev tap0 | grep -c 'inet 10.77.1.1/24')"
	fi
	if l2_wait $vm "guest: pci-nic unplug-ready" 180; then
		result takeovers "$(l2_count $vm 'took over in')"
		for key in eth0-mac eth0-carrier ping send receive rx-md5 rx-size; do
			result $key "$(l2_value $vm $key)"
		done
		result l1-rx-md5 "$(md5sum </tmp/q35nic.rx | cut -d' ' -f1)"
		result l1-rx-size "$(wc -c </tmp/q35nic.rx)"
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"net-0"}}' wait-event:DEVICE_DELETED >/tmp/$vm.del
	result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
	result del-data "$(grep -F DEVICE_DELETED /tmp/$vm.del | grep -o '"data":{[^}]*}')"
	l2_wait $vm "guest: pci-nic done" 60 && result eth0-after "$(l2_value $vm eth0-after)"
	result hotplug-errors "$(l2_value $vm hotplug-errors)"
	# The netdev kept its backend: the same netdev goes into the slot again, and out.
	qmp $vm '{"execute":"device_add","arguments":{"id":"net-0","driver":"virtio-net-pci","netdev":"net-0","bus":"pcie.1","addr":"0x0"}}' \
		'{"execute":"device_del","arguments":{"id":"net-0"}}' wait-event:DEVICE_DELETED >/tmp/$vm.again
	result replug "$(grep -c '"return":{}' /tmp/$vm.again) $(grep -c DEVICE_DELETED /tmp/$vm.again)"
	[ -n "$backend" ] && [ -d /proc/$backend ] && result backend-after-device-del alive
	qmp $vm '{"execute":"netdev_del","arguments":{"id":"net-0"}}' >/dev/null
	result backend-gone "$(gone_within "$backend" 5)"
fi
for pid in $helpers; do
	kill $pid 2>/dev/null
done
stop_guest $vm
