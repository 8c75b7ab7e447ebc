//! VM templates: several VMs restored from one snapshot directory share the snapshot's pages
//! until they write. Each VM runs the `memscan` guest, which filled 32 MiB of its 128 MiB
//! before the snapshot and reads all of it on every pass. For N = 1, 10 and 50 VMs restored
//! from one snapshot, the benchmark prints the time until all N answer QMP as running and,
//! once each has read its whole region, the total proportional set size (PSS: shared pages
//! divided among their sharers) and RSS of the citadel processes; for the peer in the same
//! run, N VMs booted on their own, the time until all N have filled their region and the
//! same sizes. Prints figures; asserts nothing about size or time.
//!
//! Run with `cargo build --release --workspace --bins && cargo bench -p citadel-tests --bench
//! templates` (the benchmark runs the release build's citadel binary and guest programs).

use std::path::Path;
use std::time::{Duration, Instant};

use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::json;

/// How many VMs run at once, in turn.
const VMS: [usize; 3] = [1, 10, 50];
const BOOT: Duration = Duration::from_secs(900);

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

/// Total PSS and RSS of `vms`, in MiB.
fn totals(vms: &[Vm]) -> (f64, f64) {
    let (pss, rss) = vms
        .iter()
        .map(|vm| pss_rss(vm.pid()))
        .fold((0, 0), |(p, r), (pss, rss)| (p + pss, r + rss));
    (pss as f64 / 1024.0, rss as f64 / 1024.0)
}

/// Starts `n` VMs restored from `incoming` and returns them with the time until every one
/// answered `query-status` with `running`.
fn restore_all(n: usize, incoming: &str) -> (Vec<Vm>, Duration) {
    let started = Instant::now();
    let vms: Vec<Vm> = (0..n).map(|_| start(&["-incoming", incoming])).collect();
    for vm in &vms {
        let mut qmp = Qmp::negotiated(&vm.qmp_path);
        let status = qmp.execute("query-status", None);
        assert_eq!(status["return"]["status"], "running", "{status}");
    }
    (vms, started.elapsed())
}

/// Boots `n` VMs and returns them with the time until every one has filled its region:
/// where a VM restored from the snapshot starts.
fn boot_all(n: usize) -> (Vec<Vm>, Duration) {
    let started = Instant::now();
    let mut vms: Vec<Vm> = (0..n).map(|_| start(&[])).collect();
    for vm in &mut vms {
        vm.wait_serial("citadel-guest: filled", BOOT);
    }
    (vms, started.elapsed())
}

fn snapshot(dir: &Path) {
    let mut vm = start(&[]);
    vm.wait_serial("citadel-guest: filled", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let reply = qmp.migrate(dir);
    assert_eq!(reply, json!({"return": {}}), "{}", vm.transcript());
    qmp.execute("quit", None);
    vm.wait_exit(Duration::from_secs(10));
}

fn main() {
    let tmp = TempDir::new("templates-bench");
    let dir = tmp.path().join("snap");
    snapshot(&dir);
    let incoming = format!("file:{}", dir.display());
    println!("VMs of 128 MiB, each reading the 32 MiB its guest filled:");
    for n in VMS {
        let (mut restored, restore_time) = restore_all(n, &incoming);
        // A restored VM was saved in the middle of a pass: the second pass it reports has
        // read every page since the restore.
        one_more_pass(&mut restored);
        let (shared, shared_rss) = totals(&restored);
        drop(restored);
        // A booted VM has written every page of its region once it has filled it.
        let (booted, boot_time) = boot_all(n);
        let (own, own_rss) = totals(&booted);
        drop(booted);
        println!(
            "  N={n:>2}: restored from one snapshot: all running in {:>6.0} ms, total PSS \
             {shared:>7.1} MiB (RSS {shared_rss:>7.1}); booted: all filled in {:>6.0} ms, PSS \
             {own:>7.1} MiB (RSS {own_rss:>7.1}); PSS ratio {:.2}x",
            restore_time.as_secs_f64() * 1000.0,
            boot_time.as_secs_f64() * 1000.0,
            shared / own
        );
    }
}
