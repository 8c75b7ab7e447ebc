#!/usr/bin/env bash
# Builds and runs every fuzz target for a bounded time: the QMP decoder and commands, the
# virtio-mmio transport, citadel-blk's descriptor chains and vhost-user handling, and
# citadel-net's vhost-user handling. Prints executions per second and coverage per target and
# fails on any crash, leak, timeout or out-of-memory, printing the input and how to replay it.
#
# Usage: scripts/fuzz.sh [SECONDS]   (seconds per target, default 45)
#
# Environment (all optional):
#   FUZZ_TARGETS="decoder_session ..."  run only these targets
#   SANITIZER=address|none              default: address when the toolchain ships ASan
#   CARGO_TARGET_DIR                    where the fuzz builds go (default target/fuzz)
#
# The seed corpus of each target (corpus/<target>/ next to its fuzz_targets/) is only read:
# new inputs go to a temporary directory, so a run never changes the tree. Failing inputs are
# kept in target/fuzz-artifacts/<target>/.
#
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
seconds=${1:-45}
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || {
    echo "fuzz: SECONDS must be a positive integer, not '$seconds'" >&2
    exit 2
}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target/fuzz}
artifacts=$root/target/fuzz-artifacts
export RUSTC_BOOTSTRAP=1

# fuzz workspace, target
all_targets=(
    "qmp/fuzz decoder_session"
    "vmm/fuzz virtio_mmio"
    "backends/blk/fuzz descriptor_chain"
    "backends/blk/fuzz blk_vhost_user"
    "backends/net/fuzz net_vhost_user"
)

die() {
    echo "fuzz: $*" >&2
    exit 1
}

if [[ $(cargo fuzz --version 2>/dev/null) != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION" || die "cannot install cargo-fuzz"
fi

if [[ -z ${SANITIZER:-} ]]; then
    rtlib=$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/lib
    if compgen -G "$rtlib/librustc-*_rt.asan.a" >/dev/null; then
        SANITIZER=address
    else
        SANITIZER=none
    fi
fi

selected=()
for entry in "${all_targets[@]}"; do
    name=${entry#* }
    if [[ -z ${FUZZ_TARGETS:-} || " $FUZZ_TARGETS " == *" $name "* ]]; then
        selected+=("$entry")
    fi
done
[[ ${#selected[@]} -gt 0 ]] || die "no target matches FUZZ_TARGETS='$FUZZ_TARGETS'"

work=$(mktemp -d /tmp/citadel-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Build each workspace once (all its targets), sharing one target directory.
built=""
for entry in "${selected[@]}"; do
    dir=${entry% *}
    [[ " $built " == *" $dir "* ]] && continue
    echo "fuzz: building $dir (sanitizer: $SANITIZER)"
    (cd "$root/$dir" && cargo fuzz build -s "$SANITIZER" --target-dir "$target_dir") ||
        die "building $dir failed"
    built+=" $dir"
done

bin_dir=$target_dir/x86_64-unknown-linux-gnu/release
summary=()
failed=0
for entry in "${selected[@]}"; do
    dir=${entry% *}
    name=${entry#* }
    seeds=$root/$dir/corpus/$name
    [[ -d $seeds ]] || die "$name has no seed corpus at $seeds"
    corpus=$work/corpus-$name
    log=$work/$name.log
    mkdir -p "$corpus" "$artifacts/$name"
    echo "fuzz: running $name for ${seconds}s"
    status=0
    # New inputs go to the first (temporary) directory; the seeds are only read.
    "$bin_dir/$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$name/" \
        "$corpus" "$seeds" >"$log" 2>&1 || status=$?
    final=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$final")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$final")
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    summary+=("$(printf '%-18s %10s %8s %8s %8s' "$name" "${runs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}")")
    if [[ $status -ne 0 ]]; then
        failed=1
        echo "fuzz: $name FAILED (exit status $status); the end of its log:" >&2
        tail -n 60 "$log" >&2
        input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        if [[ -n $input ]]; then
            echo "fuzz: failing input: $input" >&2
            echo "fuzz: reproduce with: (cd $dir && RUSTC_BOOTSTRAP=1 cargo fuzz run -s $SANITIZER $name $input)" >&2
        fi
    fi
done

echo
printf '%-18s %10s %8s %8s %8s\n' target runs exec/s cov ft
printf '%s\n' "${summary[@]}"
[[ $failed -eq 0 ]] || die "a fuzz target failed"
