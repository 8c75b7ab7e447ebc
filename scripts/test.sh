#!/usr/bin/env bash
# Builds every binary and guest program, then runs every test (unit, integration, QEMU-peer,
# guest-kernel and security tests). Tests that need hardware virtualization say SKIPPED on
# hosts without it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
