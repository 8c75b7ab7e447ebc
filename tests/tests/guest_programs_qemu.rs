//! The guest test programs (guest/) booted by QEMU's microvm machine through their PVH entry:
//! this proves the programs themselves, independently of Citadel. KVM is used when
//! `/dev/kvm` works, TCG otherwise (or as `CITADEL_QEMU_ACCEL` says).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use citadel_tests::kernel::{kvm_usable, qemu, ConsoleProcess};
use citadel_tests::{guest_program, skip};
use serde_json::{json, Value};

/// Generous: a program prints within a fraction of a second even where KVM emulates.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const COUNTER_STEP: u64 = 1 << 15;

/// A scratch directory for the QMP socket, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("citadel-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A QEMU running one guest program, with its QMP socket.
struct Guest {
    console: ConsoleProcess,
    qmp_path: PathBuf,
    _scratch: Scratch,
}

/// KVM when `/dev/kvm` works, else TCG; `CITADEL_QEMU_ACCEL` overrides (e.g. `tcg`).
fn accel() -> String {
    std::env::var("CITADEL_QEMU_ACCEL")
        .unwrap_or_else(|_| if kvm_usable() { "kvm" } else { "tcg" }.to_string())
}

const MICROVM: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=off";

fn boot(test: &str, program: &str, extra: &[&str]) -> Option<Guest> {
    boot_machine(test, MICROVM, program, extra)
}

fn boot_machine(test: &str, machine: &str, program: &str, extra: &[&str]) -> Option<Guest> {
    let Some(qemu) = qemu() else {
        skip(test, "qemu-system-x86_64 is not installed", true);
        return None;
    };
    let scratch = Scratch::new(test);
    let qmp_path = scratch.0.join("qmp.sock");
    let mut command = Command::new(qemu);
    command
        .args(["-M", machine])
        .args(["-accel", &accel()])
        .args([
            "-m",
            "64",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-kernel")
        .arg(guest_program(program))
        .args(extra);
    let console = ConsoleProcess::spawn(command).expect("spawn qemu-system-x86_64");
    Some(Guest {
        console,
        qmp_path,
        _scratch: scratch,
    })
}

impl Guest {
    fn expect_line(&mut self, needle: &str) -> String {
        match self.console.wait_for(needle, BOOT_TIMEOUT) {
            Some(line) => line,
            None => panic!(
                "no `{needle}` on the console\n{}",
                self.console.transcript()
            ),
        }
    }

    fn qmp(&self) -> QmpClient {
        QmpClient::connect(&self.qmp_path)
    }
}

/// Just enough of a QMP client to pause, resume and inspect QEMU.
struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpClient {
    fn connect(path: &Path) -> QmpClient {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(err) if Instant::now() > deadline => panic!("QMP {}: {err}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(BOOT_TIMEOUT))
            .expect("set QMP timeout");
        let mut client = QmpClient {
            reader: BufReader::new(stream.try_clone().expect("clone QMP stream")),
            writer: stream,
        };
        assert!(client.read().get("QMP").is_some(), "QMP greeting expected");
        client.execute("qmp_capabilities", json!({}));
        client
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` value, skipping events.
    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").expect("write QMP");
        loop {
            let reply = self.read();
            if let Some(value) = reply.get("return") {
                return value.clone();
            }
            assert!(reply.get("error").is_none(), "{command} failed: {reply}");
        }
    }

    fn hmp(&mut self, command_line: &str) -> String {
        let out = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        );
        out.as_str().expect("HMP output is a string").to_string()
    }
}

fn counter_value(line: &str) -> u64 {
    line.split("counter=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("malformed counter line {line:?}"))
}

#[test]
fn idle_reports_ready_then_halts_with_interrupts_enabled() {
    let Some(mut guest) = boot("idle_halts", "idle", &[]) else {
        return;
    };
    guest.expect_line("citadel-guest: ready");
    guest.expect_line("citadel-guest: entry=pvh");

    // A guest that spins would never be seen halted. Interrupts must be on (IF, bit 9 of
    // RFLAGS) so that the timer can wake it.
    let mut qmp = guest.qmp();
    let mut last = String::new();
    let halted = (0..100).any(|_| {
        last = qmp.hmp("info registers");
        let rflags = last
            .split("RFL=")
            .nth(1)
            .and_then(|rest| u64::from_str_radix(&rest[..8], 16).ok())
            .unwrap_or(0);
        let found = last.contains("HLT=1") && rflags & 0x200 != 0;
        if !found {
            std::thread::sleep(Duration::from_millis(20));
        }
        found
    });
    assert!(halted, "idle never seen halted with interrupts on:\n{last}");
}

#[test]
fn counter_advances_and_stands_still_while_paused() {
    let Some(mut guest) = boot("counter_pause", "counter", &[]) else {
        return;
    };
    guest.expect_line("citadel-guest: entry=pvh");
    guest.expect_line("citadel-guest: ready");
    let first = counter_value(&guest.expect_line("citadel-guest: counter="));
    let second = counter_value(&guest.expect_line("citadel-guest: counter="));
    assert_eq!(first % COUNTER_STEP, 0);
    assert_eq!(second, first + COUNTER_STEP);

    let mut qmp = guest.qmp();
    qmp.execute("stop", json!({}));
    // Output already queued before the pause may still arrive; then nothing may.
    let drained = guest.console.lines_for(Duration::from_millis(500));
    let paused = guest.console.lines_for(Duration::from_millis(1500));
    assert!(
        paused.iter().all(|l| !l.contains("counter=")),
        "counter advanced while paused: {paused:?}"
    );
    let before = drained
        .iter()
        .rev()
        .find(|l| l.contains("counter="))
        .map_or(second, |l| counter_value(l));
    qmp.execute("cont", json!({}));
    let after = counter_value(&guest.expect_line("citadel-guest: counter="));
    assert!(
        after > before,
        "counter {after} after resume, {before} before"
    );
}

#[test]
fn smp_starts_every_processor_of_the_mp_table() {
    for cpus in ["1", "2"] {
        let Some(mut guest) = boot("smp", "smp", &["-smp", cpus]) else {
            return;
        };
        guest.expect_line("citadel-guest: entry=pvh");
        let line = guest.expect_line("citadel-guest: cpus=");
        assert_eq!(line, format!("citadel-guest: cpus={cpus}"));
        // QEMU's own ACPI tables: the program's MADT walk agrees with another VMM's.
        let line = guest.expect_line("citadel-guest: acpi-cpus=");
        assert_eq!(line, format!("citadel-guest: acpi-cpus={cpus}"));
        let line = guest.expect_line("citadel-guest: mptable-cpus=");
        assert_eq!(line, format!("citadel-guest: mptable-cpus={cpus}"));
    }
}

#[test]
fn cmdline_prints_the_command_line() {
    let append = "hello world citadel.answer=42";
    let Some(mut guest) = boot("cmdline", "cmdline", &["-append", append]) else {
        return;
    };
    guest.expect_line("citadel-guest: entry=pvh");
    let line = guest.expect_line("citadel-guest: cmdline=");
    assert_eq!(line, format!("citadel-guest: cmdline={append}"));
}

#[test]
fn reset_pulses_the_i8042_reset_line() {
    let Some(mut guest) = boot("reset", "reset", &["-device", "i8042", "-no-reboot"]) else {
        return;
    };
    guest.expect_line("citadel-guest: resetting");
    // -no-reboot turns the guest's reset into QEMU exiting normally.
    let code = guest.console.wait_exit(BOOT_TIMEOUT);
    assert_eq!(code, Some(0), "{}", guest.console.transcript());
    guest.console.lines_for(Duration::from_millis(200));
    assert!(
        !guest.console.transcript().contains("reset-failed"),
        "{}",
        guest.console.transcript()
    );
}

#[test]
fn reset_reports_when_nothing_resets() {
    // QEMU's microvm has no i8042 unless asked for one: the write goes nowhere.
    let Some(mut guest) = boot("reset_failed", "reset", &[]) else {
        return;
    };
    guest.expect_line("citadel-guest: resetting");
    guest.expect_line("citadel-guest: reset-failed");
}

#[test]
fn virtio_blk_reads_sector_zero_over_virtio_mmio() {
    let scratch = Scratch::new("virtio_blk_disk");
    let disk = scratch.0.join("disk.img");
    let marker = b"citadel-sector-zero-marker";
    let mut image = vec![0u8; 1 << 20];
    image[..marker.len()].copy_from_slice(marker);
    std::fs::write(&disk, image).expect("write disk image");
    let drive = format!("file={},if=none,id=disk0,format=raw", disk.display());
    // Without ACPI, QEMU announces its virtio-mmio devices on the kernel command line, which
    // is where the program (like Linux) finds them; a virtio-rng device comes first so the
    // block device is not simply the first slot.
    let machine = format!("{MICROVM},acpi=off");
    let extra = [
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
        "virtio-rng-device",
        "-drive",
        &drive,
        "-device",
        "virtio-blk-device,drive=disk0",
    ];
    let Some(mut guest) = boot_machine("virtio_blk", &machine, "virtio_blk", &extra) else {
        return;
    };
    guest.expect_line("citadel-guest: entry=pvh");
    assert_eq!(
        guest.expect_line("citadel-guest: virtio-mmio devices="),
        "citadel-guest: virtio-mmio devices=2"
    );
    guest.expect_line("version=2 device=4");
    guest.expect_line("version=2 device=2");
    assert_eq!(
        guest.expect_line("citadel-guest: virtio-blk capacity="),
        "citadel-guest: virtio-blk capacity=2048"
    );
    let line = guest.expect_line("citadel-guest: virtio-blk status=");
    assert_eq!(
        line,
        format!(
            "citadel-guest: virtio-blk status=0 sector0={}......",
            String::from_utf8_lossy(marker)
        )
    );
    // The program's write of sector 1 reads back and is in the image: the same check the
    // vhost-user-blk test makes against Citadel.
    let pattern = b"citadel-guest-wrote-sector-one.";
    let expected: Vec<u8> = pattern.iter().copied().cycle().take(512).collect();
    assert_eq!(
        guest.expect_line("citadel-guest: virtio-blk write-readback status="),
        format!(
            "citadel-guest: virtio-blk write-readback status=0 sector1={}",
            String::from_utf8_lossy(&expected[..32])
        )
    );
    guest.expect_line("citadel-guest: done");
    assert_eq!(&std::fs::read(&disk).unwrap()[512..1024], &expected[..]);
}
