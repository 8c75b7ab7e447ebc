# Benchmark (needs the lab started with QEMU inside, `citadel-lab --with-qemu`): the guest
# reads a disk with O_DIRECT (8 MiB 4 KiB at a time, 64 MiB 128 KiB at a time), one request in
# flight, then 4096 random 4 KiB reads with 32 in flight and 256 with one (aio-randread, the
# same offsets every run), served by citadel-blk under Citadel and by qemu-storage-daemon under
# QEMU's microvm machine (both vhost-user-blk, same guest kernel, initramfs, image, RAM and
# vCPU), alternating runs. Each run also reports Citadel's random-read IOPS over QEMU's.
runs=2

# randread_results VM WHO: VM's random-read figures, if its reads all succeeded.
randread_results() {
	for depth in 32 1; do
		if [ "$(l2_value $1 randread-qd$depth-rc)" = 0 ]; then
			result $2.randread-qd$depth-iops "$(l2_value $1 randread-qd$depth-iops)"
			result $2.randread-qd$depth-mib-s "$(l2_value $1 randread-qd$depth-mib_per_s)"
		else
			result $2.randread-qd$depth-error "$(l2_value $1 randread-qd$depth-error)"
		fi
	done
}

rm -f /tmp/bench.img
truncate -s 64M /tmp/bench.img
i=0
while [ $i -lt "$runs" ]; do
	i=$((i + 1))
	rm -f /tmp/cb.sock /tmp/qb.sock
	citadel-blk --socket /tmp/cb.sock --image /tmp/bench.img --readonly >/tmp/cb.log 2>&1 &
	blk=$!
	qemu-storage-daemon --blockdev driver=file,node-name=img,filename=/tmp/bench.img,read-only=on \
		--export type=vhost-user-blk,id=exp,node-name=img,addr.type=unix,addr.path=/tmp/qb.sock \
		>/tmp/qsd.log 2>&1 &
	qsd=$!
	for s in /tmp/cb.sock /tmp/qb.sock; do
		n=0
		while [ ! -S $s ] && [ $n -lt 500 ]; do usleep 20000; n=$((n + 1)); done
	done

	vm=cio$i
	boot_guest $vm $GUEST/vmlinux 1 256 bench-read \
		-chardev socket,id=c0,path=/tmp/cb.sock -device vhost-user-blk-device,chardev=c0
	if l2_wait $vm "guest: bench done" 300; then
		for bs in 4k 128k; do
			[ "$(l2_value $vm read-$bs-rc)" = 0 ] && result citadel.$bs-ms "$(l2_value $vm read-$bs-ms)"
		done
		randread_results $vm citadel
	fi
	stop_guest $vm

	vm=qio$i
	l2_start $vm qemu-system-x86_64 -M microvm,memory-backend=mem -accel kvm -cpu host -m 256 -smp 1 \
		-global virtio-mmio.force-legacy=false \
		-object memory-backend-memfd,id=mem,size=256M,share=on \
		-nodefaults -no-user-config -display none -serial stdio \
		-kernel $GUEST/vmlinux -initrd $GUEST/initramfs.cpio.gz \
		-append "console=ttyS0 panic=-1 quiet lab.mode=bench-read" \
		-chardev socket,id=c0,path=/tmp/qb.sock -device vhost-user-blk,chardev=c0 \
		-qmp "unix:/tmp/$vm.qmp,server,nowait"
	if l2_wait $vm "guest: bench done" 300; then
		for bs in 4k 128k; do
			[ "$(l2_value $vm read-$bs-rc)" = 0 ] && result qemu.$bs-ms "$(l2_value $vm read-$bs-ms)"
		done
		randread_results $vm qemu
	fi
	sed 's/^/qemu-storage-daemon: /' /tmp/qsd.log
	stop_guest $vm
	for depth in 32 1; do
		c=$(l2_value cio$i randread-qd$depth-iops)
		q=$(l2_value qio$i randread-qd$depth-iops)
		[ -n "$c" ] && [ -n "$q" ] && result ratio.randread-qd$depth-iops "$(awk -v c="$c" -v q="$q" 'BEGIN { printf "%.2f", c / q }')"
	done
	kill $blk $qsd 2>/dev/null
	wait $blk $qsd 2>/dev/null
done
