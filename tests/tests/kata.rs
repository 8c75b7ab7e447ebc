//! Citadel driven the way Kata Containers drives StratoVirt: its launch line (`-name
//! sandbox-<id>`, `-uuid`, the microvm machine with its properties, `-D`, the read-only
//! root filesystem as `-drive` plus `-device virtio-blk-device`) and its QMP session (a
//! greeting whose major version is at least 5, `blockdev-add` with the raw driver and
//! `file.aio`, `device_add` with a decimal `addr` and an empty `romfile`, `device_del` until
//! DEVICE_DELETED, `query-cpus`). The `virtio_blk` guest program reads the cold-plugged root
//! disk in slot 0; the image is checked on disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use citadel_tests::disk::blk_backend_missing;
use citadel_tests::guest_program;
use citadel_tests::procfs::{blk_backends, holders_of, open_flags_on, wait_gone};
use citadel_tests::vm::{TempDir, Vm};
use serde_json::json;

const STEP: Duration = Duration::from_secs(30);
/// 1 MiB: 2048 sectors.
const IMAGE_LEN: usize = 1 << 20;
const MARKER: &[u8] = b"citadel-kata-rootfs-sector-zero";
const SANDBOX: &str = "sandbox-5f1e2d3c4b5a69788796a5b4c3d2e1f0";
const UUID: &str = "5f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0";
/// Kata's launch line, as far as Citadel takes it, for a root filesystem image.
fn kata_args(rootfs: &Path, log: &Path) -> Vec<String> {
    [
        "-name",
        SANDBOX,
        "-uuid",
        UUID,
        "-machine",
        "type=microvm,dump-guest-core=off,mem-share=on",
        "-smp",
        "1",
        "-m",
        "32",
        "-D",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        log.display().to_string(),
        "-drive".to_string(),
        format!("id=rootfs,file={},readonly=on,direct=off", rootfs.display()),
        "-device".to_string(),
        "virtio-blk-device,drive=rootfs,id=virtio-blk0".to_string(),
    ])
    .collect()
}

fn image(dir: &Path, name: &str) -> PathBuf {
    citadel_tests::disk::image_with_marker(dir, name, IMAGE_LEN, MARKER)
}

/// `device_del` of `id`, answered, with its DEVICE_DELETED event.
fn device_del(qmp: &mut citadel_tests::vm::Qmp, id: &str) {
    qmp.events.clear();
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": id}))),
        json!({"return": {}})
    );
    let event = qmp.wait_event("DEVICE_DELETED");
    assert_eq!(event["data"], json!({"device": id, "path": id}), "{event}");
}

#[test]
fn kata_launch_line_and_qmp_session() {
    if blk_backend_missing("kata::kata_launch_line_and_qmp_session") {
        return;
    }
    let dir = TempDir::new("kata");
    let rootfs = image(dir.path(), "rootfs.img");
    let data = image(dir.path(), "data.img");
    let log = dir.path().join("citadel.log");
    let mut args = kata_args(&rootfs, &log);
    args.extend([
        "-append".into(),
        "virtio_mmio.device=4K@0xd0000000:5".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&guest_program("virtio_blk"), &args);

    // The guest's driver finds the root disk, with its capacity, at probe.
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
    // readonly=on: the backend fails the guest's write and the image stays as it was.
    let line = vm.wait_serial("citadel-guest: virtio-blk write status=", STEP);
    assert!(!line.ends_with("status=0"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-blk write-readback status=", STEP);
    assert!(line.ends_with(&".".repeat(32)), "{line}");
    // No serial= on the device: GET_ID is unsupported (VIRTIO_BLK_S_UNSUPP).
    let line = vm.wait_serial("citadel-guest: virtio-blk id status=", STEP);
    assert!(
        line.starts_with("citadel-guest: virtio-blk id status=2 "),
        "{line}"
    );
    vm.wait_serial("citadel-guest: done", STEP);
    let on_disk = std::fs::read(&rootfs).unwrap();
    assert_eq!(&on_disk[..MARKER.len()], MARKER);
    assert!(on_disk[MARKER.len()..].iter().all(|&b| b == 0));

    // The root disk's backend holds the image read-only and without O_DIRECT (direct=off).
    let backends = blk_backends(vm.pid());
    assert_eq!(backends.len(), 1, "{backends:?}");
    let flags = open_flags_on(backends[0], &rootfs);
    assert!(
        !flags.is_empty(),
        "citadel-blk has no descriptor on the image"
    );
    for f in flags {
        assert_eq!(f as i32 & libc::O_ACCMODE, libc::O_RDONLY, "flags {f:o}");
        assert_eq!(f as i32 & libc::O_DIRECT, 0, "flags {f:o}");
    }

    let mut qmp = vm.qmp();
    let version = &qmp.greeting["QMP"]["version"];
    assert!(
        version["qemu"]["major"].as_u64().is_some_and(|m| m >= 5),
        "Kata refuses a QMP major below 5: {version}"
    );
    assert_eq!(
        version["package"],
        concat!("citadel-", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(qmp.execute("qmp_capabilities", None), json!({"return": {}}));

    let block = qmp.execute("query-block", None);
    let slot0 = &block["return"][0];
    assert_eq!(slot0["qdev"], "virtio-blk0", "{block}");
    assert_eq!(slot0["inserted"]["node-name"], "rootfs", "{block}");
    assert_eq!(slot0["inserted"]["file"], json!(rootfs), "{block}");
    assert_eq!(slot0["inserted"]["ro"], true, "{block}");
    assert_eq!(slot0["inserted"]["cache"]["direct"], false, "{block}");

    // A container's volume, plugged as Kata plugs it.
    assert_eq!(
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "raw",
                "node-name": "drive-data",
                "read-only": false,
                "file": {"driver": "file", "filename": data, "aio": "native"},
            }))
        ),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute(
            "device_add",
            Some(json!({
                "driver": "virtio-blk-mmio",
                "id": "virtio-drive-data",
                "drive": "drive-data",
                "addr": "1",
                "romfile": "",
            }))
        ),
        json!({"return": {}})
    );
    let block = qmp.execute("query-block", None);
    assert_eq!(block["return"][1]["qdev"], "virtio-drive-data", "{block}");
    let mut all = blk_backends(vm.pid());
    assert_eq!(all.len(), 2, "{all:?}");
    all.retain(|p| !backends.contains(p));
    let data_backend = all[0];

    device_del(&mut qmp, "virtio-drive-data");
    assert!(
        wait_gone(data_backend, Duration::from_secs(5)),
        "citadel-blk[{data_backend}] outlived device_del"
    );
    // The cold-plugged root disk leaves the same way.
    device_del(&mut qmp, "virtio-blk0");
    assert!(
        wait_gone(backends[0], Duration::from_secs(5)),
        "citadel-blk[{}] outlived device_del",
        backends[0]
    );
    let block = qmp.execute("query-block", None);
    assert!(
        block["return"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s.get("inserted").is_none()),
        "{block}"
    );

    assert_eq!(
        qmp.execute("query-uuid", None),
        json!({"return": {"UUID": UUID}})
    );

    let cpus = qmp.execute("query-cpus", None);
    let cpus = cpus["return"].as_array().expect("query-cpus list");
    assert_eq!(cpus.len(), 1, "{cpus:?}");
    assert_eq!(cpus[0]["CPU"], 0);
    let tid = cpus[0]["thread_id"].as_u64().expect("thread_id");
    assert!(
        Path::new(&format!("/proc/{}/task/{tid}", vm.pid())).exists(),
        "vCPU thread {tid} is not a thread of citadel"
    );
    assert!(log.is_file(), "-D made no log file");

    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Runs citadel with Kata's launch line plus `extra`, a pid file and a QMP socket in `dir`;
/// returns its exit code and stderr.
fn run_to_exit(dir: &Path, rootfs: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(citadel_tests::binary("citadel"))
        .args(kata_args(rootfs, &dir.join("citadel.log")))
        .args(["-machine", "microvm", "-kernel"])
        .arg(guest_program("idle"))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server,nowait",
            dir.join("qmp.sock").display()
        ))
        .arg("-pidfile")
        .arg(dir.join("citadel.pid"))
        .args(extra)
        .output()
        .expect("run citadel");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refused_launch_lines_leave_nothing_behind() {
    if blk_backend_missing("kata::refused_launch_lines_leave_nothing_behind") {
        return;
    }
    let dir = TempDir::new("kata-refused");
    let rootfs = image(dir.path(), "rootfs.img");
    let missing = dir.path().join("missing.img");
    let missing_drive = format!("id=data,file={},direct=off", missing.display());
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["-disable-seccomp"],
            "citadel: option '-disable-seccomp' is refused: citadel always runs under its seccomp filters; '-seccomp log' logs a forbidden system call instead of killing the VMM".into(),
        ),
        (
            vec!["-device", "virtio-blk-device,drive=nope"],
            "citadel: invalid value 'virtio-blk-device,drive=nope' for '-device': no -drive with id 'nope'".into(),
        ),
        (
            vec!["-drive", "id=rootfs,file=/x"],
            "citadel: invalid value 'rootfs' for '-drive': a drive with this id already exists".into(),
        ),
        // The root disk's backend is already running when the second drive is refused.
        (
            vec!["-drive", &missing_drive, "-device", "virtio-blk-device,drive=data"],
            format!(
                "citadel: -drive data: Could not open '{}': No such file or directory (os error 2)",
                missing.display()
            ),
        ),
    ];
    for (extra, expected) in cases {
        let (code, stderr) = run_to_exit(dir.path(), &rootfs, &extra);
        assert_eq!(code, Some(1), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim_end(), expected, "{extra:?}");
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: {stderr}");
        for file in ["citadel.pid", "qmp.sock"] {
            assert!(
                !dir.path().join(file).exists(),
                "{extra:?} left {file} behind"
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !holders_of(&rootfs).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            holders_of(&rootfs),
            Vec::<u32>::new(),
            "{extra:?}: a process still holds the root image"
        );
    }
}

/// The whole launch line, checked by the parser before anything runs: `-uuid` must be a
/// UUID.
#[test]
fn a_malformed_uuid_is_refused() {
    let dir = TempDir::new("kata-uuid");
    let rootfs = image(dir.path(), "rootfs.img");
    let (code, stderr) = run_to_exit(dir.path(), &rootfs, &["-uuid", "not-a-uuid"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "citadel: invalid value 'not-a-uuid' for '-uuid': expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex digits)"
    );
}
