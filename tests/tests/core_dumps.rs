//! No Citadel process writes guest memory to a core file: each sets its core size limit to 0
//! (soft and hard) at start, and marks the mappings of guest memory it holds `MADV_DONTDUMP`
//! (the `dd` flag of /proc/<pid>/smaps), which holds even when a core is written through a
//! `core_pattern` pipe. The test process raises its own limit first, so a child showing 0 set
//! it itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use citadel_tests::netns::{unique, NetNs};
use citadel_tests::procfs::{allow_own_core_dumps, core_file_limit, limit, vm_flags_of};
use citadel_tests::vhost_user::{Frontend, GuestMemory};
use citadel_tests::vm::{TempDir, Vm};
use citadel_tests::{binary, guest_program, skip, Reaped};

const MEM_SIZE: usize = 1 << 20;

fn zero_limit() -> (String, String) {
    ("0".to_string(), "0".to_string())
}

/// Asserts that at least one mapping of `pid` whose path contains `needle` exists and that
/// every such mapping carries the `dd` flag.
fn assert_not_dumped(pid: u32, needle: &str) {
    let mappings = vm_flags_of(pid, needle);
    assert!(!mappings.is_empty(), "no mapping of {needle} in {pid}");
    for flags in &mappings {
        assert!(
            flags.iter().any(|f| f == "dd"),
            "{needle} mapping of {pid} would be dumped: VmFlags {flags:?}"
        );
    }
}

fn prepared(test: &str) -> bool {
    if !allow_own_core_dumps() {
        skip(
            test,
            "cannot raise this process's core limit (needs root)",
            false,
        );
        return false;
    }
    assert_ne!(
        core_file_limit(std::process::id()),
        zero_limit(),
        "the test's own limit must not already be 0"
    );
    true
}

#[test]
fn the_vmm_writes_no_core_and_its_guest_ram_is_not_dumpable() {
    let test = "core_dumps::the_vmm";
    if !prepared(test) {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        skip(test, "no /dev/kvm", false);
        return;
    }
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "64"]);
    vm.wait_serial("citadel-guest: ready", Duration::from_secs(20));
    assert_eq!(core_file_limit(vm.pid()), zero_limit());
    assert_not_dumped(vm.pid(), "memfd:citadel-guest-ram");
}

#[test]
fn citadel_blk_writes_no_core_and_shared_guest_memory_is_not_dumpable() {
    let test = "core_dumps::citadel_blk";
    if !prepared(test) {
        return;
    }
    let dir = TempDir::new("core-blk");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let child = Reaped(
        Command::new(binary("citadel-blk"))
            .arg("--image")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn citadel-blk"),
    );
    let mut frontend = Frontend::connect(&socket);
    let mem = GuestMemory::new(MEM_SIZE);
    assert_eq!(
        frontend.share_memory(&mem, mem.fd()),
        0,
        "memory table refused"
    );
    assert_eq!(core_file_limit(child.0.id()), zero_limit());
    assert_not_dumped(child.0.id(), "memfd:citadel-test-guest");
    // Writes never extend the image, so no file can grow past it.
    let size = (1u64 << 20).to_string();
    assert_eq!(limit(child.0.id(), "Max file size"), (size.clone(), size));
}

#[test]
fn citadel_net_writes_no_core_and_shared_guest_memory_is_not_dumpable() {
    let test = "core_dumps::citadel_net";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        skip(
            test,
            "needs root and /dev/net/tun for the tap and netns",
            false,
        );
        return;
    }
    if !prepared(test) {
        return;
    }
    let dir = TempDir::new("core-net");
    let socket = dir.path().join("net.sock");
    let ns = NetNs::create(unique("ccd"));
    let mut cmd = ns.exec(&[
        binary("citadel-net").to_str().expect("utf-8"),
        "--socket",
        socket.to_str().expect("utf-8"),
        "--tap",
        "ccd0",
    ]);
    cmd.stderr(Stdio::null());
    let child = Reaped(cmd.spawn().expect("start citadel-net"));
    let mut frontend = Frontend::connect(&socket);
    let mem = GuestMemory::new(MEM_SIZE);
    assert_eq!(
        frontend.share_memory(&mem, mem.fd()),
        0,
        "memory table refused"
    );
    // `ip netns exec` execs the backend in place, so the child is citadel-net itself.
    let pid = child.0.id();
    assert_eq!(core_file_limit(pid), zero_limit());
    assert_not_dumped(pid, "memfd:citadel-test-guest");
}
