#!/usr/bin/env bash
# Compares citadel-blk with qemu-storage-daemon as vhost-user-blk backends, with no guest:
# citadel-vu-bench drives both over the same page-cached file, alternating between them,
# and a table of IOPS, MB/s, backend CPU per I/O and the citadel/qsd ratios is printed.
#
# Environment (all optional):
#   SIZE_MB=1024        size of the test file
#   RUNTIME=4           measured seconds per job and backend, per round
#   WARMUP=1            unmeasured seconds before each measurement
#   ROUNDS=2            rounds; each round runs every job on both backends, in alternating order
#   EVENT_IDX=1         negotiate VIRTIO_RING_F_EVENT_IDX (as Linux guests do); 0 to disable
#   BACKENDS="citadel qsd"   which backends to run (either alone works)
#   BUILD=1             build the release binaries first; 0 to use what is in the target dir
#   CARGO_TARGET_DIR    where cargo puts (or has put) the binaries
#   KEEP=0              1 keeps the working directory (file, sockets, logs, raw results)
#
# The raw JSON line of every measured job is kept in results.jsonl in the working directory.
set -euo pipefail

SIZE_MB=${SIZE_MB:-1024}
RUNTIME=${RUNTIME:-4}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-2}
EVENT_IDX=${EVENT_IDX:-1}
BACKENDS=${BACKENDS:-"citadel qsd"}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release

# name  pattern  block size  iodepth
jobs=(
    "4k-randread-qd1   randread  4096   1"
    "4k-randread-qd32  randread  4096   32"
    "4k-randwrite-qd1  randwrite 4096   1"
    "4k-randwrite-qd32 randwrite 4096   32"
    "128k-seqread-qd8  seqread   131072 8"
)

die() {
    echo "bench-blk: $*" >&2
    exit 1
}

for backend in $BACKENDS; do
    case $backend in
    citadel | qsd) ;;
    *) die "unknown backend '$backend' in BACKENDS (citadel, qsd)" ;;
    esac
done
command -v python3 >/dev/null || die "python3 is needed for the summary table"

if [[ $BUILD == 1 ]]; then
    packages=(-p citadel-vu-bench)
    [[ " $BACKENDS " == *" citadel "* ]] && packages+=(-p citadel-blk)
    (cd "$root" && CARGO_TARGET_DIR=$target_dir cargo build --release "${packages[@]}") ||
        die "build failed"
fi
bench=$bin_dir/citadel-vu-bench
[[ -x $bench ]] || die "$bench not found (build with BUILD=1)"
if [[ " $BACKENDS " == *" qsd "* ]]; then
    qsd=$(command -v qemu-storage-daemon) ||
        die "qemu-storage-daemon not found (Debian: apt-get install qemu-system-common)"
fi
if [[ " $BACKENDS " == *" citadel "* ]]; then
    citadel_blk=$bin_dir/citadel-blk
    [[ -x $citadel_blk ]] || die "$citadel_blk not found (build with BUILD=1)"
fi

work=$(mktemp -d /tmp/citadel-bench-blk.XXXXXX)
declare -A pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then
        echo "bench-blk: kept $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

image=$work/disk.img
echo "bench-blk: creating a ${SIZE_MB} MiB test file and reading it into the page cache" >&2
# Random contents, so neither backend meets zero pages or holes.
head -c "$((SIZE_MB << 20))" /dev/urandom >"$image"
cat "$image" >/dev/null

start_backend() {
    local name=$1 socket=$work/$1.sock
    rm -f "$socket"
    case $name in
    citadel)
        "$citadel_blk" --socket "$socket" --image "$image" >"$work/citadel.log" 2>&1 &
        ;;
    qsd)
        "$qsd" --blockdev "driver=file,node-name=f,filename=$image,cache.direct=off" \
            --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$socket,writable=on,num-queues=1" \
            >"$work/qsd.log" 2>&1 &
        ;;
    esac
    pids[$name]=$!
    for _ in $(seq 100); do
        [[ -S $socket ]] && return 0
        kill -0 "${pids[$name]}" 2>/dev/null || break
        sleep 0.1
    done
    cat "$work/$name.log" >&2
    die "$name did not create its socket $socket"
}

for backend in $BACKENDS; do
    start_backend "$backend"
done

results=$work/results.jsonl
: >"$results"
event_idx_arg=()
[[ $EVENT_IDX == 1 ]] && event_idx_arg=(--event-idx)

read -r -a order <<<"$BACKENDS"
for ((round = 1; round <= ROUNDS; round++)); do
    for job in "${jobs[@]}"; do
        read -r name pattern bs depth <<<"$job"
        for backend in "${order[@]}"; do
            pid=${pids[$backend]}
            kill -0 "$pid" 2>/dev/null || {
                cat "$work/$backend.log" >&2
                die "$backend (pid $pid) has exited"
            }
            out=$("$bench" --socket "$work/$backend.sock" --label "$backend" \
                --pattern "$pattern" --bs "$bs" --iodepth "$depth" \
                --seconds "$RUNTIME" --warmup "$WARMUP" --backend-pid "$pid" \
                "${event_idx_arg[@]}") || die "$name on $backend failed"
            echo "round $round $name ${out%%$'\n'*}" >&2
            # The JSON line, tagged with the job name for the summary.
            tail -n 1 <<<"$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); r["job"] = sys.argv[1]; print(json.dumps(r))' "$name" >>"$results"
        done
    done
    # Alternate which backend goes first, so neither always runs on a cache warmed by the other.
    order=("${order[@]:1}" "${order[0]}")
done

python3 - "$results" <<'EOF'
import collections
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
jobs = list(dict.fromkeys(r["job"] for r in rows))
backends = list(dict.fromkeys(r["label"] for r in rows))
agg = collections.defaultdict(lambda: {"ios": 0, "bytes": 0, "seconds": 0.0, "cpu_us": 0.0})
for r in rows:
    a = agg[(r["job"], r["label"])]
    a["ios"] += r["ios"]
    a["bytes"] += r["bytes"]
    a["seconds"] += r["seconds"]
    a["cpu_us"] += (r["backend_cpu_us_per_io"] or 0.0) * r["ios"]

def figures(job, backend):
    a = agg.get((job, backend))
    if not a or a["seconds"] == 0 or a["ios"] == 0:
        return None
    return (a["ios"] / a["seconds"], a["bytes"] / a["seconds"] / 1e6, a["cpu_us"] / a["ios"])

header = f"{'job':<18} {'backend':<8} {'IOPS':>10} {'MB/s':>9} {'CPU us/IO':>10}"
print()
print(header)
print("-" * len(header))
for job in jobs:
    for backend in backends:
        f = figures(job, backend)
        if f:
            print(f"{job:<18} {backend:<8} {f[0]:>10.0f} {f[1]:>9.1f} {f[2]:>10.2f}")
if "citadel" in backends and "qsd" in backends:
    print()
    print(f"{'job':<18} {'IOPS citadel/qsd':>17} {'CPU/IO citadel/qsd':>19}")
    for job in jobs:
        c, q = figures(job, "citadel"), figures(job, "qsd")
        if c and q and q[0] > 0 and q[2] > 0:
            print(f"{job:<18} {c[0] / q[0]:>17.2f} {c[2] / q[2]:>19.2f}")
    c, q = figures("4k-randread-qd32", "citadel"), figures("4k-randread-qd32", "qsd")
    if c and q:
        met = c[0] >= 1.3 * q[0] and c[2] <= q[2]
        print()
        print(f"goal (4k randread QD32: >= 1.3x qsd IOPS, no more CPU per I/O): {'met' if met else 'NOT met'}")
EOF
