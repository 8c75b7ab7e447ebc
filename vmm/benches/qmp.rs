//! QMP round trip of `citadel`: `query-status`, one request in flight, next to the host's floor
//! for the same exchange and to QEMU's microvm, in interleaved rounds of the same run. Prints
//! figures; asserts nothing about time.
//!
//! The floor is a server that does nothing but answer: this binary re-run as a separate process
//! that accepts on a Unix socket file, blocks in `read` and writes a canned reply of the size of
//! Citadel's for every JSON object it gets. It is driven by the very client that drives Citadel
//! and QEMU (same socket type, same bytes, same reads), so what Citadel adds over the floor is
//! its own work: waking from epoll, parsing, executing, serialising.
//!
//! Each peer is measured twice: placed by the scheduler, and with the client on one CPU and the
//! server (all its threads) on another. On a host whose idle CPUs are slow to wake (a nested
//! one, where an idle vCPU is halted in its hypervisor) where the scheduler puts the two ends
//! decides most of the round trip, and it may place two peers differently in the same run; the
//! pinned figures compare the peers under one placement.
//!
//! Run with `scripts/bench-vmm.sh` (it builds the guest programs first), or alone with
//! `cargo bench -p citadel --bench qmp`.

mod peers;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Rounds of each peer, interleaved so that the host's load weighs on all of them alike.
const ROUNDS: usize = 5;
/// Measured requests per round.
const REQUESTS: usize = 2_000;
/// Requests per round before measuring (caches, page faults, CPU frequency).
const WARM_UP: usize = 200;
/// Argument that makes this binary the floor server on the socket path that follows.
const FLOOR_SERVER: &str = "--qmp-floor-server";
/// What Citadel answers `query-status` with on a running VM, byte for byte.
const STATUS_REPLY: &[u8] =
    b"{\"return\":{\"running\":true,\"singlestep\":false,\"status\":\"running\"}}\r\n";

/// The floor: accepts one client, greets it, answers every JSON object with `STATUS_REPLY`
/// and exits after `quit`.
fn floor_server(path: &Path) {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).expect("floor: bind");
    let (mut stream, _) = listener.accept().expect("floor: accept");
    stream
        .write_all(b"{\"QMP\":{\"version\":{},\"capabilities\":[]}}\r\n")
        .expect("floor: greeting");
    let mut buf = vec![0u8; 16 * 1024];
    let mut depth = 0usize;
    let mut object = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            object.push(b);
            match b {
                b'{' => depth += 1,
                b'}' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        if stream.write_all(STATUS_REPLY).is_err() {
                            return;
                        }
                        if object.windows(6).any(|w| w == b"\"quit\"") {
                            return;
                        }
                        object.clear();
                    }
                }
                _ => {}
            }
        }
    }
}

/// Connects to `sock` (waiting for it to appear), negotiates, warms up and returns the round
/// trip of each measured `query-status`; then sends `quit` and waits for the server to close.
fn round_trips(sock: &Path) -> Vec<Duration> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("QMP connect {}: {e}", sock.display()),
        }
    };
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}")
        .expect("negotiate");
    line.clear();
    reader.read_line(&mut line).expect("negotiation reply");
    let mut times = Vec::with_capacity(REQUESTS);
    for i in 0..WARM_UP + REQUESTS {
        let t = Instant::now();
        writer
            .write_all(b"{\"execute\":\"query-status\"}")
            .expect("request");
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("reply");
            assert!(n > 0, "QMP server closed the connection");
            if line.contains("\"return\"") {
                break;
            }
        }
        if i >= WARM_UP {
            times.push(t.elapsed());
        }
    }
    let _ = writer.write_all(b"{\"execute\":\"quit\"}");
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    times
}

/// Where the client and the server run.
#[derive(Clone, Copy)]
enum Placement {
    /// Wherever the scheduler puts them.
    Scheduler,
    /// The client on the first CPU, the server on the second.
    Apart(usize, usize),
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(
        rc,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the size of `set`.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Restricts this thread, and what it spawns from now on, to `cpus`.
fn pin(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: every CPU number came from allowed_cpus, below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// One round against the server `cmd` starts on `sock`.
fn round(mut cmd: Command, sock: &Path, placement: Placement, all: &[usize]) -> Vec<Duration> {
    let _ = std::fs::remove_file(sock);
    if let Placement::Apart(_, server) = placement {
        pin(&[server]);
    }
    let spawned = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn();
    if let Placement::Apart(client, _) = placement {
        pin(&[client]);
    }
    let mut child: Child = spawned.expect("spawn QMP server");
    let times = round_trips(sock);
    let _ = child.wait();
    pin(all);
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Every round trip of one peer, and the p50 of each of its rounds.
#[derive(Default)]
struct Series {
    all: Vec<Duration>,
    round_p50: Vec<Duration>,
}

impl Series {
    fn add(&mut self, mut times: Vec<Duration>) {
        times.sort();
        self.round_p50.push(percentile(&times, 0.5));
        self.all.extend(times);
    }

    fn p(&mut self, p: f64) -> Duration {
        self.all.sort();
        percentile(&self.all, p)
    }

    fn report(&mut self, label: &str) {
        self.round_p50.sort();
        let (lo, hi) = (self.round_p50[0], self.round_p50[self.round_p50.len() - 1]);
        println!(
            "  {label:<36} p50 {:>7.1} us  p90 {:>7.1} us  p99 {:>7.1} us   round p50s {:.1}-{:.1} us",
            micros(self.p(0.5)),
            micros(self.p(0.9)),
            micros(self.p(0.99)),
            micros(lo),
            micros(hi),
        );
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// The three peers' round trips under one placement.
#[derive(Default)]
struct Peers {
    floor: Series,
    citadel: Series,
    qemu: Series,
}

impl Peers {
    fn report(&mut self, title: &str, qemu: bool) {
        println!("{title}:");
        self.floor.report("floor (same client, blocking server)");
        self.citadel.report("citadel");
        println!(
            "  ratio citadel/floor: p50 {:.2}x, p90 {:.2}x",
            ratio(self.citadel.p(0.5), self.floor.p(0.5)),
            ratio(self.citadel.p(0.9), self.floor.p(0.9))
        );
        if qemu {
            self.qemu.report("qemu-system-x86_64 -M microvm");
            println!(
                "  ratio citadel/qemu: p50 {:.2}x, p90 {:.2}x",
                ratio(self.citadel.p(0.5), self.qemu.p(0.5)),
                ratio(self.citadel.p(0.9), self.qemu.p(0.9))
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == FLOOR_SERVER) {
        floor_server(Path::new(
            args.get(i + 1).expect("floor server: socket path"),
        ));
        return;
    }
    let idle = peers::guest("idle");
    let dir: PathBuf =
        std::env::temp_dir().join(format!("citadel-qmp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let sock = dir.join("qmp.sock");
    let qemu = peers::have_qemu();
    let me = std::env::current_exe().expect("current_exe");
    let all = allowed_cpus();
    let mut placements = vec![(Placement::Scheduler, Peers::default())];
    if let [client, server, ..] = all[..] {
        placements.push((Placement::Apart(client, server), Peers::default()));
    }

    for _ in 0..ROUNDS {
        for (placement, peers) in placements.iter_mut() {
            let mut server = Command::new(&me);
            server.arg(FLOOR_SERVER).arg(&sock);
            peers.floor.add(round(server, &sock, *placement, &all));
            let cmd = peers::citadel_command(&idle, "none", &sock);
            peers.citadel.add(round(cmd, &sock, *placement, &all));
            if qemu {
                let mut cmd = peers::qemu_command(&idle, "none");
                cmd.arg("-qmp")
                    .arg(format!("unix:{},server=on,wait=off", sock.display()));
                peers.qemu.add(round(cmd, &sock, *placement, &all));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "QMP query-status round trip, one request in flight, {ROUNDS} interleaved rounds of \
         {REQUESTS} requests per peer and placement"
    );
    for (placement, peers) in placements.iter_mut() {
        let title = match placement {
            Placement::Scheduler => "placed by the scheduler".to_string(),
            Placement::Apart(c, s) => format!("client pinned to CPU {c}, server to CPU {s}"),
        };
        peers.report(&title, qemu);
    }
    if !qemu {
        println!("qemu-system-x86_64 not found: no peer measured");
    }
}
