//! citadel-blk with a real frontend: QEMU (TCG) boots the project's guest kernel with
//! vhost-user-blk devices on citadel-blk's socket, and the guest's own tools check the data.
//! The host then checks the bytes in the image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use citadel_tests::kernel::{self, ConsoleProcess, GuestKernel};
use citadel_tests::vm::TempDir;

const IMAGE_LEN: usize = 16 << 20;
const BOOT: Duration = Duration::from_secs(120);

/// What every test needs: the kernel, QEMU and the backend binary; `None` (after a visible
/// skip) when one is missing.
fn prerequisites(test: &str) -> Option<(GuestKernel, PathBuf)> {
    let Some(qemu) = kernel::qemu() else {
        citadel_tests::skip(test, "qemu-system-x86_64 is not installed", true);
        return None;
    };
    let Some(guest) = kernel::guest_kernel() else {
        citadel_tests::skip(
            test,
            "guest kernel not built (run scripts/guest-kernel.sh)",
            true,
        );
        return None;
    };
    if !citadel_tests::profile_dir().join("citadel-blk").exists() {
        citadel_tests::skip(
            test,
            "citadel-blk not built (cargo build -p citadel-blk)",
            true,
        );
        return None;
    }
    Some((guest, qemu))
}

fn start_backend(image: &Path, socket: &Path, extra: &[&str]) -> ConsoleProcess {
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new(citadel_tests::binary("citadel-blk"));
    cmd.arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(extra);
    let backend = ConsoleProcess::spawn(cmd).expect("spawn citadel-blk");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "citadel-blk did not listen:\n{}",
            backend.transcript()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    backend
}

/// QEMU q35 with shared memfd memory and one vhost-user-blk-pci device per socket. (The
/// microvm machine stalls this kernel under TCG here: no timer to calibrate the TSC against.)
fn start_qemu(
    qemu: &Path,
    guest: &GuestKernel,
    initrd: &Path,
    sockets: &[(&Path, u16)],
    reconnect: bool,
) -> ConsoleProcess {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args(["-serial", "stdio", "-m", "256M", "-smp", "2"])
    .args([
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-machine",
        "q35,memory-backend=mem",
    ])
    .arg("-kernel")
    .arg(&guest.bzimage)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    for (i, (socket, queues)) in sockets.iter().enumerate() {
        let mut chardev = format!("socket,id=blk{i},path={}", socket.display());
        if reconnect {
            chardev.push_str(",reconnect=1");
        }
        cmd.arg("-chardev").arg(chardev).arg("-device").arg(format!(
            "vhost-user-blk-pci,chardev=blk{i},num-queues={queues}"
        ));
    }
    ConsoleProcess::spawn(cmd).expect("spawn qemu")
}

fn initrd(dir: &TempDir, guest: &GuestKernel, script: &str) -> PathBuf {
    let out = dir.path().join("initrd.img");
    kernel::initramfs_with_script(&guest.initramfs, script, &out).expect("initramfs");
    out
}

/// Runs the guest to its end and returns the console transcript; fails with everything seen
/// when the guest does not finish.
fn run_to_end(qemu: &mut ConsoleProcess, backend: &ConsoleProcess) -> String {
    if qemu.wait_for("citadel-init: done", BOOT).is_none() {
        panic!(
            "guest did not finish\n{}\n--- backend ---\n{}",
            qemu.transcript(),
            backend.transcript()
        );
    }
    qemu.wait_exit(Duration::from_secs(20));
    qemu.transcript()
}

fn pattern(len: usize) -> Vec<u8> {
    b"citadel-blk-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[test]
fn guest_writes_reads_discards_over_two_direct_queues() {
    let Some((guest, qemu)) = prerequisites("guest_writes_reads_discards_over_two_direct_queues")
    else {
        return;
    };
    let dir = TempDir::new("blk-qemu");
    let image = dir.path().join("disk.img");
    // 0xAA everywhere, so that the discarded range visibly becomes zeroes.
    std::fs::write(&image, vec![0xaau8; IMAGE_LEN]).unwrap();
    let socket = dir.path().join("blk.sock");
    let backend = start_backend(
        &image,
        &socket,
        &["--num-queues", "2", "--serial", "citadel-q2", "--direct"],
    );
    let script = r#"
set -e
echo "QUEUES=$(ls /sys/block/vda/mq | wc -l)"
echo "SECTORS=$(cat /sys/block/vda/size)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "BS=$(cat /sys/block/vda/queue/logical_block_size)"
yes citadel-blk-pattern | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=256 2>/dev/null
cmp /tmp/pat /tmp/back && echo PATTERN-OK
blkdiscard -o 4194304 -l 1048576 /dev/vda && echo DISCARD-OK
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/z bs=4096 skip=1024 count=256 2>/dev/null
head -c 1048576 /dev/zero | cmp - /tmp/z && echo ZERO-OK
"#;
    let initrd = initrd(&dir, &guest, script);
    let mut vm = start_qemu(&qemu, &guest, &initrd, &[(&socket, 2)], false);
    let out = run_to_end(&mut vm, &backend);
    for needle in [
        "QUEUES=2",
        &format!("SECTORS={}", IMAGE_LEN / 512),
        "SERIAL=citadel-q2",
        "BS=4096",
        "PATTERN-OK",
        "DISCARD-OK",
        "ZERO-OK",
        "citadel-init: done rc=0",
    ] {
        assert!(
            out.contains(needle),
            "{needle} missing\n{out}\n--- backend ---\n{}",
            backend.transcript()
        );
    }
    let bytes = std::fs::read(&image).unwrap();
    assert!(
        bytes[1 << 20..2 << 20] == pattern(1 << 20)[..],
        "pattern not in the image"
    );
    assert!(
        bytes[4 << 20..5 << 20].iter().all(|&b| b == 0),
        "discarded range not zero"
    );
    assert!(
        bytes[5 << 20..].iter().all(|&b| b == 0xaa),
        "bytes beyond the discard changed"
    );
    assert!(
        bytes[..1 << 20].iter().all(|&b| b == 0xaa),
        "bytes before the pattern changed"
    );
}

#[test]
fn readonly_disk_refuses_guest_writes_and_serves_reads() {
    let Some((guest, qemu)) = prerequisites("readonly_disk_refuses_guest_writes_and_serves_reads")
    else {
        return;
    };
    let dir = TempDir::new("blk-qemu-ro");
    let image = dir.path().join("disk.img");
    let original = pattern(IMAGE_LEN);
    std::fs::write(&image, &original).unwrap();
    let socket = dir.path().join("blk.sock");
    let backend = start_backend(&image, &socket, &["--readonly", "--direct"]);
    let script = r#"
echo "RO=$(cat /sys/block/vda/ro)"
dd if=/dev/vda of=/tmp/first bs=4096 count=1 2>/dev/null && head -c 19 /tmp/first && echo " READ-OK"
if echo overwrite | dd of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then
  echo WRITE-ACCEPTED
else
  echo WRITE-REFUSED
fi
"#;
    let initrd = initrd(&dir, &guest, script);
    let mut vm = start_qemu(&qemu, &guest, &initrd, &[(&socket, 1)], false);
    let out = run_to_end(&mut vm, &backend);
    for needle in ["RO=1", "citadel-blk-pattern READ-OK", "WRITE-REFUSED"] {
        assert!(
            out.contains(needle),
            "{needle} missing\n{out}\n--- backend ---\n{}",
            backend.transcript()
        );
    }
    assert!(
        std::fs::read(&image).unwrap() == original,
        "read-only image changed"
    );
}

#[test]
fn backend_restart_keeps_every_acknowledged_write() {
    let Some((guest, qemu)) = prerequisites("backend_restart_keeps_every_acknowledged_write")
    else {
        return;
    };
    let dir = TempDir::new("blk-qemu-reconnect");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = start_backend(&image, &socket, &[]);
    // Record i goes to block i (4 KiB); "ACK i" is printed only after dd returned from the
    // fsync of the device, i.e. after the backend acknowledged the write and the flush.
    let script = r#"
i=1
while [ $i -le 150 ]; do
  printf 'record-%04d' $i | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync 2>/dev/null || { echo "FAIL $i"; exit 1; }
  echo "ACK $i"
  i=$((i+1))
done
"#;
    let initrd = initrd(&dir, &guest, script);
    let mut vm = start_qemu(&qemu, &guest, &initrd, &[(&socket, 1)], true);
    if vm.wait_for("ACK 5", BOOT).is_none() {
        panic!(
            "guest never wrote\n{}\n--- backend ---\n{}",
            vm.transcript(),
            backend.transcript()
        );
    }
    // Kill the backend while the guest is writing, then start a new one on the same socket.
    let pid = backend.pid() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    backend.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let mut backend = start_backend(&image, &socket, &[]);
    let out = run_to_end(&mut vm, &backend);
    // The restarted backend really served part of the run.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(backend.pid() as i32, libc::SIGTERM) };
    assert_eq!(backend.wait_exit(Duration::from_secs(10)), Some(0));
    let log = backend.transcript();
    let writes: u64 = log
        .split("writes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        writes > 0,
        "the restarted backend wrote nothing: the guest finished before the kill\n{log}"
    );
    assert!(
        out.contains("citadel-init: done rc=0"),
        "guest saw an error\n{out}\n--- backend ---\n{}",
        backend.transcript()
    );
    let acked: Vec<u32> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ACK "))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    assert_eq!(acked.len(), 150, "{out}");
    let bytes = std::fs::read(&image).unwrap();
    for i in acked {
        let at = i as usize * 4096;
        let want = format!("record-{i:04}");
        assert_eq!(
            &bytes[at..at + want.len()],
            want.as_bytes(),
            "acknowledged record {i} missing from the image"
        );
    }
}
