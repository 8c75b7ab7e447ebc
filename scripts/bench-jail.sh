#!/usr/bin/env bash
# Startup cost of the jail: time from exec to the QMP greeting for `citadel` alone, for
# `citadel-jailer -- citadel` with the opt-outs (host network namespace, no pids cgroup), with
# the default jail (new network namespace, pids cgroup), and with every optional isolation on
# (PID and user namespaces, Landlock). Median of RUNS runs each.
#
#   scripts/bench-jail.sh                 # release build, 30 runs
#   PROFILE=debug RUNS=20 scripts/bench-jail.sh
#
# Needs root, /dev/kvm and the guest programs (`make -C guest OUT=<target>/x86_64-unknown-linux-gnu/guest`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${PROFILE:-release}
RUNS=${RUNS:-30}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TRIPLE_DIR=$TARGET_DIR/x86_64-unknown-linux-gnu
BIN=$TRIPLE_DIR/$PROFILE
GUEST=$TRIPLE_DIR/guest/idle.elf

if [ "$(id -u)" != 0 ]; then echo "bench-jail: needs root" >&2; exit 1; fi
if [ "$PROFILE" = release ]; then
    cargo build --release -p citadel -p citadel-jailer --manifest-path "$ROOT/Cargo.toml"
else
    cargo build -p citadel -p citadel-jailer --manifest-path "$ROOT/Cargo.toml"
fi
[ -f "$GUEST" ] || make -C "$ROOT/guest" OUT="$TRIPLE_DIR/guest"

exec python3 - "$BIN" "$GUEST" "$RUNS" <<'PY'
import os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

bin_dir, guest, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
citadel = os.path.join(bin_dir, "citadel")
jailer = os.path.join(bin_dir, "citadel-jailer")
work = tempfile.mkdtemp(prefix="citadel-bench-jail-")
parent_cgroup = f"citadel-bench-{os.getpid()}"
vm_args = ["-machine", "microvm", "-m", "64", "-smp", "1", "-serial", "null"]


def greeting(path, deadline):
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no QMP socket at {path}")
            time.sleep(0.0002)
    data = b""
    while b"\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("QMP closed before the greeting")
        data += chunk
    s.close()
    if b'"QMP"' not in data:
        raise RuntimeError(f"unexpected greeting {data!r}")


def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_alone(i):
    d = os.path.join(work, f"alone-{i}")
    os.makedirs(d)
    sock = os.path.join(d, "qmp.sock")
    start = time.monotonic()
    p = subprocess.Popen([citadel, *vm_args, "-kernel", guest, "-qmp", f"unix:{sock},server,nowait"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        greeting(sock, start + 20)
        return time.monotonic() - start
    finally:
        p.kill()
        p.wait()


def run_jailed(i, extra):
    base = os.path.join(work, f"jail-{i}")
    jid = f"bench-{i}"
    root = os.path.join(base, "citadel", jid, "root")
    os.makedirs(root)
    shutil.copy(guest, os.path.join(root, "idle.elf"))
    os.chmod(os.path.join(root, "idle.elf"), 0o644)
    sock = os.path.join(root, "qmp.sock")
    cmd = [jailer, "--id", jid, "--exec-file", citadel, "--uid", "41300", "--gid", "41300",
           "--chroot-base-dir", base, "--parent-cgroup", parent_cgroup, *extra, "--",
           *vm_args, "-kernel", "/idle.elf", "-qmp", "unix:/qmp.sock,server,nowait"]
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        greeting(sock, start + 20)
        return time.monotonic() - start
    finally:
        with open(os.path.join(base, "citadel", jid, "citadel.pid")) as f:
            kill_pid(int(f.read().strip()))
        p.kill()
        p.wait()


def cleanup_cgroups():
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.strip().split(":", 2)
        if not controllers:
            continue
        parent = os.path.join("/sys/fs/cgroup", controllers, path.lstrip("/"), parent_cgroup)
        if not os.path.isdir(parent):
            continue
        for leaf in os.listdir(parent):
            full = os.path.join(parent, leaf)
            if os.path.isdir(full):
                for _ in range(100):
                    try:
                        os.rmdir(full)
                        break
                    except OSError:
                        time.sleep(0.01)
        os.rmdir(parent)


cases = [
    ("citadel alone", lambda i: run_alone(i)),
    ("citadel-jailer -- citadel (--host-netns --no-pids-limit)",
     lambda i: run_jailed(f"o{i}", ["--host-netns", "--no-pids-limit"])),
    ("citadel-jailer -- citadel (default jail: new netns, pids cgroup)",
     lambda i: run_jailed(f"d{i}", [])),
    ("citadel-jailer -- citadel (default + pidns, userns, landlock)",
     lambda i: run_jailed(f"f{i}", ["--new-pid-ns", "--userns", "--landlock",
                                    "--cgroup", "pids.max=64"])),
]
try:
    results = {}
    for i in range(runs):
        # Interleaved so that a change in host load hits every case alike.
        for name, run in cases:
            results.setdefault(name, []).append(run(i))
    alone = statistics.median(results[cases[0][0]])
    print(f"exec -> QMP greeting, median of {runs} runs ({os.path.basename(bin_dir)} build)")
    for name, _ in cases:
        times = results[name]
        med = statistics.median(times)
        print(f"  {name:<70} {med * 1000:8.2f} ms  (min {min(times) * 1000:.2f}, max {max(times) * 1000:.2f})  x{med / alone:.2f}")
finally:
    cleanup_cgroups()
    shutil.rmtree(work, ignore_errors=True)
PY
