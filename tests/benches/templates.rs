//! VM templates: several VMs restored from one snapshot directory share the snapshot's pages
//! until they write. Each VM runs the `memscan` guest, which filled 128 MiB of its 256 MiB
//! before the snapshot and reads all of it on every pass; once each VM has finished a pass,
//! the benchmark prints the proportional set size (PSS: shared pages divided among their
//! sharers) and RSS of every citadel process, for N VMs restored from one snapshot and, as
//! the peer in the same run, N VMs booted on their own. Prints figures; asserts nothing
//! about size.
//!
//! Run with `cargo build --release --workspace --bins && cargo bench -p citadel-tests --bench
//! templates` (the benchmark runs the release build's citadel binary and guest programs).

use std::path::Path;
use std::time::{Duration, Instant};

use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::json;

const VMS: usize = 4;
const BOOT: Duration = Duration::from_secs(240);

fn start(extra: &[&str]) -> Vm {
    let mut args = vec!["-m", "128"];
    args.extend_from_slice(extra);
    Vm::start(&guest_program("memscan"), &args)
}

/// `Pss` and `Rss` of `pid` in KiB, from `/proc/<pid>/smaps_rollup`.
fn pss_rss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in smaps_rollup of {pid}"))
    };
    (field("Pss:"), field("Rss:"))
}

/// Waits until every VM has completed one more full pass over its region than it had, so
/// that each touched every page.
fn one_more_pass(vms: &mut [Vm]) {
    for vm in vms.iter_mut() {
        vm.wait_serial("pass=", BOOT);
        vm.wait_serial("pass=", BOOT);
    }
}

/// Prints PSS and RSS of each VM and their means; returns the mean PSS in MiB.
fn report(label: &str, vms: &[Vm]) -> f64 {
    let sizes: Vec<(u64, u64)> = vms.iter().map(|vm| pss_rss(vm.pid())).collect();
    for (i, (pss, rss)) in sizes.iter().enumerate() {
        println!(
            "  {label} VM {i}: PSS {:7.1} MiB, RSS {:7.1} MiB",
            *pss as f64 / 1024.0,
            *rss as f64 / 1024.0
        );
    }
    let mean = |f: fn(&(u64, u64)) -> u64| {
        sizes.iter().map(f).sum::<u64>() as f64 / sizes.len() as f64 / 1024.0
    };
    let (pss, rss) = (mean(|s| s.0), mean(|s| s.1));
    println!("  {label}: mean PSS {pss:.1} MiB, mean RSS {rss:.1} MiB");
    pss
}

fn snapshot(dir: &Path) {
    let mut vm = start(&[]);
    vm.wait_serial("citadel-guest: filled", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let reply = qmp.execute(
        "migrate",
        Some(json!({"uri": format!("file:{}", dir.display())})),
    );
    assert_eq!(reply, json!({"return": {}}), "{}", vm.transcript());
    qmp.execute("quit", None);
    vm.wait_exit(Duration::from_secs(10));
}

fn main() {
    let tmp = TempDir::new("templates-bench");
    let dir = tmp.path().join("snap");
    snapshot(&dir);
    let incoming = format!("file:{}", dir.display());
    println!("{VMS} VMs of 128 MiB, each reading the 32 MiB its guest filled:");

    let started = Instant::now();
    let mut restored: Vec<Vm> = (0..VMS)
        .map(|_| start(&["-incoming", incoming.as_str()]))
        .collect();
    for vm in &mut restored {
        vm.wait_serial("pass=", BOOT);
    }
    println!(
        "  restored from one snapshot: all {VMS} through their first pass in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    one_more_pass(&mut restored);
    let shared = report("restored", &restored);
    drop(restored);

    let mut booted: Vec<Vm> = (0..VMS).map(|_| start(&[])).collect();
    for vm in &mut booted {
        vm.wait_serial("citadel-guest: filled", BOOT);
    }
    one_more_pass(&mut booted);
    let own = report("booted", &booted);
    drop(booted);
    println!(
        "  restored VMs take {:.2}x the memory of booted ones (mean PSS {shared:.1} vs {own:.1} MiB)",
        shared / own
    );
}
