//! `citadel-lab`: the nested-KVM lab by hand.
//!
//! ```text
//! citadel-lab [--vfio] [--with-qemu] [--memory MIB] [--cpus N] [SCENARIO...]
//! ```
//!
//! Without scenarios it boots the lab's first level (L1) with a shell on this terminal: Citadel's
//! binaries are in `/lab/bin` (on `PATH`), the guest kernel and initramfs in `/lab/guest`,
//! Debian's stock kernel in `/lab/stock`, and `. /lab/lib.sh` brings the scenario helpers
//! (`boot_guest`, `qmp`, ...). Exit the shell to power L1 off. With scenarios (names of
//! `tests/lab/scenarios/*.sh`) it runs them and prints the tagged console and their results.
//! `--with-qemu` carries this host's QEMU into L1 (`scripts/bench-lab.sh` compares with it).

use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use citadel_tests::lab::{Lab, LabOptions};

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "citadel-lab: {why}\nusage: citadel-lab [--vfio] [--with-qemu] [--memory MIB] [--cpus N] [SCENARIO...]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut options = LabOptions::default();
    let mut scenarios = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |what: &str| {
            args.next()
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} takes a positive number"))
        };
        match arg.as_str() {
            "--vfio" => options.vfio = true,
            "--with-qemu" => options.with_qemu = true,
            "--memory" => match number("--memory") {
                Ok(n) => options.memory_mib = n,
                Err(e) => return usage(&e),
            },
            "--cpus" => match number("--cpus") {
                Ok(n) => options.cpus = n,
                Err(e) => return usage(&e),
            },
            "-h" | "--help" => return usage("help"),
            s if s.starts_with('-') => return usage(&format!("unknown option {s}")),
            _ => scenarios.push(arg),
        }
    }
    let lab = match Lab::prepare(options) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("citadel-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    if scenarios.is_empty() {
        // The terminal becomes L1's console; QEMU's monitor is on Ctrl-A c.
        let error = lab.command(&[]).args(["-serial", "mon:stdio"]).exec();
        eprintln!("citadel-lab: starting QEMU: {error}");
        return ExitCode::FAILURE;
    }
    let names: Vec<&str> = scenarios.iter().map(String::as_str).collect();
    match lab.run(&names) {
        Ok(run) => {
            for line in &run.transcript {
                println!("{line}");
            }
            let mut failed = false;
            for (name, outcome) in &run.scenarios {
                println!("scenario {name}: rc={:?}", outcome.rc);
                for (key, value) in &outcome.results {
                    println!("  {key}={value}");
                }
                failed |= outcome.rc != Some(0);
            }
            println!("L1 boot {:?}, whole run {:?}", run.l1_boot, run.total);
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("citadel-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
