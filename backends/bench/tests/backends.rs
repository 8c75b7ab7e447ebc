//! citadel-vu-bench against real vhost-user-blk backends: qemu-storage-daemon, and citadel-blk
//! when it has been built into the same target directory. The checks are made from outside:
//! the bytes the writes left in the disk file, the JSON the benchmark prints, its exit status.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_citadel-vu-bench");
const DISK_SIZE: usize = 16 << 20;
const BLOCK: usize = 4096;

/// A scratch directory removed when the test ends, however it ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("citadel-vu-bench-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn disk(&self, fill: u8) -> PathBuf {
        let path = self.path("disk.img");
        fs::write(&path, vec![fill; DISK_SIZE]).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A backend process, killed and reaped when the test ends.
struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Backend {
    fn wait_for_socket(mut child: Child, socket: PathBuf) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "backend exited before creating {}: {status}",
                    socket.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no socket {} after 10 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd_path(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("qemu-storage-daemon"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        citadel_tests::skip(
            test,
            "qemu-storage-daemon is not installed (qemu-system-common)",
            true,
        );
    }
    found
}

fn start_qsd(qsd: &Path, scratch: &Scratch, disk: &Path, writable: bool, queues: u16) -> Backend {
    let socket = scratch.path("qsd.sock");
    let child = Command::new(qsd)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct=off",
            disk.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={queues}",
            socket.display(),
            if writable { "on" } else { "off" }
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning qemu-storage-daemon");
    Backend::wait_for_socket(child, socket)
}

fn start_citadel_blk(test: &str, scratch: &Scratch, disk: &Path) -> Option<Backend> {
    // The benchmark binary sits in the profile directory next to every other workspace binary.
    let binary = Path::new(BENCH).with_file_name("citadel-blk");
    if !binary.exists() {
        citadel_tests::skip(
            test,
            &format!(
                "{} is not built (cargo build -p citadel-blk)",
                binary.display()
            ),
            true,
        );
        return None;
    }
    let socket = scratch.path("citadel-blk.sock");
    let child = Command::new(binary)
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(disk)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning citadel-blk");
    Some(Backend::wait_for_socket(child, socket))
}

fn bench(backend: &Backend, args: &[&str]) -> Output {
    Command::new(BENCH)
        .arg("--socket")
        .arg(&backend.socket)
        .arg("--backend-pid")
        .arg(backend.pid().to_string())
        .args(args)
        .output()
        .expect("running citadel-vu-bench")
}

/// Runs the benchmark, requires success, and returns its JSON line.
fn bench_ok(backend: &Backend, args: &[&str]) -> serde_json::Value {
    let out = bench(backend, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "citadel-vu-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a human line and a JSON line: {stdout}");
    assert!(lines[0].contains(" IOPS, "), "{}", lines[0]);
    serde_json::from_str(lines[1]).unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", lines[1]))
}

fn assert_counts(json: &serde_json::Value, ios: u64, bs: u64) {
    assert_eq!(json["ios"], ios, "{json}");
    assert_eq!(json["bytes"], ios * bs, "{json}");
    assert_eq!(json["capacity"], DISK_SIZE as u64, "{json}");
    assert!(json["iops"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["seconds"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["backend_cpu_us_per_io"].as_f64().is_some(), "{json}");
}

/// Every 4 KiB block of the disk is either untouched (zero) or entirely one request buffer's
/// fill byte (0x5a ^ slot); returns how many blocks were written.
fn written_blocks(disk: &Path, iodepth: u8) -> usize {
    let data = fs::read(disk).unwrap();
    assert_eq!(data.len(), DISK_SIZE);
    let mut written = 0;
    for (i, block) in data.chunks(BLOCK).enumerate() {
        let first = block[0];
        if first == 0 && block.iter().all(|&b| b == 0) {
            continue;
        }
        assert!(
            (first ^ 0x5a) < iodepth && block.iter().all(|&b| b == first),
            "block {i} holds bytes no request wrote (first {first:#x})"
        );
        written += 1;
    }
    written
}

fn check_random_writes_land_on_disk(backend: &Backend, disk: &Path) {
    let json = bench_ok(
        backend,
        &[
            "--pattern",
            "randwrite",
            "--ios",
            "600",
            "--iodepth",
            "8",
            "--seed",
            "3",
        ],
    );
    assert_counts(&json, 600, BLOCK as u64);
    // 600 uniform picks among 4096 blocks hit about 557 distinct ones.
    let written = written_blocks(disk, 8);
    assert!((450..=600).contains(&written), "{written} blocks written");
}

#[test]
fn random_writes_land_on_disk_through_qsd() {
    let test = "random_writes_land_on_disk_through_qsd";
    let Some(qsd) = qsd_path(test) else { return };
    let scratch = Scratch::new("qsd-write");
    let disk = scratch.disk(0);
    let backend = start_qsd(&qsd, &scratch, &disk, true, 1);
    check_random_writes_land_on_disk(&backend, &disk);
}

#[test]
fn random_writes_land_on_disk_through_citadel_blk() {
    let test = "random_writes_land_on_disk_through_citadel_blk";
    let scratch = Scratch::new("citadel-write");
    let disk = scratch.disk(0);
    let Some(backend) = start_citadel_blk(test, &scratch, &disk) else {
        return;
    };
    check_random_writes_land_on_disk(&backend, &disk);
}

#[test]
fn read_jobs_reconnect_to_one_backend_with_and_without_event_idx() {
    let test = "read_jobs_reconnect_to_one_backend_with_and_without_event_idx";
    let Some(qsd) = qsd_path(test) else { return };
    let scratch = Scratch::new("qsd-read");
    let disk = scratch.disk(0x33);
    let backend = start_qsd(&qsd, &scratch, &disk, true, 1);
    let json = bench_ok(
        &backend,
        &["--iodepth", "32", "--ios", "3000", "--event-idx"],
    );
    assert_counts(&json, 3000, BLOCK as u64);
    assert_eq!(json["event_idx"], true);
    // EVENT_IDX is bit 29 of the negotiated features.
    let features = u64::from_str_radix(
        json["features"].as_str().unwrap().trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_ne!(features & (1 << 29), 0, "{json}");
    let json = bench_ok(
        &backend,
        &[
            "--pattern",
            "seqread",
            "--bs",
            "128k",
            "--iodepth",
            "4",
            "--ios",
            "300",
        ],
    );
    assert_counts(&json, 300, 128 << 10);
    assert_eq!(json["event_idx"], false);
    // Reads must not have changed the disk.
    assert!(fs::read(&disk).unwrap().iter().all(|&b| b == 0x33));
}

#[test]
fn two_queues_share_the_io_count() {
    let test = "two_queues_share_the_io_count";
    let Some(qsd) = qsd_path(test) else { return };
    let scratch = Scratch::new("qsd-mq");
    let disk = scratch.disk(0);
    let backend = start_qsd(&qsd, &scratch, &disk, true, 2);
    let json = bench_ok(
        &backend,
        &["--queues", "2", "--iodepth", "4", "--ios", "1001"],
    );
    assert_counts(&json, 1001, BLOCK as u64);
    assert_eq!(json["queues"], 2);
}

#[test]
fn writes_to_a_read_only_export_are_refused_with_one_line() {
    let test = "writes_to_a_read_only_export_are_refused_with_one_line";
    let Some(qsd) = qsd_path(test) else { return };
    let scratch = Scratch::new("qsd-ro");
    let disk = scratch.disk(0);
    let backend = start_qsd(&qsd, &scratch, &disk, false, 1);
    let out = bench(&backend, &["--pattern", "randwrite", "--ios", "10"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("read-only"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn an_io_beyond_size_max_is_refused_before_the_job_starts() {
    let test = "an_io_beyond_size_max_is_refused_before_the_job_starts";
    let scratch = Scratch::new("citadel-size-max");
    let disk = scratch.disk(0);
    let Some(backend) = start_citadel_blk(test, &scratch, &disk) else {
        return;
    };
    let out = bench(
        &backend,
        &["--pattern", "randwrite", "--bs", "1m", "--ios", "10"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("size_max"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_missing_socket_is_reported_with_its_path() {
    let scratch = Scratch::new("nosock");
    let socket = scratch.path("absent.sock");
    let out = Command::new(BENCH)
        .arg("--socket")
        .arg(&socket)
        .args(["--ios", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*socket.to_string_lossy()), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
