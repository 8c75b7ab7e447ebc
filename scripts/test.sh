#!/usr/bin/env bash
# Builds every binary and guest program, then runs every test (unit, integration, QEMU-peer,
# guest-kernel and security tests). Tests that cannot run on this host (for example full
# Linux guests without hardware virtualization) are listed as SKIPPED at the end, with why.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu"
skipped="$target_dir/skipped-tests.txt"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo build --workspace --all-targets
rm -f "$skipped"
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
echo
nskipped=0
if [[ -s "$skipped" ]]; then
    echo "Skipped on this host:"
    sort -u "$skipped"
    nskipped=$(sort -u "$skipped" | wc -l)
fi
# One closing line over every test binary; skipped tests also count as passed in cargo's own.
awk -v skipped="$nskipped" '
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
    END { printf "Tests: %d passed, %d failed, %d skipped\n", p - skipped, f, skipped }' "$log"
exit "$status"
