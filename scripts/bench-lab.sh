#!/usr/bin/env bash
# Boot benchmark in the nested-KVM lab: Citadel against QEMU's microvm machine on L1's KVM,
# same guest kernel, initramfs and command line, 10 alternating runs each,
# exec to the guest's first line of user space and peak RSS, medians and ratios. L1 is
# emulated, so the ratios are what carries over to real hardware, not the absolute times.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --quiet
scripts/guest-kernel.sh
scripts/lab-kernel.sh
# The whole transcript stays next to the build for a look at any run.
out="${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/lab-bench-transcript.txt"
if ! "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/debug/citadel-lab" --with-qemu bench-boot >"$out"; then
    grep -v '^\[L2 ' "$out" | tail -n 60
    echo "bench-lab: the benchmark scenario failed (output above)" >&2
    exit 1
fi
awk -F= '
    /^  (citadel|qemu)\.(ms|peak_kb|overhead_kb)=/ { key = substr($1, 3); v[key] = v[key] " " $2 }
    /^L1 boot/ { l1 = $0 }
    function median(list,    a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        cm = median(v["citadel.ms"]); qm = median(v["qemu.ms"])
        cr = median(v["citadel.peak_kb"]); qr = median(v["qemu.peak_kb"])
        printf "| | citadel | qemu -M microvm (KVM in L1) | ratio |\n| --- | --- | --- | --- |\n"
        printf "| exec to guest user space, median | %d ms | %d ms | %.2fx |\n", cm, qm, cm / qm
        printf "| peak RSS, median | %.1f MiB | %.1f MiB | %.2fx |\n", cr / 1024, qr / 1024, cr / qr
        co = median(v["citadel.overhead_kb"]); qo = median(v["qemu.overhead_kb"])
        printf "| memory besides guest RAM, median | %.1f MiB | %.1f MiB | %.2fx |\n", co / 1024, qo / 1024, co / qo
        printf "runs: citadel %s | qemu %s\n%s\n", v["citadel.ms"], v["qemu.ms"], l1
    }' "$out"
