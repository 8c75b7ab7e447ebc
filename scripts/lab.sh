#!/usr/bin/env bash
# The nested-KVM lab by hand: builds Citadel, makes sure the guest kernel and the lab's L1
# kernel are there, and boots L1 (QEMU with TCG, Debian's cloud kernel with kvm-amd) with a
# shell on this terminal. Inside: `. /lab/lib.sh; boot_guest vm1 /lab/guest/vmlinux 2 256 report`
# boots the guest kernel under Citadel, `qmp vm1 '{"execute":"query-status"}'` talks QMP to it.
# Arguments go to citadel-lab: `--vfio`, `--memory MIB`, `--cpus N`, or scenario names
# (tests/lab/scenarios/) to run instead of a shell.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --quiet
scripts/guest-kernel.sh
scripts/lab-kernel.sh
exec "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/debug/citadel-lab" "$@"
