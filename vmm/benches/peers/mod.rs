//! How the benchmarks start Citadel and its peer, QEMU's microvm, on the same guest program.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest program `name` built by `cargo build -p citadel-tests`.
pub fn guest(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<triple>/<profile>/deps/<bench>
    let triple_dir = exe.ancestors().nth(3).expect("target layout");
    let path = triple_dir.join("guest").join(format!("{name}.elf"));
    assert!(
        path.exists(),
        "{} missing: build the guest programs first (cargo build -p citadel-tests)",
        path.display()
    );
    path
}

/// The `citadel` binary built with the benchmark.
pub fn citadel() -> &'static str {
    env!("CARGO_BIN_EXE_citadel")
}

/// citadel booting `kernel` with 64 MiB, serial to `serial`, QMP on `sock`.
pub fn citadel_command(kernel: &Path, serial: &str, sock: &Path) -> Command {
    let mut c = Command::new(citadel());
    c.args([
        "-machine", "microvm", "-m", "64", "-serial", serial, "-kernel",
    ])
    .arg(kernel)
    .arg("-qmp")
    .arg(format!("unix:{},server,nowait", sock.display()));
    c
}

/// Whether QEMU is installed.
pub fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok()
}

/// The peer: QEMU's microvm with as little firmware and as few devices as it allows.
pub fn qemu_command(kernel: &Path, serial: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off",
        "-enable-kvm",
        // Hosts whose KVM refuses a write of IA32_ARCH_CAPABILITIES (nested ones do) make
        // QEMU abort at start with `-cpu host`; the guest programs never read that MSR.
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        serial,
        "-kernel",
    ])
    .arg(kernel);
    c
}
