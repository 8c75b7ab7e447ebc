//! Start latency and memory overhead of `citadel`, with QEMU's microvm booting the same guest in
//! the same run as the peer. Prints figures; asserts nothing about time.
//!
//! Run with `scripts/bench-vmm.sh` (it builds the guest programs first).

mod peers;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 25;

/// Sum of on-CPU time of every thread of `pid`, from schedstat (nanoseconds).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Sample {
    wall: Duration,
    cpu: Duration,
    rss_overhead_kib: u64,
}

fn wait_ready(child: &mut Child) -> Instant {
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read serial");
        assert!(n > 0, "guest never printed ready");
        if line.contains("citadel-guest: ready") {
            return Instant::now();
        }
    }
}

fn measure(cmd: &mut Command) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let ready = wait_ready(&mut child);
    let pid = child.id();
    let cpu = Duration::from_nanos(cpu_ns(pid));
    // Guest RAM is shared memory (memfd or QEMU's RAM); what is not shmem is the VMM's own.
    let rss_overhead_kib = status_kib(pid, "VmRSS:").saturating_sub(status_kib(pid, "RssShmem:"));
    let _ = child.kill();
    let _ = child.wait();
    Sample {
        wall: ready - start,
        cpu,
        rss_overhead_kib,
    }
}

fn median<T: Copy + Ord>(v: &mut [T]) -> T {
    v.sort();
    v[v.len() / 2]
}

fn run_series(label: &str, mut make: impl FnMut() -> Command) -> (Duration, Duration, u64) {
    // One warm-up run so page cache and KVM module state are equal for both peers.
    measure(&mut make());
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..RUNS {
        let s = measure(&mut make());
        walls.push(s.wall);
        cpus.push(s.cpu);
        rss.push(s.rss_overhead_kib);
    }
    let (w, c, r) = (median(&mut walls), median(&mut cpus), median(&mut rss));
    println!(
        "{label:<28} start->ready median {:>8.2} ms wall {:>8.2} ms cpu   VMM RSS (non-guest) {:>6} KiB",
        w.as_secs_f64() * 1e3,
        c.as_secs_f64() * 1e3,
        r
    );
    (w, c, r)
}

fn main() {
    let idle = peers::guest("idle");
    let dir = std::env::temp_dir().join(format!("citadel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");

    println!("guest: {} ({} runs each, median)", idle.display(), RUNS);
    let (cw, cc, _) = run_series("citadel", || peers::citadel_command(&idle, "stdio", &sock));
    if peers::have_qemu() {
        let (qw, qc, _) = run_series("qemu-system-x86_64 -M microvm", || {
            peers::qemu_command(&idle, "stdio")
        });
        println!(
            "ratio citadel/qemu: wall {:.2}x, cpu {:.2}x",
            cw.as_secs_f64() / qw.as_secs_f64(),
            cc.as_secs_f64() / qc.as_secs_f64()
        );
    } else {
        println!("qemu-system-x86_64 not found: no peer measured");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
