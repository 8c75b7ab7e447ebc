#!/usr/bin/env bash
# Boots a tiny guest under Citadel with a QMP socket at /tmp/citadel-demo.sock. From another
# terminal: `ncat -U /tmp/citadel-demo.sock` (see README.md for a transcript to try).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ncat >/dev/null || ! command -v make >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ncat make gcc >/dev/null
fi
cargo build -q -p citadel -p citadel-blk -p citadel-net -p citadel-tests
target=target/x86_64-unknown-linux-gnu
echo "QMP socket: /tmp/citadel-demo.sock  (try: ncat -U /tmp/citadel-demo.sock)" >&2
exec "$target/debug/citadel" -machine microvm -kernel "$target/guest/idle.elf" \
    -smp 2 -m 64 -qmp unix:/tmp/citadel-demo.sock,server,nowait -serial stdio "$@"
