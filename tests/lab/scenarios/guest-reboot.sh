# A guest `reboot -f` ends Citadel with SHUTDOWN guest-reset; `quit` mid-boot ends it cleanly.
vm=rb
boot_guest $vm $GUEST/vmlinux 1 256 reboot
pid=$L2_PID
qmp $vm wait-event:SHUTDOWN >/tmp/$vm.events 2>&1 &
if exited $pid 90; then
	wait $pid
	result reboot.exit-code $?
fi
sleep 0.2
result reboot.shutdown "$(shutdown_data /tmp/$vm.events)"

vm=midboot
boot_guest $vm $GUEST/vmlinux 1 256 report
pid=$L2_PID
# Citadel says when the VM is built and locked down; the kernel boots for seconds after that.
l2_wait $vm "landlock: enforced" 30
qmp $vm '{"execute":"quit"}' wait-event:SHUTDOWN >/tmp/$vm.events
start=$(now_ms)
if exited $pid 10; then
	wait $pid
	result midboot.exit-code $?
	result midboot.exit-ms $(($(now_ms) - start))
fi
result midboot.shutdown "$(shutdown_data /tmp/$vm.events)"
