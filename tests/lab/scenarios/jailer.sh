# citadel-jailer starts Citadel booting Linux to user space in new PID, mount, network, user,
# IPC and UTS namespaces; every Citadel thread is under a seccomp filter, checked from L1's
# /proc while the guest runs. A disk hot-plugged over QMP inside the jail is served by a
# citadel-blk in the same namespaces and cgroup, unprivileged and filtered.
id=labvm
root=/srv/jailer/citadel/$id/root
mkdir -p $root
cp $GUEST/vmlinux $GUEST/initramfs.cpio.gz $root/
l2_start jail citadel-jailer --id $id --exec-file /lab/bin/citadel --uid 1000 --gid 1000 \
	--backend-file /lab/bin/citadel-blk --backend-file /lab/bin/citadel-net \
	--new-pid-ns --new-netns --userns --landlock --keep-stdio -- \
	-machine microvm -kernel /vmlinux -initrd /initramfs.cpio.gz \
	-append "console=ttyS0 panic=-1 quiet lab.mode=report" -smp 2 -m 256 \
	-qmp unix:/qmp.sock,server,nowait -serial stdio
l2_wait jail "guest: user space up" 90 && result user-space yes
pid=$(cat /srv/jailer/citadel/$id/citadel.pid 2>/dev/null)
result pid-found "${pid:+yes}"
[ -n "$pid" ] || exit 1
result nspid "$(sed -n 's/^NSpid:[[:space:]]*//p' /proc/$pid/status | tr '\t' ' ')"
result uid "$(sed -n 's/^Uid:[[:space:]]*//p' /proc/$pid/status | tr '\t' ' ')"
result no-new-privs "$(sed -n 's/^NoNewPrivs:[[:space:]]*//p' /proc/$pid/status)"
result cap-eff "$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/$pid/status)"
own=0
for ns in pid mnt net user ipc uts; do
	[ "$(readlink /proc/$pid/ns/$ns)" != "$(readlink /proc/1/ns/$ns)" ] && own=$((own + 1))
done
result own-namespaces $own
threads=0
filtered=0
for task in /proc/$pid/task/*; do
	threads=$((threads + 1))
	grep -q '^Seccomp:[[:space:]]*2' $task/status && filtered=$((filtered + 1))
done
result threads $threads
result filtered-threads $filtered

# Disk hotplug in the jail: the image is named by its path inside the jail, and a path
# climbing out of it resolves inside it all the same.
truncate -s 16M $root/disk.img
chown 1000:1000 $root/disk.img
citadel-qmp --tag "qmp jail" $root/qmp.sock \
	'{"execute":"blockdev-add","arguments":{"node-name":"escape","file":{"driver":"file","filename":"/../../../../lab/guest/vmlinux"}}}' \
	'{"execute":"blockdev-add","arguments":{"node-name":"drive-0","file":{"driver":"file","filename":"/disk.img"}}}' \
	'{"execute":"device_add","arguments":{"id":"drive-0","driver":"virtio-blk-mmio","addr":"0x0","drive":"drive-0"}}' \
	| tee /tmp/jail.add
result escape-refused "$(grep -c 'No such file or directory' /tmp/jail.add)"
result hotplug-returns "$(sed '1,/"return":{}/d' /tmp/jail.add | grep -c '"return":{}')"
backend=
for launcher in $(cat /proc/$pid/task/*/children); do
	for child in $(cat /proc/$launcher/task/*/children); do
		grep -q '^Name:[[:space:]]*citadel-blk' /proc/$child/status && backend=$child
	done
done
result backend-found "${backend:+yes}"
if [ -n "$backend" ]; then
	result backend-uid "$(sed -n 's/^Uid:[[:space:]]*//p' /proc/$backend/status | tr '\t' ' ')"
	result backend-seccomp "$(sed -n 's/^Seccomp:[[:space:]]*//p' /proc/$backend/status)"
	result backend-no-new-privs "$(sed -n 's/^NoNewPrivs:[[:space:]]*//p' /proc/$backend/status)"
	result backend-cap-eff "$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/$backend/status)"
	same=0
	for ns in pid mnt net user ipc uts; do
		[ "$(readlink /proc/$backend/ns/$ns)" = "$(readlink /proc/$pid/ns/$ns)" ] && same=$((same + 1))
	done
	result backend-shared-namespaces $same
	[ "$(cat /proc/$backend/cgroup)" = "$(cat /proc/$pid/cgroup)" ] && result backend-same-cgroup yes
	citadel-qmp --tag "qmp jail" $root/qmp.sock '{"execute":"device_del","arguments":{"id":"drive-0"}}' >/dev/null
	gone=no
	for i in $(seq 50); do
		[ -d /proc/$backend ] || { gone=yes; break; }
		usleep 100000
	done
	result backend-gone $gone
fi
citadel-qmp --tag "qmp jail" $root/qmp.sock '{"execute":"query-status"}' '{"execute":"quit"}' >/dev/null
exited $pid 10 && result exited yes
