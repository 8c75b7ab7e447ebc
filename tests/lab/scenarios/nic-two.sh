# Both NIC slots in use: tap0 plugged as eth0 (10.77.1.0/24) and tap1 as eth1 (10.77.2.0/24).
# Over each NIC the guest pings L1 and moves 10 MiB each way with busybox nc (L1 listens on
# ports 5000+N for what the guest sends and 6000+N for what it receives), both ends report
# checksums and byte counters; then both NICs are unplugged and both backends end.
vm=nic2
dd if=/dev/urandom of=/tmp/l1tx bs=1M count=10 2>/dev/null
result l1-tx-md5 "$(md5sum </tmp/l1tx | cut -d' ' -f1)"
# Busybox nc ends the connection as soon as its standard input ends: the receiving one reads
# a FIFO that stays open and silent.
rm -f /tmp/nic2.hold
mkfifo /tmp/nic2.hold
sleep 1000000 >/tmp/nic2.hold &
helpers=$!
for n in 0 1; do
	rm -f /tmp/nic2-rx$n
	nc -l -p 500$n </tmp/nic2.hold >/tmp/nic2-rx$n &
	helpers="$helpers $!"
	nc -l -p 600$n </tmp/l1tx >/dev/null &
	helpers="$helpers $!"
done

boot_guest $vm $GUEST/vmlinux 1 256 nic-two
if l2_wait $vm "guest: nic-two waiting" 90; then
	result guest-tx-md5 "$(l2_value $vm tx-md5)"
	qmp $vm '{"execute":"netdev_add","arguments":{"id":"net-0","ifname":"tap0"}}' \
		'{"execute":"device_add","arguments":{"id":"net-0","driver":"virtio-net-mmio","netdev":"net-0","addr":"0x0"}}' \
		'{"execute":"netdev_add","arguments":{"id":"net-1","ifname":"tap1"}}' \
		'{"execute":"device_add","arguments":{"id":"net-1","driver":"virtio-net-mmio","netdev":"net-1","addr":"0x1"}}' \
		| tee /tmp/$vm.add
	result add-returns "$(sed '1,/"return":{}/d' /tmp/$vm.add | grep -c '"return":{}')"
	for n in 0 1; do
		ip addr add 10.77.$((n + 1)).1/24 dev tap$n
		ip link set tap$n up
	done
	result backend-count "$(pidof citadel-net | wc -w)"
	if l2_wait $vm "guest: nic-two unplug-ready" 300; then
		for n in 0 1; do
			for key in carrier ping send receive send-ms receive-ms rx-md5 rx-size rx-bytes tx-bytes; do
				result eth$n-$key "$(l2_value $vm eth$n-$key)"
			done
			result l1-rx$n-md5 "$(md5sum </tmp/nic2-rx$n | cut -d' ' -f1)"
			result l1-rx$n-size "$(wc -c </tmp/nic2-rx$n)"
			result tap$n-rx-bytes "$(cat /sys/class/net/tap$n/statistics/rx_bytes)"
			result tap$n-tx-bytes "$(cat /sys/class/net/tap$n/statistics/tx_bytes)"
		done
	fi
	qmp $vm '{"execute":"device_del","arguments":{"id":"net-0"}}' \
		'{"execute":"device_del","arguments":{"id":"net-1"}}' | tee /tmp/$vm.del
	result del-events "$(grep -c '"event":"DEVICE_DELETED"' /tmp/$vm.del)"
	if l2_wait $vm "guest: nic-two unplugged" 60; then
		for n in 0 1; do
			result eth$n-carrier-after "$(l2_value $vm eth$n-carrier-after)"
		done
	fi
	qmp $vm '{"execute":"netdev_del","arguments":{"id":"net-0"}}' \
		'{"execute":"netdev_del","arguments":{"id":"net-1"}}' >/dev/null
	left=$(pidof citadel-net | wc -w)
	for i in $(seq 50); do
		[ "$left" = 0 ] && break
		usleep 100000
		left=$(pidof citadel-net | wc -w)
	done
	result backends-left "$left"
fi
# Whatever the transfers left running (all of it, if one failed) ends with the scenario.
for pid in $helpers; do
	kill $pid 2>/dev/null
done
stop_guest $vm
