//! A hot-plugged disk whose citadel-blk is killed (SIGKILL) while the guest writes: Citadel
//! notices the hang-up of the backend's socket, has the launcher start a new citadel-blk on
//! the same image and hands it the ring and the inflight area, so the guest sees no error and
//! every write it saw acknowledged is in the image. A backend that keeps dying past the
//! restart budget fails the disk: the guest's requests get I/O errors, its status register
//! shows DEVICE_NEEDS_RESET, Citadel logs one line, the VM keeps running and `device_del`
//! still takes the disk out.
//!
//! The `virtio_blk` guest program in `restart` mode writes sectors 0-1023, each holding its
//! own number, and counts the writes that did not complete with status OK.

use std::path::Path;
use std::time::{Duration, Instant};

use citadel_tests::disk::blk_backend_missing;
use citadel_tests::guest_program;
use citadel_tests::procfs::{blk_backends as backends, children, wait_gone};
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(30);
/// 1 MiB: 2048 sectors, of which the guest writes the first 1024.
const IMAGE_LEN: usize = 1 << 20;
const SECTORS: usize = 1024;
/// What Citadel logs when a new backend replaced a dead one, before its pid.
const TOOK_OVER: &str = "its backend hung up; citadel-blk[";
/// What Citadel logs when it gives up on a disk.
const GAVE_UP: &str = "its backend hung up and cannot be restarted";
/// Restarts allowed within the window: Citadel's budget.
const RESTART_BUDGET: usize = 3;
/// virtio's DEVICE_NEEDS_RESET status bit.
const NEEDS_RESET: u64 = 0x40;
/// The status of a started device: ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK.
const STARTED: u64 = 15;

/// Boots the guest program in `restart` mode on disk slot 0 and plugs a fresh image into
/// it; returns the VM, a negotiated QMP client, the image and the backend's pid.
fn plugged(dir: &Path) -> (Vm, Qmp, std::path::PathBuf, u32) {
    plugged_from(dir, false)
}

/// As [`plugged`]; with `fdset`, the image reaches Citadel as a descriptor (`add-fd`, fd set
/// 3) and is renamed once plugged, so that only the descriptor leads to it.
fn plugged_from(dir: &Path, fdset: bool) -> (Vm, Qmp, std::path::PathBuf, u32) {
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; IMAGE_LEN]).unwrap();
    let mut vm = Vm::start(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5 restart",
        ],
    );
    vm.wait_serial("citadel-guest: restart waiting-for-plug", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let filename = if fdset {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let reply = qmp.execute_with_fds(
            "add-fd",
            Some(json!({"fdset-id": 3})),
            &[std::os::fd::AsRawFd::as_raw_fd(&file)],
        );
        assert_eq!(reply["return"]["fdset-id"], 3, "{reply}");
        "/dev/fdset/3".to_string()
    } else {
        img.display().to_string()
    };
    let reply = qmp.execute(
        "blockdev-add",
        Some(
            json!({"node-name": "disk-0", "file": {"driver": "file", "filename": filename},
            "cache": {"direct": false}}),
        ),
    );
    assert_eq!(reply, json!({"return": {}}));
    let reply = qmp.execute(
        "device_add",
        Some(
            json!({"id": "disk-0", "driver": "virtio-blk-mmio", "addr": "0x0",
            "drive": "disk-0"}),
        ),
    );
    assert_eq!(reply, json!({"return": {}}));
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let line = vm.wait_serial("citadel-guest: restart plugged capacity=", STEP);
    assert!(
        line.ends_with(&format!("capacity={}", IMAGE_LEN / 512)),
        "{line}"
    );
    if fdset {
        let moved = dir.join("moved.img");
        std::fs::rename(&img, &moved).unwrap();
        return (vm, qmp, moved, pids[0]);
    }
    (vm, qmp, img, pids[0])
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is a backend this test found.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(
        rc,
        0,
        "kill -{sig} {pid}: {}",
        std::io::Error::last_os_error()
    );
}

fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// The inode of citadel-blk's inflight area (a memfd) as backend `pid` maps it.
fn inflight_inode(pid: u32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let inodes: Vec<u64> = maps
        .lines()
        .filter(|l| l.contains("citadel-blk-inflight"))
        .map(|l| l.split_whitespace().nth(4).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        inodes.len(),
        1,
        "citadel-blk[{pid}] maps {inodes:?}\n{maps}"
    );
    inodes[0]
}

/// The inode of the one inflight area Citadel (`vm`) holds a descriptor of.
fn held_inflight_inode(vm: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut held = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{vm}/fd")).unwrap() {
        let path = entry.unwrap().path();
        let target = std::fs::read_link(&path).unwrap_or_default();
        if target.to_string_lossy().contains("citadel-blk-inflight") {
            held.push(std::fs::metadata(&path).unwrap().ino());
        }
    }
    assert_eq!(held.len(), 1, "citadel[{vm}] holds inflight areas {held:?}");
    held[0]
}

/// Waits until Citadel has logged `count` takeovers; returns the pid named by the last.
fn wait_takeover(vm: &Vm, count: usize) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = vm.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(TOOK_OVER)).collect();
        if lines.len() >= count {
            let last = lines[count - 1];
            let pid = last.split(TOOK_OVER).nth(1).unwrap();
            return pid[..pid.find(']').unwrap()].parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no restart #{count} of the backend within 10 s\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the guest to finish its writes and checks that none failed, that the device
/// never asked for a reset, and that every sector holds what the guest wrote to it.
fn assert_every_write_landed(vm: &mut Vm, img: &Path) {
    let line = vm.wait_serial("citadel-guest: restart errors=", STEP);
    assert_eq!(number(&line), 0, "{}", vm.transcript());
    let line = vm.wait_serial("citadel-guest: restart device-status=", STEP);
    assert_eq!(number(&line), STARTED, "{line}");
    assert!(!vm.log().contains(GAVE_UP), "{}", vm.log());
    citadel_tests::disk::assert_numbered_sectors(img, SECTORS);
}

/// The last number a guest line `<needle><number>` reported.
fn number(line: &str) -> u64 {
    line.rsplit('=').next().unwrap().parse().unwrap()
}

#[test]
fn a_killed_backend_is_restarted_and_no_acknowledged_write_is_lost() {
    if blk_backend_missing("a_killed_backend_is_restarted_and_no_acknowledged_write_is_lost") {
        return;
    }
    let dir = TempDir::new("blk-restart");
    let (mut vm, mut qmp, img, first) = plugged(dir.path());

    // Citadel holds the inflight area the first backend created, and hands it on.
    let held = held_inflight_inode(vm.pid());
    assert_eq!(inflight_inode(first), held);
    vm.wait_serial("citadel-guest: restart progress=128", STEP);
    kill9(first);
    let second = wait_takeover(&vm, 1);
    assert_ne!(second, first);
    assert_eq!(backends(vm.pid()), vec![second]);
    assert_eq!(inflight_inode(second), held);
    // Stopped first, so that the guest's next write waits in the ring when it dies.
    vm.wait_serial("citadel-guest: restart progress=512", STEP);
    signal(second, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    kill9(second);
    let third = wait_takeover(&vm, 2);
    assert!(![first, second].contains(&third));
    assert_eq!(inflight_inode(third), held);
    assert_eq!(held_inflight_inode(vm.pid()), held);

    assert_every_write_landed(&mut vm, &img);

    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "disk-0"}))),
        json!({"return": {}})
    );
    assert!(wait_gone(third, Duration::from_secs(5)));
}

#[test]
fn a_backend_that_keeps_dying_fails_the_disk_and_the_vm_lives_on() {
    if blk_backend_missing("a_backend_that_keeps_dying_fails_the_disk_and_the_vm_lives_on") {
        return;
    }
    let dir = TempDir::new("blk-restart-fail");
    let (mut vm, mut qmp, _img, mut pid) = plugged(dir.path());

    vm.wait_serial("citadel-guest: restart progress=64", STEP);
    for round in 1..=RESTART_BUDGET {
        kill9(pid);
        pid = wait_takeover(&vm, round);
    }
    kill9(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vm.log().contains(GAVE_UP) {
        assert!(
            Instant::now() < deadline,
            "Citadel did not give up on the disk\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let gave_up: Vec<String> = vm
        .log()
        .lines()
        .filter(|l| l.contains(GAVE_UP))
        .map(str::to_string)
        .collect();
    assert_eq!(gave_up.len(), 1, "{gave_up:?}");
    assert!(gave_up[0].contains("disk disk-0"), "{}", gave_up[0]);

    // The guest's writes after that fail instead of hanging, and the device says why.
    let line = vm.wait_serial("citadel-guest: restart errors=", STEP);
    assert!(number(&line) > 0, "{}", vm.transcript());
    let line = vm.wait_serial("citadel-guest: restart device-status=", STEP);
    assert_eq!(number(&line), STARTED | NEEDS_RESET, "{line}");

    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], "running", "{status}");
    qmp.events.clear();
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "disk-0"}))),
        json!({"return": {}})
    );
    assert!(
        qmp.events
            .iter()
            .any(|e: &Value| e["event"] == "DEVICE_DELETED"),
        "{:?}",
        qmp.events
    );
    let block = qmp.execute("query-block", None);
    assert!(block["return"][0].get("inserted").is_none(), "{block}");
    assert!(backends(vm.pid()).is_empty(), "{:?}", backends(vm.pid()));
}

#[test]
fn a_command_line_disk_gets_its_backend_restarted_too() {
    if blk_backend_missing("a_command_line_disk_gets_its_backend_restarted_too") {
        return;
    }
    let dir = TempDir::new("blk-restart-cold");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; IMAGE_LEN]).unwrap();
    let drive = format!("id=d0,file={}", img.display());
    let mut vm = Vm::start(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-device,drive=d0,id=disk-0",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5 restart",
        ],
    );
    let line = vm.wait_serial("citadel-guest: restart plugged capacity=", STEP);
    assert!(
        line.ends_with(&format!("capacity={}", IMAGE_LEN / 512)),
        "{line}"
    );
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    vm.wait_serial("citadel-guest: restart progress=256", STEP);
    kill9(pids[0]);
    let second = wait_takeover(&vm, 1);
    assert_ne!(second, pids[0]);
    assert_every_write_landed(&mut vm, &img);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "disk-0"}))),
        json!({"return": {}})
    );
    assert!(wait_gone(second, Duration::from_secs(5)));
}

#[test]
fn a_disk_from_an_fd_set_is_restarted_on_a_duplicate_of_its_descriptor() {
    if blk_backend_missing("a_disk_from_an_fd_set_is_restarted_on_a_duplicate_of_its_descriptor") {
        return;
    }
    let dir = TempDir::new("blk-restart-fdset");
    let (mut vm, mut qmp, img, first) = plugged_from(dir.path(), true);
    // The set's descriptor goes: the node's own duplicate is what a restart uses.
    assert_eq!(
        qmp.execute("remove-fd", Some(json!({"fdset-id": 3}))),
        json!({"return": {}})
    );
    vm.wait_serial("citadel-guest: restart progress=128", STEP);
    kill9(first);
    let second = wait_takeover(&vm, 1);
    assert_ne!(second, first);
    assert_every_write_landed(&mut vm, &img);
}

#[test]
fn a_disk_whose_launcher_is_gone_fails_with_the_reason_and_the_vm_lives_on() {
    if blk_backend_missing(
        "a_disk_whose_launcher_is_gone_fails_with_the_reason_and_the_vm_lives_on",
    ) {
        return;
    }
    let dir = TempDir::new("blk-restart-launcher");
    let (mut vm, mut qmp, _img, backend) = plugged(dir.path());
    vm.wait_serial("citadel-guest: restart progress=64", STEP);
    let launcher = children(vm.pid());
    assert_eq!(launcher.len(), 1, "{launcher:?}");
    // The backend dies with its launcher (its parent-death signal); nobody can start another.
    kill9(launcher[0]);
    assert!(wait_gone(backend, Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vm.log().contains(GAVE_UP) {
        assert!(
            Instant::now() < deadline,
            "Citadel did not give up on the disk\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = vm.log();
    let gave_up: Vec<&str> = log.lines().filter(|l| l.contains(GAVE_UP)).collect();
    assert_eq!(gave_up.len(), 1, "{gave_up:?}");
    assert!(
        gave_up[0].contains("(the device launcher has exited)"),
        "{}",
        gave_up[0]
    );
    let line = vm.wait_serial("citadel-guest: restart device-status=", STEP);
    assert_eq!(number(&line), STARTED | NEEDS_RESET, "{line}");
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], "running", "{status}");
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "disk-0"}))),
        json!({"return": {}})
    );
}
