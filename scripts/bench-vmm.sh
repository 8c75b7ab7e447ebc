#!/usr/bin/env bash
# Start latency (exec -> "citadel-guest: ready" on serial), VMM memory overhead and QMP round
# trip of citadel, with QEMU's microvm booting the same guest in the same run. The QMP round trip
# is printed next to the host's floor for the same exchange, measured by the same client.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p citadel-tests
cargo bench -q -p citadel --bench startup --bench qmp
