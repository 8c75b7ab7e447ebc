#!/usr/bin/env bash
# q35 boot benchmark in the nested-KVM lab, one L1 boot: Citadel's microvm machine, Citadel's
# q35 machine with one PCIe root port, and QEMU's q35 machine (SeaBIOS) on L1's KVM with one
# root port, same guest kernel (PVH vmlinux), initramfs and command line, up to 10 alternating
# rounds within 6 minutes (tests/lab/scenarios/bench-q35.sh), exec to the guest's first line
# of user space and peak RSS, medians and ratios. L1 is emulated, so the ratios are what
# carries over to real hardware, not the absolute times. About 4-7 minutes in all (fewer
# rounds on a busy host); each time L1 dies under TCG the lab boots it again and the scenario
# starts over (at most 3 boots).
#
#   scripts/bench-lab-q35.sh [--release]
#
# --release measures release builds of Citadel's binaries (the default is the debug build, as
# scripts/bench-lab.sh measures).
#
# The lab carries only QEMU's microvm firmware into L1; every file next to the scenarios goes
# into L1's /lab/scenarios, so SeaBIOS is linked there for the run and removed after it.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
case "${1:-}" in
--release) profile=release ;;
"") ;;
*)
    echo "usage: scripts/bench-lab-q35.sh [--release]" >&2
    exit 2
    ;;
esac
if [ $profile = release ]; then
    cargo build --workspace --release --quiet
else
    cargo build --workspace --quiet
fi
scripts/guest-kernel.sh
scripts/lab-kernel.sh
# The whole transcript stays next to the build for a look at any run. L1 itself sometimes dies
# under QEMU's TCG (see tests/src/lab.rs); the lab then boots it again and starts the scenario
# over, and when it died in every boot the transcript comes on stderr. Either way the figures
# are those of the one L1 boot that completed the most rounds (a round: one boot of each
# machine), its complete rounds only.
out="${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/lab-bench-q35-transcript.txt"
lab_ok=yes
"${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/$profile/citadel-lab" --with-qemu bench-q35 >"$out" 2>&1 || lab_ok=no
awk -v profile=$profile -v lab_ok=$lab_ok '
    /^\[L1\] lab: L1 up after/ { boots++; up[boots] = substr($0, 11); rounds[boots] = 0; delete pend; next }
    /^\[L1\] lab-result: bench-q35 / {
        kv = substr($0, length("[L1] lab-result: bench-q35 ") + 1)
        eq = index(kv, "="); key = substr(kv, 1, eq - 1); val = substr(kv, eq + 1)
        if (key ~ /^(microvm|q35|qemu-q35)\.(ms|guest_ms|before_kernel_ms|peak_kb|overhead_kb|retried|failed)$/) pend[key] = pend[key] " " val
        else if (key == "qemu-q35.firmware") fw[boots] = val
        else if (key == "round_ms") {
            for (k in pend) data[boots "|" k] = data[boots "|" k] pend[k]
            delete pend
            rounds[boots]++
        }
        next
    }
    /^L1 boot / { l1 = $0 }
    /^\[lab\] L1 died/ { died++ }
    function median(list,    a, n, i, j, t) {
        n = split(list, a, " ")
        if (n == 0) return 0
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function ratio(a, b) { return b > 0 ? sprintf("%.2fx", a / b) : "-" }
    # row LABEL KEY KIB: the medians of the three machines and the two ratios.
    function row(label, key, kib,    m, q, e) {
        m = median(v["microvm." key]); q = median(v["q35." key]); e = median(v["qemu-q35." key])
        if (kib) printf "| %s | %.1f MiB | %.1f MiB | %.1f MiB | %s | %s |\n", label, m / 1024, q / 1024, e / 1024, ratio(q, m), ratio(q, e)
        else printf "| %s | %d ms | %d ms | %d ms | %s | %s |\n", label, m, q, e, ratio(q, m), ratio(q, e)
    }
    END {
        best = 0
        for (b = 1; b <= boots; b++) if (rounds[b] > 0 && rounds[b] >= rounds[best]) best = b
        if (best == 0) exit 1
        for (k in data) if (index(k, best "|") == 1) v[substr(k, length(best "|") + 1)] = data[k]
        printf "| median | citadel microvm | citadel q35 | qemu -M q35 (%s, KVM in L1) | citadel q35 / microvm | citadel q35 / qemu q35 |\n", fw[best]
        printf "| --- | --- | --- | --- | --- | --- |\n"
        row("exec to guest user space", "ms", 0)
        row("exec to the guest kernel clock start (VMM, firmware, earliest kernel setup)", "before_kernel_ms", 0)
        row("guest kernel uptime at its report", "guest_ms", 0)
        row("peak RSS", "peak_kb", 1)
        row("memory besides guest RAM", "overhead_kb", 1)
        printf "runs (ms): citadel microvm%s | citadel q35%s | qemu q35%s\n", v["microvm.ms"], v["q35.ms"], v["qemu-q35.ms"]
        printf "rounds: %d complete, in L1 boot %d of %d; citadel %s build", rounds[best], best, boots, profile
        retried = v["microvm.retried"] v["q35.retried"] v["qemu-q35.retried"]
        if (retried != "") printf "; booted again after ending before user space:%s", retried
        failed = v["microvm.failed"] v["q35.failed"] v["qemu-q35.failed"]
        if (failed != "") printf "; failed twice:%s", failed
        if (died) printf "\nL1 died and was booted again %d time(s) (QEMU TCG; see tests/src/lab.rs)", died
        if (lab_ok != "yes") printf "\ncitadel-lab reported a failure (L1 died in its last boot too, or the scenario failed): these are the rounds completed before"
        printf "\n%s\n%s\n", up[best], l1
    }' "$out" || {
    grep -v '^\[L2 ' "$out" | tail -n 60
    echo "bench-lab-q35: the benchmark scenario failed (output above, whole transcript in $out)" >&2
    exit 1
}
