# StratoVirt's guide's NIC hotplug on the lightweight machine, against Linux: eth0 (NIC slot
# 0) has no carrier until netdev_add starts a citadel-net on tap0 (the launcher creates the
# tap, as root in L1) and device_add plugs it; L1 gives the tap an address and the guest pings
# it; device_del takes the NIC out (DEVICE_DELETED before the return, carrier down, the
# backend stays) and netdev_del ends the backend.
vm=nic
boot_guest $vm $GUEST/vmlinux 1 256 nic
if l2_wait $vm "guest: nic waiting" 90; then
	result nics "$(l2_value $vm nics)"
	result eth0-mac "$(l2_value $vm eth0-mac)"
	result carrier-empty "$(l2_value $vm eth0-carrier-empty)"
	qmp $vm '{"execute":"netdev_add","arguments":{"id":"net-0","ifname":"tap0"}}' \
		'{"execute":"device_add","arguments":{"id":"net-0","driver":"virtio-net-mmio","netdev":"net-0","addr":"0x0"}}' \
		| tee /tmp/$vm.add
	# Replies after the negotiation's own.
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	ip addr add 10.77.1.1/24 dev tap0
	ip link set tap0 up
	backend=$(pidof citadel-net)
	result backend-count "$(echo $backend | wc -w)"
	if [ -n "$backend" ]; then
		result backend-seccomp "$(sed -n 's/^Seccomp:[[:space:]]*//p' /proc/$backend/status)"
	fi
	if l2_wait $vm "guest: nic unplug-ready" 120; then
		result carrier "$(l2_value $vm eth0-carrier)"
		result ping "$(l2_value $vm ping)"
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"net-0"}}' | tee /tmp/$vm.del
	# The event line comes before the reply line.
	result del-order "$(sed '1,/"return":{}/d' /tmp/$vm.del | grep -oE 'DEVICE_DELETED|"return":\{\}' | tr '\n' ' ')"
	if l2_wait $vm "guest: nic unplugged" 60; then
		result carrier-after "$(l2_value $vm eth0-carrier-after)"
	fi
	if [ -n "$backend" ] && [ -d /proc/$backend ]; then
		result backend-after-device-del alive
	fi
	qmp $vm '{"execute":"netdev_del","arguments":{"id":"net-0"}}' >/dev/null
	result backend-gone "$(gone_within "$backend" 5)"
fi
stop_guest $vm
