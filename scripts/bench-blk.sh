#!/usr/bin/env bash
# Compares citadel-blk with qemu-storage-daemon as vhost-user-blk backends, with no guest:
# citadel-vu-bench drives both over the same page-cached file, alternating between them,
# and a table of IOPS, MB/s, backend CPU per I/O and the citadel/qsd ratios is printed.
#
# Environment (all optional):
#   SIZE_MB=1024        size of the test file
#   RUNTIME=2           measured seconds per job and backend, per round
#   WARMUP=0.5          unmeasured seconds before each measurement
#   ROUNDS=4            rounds; each round runs every job on both backends, in alternating order
#                       (short interleaved rounds let the per-round ratios cancel host noise)
#   EVENT_IDX=1         negotiate VIRTIO_RING_F_EVENT_IDX (as Linux guests do); 0 to disable
#   BACKENDS="citadel qsd"   which backends to run (either alone works)
#   BUILD=1             build the release binaries first; 0 to use what is in the target dir
#   CARGO_TARGET_DIR    where cargo puts (or has put) the binaries
#   KEEP=0              1 keeps the working directory (file, sockets, logs, raw results)
#
# The raw JSON line of every measured job is kept in results.jsonl in the working directory.
set -euo pipefail

SIZE_MB=${SIZE_MB:-1024}
RUNTIME=${RUNTIME:-2}
WARMUP=${WARMUP:-0.5}
ROUNDS=${ROUNDS:-4}
EVENT_IDX=${EVENT_IDX:-1}
BACKENDS=${BACKENDS:-"citadel qsd"}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release

# name  pattern  block size  iodepth  data descriptor size (citadel-blk's size_max is 64 KiB,
# so a 128 KiB read is two descriptors, as a guest sends it)
jobs=(
    "4k-randread-qd1   randread  4096   1  4096"
    "4k-randread-qd32  randread  4096   32 4096"
    "4k-randwrite-qd1  randwrite 4096   1  4096"
    "4k-randwrite-qd32 randwrite 4096   32 4096"
    "128k-seqread-qd8  seqread   131072 8  65536"
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

echo "bench-blk: load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
results=$work/results.jsonl
: >"$results"
event_idx_arg=()
[[ $EVENT_IDX == 1 ]] && event_idx_arg=(--event-idx)

read -r -a order <<<"$BACKENDS"
for ((round = 1; round <= ROUNDS; round++)); do
    for job in "${jobs[@]}"; do
        read -r name pattern bs depth seg <<<"$job"
        for backend in "${order[@]}"; do
            pid=${pids[$backend]}
            kill -0 "$pid" 2>/dev/null || {
                cat "$work/$backend.log" >&2
                die "$backend (pid $pid) has exited"
            }
            out=$("$bench" --socket "$work/$backend.sock" --label "$backend" \
                --pattern "$pattern" --bs "$bs" --seg-size "$seg" --iodepth "$depth" \
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

echo "bench-blk: load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$results" <<'EOF'
import collections
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
jobs = list(dict.fromkeys(r["job"] for r in rows))
backends = list(dict.fromkeys(r["label"] for r in rows))
runs = collections.defaultdict(list)
for r in rows:
    runs[(r["job"], r["label"])].append(r)

def figures(job, backend):
    rs = runs.get((job, backend))
    ios = sum(r["ios"] for r in rs or [])
    seconds = sum(r["seconds"] for r in rs or [])
    if not ios or not seconds:
        return None
    cpu_us = sum((r["backend_cpu_us_per_io"] or 0.0) * r["ios"] for r in rs)
    return {
        "iops": ios / seconds,
        "mbs": sum(r["bytes"] for r in rs) / seconds / 1e6,
        "cpu": cpu_us / ios,
        "lat": sum(r["lat_mean_us"] * r["ios"] for r in rs) / ios,
        "min": min(r["iops"] for r in rs),
        "max": max(r["iops"] for r in rs),
    }

header = (f"{'job':<18} {'backend':<8} {'IOPS':>8} {'(min-max of rounds)':>20} "
          f"{'MB/s':>8} {'lat us':>8} {'CPU us/IO':>10}")
print()
print("IOPS, MB/s over all rounds; CPU us/IO: the backend's user+system time per I/O")
print(header)
print("-" * len(header))
for job in jobs:
    for backend in backends:
        f = figures(job, backend)
        if f:
            spread = f"{f['min']:.0f}-{f['max']:.0f}"
            print(f"{job:<18} {backend:<8} {f['iops']:>8.0f} {spread:>20} "
                  f"{f['mbs']:>8.1f} {f['lat']:>8.1f} {f['cpu']:>10.2f}")

if "citadel" in backends and "qsd" in backends:
    def round_ratios(job):
        # Each round ran both backends back to back, so a per-round ratio cancels most of the
        # drift in what else the host is doing.
        c, q = runs[(job, "citadel")], runs[(job, "qsd")]
        return [a["iops"] / b["iops"] for a, b in zip(c, q) if b["iops"] > 0]

    print()
    print(f"{'job':<18} {'IOPS citadel/qsd':>17} {'median per round':>17} {'CPU/IO citadel/qsd':>19}")
    for job in jobs:
        c, q = figures(job, "citadel"), figures(job, "qsd")
        per_round = round_ratios(job)
        if c and q and q["iops"] > 0 and q["cpu"] > 0 and per_round:
            print(f"{job:<18} {c['iops'] / q['iops']:>17.2f} {statistics.median(per_round):>17.2f} "
                  f"{c['cpu'] / q['cpu']:>19.2f}")
    goal = "4k-randread-qd32"
    c, q = figures(goal, "citadel"), figures(goal, "qsd")
    if c and q and round_ratios(goal):
        ratio = statistics.median(round_ratios(goal))
        met = ratio >= 1.3 and c["cpu"] <= q["cpu"]
        print()
        print(f"goal, 4k randread QD32 >= 1.3x qsd IOPS (median per-round ratio {ratio:.2f}) "
              f"with no more CPU per I/O: {'met' if met else 'NOT met'}")
EOF
