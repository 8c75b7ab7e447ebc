//! Descriptors passed over the QMP socket (`SCM_RIGHTS`), as libvirt and Kata pass files to a
//! jailed QEMU: `getfd`/`closefd`, `add-fd`/`remove-fd`/`query-fdsets`, and a disk plugged
//! from `/dev/fdset/N` whose file the VMM could not open by path. Every check looks from
//! outside: replies on the socket, the VMM's and the backend's `/proc/<pid>/fd`, bytes the
//! guest wrote.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use citadel_tests::disk::{
    assert_guest_wrote, blk_backend_missing, error_desc, guest_used_plugged_disk,
};
use citadel_tests::guest_program;
use citadel_tests::procfs::{blk_backends as backends, wait_gone};
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(30);
/// 1 MiB: 2048 sectors.
const IMAGE_LEN: usize = 1 << 20;
const MARKER: &[u8] = b"citadel-fdset-disk-sector0";
/// O_CLOEXEC as /proc/<pid>/fdinfo shows it (octal flags).
const O_CLOEXEC: u32 = 0o2000000;
fn read_write(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}
/// The targets of `pid`'s descriptors.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|t| t.display().to_string())
        .collect()
}

fn image(dir: &Path, name: &str) -> PathBuf {
    citadel_tests::disk::image_with_marker(dir, name, IMAGE_LEN, MARKER)
}

/// The octal open flags of `pid`'s descriptor `fd`.
fn fd_flags(pid: u32, fd: i64) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    u32::from_str_radix(flags.trim(), 8).unwrap()
}

fn holds(pid: u32, path: &Path) -> usize {
    let path = path.display().to_string();
    fd_targets(pid).iter().filter(|t| **t == path).count()
}

fn blockdev_add(qmp: &mut Qmp, node: &str, filename: &str, read_only: bool) -> Value {
    qmp.execute(
        "blockdev-add",
        Some(
            json!({"node-name": node, "file": {"driver": "file", "filename": filename},
            "read-only": read_only}),
        ),
    )
}

#[test]
fn a_disk_plugged_from_an_fd_set_reaches_the_guest_though_its_path_is_gone() {
    let test = "a_disk_plugged_from_an_fd_set_reaches_the_guest_though_its_path_is_gone";
    if blk_backend_missing(test) {
        return;
    }
    let dir = TempDir::new("fdset-disk");
    let path = image(dir.path(), "disk.img");
    let file = read_write(&path);
    // The path no longer exists: only the descriptor reaches the file.
    std::fs::remove_file(&path).unwrap();
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

    let reply = blockdev_add(&mut qmp, "by-path", path.to_str().unwrap(), false);
    assert!(
        error_desc(&reply).contains("No such file or directory"),
        "{reply}"
    );

    let reply = qmp.execute_with_fds(
        "add-fd",
        Some(json!({"fdset-id": 3, "opaque": "disk rw"})),
        &[file.as_raw_fd()],
    );
    let fd = reply["return"]["fd"]
        .as_i64()
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(reply["return"]["fdset-id"], 3, "{reply}");
    assert_ne!(
        fd_flags(vm.pid(), fd) & O_CLOEXEC,
        0,
        "received descriptors are close-on-exec"
    );
    assert_eq!(
        qmp.execute("query-fdsets", None),
        json!({"return": [{"fdset-id": 3, "fds": [{"fd": fd, "opaque": "disk rw"}]}]})
    );

    assert_eq!(
        blockdev_add(&mut qmp, "drive-0", "/dev/fdset/3", false),
        json!({"return": {}})
    );
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let deleted = format!("{} (deleted)", path.display());
    assert!(
        fd_targets(pids[0]).contains(&deleted),
        "citadel-blk[{}] serves the passed file: {:?}",
        pids[0],
        fd_targets(pids[0])
    );
    assert_eq!(
        qmp.execute(
            "device_add",
            Some(
                json!({"id": "disk-0", "driver": "virtio-blk-mmio", "addr": "0x0",
                "drive": "drive-0"})
            )
        ),
        json!({"return": {}})
    );
    guest_used_plugged_disk(&mut vm, IMAGE_LEN, MARKER, STEP);
    let mut written = vec![0u8; 512];
    file.read_exact_at(&mut written, 512).unwrap();
    assert_guest_wrote(&written);

    // The set kept its own descriptor: removing it leaves the disk served. The node keeps
    // one duplicate, to start a backend again if this one dies, until device_del.
    assert_eq!(
        qmp.execute("remove-fd", Some(json!({"fdset-id": 3, "fd": fd}))),
        json!({"return": {}})
    );
    assert_eq!(qmp.execute("query-fdsets", None), json!({"return": []}));
    let held = |pid| fd_targets(pid).iter().filter(|t| **t == deleted).count();
    assert_eq!(held(vm.pid()), 1);
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "disk-0"}))),
        json!({"return": {}})
    );
    assert!(wait_gone(pids[0], Duration::from_secs(5)));
    assert_eq!(held(vm.pid()), 0);
}

#[test]
fn a_disk_on_the_command_line_comes_from_an_inherited_descriptor() {
    let test = "a_disk_on_the_command_line_comes_from_an_inherited_descriptor";
    if blk_backend_missing(test) {
        return;
    }
    let dir = TempDir::new("add-fd");
    let path = image(dir.path(), "disk.img");
    let file = read_write(&path);
    std::fs::remove_file(&path).unwrap();
    let fd = file.as_raw_fd();
    let add_fd = format!("fd={fd},set=1,opaque=cold");
    let mut vm = Vm::start_inheriting(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-add-fd",
            &add_fd,
            "-drive",
            "id=d0,file=/dev/fdset/1",
            "-device",
            "virtio-blk-device,drive=d0",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5",
        ],
        &[fd],
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk capacity=", STEP);
    assert!(
        line.ends_with(&format!("capacity={}", IMAGE_LEN / 512)),
        "{line}"
    );
    let line = vm.wait_serial("citadel-guest: virtio-blk write status=", STEP);
    assert!(line.ends_with("status=0"), "{line}");
    let mut written = vec![0u8; 512];
    file.read_exact_at(&mut written, 512).unwrap();
    assert_guest_wrote(&written);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        qmp.execute("query-fdsets", None),
        json!({"return": [{"fdset-id": 1, "fds": [{"fd": fd, "opaque": "cold"}]}]})
    );
    // Taken close-on-exec, so it reaches no process started later.
    assert_ne!(fd_flags(vm.pid(), i64::from(fd)) & O_CLOEXEC, 0);
}

#[test]
fn getfd_keeps_a_descriptor_by_name_until_closefd() {
    let dir = TempDir::new("getfd");
    let first = image(dir.path(), "first");
    let second = image(dir.path(), "second");
    let vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let pid = vm.pid();

    let file = File::open(&first).unwrap();
    assert_eq!(
        qmp.execute_with_fds("getfd", Some(json!({"fdname": "img"})), &[file.as_raw_fd()]),
        json!({"return": {}})
    );
    assert_eq!(holds(pid, &first), 1);
    // The same name again replaces (and closes) the older descriptor.
    let file = File::open(&second).unwrap();
    assert_eq!(
        qmp.execute_with_fds("getfd", Some(json!({"fdname": "img"})), &[file.as_raw_fd()]),
        json!({"return": {}})
    );
    assert_eq!(holds(pid, &first), 0);
    assert_eq!(holds(pid, &second), 1);
    assert_eq!(
        qmp.execute("closefd", Some(json!({"fdname": "img"}))),
        json!({"return": {}})
    );
    assert_eq!(holds(pid, &second), 0);
    let reply = qmp.execute("closefd", Some(json!({"fdname": "img"})));
    assert_eq!(error_desc(&reply), "File descriptor named 'img' not found");
}

#[test]
fn refused_or_unclaimed_descriptors_are_closed() {
    let dir = TempDir::new("fd-errors");
    let path = image(dir.path(), "disk.img");
    let vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let pid = vm.pid();
    let file = File::open(&path).unwrap();
    let fd = file.as_raw_fd();

    for command in ["getfd", "add-fd"] {
        let arguments = (command == "getfd").then(|| json!({"fdname": "x"}));
        let reply = qmp.execute(command, arguments);
        assert_eq!(
            error_desc(&reply),
            "No file descriptor supplied via SCM_RIGHTS",
            "{command}"
        );
    }
    let held = fd_targets(pid).len();
    // Attached to a command that takes none.
    let reply = qmp.execute_with_fds("query-status", None, &[fd, fd, fd]);
    assert!(reply.get("return").is_some(), "{reply}");
    assert_eq!(holds(pid, &path), 0);
    // Sent ahead of a command that takes none: kept until it arrives, then closed.
    qmp.send_with_fds(b" ", &[fd]);
    let reply = qmp.execute("query-status", None);
    assert!(reply.get("return").is_some(), "{reply}");
    assert_eq!(holds(pid, &path), 0);
    // More than a message may carry: all closed, the command refused.
    let reply = qmp.execute_with_fds("add-fd", None, &[fd; 6]);
    assert_eq!(
        error_desc(&reply),
        "Too many file descriptors passed: at most 4 per message"
    );
    assert_eq!(holds(pid, &path), 0);
    // A name QEMU refuses.
    let reply = qmp.execute_with_fds("getfd", Some(json!({"fdname": "0x"})), &[fd]);
    assert_eq!(
        error_desc(&reply),
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    // getfd takes one; the others attached to it are closed.
    let reply = qmp.execute_with_fds("getfd", Some(json!({"fdname": "one"})), &[fd, fd]);
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(holds(pid, &path), 1);
    qmp.execute("closefd", Some(json!({"fdname": "one"})));
    assert_eq!(fd_targets(pid).len(), held, "{:?}", fd_targets(pid));

    let reply = qmp.execute("remove-fd", Some(json!({"fdset-id": 7})));
    assert_eq!(
        error_desc(&reply),
        "File descriptor named 'fdset-id:7' not found"
    );
    let reply = qmp.execute_with_fds("add-fd", Some(json!({"fdset-id": -1})), &[fd]);
    assert_eq!(
        error_desc(&reply),
        "Parameter 'fdset-id' expects a non-negative value"
    );
    assert_eq!(holds(pid, &path), 0);

    // A read-only descriptor serves no read-write node.
    let reply = qmp.execute_with_fds("add-fd", None, &[fd]);
    assert_eq!(reply["return"]["fdset-id"], 0, "{reply}");
    let reply = blockdev_add(&mut qmp, "drive-0", "/dev/fdset/0", false);
    assert_eq!(
        error_desc(&reply),
        "Could not open '/dev/fdset/0': Permission denied (os error 13)"
    );
    let reply = blockdev_add(&mut qmp, "drive-0", "/dev/fdset/9", true);
    assert_eq!(
        error_desc(&reply),
        "Could not open '/dev/fdset/9': No such file or directory (os error 2)"
    );
    assert!(backends(pid).is_empty());
}

#[test]
fn a_vm_holds_a_bounded_number_of_passed_descriptors() {
    let dir = TempDir::new("fd-limits");
    let path = image(dir.path(), "disk.img");
    let vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let pid = vm.pid();
    let file = File::open(&path).unwrap();
    let fd = file.as_raw_fd();
    for i in 0..64 {
        let reply = qmp.execute_with_fds("getfd", Some(json!({"fdname": format!("n{i}")})), &[fd]);
        assert_eq!(reply, json!({"return": {}}), "getfd {i}");
        let reply = qmp.execute_with_fds("add-fd", Some(json!({"fdset-id": i % 3})), &[fd]);
        assert!(reply.get("return").is_some(), "add-fd {i}: {reply}");
    }
    let reply = qmp.execute_with_fds("getfd", Some(json!({"fdname": "more"})), &[fd]);
    assert_eq!(
        error_desc(&reply),
        "Too many named file descriptors: at most 64"
    );
    let reply = qmp.execute_with_fds("add-fd", None, &[fd]);
    assert_eq!(
        error_desc(&reply),
        "Too many file descriptors in fd sets: at most 64"
    );
    assert_eq!(holds(pid, &path), 128);
}

#[test]
fn an_add_fd_of_a_descriptor_not_inherited_is_refused_at_start() {
    let output = std::process::Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "32", "-kernel"])
        .arg(guest_program("idle"))
        .args(["-add-fd", "fd=1000,set=0", "-serial", "none"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        err.trim_end(),
        "citadel: -add-fd fd=1000: Bad file descriptor (os error 9)"
    );
}

/// QEMU's Python library passes a descriptor in a message of its own (a lone space) just
/// before the command that takes it.
const PYTHON_CLIENT: &str = r#"
import asyncio, os, sys
from qemu.qmp import QMPClient

async def main(path, image):
    qmp = QMPClient("citadel-fds")
    await qmp.connect(path)
    fd = os.open(image, os.O_RDWR)
    qmp.send_fd_scm(fd)
    added = await qmp.execute("add-fd", {"fdset-id": 2, "opaque": "python"})
    assert added["fdset-id"] == 2, added
    qmp.send_fd_scm(fd)
    await qmp.execute("getfd", {"fdname": "py"})
    sets = await qmp.execute("query-fdsets")
    assert sets == [{"fdset-id": 2, "fds": [{"fd": added["fd"], "opaque": "python"}]}], sets
    await qmp.execute("blockdev-add", {"node-name": "py-disk",
        "file": {"driver": "file", "filename": "/dev/fdset/2"}})
    await qmp.execute("closefd", {"fdname": "py"})
    await qmp.disconnect()
    print("python-fds: ok")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[test]
fn qemu_python_library_passes_descriptors_ahead_of_its_commands() {
    let test = "qemu_python_library_passes_descriptors_ahead_of_its_commands";
    if blk_backend_missing(test) {
        return;
    }
    let have_module = std::process::Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_module {
        citadel_tests::skip(
            test,
            "python3 module qemu.qmp is not installed (pip install qemu.qmp)",
            true,
        );
        return;
    }
    let dir = TempDir::new("fds-python");
    let path = image(dir.path(), "disk.img");
    let vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(&vm.qmp_path)
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("python-fds: ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(holds(pids[0], &path), 1);
    // The set's descriptor and the node's duplicate (kept to restart the backend) stay in
    // the VMM; the named one was closed.
    assert_eq!(holds(vm.pid(), &path), 2);
}
