# A q35 VM with a NIC card is snapshotted while its Linux pings L1 and is restored from the
# snapshot: the card (virtio-net-pci in root port pcie.1, cold-plugged with a netdev on tap0)
# is saved with its transport and MSI-X table, the restored VM gets a new citadel-net for it
# from the same command line plus `-incoming`, and the guest's own count of pings carries on
# through that backend, without booting again. Each VM's launcher creates tap0, which L1 then
# gives the same MAC and address, as the host side of a restored VM's network would be (a
# new MAC would leave the guest's neighbour entry for L1 pointing at the old one for tens of
# seconds).
dir=/tmp/nicsnap-dir
rm -rf $dir
port="-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1"
# configure_tap: gives tap0 L1's MAC and address once a VM's launcher created it.
configure_tap() {
	for i in $(seq 100); do
		[ -d /sys/class/net/tap0 ] && break
		usleep 100000
	done
	ip link set tap0 address 02:00:0a:4d:01:01
	ip addr add 10.77.1.1/24 dev tap0
	ip link set tap0 up
}
# pings_after NAME N: how many of NAME's pings numbered above N were answered.
pings_after() {
	sed -n 's/^guest: ping \([0-9]*\) rc=0$/\1/p' /tmp/$1.log | awk -v n="$2" '$1 > n' | wc -l
}
# wait_pings NAME N COUNT: waits up to 120 s for COUNT answered pings numbered above N.
wait_pings() {
	i=0
	while [ "$(pings_after $1 $2)" -lt $3 ] && [ $i -lt 1200 ]; do
		usleep 100000
		i=$((i + 1))
	done
	[ "$(pings_after $1 $2)" -ge $3 ]
}

vm=nicsnap
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 nic-pings $port \
	-netdev tap,id=net-0,ifname=tap0 \
	-device virtio-net-pci,netdev=net-0,id=net-0,bus=pcie.1,mac=52:54:00:12:34:56
configure_tap
if wait_pings $vm -1 3; then
	result answered-before yes
	qmp $vm "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"file:$dir\"}}" \
		'{"execute":"query-migrate"}' >/tmp/$vm.migrate
	grep -q '"event":"STOP"' /tmp/$vm.migrate && result stop-event yes
	grep -q '"return":{}' /tmp/$vm.migrate && result migrate ok
	result status "$(grep -o '"status":"[a-z-]*"' /tmp/$vm.migrate | tail -n1 | cut -d'"' -f4)"
fi
stop_guest $vm
# The first VM's tap goes with its netdev; the restored VM's launcher makes another.
for i in $(seq 100); do
	[ -d /sys/class/net/tap0 ] || break
	usleep 100000
done
last=$(sed -n 's/^guest: ping \([0-9]*\) rc=.*$/\1/p' /tmp/$vm.log | tail -n1)
result last-ping "$last"

vm=nicsnap-restored
start=$(now_ms)
MACHINE=q35 boot_guest $vm $GUEST/vmlinux 1 256 nic-pings $port \
	-netdev tap,id=net-0,ifname=tap0 \
	-device virtio-net-pci,netdev=net-0,id=net-0,bus=pcie.1,mac=52:54:00:12:34:56 \
	-incoming "file:$dir"
configure_tap
if [ -n "$last" ] && wait_pings $vm "$last" 3; then
	result answered-after-restore-ms $(($(now_ms) - start))
	result first-ping "$(sed -n 's/^guest: ping \([0-9]*\) rc=.*$/\1/p' /tmp/$vm.log | head -n1)"
	result answered-after "$(pings_after $vm "$last")"
fi
result boots "$(l2_count $vm 'guest: user space up')"
result backends "$(pidof citadel-net | wc -w)"
stop_guest $vm
rm -rf $dir
