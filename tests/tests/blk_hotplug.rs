//! Disk hotplug over QMP on the lightweight machine, with StratoVirt's guide's commands:
//! `blockdev-add` starts a citadel-blk process, `device_add` plugs it into a hot-replace slot
//! the guest has driven since boot, `device_del` takes it out (DEVICE_DELETED before the
//! return) and ends the process. The `virtio_blk` guest program in `hotplug` mode reports
//! what a driver sees at each step; the bytes it writes are checked in the image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use citadel_tests::disk::{
    assert_guest_wrote, blk_backend_missing, error_desc, guest_used_plugged_disk,
};
use citadel_tests::guest_program;
use citadel_tests::procfs::{blk_backends as backends, status, status_field, wait_gone};
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(30);
/// 1 MiB: 2048 sectors.
const IMAGE_LEN: usize = 1 << 20;
const MARKER: &[u8] = b"citadel-hotplugged-disk-sector0";
fn blockdev_add(qmp: &mut Qmp, node: &str, file: &Path, read_only: bool) -> Value {
    qmp.execute(
        "blockdev-add",
        Some(
            json!({"node-name": node, "file": {"driver": "file", "filename": file},
            "cache": {"direct": false}, "read-only": read_only}),
        ),
    )
}

fn image(dir: &Path, name: &str) -> PathBuf {
    citadel_tests::disk::image_with_marker(dir, name, IMAGE_LEN, MARKER)
}

fn device_add(qmp: &mut Qmp, id: &str, addr: &str, drive: &str) -> Value {
    qmp.execute(
        "device_add",
        Some(json!({"id": id, "driver": "virtio-blk-mmio", "addr": addr, "drive": drive})),
    )
}
#[test]
fn a_disk_plugged_over_qmp_reaches_the_guest_through_its_own_backend_process() {
    if blk_backend_missing(
        "a_disk_plugged_over_qmp_reaches_the_guest_through_its_own_backend_process",
    ) {
        return;
    }
    let dir = TempDir::new("hotplug");
    let img = image(dir.path(), "disk.img");
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
    let line = vm.wait_serial("citadel-guest: hotplug empty capacity=", STEP);
    assert!(line.ends_with("capacity=0"), "{line}");
    // The empty slot answers a read with an I/O error rather than never.
    let line = vm.wait_serial("citadel-guest: hotplug empty-read status=", STEP);
    assert!(line.ends_with("status=1"), "{line}");
    vm.wait_serial("citadel-guest: hotplug waiting-for-plug", STEP);

    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert!(backends(vm.pid()).is_empty());
    assert_eq!(
        blockdev_add(&mut qmp, "drive-0", &img, false),
        json!({"return": {}})
    );
    let pids = backends(vm.pid());
    assert_eq!(
        pids.len(),
        1,
        "one citadel-blk after blockdev-add: {pids:?}"
    );
    let backend = pids[0];
    assert_ne!(backend, vm.pid());
    let st = status(backend).unwrap();
    assert_eq!(status_field(&st, "Seccomp"), "2", "{st}");
    assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{st}");
    assert_eq!(
        device_add(&mut qmp, "drive-0", "0x0", "drive-0"),
        json!({"return": {}})
    );

    guest_used_plugged_disk(&mut vm, IMAGE_LEN, MARKER, STEP);
    vm.wait_serial("citadel-guest: hotplug waiting-for-unplug", STEP);
    let written = std::fs::read(&img).unwrap()[512..1024].to_vec();
    assert_guest_wrote(&written);

    let block = qmp.execute("query-block", None);
    let slot0 = &block["return"][0];
    assert_eq!(slot0["qdev"], "drive-0", "{block}");
    assert_eq!(slot0["inserted"]["node-name"], "drive-0", "{block}");
    assert_eq!(slot0["inserted"]["file"], json!(img), "{block}");
    assert_eq!(slot0["inserted"]["ro"], false, "{block}");
    assert!(block["return"][1].get("inserted").is_none(), "{block}");

    // DEVICE_DELETED comes before the return, with the guide's data.
    qmp.events.clear();
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "drive-0"}))),
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
        json!({"device": "drive-0", "path": "drive-0"})
    );
    assert!(
        wait_gone(backend, Duration::from_secs(5)),
        "citadel-blk[{backend}] outlived device_del"
    );
    let line = vm.wait_serial("citadel-guest: hotplug unplugged capacity=", STEP);
    assert!(line.ends_with("capacity=0"), "{line}");
    let line = vm.wait_serial("citadel-guest: hotplug unplugged-read status=", STEP);
    assert!(line.ends_with("status=1"), "{line}");
    // device_del released the node, as on StratoVirt's lightweight machine.
    let reply = qmp.execute("blockdev-del", Some(json!({"node-name": "drive-0"})));
    assert_eq!(
        error_desc(&reply),
        "Failed to find node with node-name='drive-0'"
    );
}

#[test]
fn refused_hotplug_commands_change_nothing() {
    if blk_backend_missing("refused_hotplug_commands_change_nothing") {
        return;
    }
    let dir = TempDir::new("hotplug-bad");
    let img = image(dir.path(), "disk.img");
    let other = image(dir.path(), "other.img");
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    let missing = dir.path().join("missing.img");
    let reply = blockdev_add(&mut qmp, "drive-0", &missing, false);
    assert!(
        error_desc(&reply).contains("No such file or directory"),
        "{reply}"
    );
    assert!(backends(vm.pid()).is_empty());
    let reply = device_add(&mut qmp, "drive-0", "0x0", "drive-0");
    assert_eq!(error_desc(&reply), "Failed to find block node 'drive-0'");

    assert_eq!(
        blockdev_add(&mut qmp, "drive-0", &img, false),
        json!({"return": {}})
    );
    let reply = blockdev_add(&mut qmp, "drive-0", &other, false);
    assert_eq!(error_desc(&reply), "drive-0 is already registered.");
    assert_eq!(backends(vm.pid()).len(), 1);

    for (addr, expected) in [
        ("0x6", "Invalid addr for device drive-0"),
        ("12", "Invalid addr for device drive-0"),
        ("zz", "Invalid addr for device drive-0"),
    ] {
        let reply = device_add(&mut qmp, "drive-0", addr, "drive-0");
        assert_eq!(error_desc(&reply), expected, "addr {addr}");
    }
    let reply = qmp.execute(
        "device_add",
        Some(json!({"id": "net-0", "driver": "virtio-gpu-device", "addr": "0x0", "drive": "drive-0"})),
    );
    assert!(
        error_desc(&reply).starts_with("Unsupported replaceable device type."),
        "{reply}"
    );
    let reply = qmp.execute("device_del", Some(json!({"id": "nope"})));
    assert_eq!(reply["error"]["class"], "DeviceNotFound", "{reply}");
    assert_eq!(error_desc(&reply), "Device 'nope' not found");

    // StratoVirt's lun names the slot after its number: lun 5 would be a seventh slot.
    let lun = |qmp: &mut Qmp, lun: u64| {
        qmp.execute(
            "device_add",
            Some(
                json!({"id": "disk-a", "driver": "virtio-blk-mmio", "lun": lun,
                "drive": "drive-0"}),
            ),
        )
    };
    assert_eq!(
        error_desc(&lun(&mut qmp, 5)),
        "Invalid addr for device disk-a"
    );
    // Plugged while the guest never drove the slot: the disk waits for the driver. Lun 0 is
    // slot 1, as the refusal below shows.
    assert_eq!(lun(&mut qmp, 0), json!({"return": {}}));
    let reply = device_add(&mut qmp, "disk-b", "0x2", "drive-0");
    assert_eq!(
        error_desc(&reply),
        "Node 'drive-0' is already in use by device 'disk-a'"
    );
    assert_eq!(
        blockdev_add(&mut qmp, "drive-1", &other, true),
        json!({"return": {}})
    );
    let reply = device_add(&mut qmp, "disk-b", "0x1", "drive-1");
    assert_eq!(error_desc(&reply), "The slot 1 is occupied already.");
    let reply = device_add(&mut qmp, "disk-a", "0x2", "drive-1");
    assert_eq!(error_desc(&reply), "disk-a is already registered.");
    let reply = qmp.execute("blockdev-del", Some(json!({"node-name": "drive-0"})));
    assert_eq!(
        error_desc(&reply),
        "Node 'drive-0' is busy: device 'disk-a' uses it"
    );

    // Nothing above changed what is plugged.
    let block = qmp.execute("query-block", None);
    let plugged: Vec<(&str, &str)> = block["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            Some((
                s["qdev"].as_str()?,
                s.get("inserted")?["node-name"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(plugged, vec![("disk-a", "drive-0")], "{block}");

    // A node no device uses ends with blockdev-del; quit ends the rest.
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(
        qmp.execute("blockdev-del", Some(json!({"node-name": "drive-1"}))),
        json!({"return": {}})
    );
    assert_eq!(backends(vm.pid()).len(), 1);
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "citadel-blk[{pid}] outlived the VM"
        );
    }
}

#[test]
fn disks_on_the_command_line_fill_the_slots_in_order_and_leave_like_hotplugged_ones() {
    if blk_backend_missing(
        "disks_on_the_command_line_fill_the_slots_in_order_and_leave_like_hotplugged_ones",
    ) {
        return;
    }
    let dir = TempDir::new("coldplug");
    let first = image(dir.path(), "first.img");
    let second = image(dir.path(), "second.img");
    let spare = image(dir.path(), "spare.img");
    let drive =
        |id: &str, path: &Path, extra: &str| format!("id={id},file={}{extra}", path.display());
    let args = [
        "-m".to_string(),
        "32".into(),
        "-drive".into(),
        drive("drive-a", &first, ""),
        "-drive".into(),
        drive("drive-b", &second, ",direct=off,readonly=off"),
        "-drive".into(),
        drive("spare", &spare, ",direct=off"),
        "-device".into(),
        "virtio-blk-device,drive=drive-a,id=disk-a,bootindex=0,serial=CITADEL A-0001".into(),
        "-device".into(),
        "virtio-blk-device,drive=drive-b,serial=CITADEL B-0002".into(),
        "-append".into(),
        "virtio_mmio.device=4K@0xd0000000:5".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&guest_program("virtio_blk"), &args);

    // The first device is in slot 0, with its capacity from the start.
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
    let line = vm.wait_serial("citadel-guest: virtio-blk write status=", STEP);
    assert!(line.ends_with("status=0"), "{line}");
    // The guest's GET_ID reads the serial number the command line gave.
    let line = vm.wait_serial("citadel-guest: virtio-blk id status=", STEP);
    assert_eq!(
        line,
        format!(
            "citadel-guest: virtio-blk id status=0 serial=CITADEL A-0001{}",
            ".".repeat(18)
        )
    );
    vm.wait_serial("citadel-guest: done", STEP);
    assert_guest_wrote(&std::fs::read(&first).unwrap()[512..1024]);
    assert!(std::fs::read(&second).unwrap()[512..1024]
        .iter()
        .all(|&b| b == 0));

    // One backend per drive, the unused one included; none bypasses the page cache unless
    // told to.
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 3, "{pids:?}");
    let holder = |path: &Path| {
        let held: Vec<u32> = citadel_tests::procfs::holders_of(path)
            .into_iter()
            .filter(|p| pids.contains(p))
            .collect();
        assert_eq!(held.len(), 1, "{}: {held:?}", path.display());
        held[0]
    };
    let (pid_a, pid_b, pid_spare) = (holder(&first), holder(&second), holder(&spare));
    let flags = |pid: u32, path: &Path| citadel_tests::procfs::open_flags_on(pid, path);
    for (pid, path) in [(pid_a, &first), (pid_b, &second)] {
        let flags = flags(pid, path);
        assert!(
            !flags.is_empty(),
            "citadel-blk[{pid}] has no descriptor on its image"
        );
        assert!(
            flags
                .iter()
                .all(|f| *f as i32 & libc::O_DIRECT == 0
                    && *f as i32 & libc::O_ACCMODE == libc::O_RDWR),
            "{flags:?}"
        );
    }

    // The device's serial number is its backend's, for the guest's GET_ID.
    let serial_of = |pid: u32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        args.windows(2)
            .find(|w| w[0] == "--serial")
            .map(|w| w[1].clone())
    };
    assert_eq!(serial_of(pid_a).as_deref(), Some("CITADEL A-0001"));
    assert_eq!(serial_of(pid_b).as_deref(), Some("CITADEL B-0002"));
    assert_eq!(serial_of(pid_spare), None);

    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let block = qmp.execute("query-block", None);
    let plugged: Vec<(&str, &str)> = block["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            Some((
                s["qdev"].as_str()?,
                s.get("inserted")?["node-name"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(
        plugged,
        vec![("disk-a", "drive-a"), ("drive-b", "drive-b")],
        "{block}"
    );
    assert_eq!(block["return"][0]["inserted"]["cache"]["direct"], false);

    // A drive no device uses is a node device_add can plug; its slot is the next free one.
    let reply = device_add(&mut qmp, "disk-a", "0x2", "spare");
    assert_eq!(error_desc(&reply), "disk-a is already registered.");
    assert_eq!(
        device_add(&mut qmp, "disk-spare", "2", "spare"),
        json!({"return": {}})
    );
    // The cold-plugged disks leave with device_del, under the id the command line gave.
    for (id, pid) in [
        ("drive-b", pid_b),
        ("disk-a", pid_a),
        ("disk-spare", pid_spare),
    ] {
        qmp.events.clear();
        assert_eq!(
            qmp.execute("device_del", Some(json!({"id": id}))),
            json!({"return": {}})
        );
        let event = qmp.wait_event("DEVICE_DELETED");
        assert_eq!(event["data"]["device"], id, "{event}");
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "citadel-blk[{pid}] outlived device_del {id}"
        );
    }
    assert!(backends(vm.pid()).is_empty());
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `direct=on` either serves the image with O_DIRECT or, where the file system aligns direct
/// I/O to more than the slot's 512-byte blocks, is refused in one line before the VM is
/// made: no pid file, no QMP socket, no backend holding the image. The image is named
/// relative to citadel's current directory.
#[test]
fn direct_on_serves_with_o_direct_or_is_refused_before_anything_is_made() {
    if blk_backend_missing("direct_on_serves_with_o_direct_or_is_refused_before_anything_is_made") {
        return;
    }
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = TempDir::new("coldplug-direct");
    let img = image(dir.path(), "disk.img");
    let serial = dir.path().join("serial.log");
    let pidfile = dir.path().join("citadel.pid");
    let socket = dir.path().join("qmp.sock");
    let mut child = Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "32", "-kernel"])
        .arg(guest_program("virtio_blk"))
        .args(["-append", "virtio_mmio.device=4K@0xd0000000:5", "-drive"])
        .arg("id=d0,file=disk.img,direct=on")
        .current_dir(dir.path())
        .args(["-device", "virtio-blk-device,drive=d0", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", socket.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + STEP;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert_eq!(status.code(), Some(1), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.starts_with("citadel: -drive d0: the disk's logical block size is ")
                    && err
                        .trim_end()
                        .ends_with("(direct=on aligns I/O to the image's direct I/O block size)"),
                "{err}"
            );
            assert!(!pidfile.exists() && !socket.exists());
            assert!(citadel_tests::procfs::holders_of(&img).is_empty());
            return;
        }
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains("citadel-guest: done") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{console}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(
        console.contains(&format!("virtio-blk capacity={}", IMAGE_LEN / 512)),
        "{console}"
    );
    let pids = backends(child.id());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let flags = citadel_tests::procfs::open_flags_on(pids[0], &img);
    assert!(
        !flags.is_empty() && flags.iter().all(|f| *f as i32 & libc::O_DIRECT != 0),
        "{flags:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
