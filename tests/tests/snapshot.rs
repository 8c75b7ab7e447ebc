//! Memory snapshots over QMP and the command line, against real citadel processes running the
//! `counter` guest program: `migrate` to `file:DIR` pauses the VM and writes the snapshot,
//! `query-migrate` reports it, and `-incoming file:DIR` restores it into new VMs that carry
//! on counting from where the first one stopped. Refusals leave the VM as it was and the
//! files as they were; a snapshot that fills the disk leaves nothing and a paused, usable VM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(20);
const RAM_MIB: u64 = 64;

fn counter_of(line: &str) -> Option<u64> {
    line.split("counter=").nth(1)?.trim().parse().ok()
}

fn start(extra: &[&str]) -> Vm {
    let mem = RAM_MIB.to_string();
    let mut args = vec!["-m", mem.as_str(), "-smp", "2"];
    args.extend_from_slice(extra);
    Vm::start(&guest_program("counter"), &args)
}

fn status(qmp: &mut Qmp) -> Value {
    qmp.execute("query-status", None)["return"]["status"].clone()
}

/// The files of a snapshot, to show that restoring from them changes nothing.
fn contents(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("state")).unwrap(),
        std::fs::read(dir.join("memory")).unwrap(),
    )
}

/// Starts a counting VM, snapshots it into `dir` over QMP and quits it; returns the last
/// counter value it printed.
fn snapshot_of_a_counting_vm(dir: &Path) -> u64 {
    let mut vm = start(&[]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    vm.wait_serial("counter=", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        qmp.execute("query-migrate", None),
        json!({"return": {"status": "none"}})
    );
    assert_eq!(qmp.migrate(dir), json!({"return": {}}));
    // STOP came before the reply.
    assert!(
        qmp.events.iter().any(|e| e["event"] == "STOP"),
        "{:?}",
        qmp.events
    );
    assert_eq!(status(&mut qmp), "paused");
    let info = qmp.execute("query-migrate", None);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    assert!(info["return"]["total-time"].is_u64(), "{info}");
    // Whatever the guest printed before the pause has arrived; nothing comes after it.
    vm.serial_lines_for(Duration::from_millis(300));
    let quiet = vm.serial_lines_for(Duration::from_millis(500));
    assert!(
        quiet.iter().all(|l| counter_of(l).is_none()),
        "counting while paused: {quiet:?}"
    );
    let last = vm
        .transcript()
        .lines()
        .filter_map(counter_of)
        .next_back()
        .expect("a counter line before the snapshot");
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    last
}

#[test]
fn a_snapshot_restores_into_two_vms_that_carry_on_counting() {
    let tmp = TempDir::new("snapshot-restore");
    let dir = tmp.path().join("snap");
    let saved = snapshot_of_a_counting_vm(&dir);

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("state")), 0o600);
    assert_eq!(mode(&dir.join("memory")), 0o600);
    assert_eq!(
        std::fs::metadata(dir.join("memory")).unwrap().len(),
        RAM_MIB << 20
    );
    let before = contents(&dir);

    // Two VMs from the same directory at once, as templates; the second one trusts the
    // memory file without reading it first.
    let incoming = format!("file:{}", dir.display());
    let unverified = format!("{incoming},verify=off");
    let mut vms: Vec<Vm> = [&incoming, &unverified]
        .into_iter()
        .map(|uri| start(&["-incoming", uri.as_str()]))
        .collect();
    for vm in &mut vms {
        let line = vm.wait_serial("counter=", BOOT);
        let next = counter_of(&line).unwrap();
        assert!(
            next > saved,
            "restored at {next}, the snapshot was taken after {saved}\n{}",
            vm.transcript()
        );
        // The guest did not boot again: it carried on from its saved state.
        assert!(
            !vm.transcript().contains("citadel-guest: ready"),
            "{}",
            vm.transcript()
        );
        let mut qmp = Qmp::negotiated(&vm.qmp_path);
        assert_eq!(status(&mut qmp), "running");
        let later = counter_of(&vm.wait_serial("counter=", BOOT)).unwrap();
        assert!(later > next, "{later} after {next}");
    }
    drop(vms);
    assert!(contents(&dir) == before, "restoring changed the snapshot");
}

#[test]
fn refused_migrations_leave_the_vm_running_and_nothing_on_disk() {
    let tmp = TempDir::new("snapshot-refused");
    let mut vm = start(&[]);
    vm.wait_serial("counter=", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"x").unwrap();
    let reply = qmp.migrate(&full);
    let why = format!("snapshot directory '{}' is not empty", full.display());
    assert_eq!(
        reply["error"],
        json!({"class": "GenericError", "desc": why}),
        "{reply}"
    );
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"x");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);
    assert_eq!(
        qmp.execute("query-migrate", None),
        json!({"return": {"status": "failed", "error-desc": why}})
    );

    let missing = tmp.path().join("no/such/parent");
    let reply = qmp.migrate(&missing);
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("opening its parent"),
        "{reply}"
    );
    let file = tmp.path().join("file");
    std::fs::write(&file, b"y").unwrap();
    let reply = qmp.migrate(&file);
    assert_eq!(
        reply["error"]["desc"],
        format!("snapshot path '{}' is not a directory", file.display())
    );
    let reply = qmp.execute("migrate", Some(json!({"uri": "tcp:127.0.0.1:4444"})));
    assert_eq!(
        reply["error"]["desc"],
        "Parameter 'uri' expects a valid migration protocol: Citadel writes snapshots to \
         'file:<directory>' only, not 'tcp'"
    );

    // None of that paused the guest.
    assert!(qmp.events.iter().all(|e| e["event"] != "STOP"));
    assert_eq!(status(&mut qmp), "running");
    let a = counter_of(&vm.wait_serial("counter=", BOOT)).unwrap();
    let b = counter_of(&vm.wait_serial("counter=", BOOT)).unwrap();
    assert!(b > a);

    // A snapshot into an existing empty directory works; a second one into it is refused and
    // the VM stays paused, its first snapshot intact.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(qmp.migrate(&empty), json!({"return": {}}));
    let first = contents(&empty);
    let reply = qmp.migrate(&empty);
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .ends_with("is not empty"),
        "{reply}"
    );
    assert!(contents(&empty) == first);
    assert_eq!(status(&mut qmp), "paused");
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    let c = counter_of(&vm.wait_serial("counter=", BOOT)).unwrap();
    assert!(c > b);
}

/// Runs citadel on the counter guest with `-incoming file:DIR` and `extra`; it must refuse
/// with the one line `citadel: -incoming file:DIR: EXPECTED` (or `citadel: EXPECTED` for a
/// state that is checked against the machine once it is built: `in_machine`), and leave the
/// files as they were.
fn refused_restore(dir: &Path, extra: &[&str], expected: &str, in_machine: bool) {
    let before = contents(dir);
    let out = std::process::Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-kernel"])
        .arg(guest_program("counter"))
        .arg("-incoming")
        .arg(format!("file:{}", dir.display()))
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
    let line = if in_machine {
        format!("citadel: {expected}")
    } else {
        format!("citadel: -incoming file:{}: {expected}", dir.display())
    };
    assert_eq!(err.trim_end(), line, "{extra:?}");
    assert!(contents(dir) == before, "{extra:?} changed the snapshot");
}

#[test]
fn mismatched_or_damaged_snapshots_are_refused_before_anything_runs() {
    let tmp = TempDir::new("snapshot-damaged");
    let dir = tmp.path().join("snap");
    snapshot_of_a_counting_vm(&dir);
    let ram = (RAM_MIB << 20).to_string();

    refused_restore(
        &dir,
        &["-m", "128", "-smp", "2"],
        "snapshot has 64 MiB of RAM, the command line asks for 128 MiB (-m)",
        false,
    );
    refused_restore(
        &dir,
        &["-m", "64", "-smp", "1"],
        "snapshot has 2 vCPUs, the command line asks for 1 (-smp)",
        false,
    );
    refused_restore(
        &dir,
        &["-m", "64", "-smp", "2", "-device", "virtio-balloon-device"],
        "snapshot devices [blk,blk,blk,blk,blk,blk,net,net] differ from the command line's \
         [blk,blk,blk,blk,blk,blk,net,net,balloon]",
        true,
    );

    let good = contents(&dir);
    let mut memory = good.1.clone();
    memory[12345] ^= 0x40;
    std::fs::write(dir.join("memory"), &memory).unwrap();
    refused_restore(
        &dir,
        &["-m", "64", "-smp", "2"],
        "snapshot memory file is corrupt (checksum mismatch)",
        false,
    );
    std::fs::write(dir.join("memory"), &good.1[..4096]).unwrap();
    refused_restore(
        &dir,
        &["-m", "64", "-smp", "2"],
        &format!("snapshot memory file is 4096 bytes, the snapshot's RAM is {ram} bytes"),
        false,
    );
    // Its length is checked even when its checksum is not.
    let unverified = format!("file:{},verify=off", dir.display());
    let out = std::process::Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "64", "-smp", "2", "-kernel"])
        .arg(guest_program("counter"))
        .args(["-incoming", &unverified])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "citadel: -incoming file:{}: snapshot memory file is 4096 bytes, the snapshot's RAM \
             is {ram} bytes",
            dir.display()
        )
    );
    std::fs::write(dir.join("memory"), &good.1).unwrap();
    let mut state = good.0.clone();
    let last = state.len() - 2;
    state[last] ^= 0x01;
    std::fs::write(dir.join("state"), &state).unwrap();
    refused_restore(
        &dir,
        &["-m", "64", "-smp", "2"],
        "snapshot state file is corrupt (state checksum mismatch)",
        false,
    );
    std::fs::remove_file(dir.join("state")).unwrap();
    let out = std::process::Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "64", "-smp", "2", "-kernel"])
        .arg(guest_program("counter"))
        .arg("-incoming")
        .arg(format!("file:{}", dir.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("citadel: -incoming file:{}: ", dir.display())),
        "{err}"
    );
    assert!(err.contains("state"), "{err}");
}

/// A tmpfs of `size` mounted at `dir` for the life of the value (needs root).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_migration_leaves_nothing_and_the_vm_carries_on() {
    let tmp = TempDir::new("snapshot-full");
    let Some(disk) = SmallDisk::mount(&tmp.path().join("disk"), "8m") else {
        citadel_tests::skip(
            "a_full_disk_fails_the_migration_leaves_nothing_and_the_vm_carries_on",
            "needs root to mount a small tmpfs",
            true,
        );
        return;
    };
    let mut vm = start(&[]);
    vm.wait_serial("counter=", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    // 64 MiB of RAM cannot fit in 8 MiB.
    let dir = disk.0.join("snap");
    let reply = qmp.migrate(&dir);
    let why = reply["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.starts_with("writing the snapshot's memory file: No space left on device"),
        "{reply}"
    );
    // It was paused for the snapshot, and stays paused.
    assert!(qmp.events.iter().any(|e| e["event"] == "STOP"));
    assert_eq!(status(&mut qmp), "paused");
    assert_eq!(
        qmp.execute("query-migrate", None),
        json!({"return": {"status": "failed", "error-desc": why}})
    );
    // The partial files and the directory made for them are gone.
    assert!(!dir.exists());
    assert_eq!(std::fs::read_dir(&disk.0).unwrap().count(), 0);
    // The VM is usable: it runs on, and a snapshot somewhere with room works.
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    vm.serial_lines_for(Duration::from_millis(200));
    let a = counter_of(&vm.wait_serial("counter=", BOOT)).unwrap();
    let b = counter_of(&vm.wait_serial("counter=", BOOT)).unwrap();
    assert!(b > a);
    assert_eq!(
        qmp.migrate(&tmp.path().join("roomy")),
        json!({"return": {}})
    );
}

/// 1 MiB: 2048 sectors, of which the `virtio_blk` guest program in `restart` mode writes the
/// first 1024, each holding its own number (see `blk_restart.rs`).
const DISK_LEN: usize = 1 << 20;
const DISK_SECTORS: usize = 1024;

/// The `virtio_blk` guest program writing numbered sectors to a disk of the command line,
/// served by citadel-blk in disk slot 0; with `incoming`, restored from that snapshot.
fn start_writing(img: &Path, incoming: Option<&Path>) -> Vm {
    let drive = format!("file={},id=d0", img.display());
    let mut args = vec![
        "-m",
        "32",
        "-append",
        "virtio_mmio.device=4K@0xd0000000:5 restart",
        "-drive",
        &drive,
        "-device",
        "virtio-blk-device,drive=d0,id=disk-0",
    ];
    let uri = incoming.map(|dir| format!("file:{}", dir.display()));
    if let Some(uri) = &uri {
        args.extend(["-incoming", uri]);
    }
    Vm::start(&guest_program("virtio_blk"), &args)
}

fn progress_of(line: &str) -> u64 {
    line.split("progress=")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A VM whose disk is served by a citadel-blk process is snapshotted twice while its guest
/// writes: each `migrate` stops the backend at the used index, writes the snapshot and
/// starts the backend again, so the guest carries on after `cont` without an error. The
/// VM restored from the second snapshot, with the same `-drive`, gets guest RAM copied into
/// shared memory and a new citadel-blk that takes the ring from the saved used index: its
/// guest goes on writing where it was paused, never starts again, and the image ends up
/// holding every sector, each written once acknowledged by one VM or the other.
#[test]
fn a_vm_with_a_disk_backend_is_snapshotted_mid_write_and_restored_with_a_new_backend() {
    if citadel_tests::disk::blk_backend_missing(
        "a_vm_with_a_disk_backend_is_snapshotted_mid_write_and_restored_with_a_new_backend",
    ) {
        return;
    }
    let tmp = TempDir::new("snapshot-disk");
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, vec![0u8; DISK_LEN]).unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));

    let mut vm = start_writing(&img, None);
    vm.wait_serial("citadel-guest: restart plugged capacity=2048", BOOT);
    vm.wait_serial("citadel-guest: restart progress=128", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(qmp.migrate(&first), json!({"return": {}}));
    assert_eq!(status(&mut qmp), "paused");
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    let line = vm.wait_serial("citadel-guest: restart progress=", BOOT);
    let resumed = progress_of(&line);
    assert!(resumed > 128, "{line}");
    vm.wait_serial(
        &format!("citadel-guest: restart progress={}", resumed + 128),
        BOOT,
    );
    assert_eq!(qmp.migrate(&second), json!({"return": {}}));
    vm.serial_lines_for(Duration::from_millis(300));
    let saved = vm
        .transcript()
        .lines()
        .filter(|l| l.contains("restart progress="))
        .map(progress_of)
        .max()
        .unwrap();
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    let written_before = std::fs::read(&img).unwrap();

    // Without the disk on the command line the restore is refused before anything starts.
    refused_restore(
        &second,
        &[
            "-m",
            "32",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5 restart",
        ],
        "snapshot has disks in slots [0] and NICs in slots [], the command line plugs disks \
         in slots [] and NICs in slots []",
        false,
    );

    let mut restored = start_writing(&img, Some(&second));
    let line = restored.wait_serial("citadel-guest: restart errors=", BOOT);
    assert!(
        line.ends_with("errors=0"),
        "{line}\n{}",
        restored.transcript()
    );
    let line = restored.wait_serial("citadel-guest: restart device-status=", BOOT);
    assert!(line.ends_with("device-status=15"), "{line}");
    let transcript = restored.transcript();
    assert!(
        !transcript.contains("plugged capacity"),
        "the restored guest started again:\n{transcript}"
    );
    let first_progress = transcript
        .lines()
        .filter(|l| l.contains("restart progress="))
        .map(progress_of)
        .next()
        .unwrap();
    assert!(first_progress >= saved, "{first_progress} after {saved}");
    assert_eq!(
        citadel_tests::procfs::blk_backends(restored.pid()).len(),
        1,
        "the restored disk has its own citadel-blk"
    );
    let mut qmp = Qmp::negotiated(&restored.qmp_path);
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(restored.wait_exit(Duration::from_secs(10)), Some(0));

    citadel_tests::disk::assert_numbered_sectors(&img, DISK_SECTORS);
    let image = std::fs::read(&img).unwrap();
    // What the first VM had written when it was saved was written again only as it was.
    let saved_sectors = saved as usize;
    assert_eq!(
        written_before[..saved_sectors * 512],
        image[..saved_sectors * 512]
    );
}

/// A VM restored without disks maps its RAM privately from the snapshot: a disk plugged into
/// it later is refused with the reason, and `share=on` restores it into shared memory
/// instead, where the disk plugs.
#[test]
fn a_disk_plugs_into_a_restored_vm_only_with_shared_memory() {
    if citadel_tests::disk::blk_backend_missing(
        "a_disk_plugs_into_a_restored_vm_only_with_shared_memory",
    ) {
        return;
    }
    let tmp = TempDir::new("snapshot-share");
    let dir = tmp.path().join("snap");
    snapshot_of_a_counting_vm(&dir);
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, vec![0u8; DISK_LEN]).unwrap();
    for (incoming, plugs) in [("", false), (",share=on", true)] {
        let uri = format!("file:{}{incoming}", dir.display());
        let mut vm = start(&["-incoming", &uri]);
        vm.wait_serial("counter=", BOOT);
        let mut qmp = Qmp::negotiated(&vm.qmp_path);
        let reply = qmp.execute(
            "blockdev-add",
            Some(json!({"node-name": "d0", "file": {"driver": "file",
                "filename": img.display().to_string()}})),
        );
        assert_eq!(reply, json!({"return": {}}));
        let reply = qmp.execute(
            "device_add",
            Some(
                json!({"id": "disk-0", "driver": "virtio-blk-mmio", "addr": "0x0",
                "drive": "d0"}),
            ),
        );
        if plugs {
            assert_eq!(reply, json!({"return": {}}), "{uri}");
        } else {
            let desc = citadel_tests::disk::error_desc(&reply);
            assert!(
                desc.contains(
                    "private mapping of a snapshot's memory file, which no backend \
                     can share (restore with -incoming file:DIR,share=on)"
                ),
                "{desc}"
            );
        }
        assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
        assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    }
}
