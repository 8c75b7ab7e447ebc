#!/usr/bin/env bash
# Disk backend restart: from `kill -9` of a plugged disk's citadel-blk to the guest's next
# write landing in the image, median and p90 of ROUNDS rounds (one VM each).
#
#   scripts/bench-restart.sh                      # release build, 20 rounds
#   PROFILE=debug ROUNDS=5 scripts/bench-restart.sh
#
# Needs /dev/kvm; the guest programs are built by the citadel-tests build script.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${PROFILE:-release}
ROUNDS=${ROUNDS:-20}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/x86_64-unknown-linux-gnu/$PROFILE

packages=(-p citadel -p citadel-blk -p citadel-net -p citadel-tests)
if [ "$PROFILE" = release ]; then
    cargo build --release "${packages[@]}" --bins --manifest-path "$ROOT/Cargo.toml"
else
    cargo build "${packages[@]}" --bins --manifest-path "$ROOT/Cargo.toml"
fi

"$BIN/citadel-restart-bench" --rounds "$ROUNDS"
