# citadel-jailer starts Citadel booting Linux to user space in new PID, mount, network, user,
# IPC and UTS namespaces; every Citadel thread is under a seccomp filter, checked from L1's
# /proc while the guest runs.
id=labvm
root=/srv/jailer/citadel/$id/root
mkdir -p $root
cp $GUEST/vmlinux $GUEST/initramfs.cpio.gz $root/
l2_start jail citadel-jailer --id $id --exec-file /lab/bin/citadel --uid 1000 --gid 1000 \
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
citadel-qmp --tag "qmp jail" $root/qmp.sock '{"execute":"query-status"}' '{"execute":"quit"}' >/dev/null
exited $pid 10 && result exited yes
