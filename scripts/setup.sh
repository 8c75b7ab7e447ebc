#!/usr/bin/env bash
# Installs everything Citadel's build, tests and benchmarks need on Debian bookworm (run as
# root), then builds the guest kernel (cached outside the tree). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    gcc make binutils            # guest test programs
    qemu-system-x86 qemu-utils   # QEMU peer and TCG frontend for the backends, qemu-storage-daemon
    busybox-static cpio          # guest initramfs
    linux-source-6.1 flex bison bc libelf-dev libssl-dev xz-utils  # guest kernel
    socat ncat iperf3 fio iproute2 strace procps python3-pip
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    echo "setup: installing qemu.qmp (QEMU's QMP client library and qmp-shell)"
    python3 -m pip install -q qemu.qmp 2>/dev/null ||
        python3 -m pip install -q --break-system-packages qemu.qmp
fi
# pyenv only exposes a new console script (qmp-shell) after a rehash.
if command -v pyenv >/dev/null; then
    pyenv rehash
fi

scripts/guest-kernel.sh
# The nested-KVM lab's L1 kernel (Debian's cloud kernel and its kvm-amd, vfio and tun modules).
scripts/lab-kernel.sh
