#!/usr/bin/env bash
# Disk hotplug latency over QMP: blockdev-add, device_add and device_del as a client sees them
# (the configuration-change interrupt is raised before device_add replies), median and p90 of
# ROUNDS rounds, next to a fork+exec of `citadel-blk --help` timed in the same rounds as the
# floor under starting a backend. JAILER=1 also runs Citadel under citadel-jailer (root).
#
#   scripts/bench-hotplug.sh                      # release build, 200 rounds
#   PROFILE=debug ROUNDS=50 JAILER=1 scripts/bench-hotplug.sh
#
# Needs /dev/kvm; the guest programs are built by the citadel-tests build script.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${PROFILE:-release}
ROUNDS=${ROUNDS:-200}
JAILER=${JAILER:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/x86_64-unknown-linux-gnu/$PROFILE

packages=(-p citadel -p citadel-blk -p citadel-net -p citadel-tests)
if [ "$JAILER" = 1 ]; then packages+=(-p citadel-jailer); fi
if [ "$PROFILE" = release ]; then
    cargo build --release "${packages[@]}" --bins --manifest-path "$ROOT/Cargo.toml"
else
    cargo build "${packages[@]}" --bins --manifest-path "$ROOT/Cargo.toml"
fi

"$BIN/citadel-hotplug-bench" --rounds "$ROUNDS"
if [ "$JAILER" = 1 ]; then
    "$BIN/citadel-hotplug-bench" --rounds "$ROUNDS" --jailer
fi
