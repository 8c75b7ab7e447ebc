//! Start latency, memory overhead and QMP round trip of `citadel`, with QEMU's microvm booting
//! the same guest in the same run as the peer. Prints figures; asserts nothing about time.
//!
//! Run with `scripts/bench-vmm.sh` (it builds the guest programs first).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 25;
const QMP_REQUESTS: usize = 10_000;

fn guest(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<triple>/<profile>/deps/<bench>
    let triple_dir = exe.ancestors().nth(3).expect("target layout");
    let path = triple_dir.join("guest").join(format!("{name}.elf"));
    assert!(
        path.exists(),
        "{} missing: build the guest programs first (cargo build -p citadel-tests)",
        path.display()
    );
    path
}

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

fn qmp_round_trips(sock: &Path) -> Vec<Duration> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("QMP connect: {e}"),
        }
    };
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let mut times = Vec::with_capacity(QMP_REQUESTS);
    for _ in 0..QMP_REQUESTS {
        let t = Instant::now();
        writer.write_all(b"{\"execute\":\"query-status\"}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
        }
        times.push(t.elapsed());
    }
    let _ = writer.write_all(b"{\"execute\":\"quit\"}");
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    times.sort();
    times
}

/// citadel booting `kernel` with 64 MiB, serial to `serial`, QMP on `sock`.
fn citadel_command(citadel: &str, kernel: &Path, serial: &str, sock: &Path) -> Command {
    let mut c = Command::new(citadel);
    c.args([
        "-machine", "microvm", "-m", "64", "-serial", serial, "-kernel",
    ])
    .arg(kernel)
    .arg("-qmp")
    .arg(format!("unix:{},server,nowait", sock.display()));
    c
}

/// The peer: QEMU's microvm with as little firmware and as few devices as it allows.
fn qemu_command(kernel: &Path, serial: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        serial,
        "-kernel",
    ])
    .arg(kernel);
    c
}

fn report_qmp(label: &str, sorted: &[Duration]) {
    println!(
        "QMP query-status round trip, {label:<20} over {} requests: p50 {:.1} us, p99 {:.1} us",
        sorted.len(),
        micros(percentile(sorted, 0.5)),
        micros(percentile(sorted, 0.99))
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Round trips of one byte over a Unix socket pair between this process and a child, the
/// same path a QMP request and its reply take between two processes.
fn socket_floor() -> Vec<Duration> {
    use std::os::fd::AsRawFd;
    let (mut a, b) = UnixStream::pair().expect("socketpair");
    // SAFETY: the child only runs read/write/_exit on an fd it owns, all async-signal-safe,
    // so forking this (possibly multi-threaded) process is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let fd = b.as_raw_fd();
        let mut byte = 0u8;
        // SAFETY: `byte` is a live one-byte buffer and `fd` is open in the child; the
        // parent's end is closed here so that the parent closing it ends this loop.
        unsafe {
            libc::close(a.as_raw_fd());
            while libc::read(fd, (&mut byte as *mut u8).cast(), 1) == 1 {
                if libc::write(fd, (&byte as *const u8).cast(), 1) != 1 {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    drop(b);
    let mut times = Vec::with_capacity(QMP_REQUESTS);
    let mut byte = [0u8; 1];
    for _ in 0..QMP_REQUESTS {
        let t = Instant::now();
        a.write_all(b"x").unwrap();
        a.read_exact(&mut byte).unwrap();
        times.push(t.elapsed());
    }
    drop(a);
    // SAFETY: reaps the child forked above; a null status pointer is allowed.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let citadel = env!("CARGO_BIN_EXE_citadel");
    let idle = guest("idle");
    let dir = std::env::temp_dir().join(format!("citadel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");

    println!("guest: {} ({} runs each, median)", idle.display(), RUNS);
    let (cw, cc, _) = run_series("citadel", || {
        citadel_command(citadel, &idle, "stdio", &sock)
    });
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    if qemu {
        let (qw, qc, _) = run_series("qemu-system-x86_64 -M microvm", || {
            qemu_command(&idle, "stdio")
        });
        println!(
            "ratio citadel/qemu: wall {:.2}x, cpu {:.2}x",
            cw.as_secs_f64() / qw.as_secs_f64(),
            cc.as_secs_f64() / qc.as_secs_f64()
        );
    } else {
        println!("qemu-system-x86_64 not found: no peer measured");
    }

    // Every QMP round trip wakes the VMM from epoll and the client from its read; on a
    // nested host an idle CPU can take tens of microseconds to wake, so the floor of any such
    // exchange is printed first, measured the same way between two processes.
    let floor = socket_floor();
    println!(
        "IPC floor (unix socket ping-pong between two processes): p50 {:.1} us, p99 {:.1} us",
        micros(percentile(&floor, 0.5)),
        micros(percentile(&floor, 0.99))
    );
    let mut child = citadel_command(citadel, &idle, "none", &sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn citadel");
    let ours = qmp_round_trips(&sock);
    let _ = child.wait();
    report_qmp("citadel", &ours);
    if qemu {
        let _ = std::fs::remove_file(&sock);
        let mut child = qemu_command(&idle, "none")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu");
        let theirs = qmp_round_trips(&sock);
        let _ = child.wait();
        report_qmp("qemu-system-x86_64", &theirs);
        println!(
            "ratio citadel/qemu QMP p50: {:.2}x",
            percentile(&ours, 0.5).as_secs_f64() / percentile(&theirs, 0.5).as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
