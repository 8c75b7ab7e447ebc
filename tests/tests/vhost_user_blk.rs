//! Citadel's vhost-user-blk device against citadel-blk: the `virtio_blk` guest program drives
//! the virtio-mmio slot like a driver (configuration, negotiation, one queue, a read, a write
//! and a read back) and the bytes are checked in the image file on the host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use citadel_tests::disk::blk_backend_missing;
use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(30);
/// 1 MiB: 2048 sectors.
const IMAGE_LEN: usize = 1 << 20;
const MARKER: &[u8] = b"citadel-vhost-user-blk-sector-0";
const PATTERN: &[u8] = b"citadel-guest-wrote-sector-one.";

/// citadel-blk serving an image in a scratch directory, killed on drop.
struct Backend {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    _dir: TempDir,
}

impl Backend {
    fn start() -> Backend {
        let dir = TempDir::new("vu-blk");
        let image = dir.path().join("disk.img");
        let mut bytes = vec![0u8; IMAGE_LEN];
        bytes[..MARKER.len()].copy_from_slice(MARKER);
        std::fs::write(&image, bytes).unwrap();
        let socket = dir.path().join("blk.sock");
        let child = Command::new(citadel_tests::binary("citadel-blk"))
            .arg("--image")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn citadel-blk");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "citadel-blk never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend {
            child,
            socket,
            image,
            _dir: dir,
        }
    }

    fn sector(&self, n: usize) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()[n * 512..(n + 1) * 512].to_vec()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn disk_args(socket: &Path) -> Vec<String> {
    vec![
        "-m".into(),
        "32".into(),
        "-chardev".into(),
        format!("socket,id=c0,path={}", socket.display()),
        "-device".into(),
        "vhost-user-blk-device,chardev=c0,id=disk0".into(),
    ]
}

fn expected_sector1() -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(512).collect()
}

#[test]
fn guest_reads_and_writes_the_image_through_citadel_blk() {
    if blk_backend_missing("guest_reads_and_writes_the_image_through_citadel_blk") {
        return;
    }
    let backend = Backend::start();
    let mut args = disk_args(&backend.socket);
    // Citadel declares the slot in the DSDT; this guest program reads its command line
    // instead, where an operator would declare it for a kernel built without ACPI. The disk
    // takes the first slot after the six hot-replace disk slots and the two NIC slots: slot 8,
    // IOAPIC pin 16.
    args.extend([
        "-append".into(),
        "virtio_mmio.device=4K@0xd0008000:16".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&guest_program("virtio_blk"), &args);

    let line = vm.wait_serial("citadel-guest: virtio-mmio devices=", BOOT);
    assert!(line.ends_with("devices=1"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-mmio base=", BOOT);
    assert!(
        line.contains("base=0xd0008000 version=2 device=2"),
        "{line}"
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk capacity=", BOOT);
    assert!(
        line.ends_with(&format!("capacity={}", IMAGE_LEN / 512)),
        "{line}"
    );
    // Completions come straight from the backend through the irqfd; the transport reports
    // VRING for them all the same.
    let line = vm.wait_serial("citadel-guest: virtio-blk isr=", BOOT);
    assert!(line.ends_with("isr=1"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-blk status=", BOOT);
    assert_eq!(
        line,
        format!(
            "citadel-guest: virtio-blk status=0 sector0={}.",
            String::from_utf8_lossy(MARKER)
        )
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk write status=", BOOT);
    assert!(line.ends_with("write status=0"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-blk write-readback status=", BOOT);
    assert_eq!(
        line,
        format!(
            "citadel-guest: virtio-blk write-readback status=0 sector1={}",
            String::from_utf8_lossy(&expected_sector1()[..32])
        )
    );
    vm.wait_serial("citadel-guest: done", BOOT);
    assert_eq!(backend.sector(1), expected_sector1());
    assert_eq!(&backend.sector(0)[..MARKER.len()], MARKER);

    // A machine reset stops the backend's rings and boots the same slot again: the guest
    // drives the device a second time from scratch.
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(qmp.execute("system_reset", None), json!({"return": {}}));
    let line = vm.wait_serial("citadel-guest: virtio-blk write-readback status=", BOOT);
    assert!(
        line.contains("status=0 sector1=citadel-guest-wrote"),
        "{line}"
    );

    // A snapshot cannot keep a device whose backend Citadel did not start: refused before
    // the VM is paused, nothing written.
    let scratch = TempDir::new("vu-blk-snapshot");
    let snap = scratch.path().join("snap");
    let reply = qmp.migrate(&snap);
    assert_eq!(
        citadel_tests::disk::error_desc(&reply),
        "snapshot refused: 1 vhost-user-blk device(s) of the command line cannot be kept in a \
         snapshot; plug disks into the disk slots (-drive, blockdev-add) instead"
    );
    assert!(!snap.exists());
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], "running", "{status}");
}

#[test]
fn bad_disk_command_lines_fail_with_one_line_and_create_nothing() {
    if blk_backend_missing("bad_disk_command_lines_fail_with_one_line_and_create_nothing") {
        return;
    }
    let dir = TempDir::new("vu-blk-bad");
    let pidfile = dir.path().join("citadel.pid");
    let kernel = guest_program("virtio_blk");
    let refusing = dir.path().join("nobody-listens.sock");
    // A socket file nobody accepts on: connect() is refused.
    drop(std::os::unix::net::UnixListener::bind(&refusing).unwrap());
    let not_a_backend = dir.path().join("plain-file");
    std::fs::write(&not_a_backend, b"").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["-device".into(), "vhost-user-blk-device,chardev=c9".into()],
            "no -chardev with id 'c9'",
        ),
        (vec!["-chardev".into(), "socket,id=c0".into()], "no path="),
        (
            vec![
                "-chardev".into(),
                format!("socket,id=c0,path={}", refusing.display()),
                "-device".into(),
                "vhost-user-blk-device,chardev=c0".into(),
            ],
            "Connection refused",
        ),
        (
            vec![
                "-chardev".into(),
                format!("socket,id=c0,path={}", not_a_backend.display()),
                "-device".into(),
                "vhost-user-blk-device,chardev=c0".into(),
            ],
            "Connection refused",
        ),
        (
            vec![
                "-drive".into(),
                "file=/nonexistent.img,if=none,id=d0".into(),
            ],
            "-drive d0: Could not open '/nonexistent.img': No such file or directory",
        ),
        (vec!["-netdev".into(), "user,id=n0".into()], "not supported"),
        (vec!["-netdev".into(), "tap,id=n0".into()], "no ifname="),
    ];
    for (extra, expected) in cases {
        let out = Command::new(citadel_tests::binary("citadel"))
            .args(["-machine", "microvm", "-m", "32", "-kernel"])
            .arg(&kernel)
            .arg("-pidfile")
            .arg(&pidfile)
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(
            err.starts_with("citadel: ") && err.contains(expected),
            "{extra:?}: {err}"
        );
        assert!(!pidfile.exists(), "{extra:?} created the pid file");
    }
}

#[test]
fn a_backend_that_never_answers_fails_the_start_within_the_timeout() {
    if blk_backend_missing("a_backend_that_never_answers_fails_the_start_within_the_timeout") {
        return;
    }
    let dir = TempDir::new("vu-blk-mute");
    let socket = dir.path().join("mute.sock");
    // Accepts the connection (the backlog does) and never reads or answers.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let started = Instant::now();
    let out = Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "32", "-kernel"])
        .arg(guest_program("virtio_blk"))
        .args(disk_args(&socket))
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("SET_OWNER") || err.contains("GET_FEATURES"),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
}
