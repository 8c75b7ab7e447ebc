# The project's guest kernel (vmlinux, PVH entry) boots to user space with 1, 2 and 4 vCPUs;
# the guest reports what it sees; QMP quit ends each VM.
for smp in 1 2 4; do
	boot_and_report smp$smp $GUEST/vmlinux $smp 60
done
