//! Disks served by a backend the user started, attached at run time as QEMU attaches them:
//! `chardev-add` of a Unix client socket, `device_add {"driver":"vhost-user-blk-device",
//! "chardev":..}` into a hot-replace disk slot, `device_del`, `chardev-remove`.
//! qemu-storage-daemon is the backend; the `virtio_blk` guest program in `hotplug` mode
//! reports what its driver sees, and the bytes it writes are checked in the image. The same
//! backend also serves a `-chardev` disk of the command line.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use citadel_tests::disk::{
    assert_guest_wrote, blk_backend_missing, error_desc, guest_used_plugged_disk, image_with_marker,
};
use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(30);
/// 1 MiB: 2048 sectors.
const IMAGE_LEN: usize = 1 << 20;
const MARKER: &[u8] = b"citadel-qsd-served-disk-sector0";

/// qemu-storage-daemon exporting an image as vhost-user-blk on a socket; killed on drop.
struct StorageDaemon {
    child: Child,
    socket: PathBuf,
}

impl StorageDaemon {
    /// Exports `image` on `dir/name.sock`, with `extra` export options.
    fn start(dir: &Path, name: &str, image: &Path, extra: &str) -> StorageDaemon {
        let socket = dir.join(format!("{name}.sock"));
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on{extra}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        StorageDaemon { child, socket }
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True (and the test reported as skipped, or failed in CI) when a prerequisite is missing.
fn missing(test: &str) -> bool {
    if blk_backend_missing(test) {
        return true;
    }
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !qsd {
        citadel_tests::skip(
            test,
            "qemu-storage-daemon not installed (Debian: qemu-system-common)",
            true,
        );
    }
    !qsd
}

fn chardev_add(qmp: &mut Qmp, id: &str, path: &Path, server: bool) -> Value {
    qmp.execute(
        "chardev-add",
        Some(json!({"id": id, "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": path}}, "server": server}}})),
    )
}

fn device_add(qmp: &mut Qmp, id: &str, addr: &str, chardev: &str) -> Value {
    qmp.execute(
        "device_add",
        Some(
            json!({"id": id, "driver": "vhost-user-blk-device", "addr": addr, "chardev": chardev}),
        ),
    )
}

fn query_chardev(qmp: &mut Qmp) -> Value {
    qmp.execute("query-chardev", None)["return"].clone()
}

fn slot0_inserted(qmp: &mut Qmp) -> bool {
    let block = qmp.execute("query-block", None);
    block["return"][0].get("inserted").is_some()
}

#[test]
fn a_disk_served_by_qemu_storage_daemon_is_plugged_through_chardev_add() {
    let test = "a_disk_served_by_qemu_storage_daemon_is_plugged_through_chardev_add";
    if missing(test) {
        return;
    }
    let dir = TempDir::new("chardev");
    let img = image_with_marker(dir.path(), "disk.img", IMAGE_LEN, MARKER);
    let qsd = StorageDaemon::start(dir.path(), "qsd", &img, "");
    // The guest program finds its slot on the command line: disk slot 0, pin 5.
    let mut vm = Vm::start(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5 hotplug",
        ],
    );
    vm.wait_serial("citadel-guest: hotplug waiting-for-plug", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    // Refusals first: each leaves nothing behind.
    let reply = chardev_add(&mut qmp, "c0", &qsd.socket, true);
    assert!(
        error_desc(&reply).starts_with("Only client sockets are supported"),
        "{reply}"
    );
    let nowhere = dir.path().join("nowhere.sock");
    let reply = chardev_add(&mut qmp, "c0", &nowhere, false);
    assert_eq!(
        error_desc(&reply),
        format!(
            "Failed to connect to '{}': No such file or directory (os error 2)",
            nowhere.display()
        )
    );
    let reply = device_add(&mut qmp, "vdisk", "0x0", "c0");
    assert_eq!(
        error_desc(&reply),
        "Property 'vhost-user-blk-device.chardev' can't find value 'c0'"
    );
    assert_eq!(query_chardev(&mut qmp), json!([]));

    assert_eq!(
        chardev_add(&mut qmp, "c0", &qsd.socket, false),
        json!({"return": {}})
    );
    let reply = chardev_add(&mut qmp, "c0", &qsd.socket, false);
    assert_eq!(error_desc(&reply), "Chardev 'c0' already exists");
    assert_eq!(
        query_chardev(&mut qmp),
        json!([{"label": "c0", "filename": format!("unix:{}", qsd.socket.display()),
            "frontend-open": false}])
    );
    assert_eq!(
        device_add(&mut qmp, "vdisk", "0x0", "c0"),
        json!({"return": {}})
    );

    guest_used_plugged_disk(&mut vm, IMAGE_LEN, MARKER, STEP);
    vm.wait_serial("citadel-guest: hotplug waiting-for-unplug", STEP);
    let written = std::fs::read(&img).unwrap()[512..1024].to_vec();
    assert_guest_wrote(&written);

    // In use: neither removable nor usable by a second device; the slot is taken.
    assert_eq!(query_chardev(&mut qmp)[0]["frontend-open"], true);
    let reply = qmp.execute("chardev-remove", Some(json!({"id": "c0"})));
    assert_eq!(error_desc(&reply), "Chardev 'c0' is busy");
    let reply = device_add(&mut qmp, "other", "0x1", "c0");
    assert_eq!(
        error_desc(&reply),
        "Property 'vhost-user-blk-device.chardev' can't take value 'c0', it's in use"
    );
    let reply = device_add(&mut qmp, "other", "0x0", "c0");
    assert_eq!(error_desc(&reply), "The slot 0 is occupied already.");
    let reply = device_add(&mut qmp, "vdisk", "0x1", "c0");
    assert_eq!(error_desc(&reply), "vdisk is already registered.");
    let block = qmp.execute("query-block", None);
    let inserted = &block["return"][0]["inserted"];
    assert_eq!(inserted["node-name"], "chardev:c0", "{block}");
    assert_eq!(inserted["file"], json!(qsd.socket), "{block}");
    assert_eq!(block["return"][0]["qdev"], "vdisk", "{block}");

    // DEVICE_DELETED comes before the return; the guest sees an empty slot again.
    qmp.events.clear();
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "vdisk"}))),
        json!({"return": {}})
    );
    let deleted: Vec<&Value> = qmp
        .events
        .iter()
        .filter(|e| e["event"] == "DEVICE_DELETED")
        .collect();
    assert_eq!(deleted.len(), 1, "{:?}", qmp.events);
    assert_eq!(
        deleted[0]["data"],
        json!({"device": "vdisk", "path": "vdisk"})
    );
    let line = vm.wait_serial("citadel-guest: hotplug unplugged capacity=", STEP);
    assert!(line.ends_with("capacity=0"), "{line}");
    assert!(!slot0_inserted(&mut qmp));

    // The chardev outlives its device until chardev-remove.
    assert_eq!(query_chardev(&mut qmp)[0]["frontend-open"], false);
    assert_eq!(
        qmp.execute("chardev-remove", Some(json!({"id": "c0"}))),
        json!({"return": {}})
    );
    assert_eq!(query_chardev(&mut qmp), json!([]));
    let reply = qmp.execute("chardev-remove", Some(json!({"id": "c0"})));
    assert_eq!(error_desc(&reply), "Chardev 'c0' not found");
}

#[test]
fn a_backend_that_cannot_honour_the_slot_is_refused_naming_the_limit() {
    let test = "a_backend_that_cannot_honour_the_slot_is_refused_naming_the_limit";
    if missing(test) {
        return;
    }
    let dir = TempDir::new("chardev-limits");
    let img = image_with_marker(dir.path(), "disk.img", IMAGE_LEN, MARKER);
    let qsd = StorageDaemon::start(dir.path(), "qsd4k", &img, ",logical-block-size=4096");
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        chardev_add(&mut qmp, "c1", &qsd.socket, false),
        json!({"return": {}})
    );
    // Twice: the second attempt connects again, and the backend answers it the same way.
    for _ in 0..2 {
        let reply = device_add(&mut qmp, "vdisk", "0x0", "c1");
        assert_eq!(
            error_desc(&reply),
            format!(
                "Device vdisk cannot take the backend at {}: the disk's logical block size is 4096, the slot's 512",
                qsd.socket.display()
            )
        );
        assert!(!slot0_inserted(&mut qmp));
        assert_eq!(query_chardev(&mut qmp)[0]["frontend-open"], false);
    }
    assert_eq!(
        qmp.execute("chardev-remove", Some(json!({"id": "c1"}))),
        json!({"return": {}})
    );

    // A socket the management connected and passed with getfd serves the same way, once.
    let file = std::fs::File::open(&img).unwrap();
    assert_eq!(
        qmp.execute_with_fds(
            "getfd",
            Some(json!({"fdname": "notsock"})),
            &[file.as_raw_fd()]
        ),
        json!({"return": {}})
    );
    let reply = chardev_add_fd(&mut qmp, "c2", "notsock");
    assert!(
        error_desc(&reply).starts_with("The descriptor passed is not a socket"),
        "{reply}"
    );
    assert_eq!(query_chardev(&mut qmp), json!([]));
    let stream = UnixStream::connect(&qsd.socket).unwrap();
    assert_eq!(
        qmp.execute_with_fds(
            "getfd",
            Some(json!({"fdname": "vu"})),
            &[stream.as_raw_fd()]
        ),
        json!({"return": {}})
    );
    drop(stream);
    assert_eq!(chardev_add_fd(&mut qmp, "c2", "vu"), json!({"return": {}}));
    assert_eq!(
        query_chardev(&mut qmp),
        json!([{"label": "c2", "filename": "fd:vu", "frontend-open": false}])
    );
    let reply = device_add(&mut qmp, "vdisk", "0x0", "c2");
    assert_eq!(
        error_desc(&reply),
        "Device vdisk cannot take the backend at fd:vu: the disk's logical block size is 4096, the slot's 512"
    );
    let reply = device_add(&mut qmp, "vdisk", "0x0", "c2");
    assert!(
        error_desc(&reply).starts_with("Chardev 'c2' is disconnected"),
        "{reply}"
    );
    assert!(!slot0_inserted(&mut qmp));
    assert!(vm.wait_exit(Duration::from_millis(100)).is_none());
}

fn chardev_add_fd(qmp: &mut Qmp, id: &str, fdname: &str) -> Value {
    qmp.execute(
        "chardev-add",
        Some(json!({"id": id, "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": fdname}}, "server": false}}})),
    )
}

#[test]
fn qemu_storage_daemon_serves_a_disk_of_the_command_line() {
    let test = "qemu_storage_daemon_serves_a_disk_of_the_command_line";
    if missing(test) {
        return;
    }
    let dir = TempDir::new("chardev-cli");
    let img = image_with_marker(dir.path(), "disk.img", IMAGE_LEN, MARKER);
    let qsd = StorageDaemon::start(dir.path(), "qsd", &img, "");
    let chardev = format!("socket,id=c0,path={}", qsd.socket.display());
    // A second backend on a chardev no device of the command line uses: connected at start,
    // waiting for QMP's device_add.
    let other = image_with_marker(dir.path(), "other.img", IMAGE_LEN, MARKER);
    let spare_qsd = StorageDaemon::start(dir.path(), "spare", &other, "");
    let spare = format!("socket,id=spare,path={}", spare_qsd.socket.display());
    // The disk takes the first slot after the hot-replace ones: slot 8, pin 16.
    let mut vm = Vm::start(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-append",
            "virtio_mmio.device=4K@0xd0008000:16",
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-blk-device,chardev=c0,id=disk0",
            "-chardev",
            &spare,
        ],
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk capacity=", STEP);
    assert!(
        line.ends_with(&format!("capacity={}", IMAGE_LEN / 512)),
        "{line}"
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk status=", STEP);
    assert_eq!(
        line,
        format!(
            "citadel-guest: virtio-blk status=0 sector0={}.",
            String::from_utf8_lossy(MARKER)
        )
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk write-readback status=", STEP);
    assert!(
        line.contains("status=0 sector1=citadel-guest-wrote"),
        "{line}"
    );
    vm.wait_serial("citadel-guest: done", STEP);
    let written = std::fs::read(&img).unwrap()[512..1024].to_vec();
    assert_guest_wrote(&written);

    // Both chardevs are QMP's to see; the device's is in use for good, the spare one plugs.
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        query_chardev(&mut qmp),
        json!([
            {"label": "c0", "filename": format!("unix:{}", qsd.socket.display()),
                "frontend-open": true},
            {"label": "spare", "filename": format!("unix:{}", spare_qsd.socket.display()),
                "frontend-open": false},
        ])
    );
    let reply = qmp.execute("chardev-remove", Some(json!({"id": "c0"})));
    assert_eq!(error_desc(&reply), "Chardev 'c0' is busy");
    let reply = chardev_add(&mut qmp, "c0", &spare_qsd.socket, false);
    assert_eq!(error_desc(&reply), "Chardev 'c0' already exists");
    let reply = device_add(&mut qmp, "vdisk", "0x0", "c0");
    assert_eq!(
        error_desc(&reply),
        "Property 'vhost-user-blk-device.chardev' can't take value 'c0', it's in use"
    );
    assert_eq!(
        device_add(&mut qmp, "vdisk", "0x0", "spare"),
        json!({"return": {}})
    );
    let block = qmp.execute("query-block", None);
    assert_eq!(
        block["return"][0]["inserted"]["file"],
        json!(spare_qsd.socket),
        "{block}"
    );
}

#[test]
fn a_command_line_chardev_that_cannot_connect_is_refused_at_start() {
    let dir = TempDir::new("chardev-cli-bad");
    let nowhere = dir.path().join("nowhere.sock");
    let out = Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "32", "-kernel"])
        .arg(guest_program("idle"))
        .args(["-serial", "none", "-chardev"])
        .arg(format!("socket,id=spare,path={}", nowhere.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "citadel: -chardev spare: Failed to connect to '{}': No such file or directory (os error 2)",
            nowhere.display()
        )
    );
}

#[test]
fn a_backend_started_outside_citadel_that_dies_fails_its_disk_and_the_vm_lives_on() {
    let test = "a_backend_started_outside_citadel_that_dies_fails_its_disk_and_the_vm_lives_on";
    if missing(test) {
        return;
    }
    let dir = TempDir::new("chardev-dies");
    let img = image_with_marker(dir.path(), "disk.img", IMAGE_LEN, MARKER);
    let mut qsd = StorageDaemon::start(dir.path(), "qsd", &img, "");
    let mut vm = Vm::start(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5 hotplug",
        ],
    );
    vm.wait_serial("citadel-guest: hotplug waiting-for-plug", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        chardev_add(&mut qmp, "c0", &qsd.socket, false),
        json!({"return": {}})
    );
    assert_eq!(
        device_add(&mut qmp, "vdisk", "0x0", "c0"),
        json!({"return": {}})
    );
    vm.wait_serial("citadel-guest: hotplug waiting-for-unplug", STEP);
    qsd.child.kill().expect("kill qemu-storage-daemon");
    qsd.child.wait().expect("reap qemu-storage-daemon");

    // Citadel cannot restart what it did not start: the disk fails, saying why, and the VM
    // and its QMP go on.
    const FAILED: &str =
        "disk vdisk: its backend hung up and cannot be restarted (its backend, behind chardev c0, was not started by Citadel)";
    let deadline = Instant::now() + STEP;
    while !vm.log().contains(FAILED) {
        assert!(Instant::now() < deadline, "no failure logged\n{}", vm.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "vdisk"}))),
        json!({"return": {}})
    );
    assert!(!slot0_inserted(&mut qmp));
}
