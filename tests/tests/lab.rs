//! Full Linux guests under Citadel, in the nested-KVM lab (see `citadel_tests::lab`): the
//! project's guest kernel and Debian's stock cloud kernel boot to user space with 1, 2 and 4
//! vCPUs and, on the q35 machine, find its PCI host bridge and the hotplug slots of its PCIe
//! root ports, the VM lifecycle works against a live user space, the jailer confines a VM running
//! Linux, CPU templates reach the guest's own /proc/cpuinfo, and disks and NICs hot-plugged
//! over QMP reach Linux: one disk, six at once, a read-only one, one plugged ten times over,
//! a PCI one in a q35 root port (with either kernel); one NIC, and two at once carrying 10 MiB
//! each way; a snapshot of a running Linux user space restored into two VMs at once. In the
//! lab's VFIO variant, L1's `edu` PCI device hot-plugged into a q35 root port answers the
//! guest's registers, DMA and MSI, and goes back to L1's vfio-pci on unplug.
//!
//! All scenarios share one lab boot, started by the first test that needs it.

use std::sync::{Mutex, OnceLock};

use citadel_tests::lab::{Lab, LabError, LabOptions, LabRun, ScenarioOutcome};
use citadel_tests::skip;

const SCENARIOS: &[&str] = &[
    "boot-smp",
    "lifecycle",
    "guest-reboot",
    "jailer",
    "cpu-template",
    "stock-kernel",
    "q35-boot",
    "q35-hotplug",
    "q35-nic",
    "q35-coldplug",
    "vhost-user-blk",
    "hotplug",
    "stock-hotplug",
    "stock-q35-hotplug",
    "nic-hotplug",
    "balloon",
    "chardev-hotplug",
    "blk-restart",
    "q35-blk-restart",
    "disks-six",
    "disk-readonly",
    "disk-replug",
    "nic-two",
    "snapshot",
    "q35-snapshot",
    "q35-nic-snapshot",
];

/// RAM given to every lab guest (`-m 256` in the scenarios).
const GUEST_RAM_KB: u64 = 256 * 1024;

/// Scenarios of the lab's VFIO variant, a boot of its own.
const VFIO_SCENARIOS: &[&str] = &[
    "vfio-edu",
    "vfio-hotplug",
    "vfio-msix",
    "vfio-intx",
    "vfio-jail",
];

fn lab() -> Option<&'static Result<LabRun, LabError>> {
    static RUN: OnceLock<Result<LabRun, LabError>> = OnceLock::new();
    // Every scenario runs in this one L1 boot (each within its own limit): the whole run
    // gets 45 minutes, against the usual 30, for the q35 machine's twenty plug cycles among
    // them.
    let options = LabOptions {
        timeout: std::time::Duration::from_secs(45 * 60),
        ..LabOptions::default()
    };
    boot(&RUN, options, SCENARIOS, "lab-transcript.txt")
}

fn vfio_options() -> LabOptions {
    LabOptions {
        vfio: true,
        ..LabOptions::default()
    }
}

fn vfio_lab() -> Option<&'static Result<LabRun, LabError>> {
    static RUN: OnceLock<Result<LabRun, LabError>> = OnceLock::new();
    boot(
        &RUN,
        vfio_options(),
        VFIO_SCENARIOS,
        "lab-vfio-transcript.txt",
    )
}

/// Lab boots of its own a scenario gets after failing in the shared one (or the shared one
/// failing), before its test fails.
const OWN_LABS: u32 = 2;

/// Held while a lab boots: two emulated labs at once on a small host only slow each other down
/// and stretch every guest-visible timing in both.
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Boots the lab once for all the tests that share `run`, keeping its transcript in the target
/// directory. `None` when the lab cannot run here at all (the test is then skipped, or fails in
/// CI).
fn boot(
    run: &'static OnceLock<Result<LabRun, LabError>>,
    options: LabOptions,
    scenarios: &[&str],
    transcript_name: &str,
) -> Option<&'static Result<LabRun, LabError>> {
    let run = run.get_or_init(|| {
        let _one = ONE_LAB_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let target = citadel_tests::profile_dir()
            .parent()
            .expect("profile dir has a parent")
            .to_path_buf();
        let live = target.join(format!("{transcript_name}.live"));
        let _ = std::fs::remove_file(&live);
        let options = LabOptions {
            live_transcript: Some(live),
            ..options
        };
        let lab = Lab::prepare(options)?;
        let run = lab.run(scenarios)?;
        let transcript = target.join(transcript_name);
        let _ = std::fs::write(&transcript, run.transcript.join("\n"));
        eprintln!(
            "lab: L1 boot {:?}, whole run {:?}, transcript in {}",
            run.l1_boot,
            run.total,
            transcript.display()
        );
        Ok(run)
    });
    if let Err(LabError::Missing(why)) = run {
        skip("lab", why, true);
        return None;
    }
    Some(run)
}

/// Runs `check` on the outcome of scenario `name` in the shared lab boot, which must have
/// ended by itself with status 0.
///
/// The lab is emulated, and QEMU's TCG emulation of nested SVM now and then corrupts L1's or a
/// guest's state (L1 has died of a bad GS base in its page-fault entry and of a corrupted stack
/// while KVM reset a triple-faulted vCPU; SMP guests have triple-faulted under the same Citadel
/// that booted them fine a run before). So a scenario that fails, or that the shared boot never
/// reached, is run again in lab boots of its own (at most [`OWN_LABS`]), saying so on stderr
/// and keeping every transcript; it fails the test only if it fails in each.
fn check_scenario(name: &str, check: impl Fn(&ScenarioOutcome)) {
    check_in(lab, LabOptions::default(), name, check);
}

fn check_in(
    shared: fn() -> Option<&'static Result<LabRun, LabError>>,
    options: LabOptions,
    name: &str,
    check: impl Fn(&ScenarioOutcome),
) {
    let Some(run) = shared() else {
        return;
    };
    let first = match run {
        Ok(run) => {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(finished(run, name))))
                .is_ok()
        }
        Err(e) => {
            static REPORTED: std::sync::Once = std::sync::Once::new();
            REPORTED.call_once(|| eprintln!("lab: the shared lab boot failed: {e}"));
            false
        }
    };
    if first {
        return;
    }
    eprintln!("lab: scenario {name} failed in the shared lab boot; running it on its own");
    for attempt in 1..=OWN_LABS {
        let last = attempt == OWN_LABS;
        let own = {
            let _one = ONE_LAB_AT_A_TIME
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Lab::prepare(options.clone()).and_then(|lab| lab.run(&[name]))
        };
        match own {
            Ok(run) => {
                let transcript = citadel_tests::profile_dir()
                    .parent()
                    .expect("profile dir has a parent")
                    .join(format!("lab-retry-{name}-{attempt}.txt"));
                let _ = std::fs::write(&transcript, run.transcript.join("\n"));
                if last {
                    check(finished(&run, name));
                } else if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(finished(&run, name))
                }))
                .is_err()
                {
                    eprintln!("lab: scenario {name} failed in its own lab boot {attempt}");
                    continue;
                }
                eprintln!("lab: scenario {name} passed in its own lab boot {attempt}");
                return;
            }
            Err(e) if last => panic!("{e}"),
            Err(e) => eprintln!(
                "lab: scenario {name}'s own lab boot {attempt} failed: {}",
                e.to_string().lines().next().unwrap_or_default()
            ),
        }
    }
}

fn finished<'a>(run: &'a LabRun, name: &str) -> &'a ScenarioOutcome {
    let outcome = run.scenario(name);
    assert_eq!(
        outcome.rc,
        Some(0),
        "scenario {name} did not finish cleanly\n{}",
        outcome.transcript()
    );
    outcome
}

fn value<'a>(outcome: &'a ScenarioOutcome, key: &str) -> &'a str {
    outcome
        .get(key)
        .unwrap_or_else(|| panic!("no result {key}\n{}", outcome.transcript()))
}

/// What every boot scenario checks for one VM: user space reached, the guest sees the vCPUs,
/// RAM and command line it was given, its log is free of kernel warnings, and QMP quit ends it.
fn check_boot(outcome: &ScenarioOutcome, vm: &str, smp: u32) {
    let ctx = || format!("VM {vm}\n{}", outcome.transcript());
    assert!(outcome.get(&format!("{vm}.boot_ms")).is_some(), "{}", ctx());
    assert_eq!(
        value(outcome, &format!("{vm}.nproc")),
        smp.to_string(),
        "{}",
        ctx()
    );
    let mem: u64 = value(outcome, &format!("{vm}.memtotal_kb"))
        .parse()
        .unwrap_or_else(|_| panic!("{}", ctx()));
    // The kernel keeps its own image and reserved areas out of MemTotal, but no more than a
    // fifth of a small guest, and never reports more than it was given.
    assert!(
        (GUEST_RAM_KB * 4 / 5..=GUEST_RAM_KB).contains(&mem),
        "MemTotal {mem} kB for a {GUEST_RAM_KB} kB guest\n{}",
        ctx()
    );
    let cmdline = value(outcome, &format!("{vm}.cmdline"));
    assert!(
        cmdline.contains("console=ttyS0 panic=-1 quiet lab.mode=report"),
        "{cmdline}\n{}",
        ctx()
    );
    assert_eq!(
        value(outcome, &format!("{vm}.dmesg-problems")),
        "0",
        "{}",
        ctx()
    );
    // Both kernels take their CPUs from Citadel's ACPI MADT (the stock one has no MP-table
    // parser at all).
    assert_eq!(value(outcome, &format!("{vm}.acpi-madt")), "1", "{}", ctx());
    assert_eq!(value(outcome, &format!("{vm}.exit-code")), "0", "{}", ctx());
}

#[test]
fn guest_kernel_boots_to_user_space_with_1_2_and_4_vcpus() {
    check_scenario("boot-smp", |outcome| {
        for smp in [1, 2, 4] {
            check_boot(outcome, &format!("smp{smp}"), smp);
        }
    });
}

#[test]
fn debian_stock_kernel_boots_to_user_space_with_1_2_and_4_vcpus() {
    check_scenario("stock-kernel", |outcome| {
        for smp in [1, 2, 4] {
            check_boot(outcome, &format!("stock{smp}"), smp);
        }
    });
}

/// The q35 machine's PCI host bridge (Intel Q35, 8086:29c0, a host bridge).
const Q35_HOST_BRIDGE: &str = "0000:00:00.0=8086:29c0/060000";

/// The 32-bit memory window the DSDT's PCI0 gives its devices, first and last byte.
const Q35_MEM_WINDOW: (u64, u64) = (0xd004_0000, 0xdfff_ffff);

/// The part of PCI0's I/O windows a bridge's I/O window (4 KiB aligned) can take.
const Q35_IO_WINDOW: (u64, u64) = (0x1000, 0xffff);

/// The capabilities pciehp reads from the slot of each of Citadel's PCIe root ports.
const ROOT_PORT_SLOT: &str = "AttnBtn+ PwrCtrl+ MRL- AttnInd+ PwrInd+ HotPlug+ Surprise- \
                              Interlock- NoCompl+ IbPresDis- LLActRep+";

/// What Linux made of a q35 VM with `ports` PCIe root ports (`pcie-root-port` N at 00:0N.0,
/// port N, its slot N): the host bridge and the root ports are the PCI functions it finds,
/// pcieport drives each port and pciehp registers each slot with its capabilities and an MSI;
/// the host bridge came from ACPI with its bus range and memory window, and its config space
/// through ECAM (MMCONFIG from MCFG, reserved in E820; Linux accesses extended config space
/// through it, never through port I/O); _OSC gave Linux native hotplug; the bridge windows
/// Linux assigned the ports lie in the host bridge's window; nothing PCI failed in its log.
fn check_q35(outcome: &ScenarioOutcome, vm: &str, ports: u32) {
    let ctx = || format!("VM {vm}\n{}", outcome.transcript());
    let v = |key: &str| value(outcome, &format!("{vm}.{key}"));
    assert!(outcome.get(&format!("{vm}.boot_ms")).is_some(), "{}", ctx());
    assert_eq!(v("nproc"), "1", "{}", ctx());
    let mem: u64 = v("memtotal_kb")
        .parse()
        .unwrap_or_else(|_| panic!("{}", ctx()));
    assert!(
        (GUEST_RAM_KB * 4 / 5..=GUEST_RAM_KB).contains(&mem),
        "MemTotal {mem} kB for a {GUEST_RAM_KB} kB guest\n{}",
        ctx()
    );
    assert_eq!(v("dmesg-problems"), "0", "{}", ctx());
    let port = |n: u32| format!("0000:00:{n:02x}.0");
    let ns = 1..=ports;
    let functions: Vec<String> = std::iter::once(Q35_HOST_BRIDGE.to_string())
        .chain(ns.clone().map(|n| format!("{}=1b36:000c/060400", port(n))))
        .collect();
    assert_eq!(v("pci-functions"), functions.join(" "), "{}", ctx());
    let drivers: Vec<String> = std::iter::once("0000:00:00.0=none".to_string())
        .chain(ns.clone().map(|n| format!("{}=pcieport", port(n))))
        .collect();
    assert_eq!(v("pci-drivers"), drivers.join(" "), "{}", ctx());
    // Every function's extended config space (4 KiB) is there: Linux reads it through ECAM.
    let sizes: Vec<String> = functions
        .iter()
        .filter_map(|f| f.split_once('='))
        .map(|(a, _)| format!("{a}=4096"))
        .collect();
    assert_eq!(v("pci-config-sizes"), sizes.join(" "), "{}", ctx());
    let slots: Vec<String> = ns.clone().map(|n| format!("{n}=0000:{n:02x}:00")).collect();
    assert_eq!(v("pci-slots"), slots.join(" "), "{}", ctx());
    assert_eq!(v("pciehp-slots"), ports.to_string(), "{}", ctx());
    for n in ns.clone() {
        assert_eq!(
            v(&format!("pciehp-slot-{n}")),
            format!("{} {ROOT_PORT_SLOT}", port(n)),
            "slot {n}\n{}",
            ctx()
        );
    }
    // Each port's PCIe services: PME and hotplug (it has no AER or DPC capability).
    let services: Vec<String> = ns
        .clone()
        .map(|n| format!("{0}:pcie001 {0}:pcie004", port(n)))
        .collect();
    assert_eq!(v("pcie-services"), services.join(" "), "{}", ctx());
    assert_eq!(v("pciehp-irqs"), ports.to_string(), "{}", ctx());
    assert_eq!(v("pciehp-msi-irqs"), ports.to_string(), "{}", ctx());
    // Each port has an I/O, a memory and a prefetchable window, as Linux assigned them for
    // its hotplug slot (Citadel's firmware assigns none), each in a window of the host
    // bridge: I/O above the legacy ports, memory (prefetchable too, the host bridge having
    // no prefetchable window) in its 32-bit memory window.
    let windows = v("pci-bridge-windows");
    for n in ns {
        let Some((_, ranges)) = windows
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(a, _)| *a == port(n))
        else {
            panic!("no bridge windows of port {n}: {windows}\n{}", ctx());
        };
        let mut kinds = Vec::new();
        for (kind, range) in ranges.split(',').filter_map(|r| r.split_once(':')) {
            let bounds = range.split_once('-').and_then(|(a, b)| {
                let hex = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok();
                Some((hex(a)?, hex(b)?))
            });
            let Some((first, last)) = bounds else {
                panic!("bridge window {range} of port {n}\n{}", ctx());
            };
            let (low, high) = if kind == "io" {
                Q35_IO_WINDOW
            } else {
                Q35_MEM_WINDOW
            };
            assert!(
                low <= first && first <= last && last <= high,
                "port {n}'s {kind} window {range} is outside the host bridge's window\n{}",
                ctx()
            );
            kinds.push(kind);
        }
        assert_eq!(kinds, ["io", "mem", "pref"], "port {n}\n{}", ctx());
    }
    assert_eq!(
        v("acpi-pci-root"),
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        "{}",
        ctx()
    );
    assert_eq!(v("acpi-host-bridge-windows"), "1", "{}", ctx());
    let resources = v("root-bus-resources");
    for resource in ["[bus 00-ff]", "[mem 0xd0040000-0xdfffffff window]"] {
        assert!(
            resources.split("; ").any(|r| r == resource),
            "no root bus resource {resource}\n{}",
            ctx()
        );
    }
    assert_eq!(
        v("mmconfig"),
        "domain 0000 [bus 00-ff] at [mem 0xe0000000-0xefffffff] (base 0xe0000000)",
        "{}",
        ctx()
    );
    assert_eq!(
        v("mmconfig-reserved"),
        "[mem 0xe0000000-0xefffffff] reserved in E820",
        "{}",
        ctx()
    );
    // Type 1 (0xCF8/0xCFC) for the first 256 bytes only: extended config space is ECAM's.
    assert_eq!(v("config-access"), "1:base", "{}", ctx());
    // Citadel's _OSC grants Linux every control it asks for.
    assert_eq!(v("osc-not-granted"), "", "{}", ctx());
    let controls = v("osc-controls");
    for feature in ["PCIeHotplug", "PME", "PCIeCapability"] {
        assert!(
            controls
                .trim_matches(|c| c == '[' || c == ']')
                .split_whitespace()
                .any(|f| f == feature),
            "_OSC did not give Linux {feature}: {controls}\n{}",
            ctx()
        );
    }
    assert_eq!(v("pci-problems"), "0", "{}", ctx());
    assert_eq!(v("kernel-errors"), "0", "{}", ctx());
    assert_eq!(v("status"), r#""status":"running""#, "{}", ctx());
    assert_eq!(v("exit-code"), "0", "{}", ctx());
}

#[test]
fn q35_linux_finds_the_pci_host_bridge_through_acpi_and_registers_each_root_ports_hotplug_slot() {
    check_scenario("q35-boot", |outcome| {
        // The project's guest kernel with two root ports, Debian's stock kernel with one.
        check_q35(outcome, "q35", 2);
        check_q35(outcome, "stock-q35", 1);
    });
}

#[test]
fn stop_freezes_and_cont_resumes_a_live_user_space() {
    check_scenario("lifecycle", |outcome| {
        let t = || outcome.transcript();
        assert_eq!(value(outcome, "stop"), "ok", "{}", t());
        assert_eq!(value(outcome, "ticks-while-stopped"), "0", "{}", t());
        assert_eq!(value(outcome, "cont"), "ok", "{}", t());
        assert_eq!(value(outcome, "ticks-after-cont"), "yes", "{}", t());
        // The guest's clock does not run away across the pause: between the last tick before
        // `stop` and the first after `cont` its uptime moves by no more than the real time that
        // passed (the pause plus the ticks' own period and slack), and it does move.
        let across: i64 = value(outcome, "guest-ms-across-pause").parse().unwrap();
        let paused: i64 = value(outcome, "paused-ms").parse().unwrap();
        assert!(
            across > 0 && across <= paused + 1000,
            "guest uptime moved {across} ms across a {paused} ms pause\n{}",
            t()
        );
    });
}

#[test]
fn query_cpus_thread_ids_are_live_threads_of_citadel() {
    check_scenario("lifecycle", |outcome| {
        let ids = value(outcome, "cpu-thread-ids");
        assert_eq!(
            ids.split_whitespace().count(),
            2,
            "{}",
            outcome.transcript()
        );
        assert_eq!(
            value(outcome, "live-cpu-threads"),
            "2",
            "{}",
            outcome.transcript()
        );
    });
}

#[test]
fn system_reset_reboots_linux_to_user_space_twice_in_a_row() {
    check_scenario("lifecycle", |outcome| {
        let t = || outcome.transcript();
        assert_eq!(value(outcome, "reset1.qmp"), "ok", "{}", t());
        assert_eq!(value(outcome, "reset1.boots"), "2", "{}", t());
        assert_eq!(value(outcome, "reset2.qmp"), "ok", "{}", t());
        assert_eq!(value(outcome, "reset2.boots"), "3", "{}", t());
        assert_eq!(value(outcome, "exited"), "yes", "{}", t());
    });
}

#[test]
fn guest_reboot_ends_citadel_with_a_guest_reset_shutdown() {
    check_scenario("guest-reboot", |outcome| {
        let t = || outcome.transcript();
        assert_eq!(value(outcome, "reboot.exit-code"), "0", "{}", t());
        let shutdown = value(outcome, "reboot.shutdown");
        assert!(
            shutdown.contains(r#""guest":true"#) && shutdown.contains(r#""reason":"guest-reset""#),
            "{shutdown}\n{}",
            t()
        );
    });
}

#[test]
fn quit_during_linux_boot_ends_citadel_cleanly() {
    check_scenario("guest-reboot", |outcome| {
        let t = || outcome.transcript();
        assert_eq!(value(outcome, "midboot.exit-code"), "0", "{}", t());
        let shutdown = value(outcome, "midboot.shutdown");
        assert!(
            shutdown.contains(r#""reason":"host-qmp-quit""#),
            "{shutdown}\n{}",
            t()
        );
    });
}

#[test]
fn jailer_confines_citadel_running_linux() {
    check_scenario("jailer", |outcome| {
        let t = || outcome.transcript();
        assert_eq!(value(outcome, "user-space"), "yes", "{}", t());
        // PID 1 of its own PID namespace, unprivileged, in six namespaces of its own.
        let nspid: Vec<&str> = value(outcome, "nspid").split_whitespace().collect();
        assert_eq!(nspid.len(), 2, "{}", t());
        assert_eq!(nspid[1], "1", "{}", t());
        assert_eq!(value(outcome, "uid"), "1000 1000 1000 1000", "{}", t());
        assert_eq!(value(outcome, "no-new-privs"), "1", "{}", t());
        assert_eq!(value(outcome, "cap-eff"), "0000000000000000", "{}", t());
        assert_eq!(value(outcome, "own-namespaces"), "6", "{}", t());
        // The event loop and two vCPU threads at least, every one of them filtered.
        let threads: u32 = value(outcome, "threads").parse().unwrap();
        assert!(threads >= 3, "{}", t());
        assert_eq!(
            value(outcome, "filtered-threads"),
            threads.to_string(),
            "{}",
            t()
        );
        // A hot-plugged disk's backend: inside the same jail, unprivileged and filtered; a path
        // climbing out of the jail resolves inside it (and finds nothing).
        assert_eq!(value(outcome, "escape-refused"), "1", "{}", t());
        assert_eq!(value(outcome, "hotplug-returns"), "2", "{}", t());
        assert_eq!(value(outcome, "backend-found"), "yes", "{}", t());
        assert_eq!(
            value(outcome, "backend-uid"),
            "1000 1000 1000 1000",
            "{}",
            t()
        );
        assert_eq!(value(outcome, "backend-seccomp"), "2", "{}", t());
        assert_eq!(value(outcome, "backend-no-new-privs"), "1", "{}", t());
        assert_eq!(
            value(outcome, "backend-cap-eff"),
            "0000000000000000",
            "{}",
            t()
        );
        assert_eq!(value(outcome, "backend-shared-namespaces"), "6", "{}", t());
        assert_eq!(value(outcome, "backend-same-cgroup"), "yes", "{}", t());
        assert_eq!(value(outcome, "backend-gone"), "yes", "{}", t());
        assert_eq!(value(outcome, "exited"), "yes", "{}", t());
    });
}

/// /proc/cpuinfo names of features the baseline template hides (a subset of its list, the
/// ones QEMU's TCG `-cpu max` offers L1 and so L1's KVM can pass on).
const BASELINE_HIDDEN_FLAGS: &[&str] = &["ssse3", "sse4_1", "sse4_2", "popcnt", "pcid", "movbe"];

#[test]
fn cpu_templates_reach_the_guests_own_cpuinfo() {
    check_scenario("cpu-template", |outcome| {
        let t = || outcome.transcript();
        let host: Vec<&str> = value(outcome, "host.flags").split_whitespace().collect();
        let baseline: Vec<&str> = value(outcome, "baseline.flags")
            .split_whitespace()
            .collect();
        assert!(host.contains(&"hypervisor"), "{}", t());
        assert!(baseline.contains(&"sse2"), "{}", t());
        let offered: Vec<&&str> = BASELINE_HIDDEN_FLAGS
            .iter()
            .filter(|f| host.contains(f))
            .collect();
        assert!(
            !offered.is_empty(),
            "the host template offers none of {BASELINE_HIDDEN_FLAGS:?}\n{}",
            t()
        );
        for flag in offered {
            assert!(
                !baseline.contains(flag),
                "baseline guest sees {flag}\n{}",
                t()
            );
        }
        // Both guests see the L1 CPU's vendor (QEMU's TCG `max` CPU is an AMD one, which is what
        // kvm-amd needs), and boot without kernel warnings.
        assert_eq!(value(outcome, "host.vendor"), "AuthenticAMD", "{}", t());
        assert_eq!(value(outcome, "baseline.vendor"), "AuthenticAMD", "{}", t());
        assert_eq!(value(outcome, "host.dmesg-problems"), "0", "{}", t());
        assert_eq!(value(outcome, "baseline.dmesg-problems"), "0", "{}", t());
    });
}

#[test]
fn vfio_variant_offers_a_pci_device_bound_to_vfio_pci() {
    check_in(vfio_lab, vfio_options(), "vfio-edu", |outcome| {
        let t = || outcome.transcript();
        assert_eq!(value(outcome, "edu-driver"), "vfio-pci", "{}", t());
        assert!(!value(outcome, "edu-group").is_empty(), "{}", t());
        assert_eq!(value(outcome, "group-node"), "yes", "{}", t());
        assert_eq!(value(outcome, "container-node"), "yes", "{}", t());
        // The two-function device shares one group, half of it vfio-pci's.
        let shared = value(outcome, "shared-address");
        assert!(shared.ends_with(".0"), "{}", t());
        let sibling = format!("{}1", &shared[..shared.len() - 1]);
        assert_eq!(
            value(outcome, "shared-group"),
            format!("{shared}=vfio-pci {sibling}=virtio-pci"),
            "{}",
            t()
        );
    });
}

#[test]
fn a_hot_plugged_edu_device_answers_the_guest_through_vfio() {
    check_in(vfio_lab, vfio_options(), "vfio-hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        let has = |key, text: &str| {
            assert!(v(key).contains(text), "{key} lacks {text:?}\n{}", t());
        };
        assert_eq!(v("l1-driver"), "vfio-pci", "{}", t());
        // device_add refuses what it cannot pass through or put there.
        has("err-unknown-host", "no such PCI device");
        has("err-not-vfio", "not bound to vfio-pci");
        has("err-not-viable", "its IOMMU group is not viable");
        assert_eq!(v("shared-group-users"), "0", "{}", t());
        has("err-addr", "Invalid addr");
        has("err-bus", "does not support hotplugging");
        has("err-occupied", "holds a device");
        has("err-twice", "already passed through");
        has("err-migrate", "cannot be kept in a snapshot");
        assert_eq!(v("snapshot-written"), "no", "{}", t());
        // Each round: the guest reached the device's registers through its BAR (a memory slot
        // from the first access on), the device moved bytes each way through guest RAM by
        // DMA, and its MSI reached the guest's CPU.
        assert_eq!(v("added"), "2", "{}", t());
        assert_eq!(v("bars-mapped"), "2", "{}", t());
        for round in ["", "round2-"] {
            let v = |key: &str| value(outcome, &format!("{round}{key}"));
            assert_eq!(v("edu-id"), "0x010000ed", "{round}\n{}", t());
            assert_eq!(v("edu-not"), "0xedcba987", "{round}\n{}", t());
            assert_eq!(v("edu-fact"), "3628800", "{round}\n{}", t());
            assert_eq!(v("edu-dma"), "ok", "{round}\n{}", t());
            assert_eq!(v("edu-irq-status"), "0x1", "{round}\n{}", t());
            assert_eq!(v("edu-msi"), "seen", "{round}\n{}", t());
            assert_eq!(v("probe-rc"), "0", "{round}\n{}", t());
            assert_eq!(v("after"), "gone", "{round}\n{}", t());
        }
        // device_del returns first; DEVICE_DELETED, with the guide's data, follows once the
        // guest powered the slot off. The edu stays vfio-pci's in L1, to be plugged again.
        assert_eq!(v("del-order"), "\"return\":{} DEVICE_DELETED ", "{}", t());
        assert_eq!(
            v("del-data"),
            r#""data":{"device":"edu0","path":"edu0"}"#,
            "{}",
            t()
        );
        assert_eq!(v("deleted-after-release"), "2", "{}", t());
        assert_eq!(v("l1-driver-after-unplug"), "vfio-pci vfio-pci", "{}", t());
        // L1's VFIO group is open only while the device is plugged: a refused device_add and
        // an unplug leave it to the next user.
        assert_eq!(v("group-users-refused"), "0", "{}", t());
        assert_ne!(v("round1-group-users"), "0", "{}", t());
        assert_ne!(v("round2-group-users"), "0", "{}", t());
        assert_eq!(v("group-users-after-unplug"), "0", "{}", t());
        assert_eq!(v("guest-done"), "yes", "{}", t());
        assert_eq!(v("hotplug-errors"), "0", "{}", t());
        assert_eq!(v("vfiohp.exit-code"), "0", "{}", t());
    });
}

#[test]
fn a_passed_through_virtio_disk_interrupts_the_guest_with_msi_x() {
    check_in(vfio_lab, vfio_options(), "vfio-msix", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        assert_eq!(v("l1-driver"), "vfio-pci", "{}", t());
        assert_eq!(v("add-returns"), "1", "{}", t());
        // The guest's virtio-blk drove L0's disk through Citadel: the marker the lab wrote,
        // a file system made and a file written (DMA both ways through L0's IOMMU).
        assert_eq!(v("round1-size"), "32768", "{}", t());
        assert_eq!(v("round1-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        assert_eq!(v("mkfs"), "0", "{}", t());
        assert_eq!(v("mount"), "0", "{}", t());
        assert_eq!(v("file-write"), "0", "{}", t());
        // With MSI-X: a vector for configuration changes and one per queue, the request
        // queue's among those that fired.
        let vectors: u32 = v("round1-msix-vectors").parse().unwrap_or(0);
        let fired: u32 = v("round1-msix-fired").parse().unwrap_or(0);
        assert!(
            vectors >= 2 && fired >= 1,
            "{vectors} vectors, {fired} fired\n{}",
            t()
        );
        // The BAR without the MSI-X table became a memory slot; the table's stays trapped.
        assert_eq!(v("bars-mapped"), "1", "{}", t());
        assert_eq!(v("deleted"), "1", "{}", t());
        assert_eq!(v("guest-done"), "yes", "{}", t());
        assert_eq!(v("hotplug-errors"), "0", "{}", t());
        assert_eq!(v("vfiomsix.exit-code"), "0", "{}", t());
        assert_eq!(v("l1-driver-after"), "vfio-pci", "{}", t());
    });
}

#[test]
fn a_passed_through_disk_interrupts_a_guest_without_msi_through_intx() {
    check_in(vfio_lab, vfio_options(), "vfio-intx", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        // Plugged on the command line; the guest (pci=nomsi) drove it with INTx alone.
        assert_eq!(v("round1-size"), "32768", "{}", t());
        assert_eq!(v("round1-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        assert_eq!(v("mkfs"), "0", "{}", t());
        assert_eq!(v("mount"), "0", "{}", t());
        assert_eq!(v("file-write"), "0", "{}", t());
        assert_eq!(v("round1-msix-vectors"), "0", "{}", t());
        assert_eq!(v("round1-intx-chip"), "IO-APIC", "{}", t());
        let count: u64 = v("round1-intx-count").parse().unwrap_or(0);
        assert!(count > 0, "the INTx line never fired\n{}", t());
        assert_eq!(v("vfiointx.exit-code"), "0", "{}", t());
        assert_eq!(v("l1-driver-after"), "vfio-pci", "{}", t());
    });
}

#[test]
fn a_jail_reaches_only_the_vfio_device_the_jailer_was_given() {
    check_in(vfio_lab, vfio_options(), "vfio-jail", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        // Not given to the jailer: the function does not exist for the jailed VM.
        assert!(
            v("closed-refused").contains("no such PCI device"),
            "{}",
            t()
        );
        // Given: its group's node and the container, its sysfs directory, nothing else.
        assert_eq!(v("jail-vfio-nodes"), v("expected-nodes"), "{}", t());
        assert_eq!(v("jail-pci-devices").trim(), v("edu-address"), "{}", t());
        assert_eq!(v("jail-sys").trim(), "bus", "{}", t());
        assert_eq!(v("uid"), "1000 1000 1000 1000", "{}", t());
        // And the unprivileged, jailed VMM passes it through (its DMA mapping within the
        // locked-memory limit the jailer set).
        assert_eq!(v("open-returns"), "1", "{}", t());
        assert_eq!(v("edu-id"), "0x010000ed", "{}", t());
        assert_eq!(v("edu-not"), "0xedcba987", "{}", t());
        assert_eq!(v("edu-fact"), "3628800", "{}", t());
        assert_eq!(v("edu-dma"), "ok", "{}", t());
        assert_eq!(v("edu-msi"), "seen", "{}", t());
        assert_eq!(v("exited"), "yes", "{}", t());
        assert_eq!(v("l1-driver-after"), "vfio-pci", "{}", t());
    });
}

#[test]
fn linux_reads_and_writes_a_vhost_user_blk_disk_served_by_citadel_blk() {
    check_scenario("vhost-user-blk", |outcome| {
        let t = || outcome.transcript();
        // Every slot reaches Linux through the DSDT as an LNRO0005 device: the six hot-replace
        // disk slots, the two NIC slots and this disk's, the ninth, which Linux names vdg.
        assert_eq!(value(outcome, "disk.acpi-virtio"), "9", "{}", t());
        assert_eq!(value(outcome, "disk.name"), "vdg", "{}", t());
        assert_eq!(
            value(outcome, "disk.marker"),
            "citadel-lab-disk-marker!",
            "{}",
            t()
        );
        assert_eq!(value(outcome, "disk.write-rc"), "0", "{}", t());
        assert_eq!(
            value(outcome, "disk.image"),
            "written-by-the-guest",
            "{}",
            t()
        );
        assert_eq!(value(outcome, "disk.exit-code"), "0", "{}", t());
    });
}

#[test]
fn linux_writes_through_a_disk_whose_backend_is_killed_under_it() {
    check_scenario("blk-restart", check_restart);
}

#[test]
fn linux_writes_through_a_pci_disk_whose_backend_is_killed_under_it() {
    check_scenario("q35-blk-restart", check_restart);
}

/// What `blk-restart` and `q35-blk-restart` show.
fn check_restart(outcome: &ScenarioOutcome) {
    let t = || outcome.transcript();
    let v = |key| value(outcome, key);
    // L1 killed the one backend while dd was writing, and a new one took over.
    assert_eq!(v("killed"), "1", "{}", t());
    assert_eq!(v("killed-mid-dd"), "yes", "{}", t());
    assert_eq!(v("backend-restarted"), "yes", "{}", t());
    assert_eq!(v("takeovers"), "1", "{}", t());
    assert_eq!(v("gave-up"), "0", "{}", t());
    // The guest saw nothing: dd succeeded, its kernel logged no I/O error.
    assert_eq!(v("dd-rc"), "0", "{}", t());
    assert_eq!(v("io-errors"), "0", "{}", t());
    // Every block dd wrote is in the image.
    assert_eq!(v("image-matches"), "yes", "{}", t());
    assert_eq!(v("rs.exit-code"), "0", "{}", t());
}

#[test]
fn linux_uses_a_disk_hot_plugged_over_qmp_and_lets_it_go() {
    check_scenario("hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        // Six hot-replace slots from boot, empty until something is plugged.
        assert_eq!(v("disks"), "6", "{}", t());
        assert_eq!(v("vdb-size-empty"), "0", "{}", t());
        assert_eq!(v("add-returns"), "2", "{}", t());
        // The disk is served by a process of its own, confined.
        assert_eq!(v("backend-count"), "1", "{}", t());
        assert_eq!(v("backend-seccomp"), "2", "{}", t());
        assert_eq!(v("backend-no-new-privs"), "1", "{}", t());
        // Linux took the configuration change: 64 MiB, announced in its log.
        assert_eq!(v("vdb-size"), (64u64 << 20 >> 9).to_string(), "{}", t());
        assert_eq!(v("vdb-new-size-messages"), "1", "{}", t());
        assert_eq!(v("vdb-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        for step in ["mkfs", "mount", "file-write", "umount"] {
            assert_eq!(v(step), "0", "{step}\n{}", t());
        }
        // device_del: the event before the return, with the guide's data, then the slot is
        // empty again and the backend process is gone.
        assert_eq!(v("del-order"), "DEVICE_DELETED \"return\":{} ", "{}", t());
        assert_eq!(
            v("del-data"),
            r#""data":{"device":"drive-0","path":"drive-0"}"#,
            "{}",
            t()
        );
        assert_eq!(v("vdb-size-after"), "0", "{}", t());
        assert_eq!(v("backend-gone"), "yes", "{}", t());
        assert_eq!(v("hp.exit-code"), "0", "{}", t());
        // What the guest wrote through the file system is in the image.
        assert_eq!(v("image-file-bytes"), "1", "{}", t());
    });
}

#[test]
fn linux_on_q35_uses_a_pci_disk_hot_plugged_into_a_root_port_and_releases_it_twenty_times() {
    check_scenario("q35-hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        // Every round: blockdev-add (odd rounds) and device_add answered, pciehp found the
        // card, virtio-blk bound it as vda with its 64 MiB and the host's marker. An even round
        // plugs the node the round before kept, with the same citadel-blk.
        assert_eq!(v("added"), "20", "{}", t());
        assert_eq!(v("backend-count"), "1", "{}", t());
        assert_eq!(v("node-kept-backend"), "1 alive", "{}", t());
        assert_eq!(v("round1-size"), (64u64 << 20 >> 9).to_string(), "{}", t());
        assert_eq!(v("round1-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        assert_eq!(
            v("round20-marker"),
            "citadel-lab-hotplug-marker!",
            "{}",
            t()
        );
        for step in ["mkfs", "mount", "file-write", "umount"] {
            assert_eq!(v(step), "0", "{step}\n{}", t());
        }
        // device_del returns first; DEVICE_DELETED, with the guide's data, follows once the
        // guest has powered the slot off, and the disk is gone from the guest by then.
        assert_eq!(v("del-order"), "\"return\":{} DEVICE_DELETED ", "{}", t());
        assert_eq!(
            v("del-data"),
            r#""data":{"device":"drive-0","path":"drive-0"}"#,
            "{}",
            t()
        );
        assert_eq!(v("deleted-after-release"), "20", "{}", t());
        assert_eq!(v("round1-after"), "none", "{}", t());
        assert_eq!(v("round20-after"), "none", "{}", t());
        assert_eq!(v("guest-done"), "yes", "{}", t());
        // Neither pciehp nor AER complained, blockdev-del ended the backend, and what the guest
        // wrote through the file system is in the image.
        assert_eq!(v("hotplug-errors"), "0", "{}", t());
        assert_eq!(v("backend-gone"), "yes", "{}", t());
        assert_eq!(v("q35hp.exit-code"), "0", "{}", t());
        assert_eq!(v("image-file-bytes"), "1", "{}", t());
        let mut plugs: Vec<u64> = v("plug-to-ready-ms")
            .split_whitespace()
            .skip(1)
            .filter_map(|ms| ms.parse().ok())
            .collect();
        plugs.sort_unstable();
        if let Some(median) = plugs.get(plugs.len() / 2) {
            eprintln!(
                "q35 hotplug, blockdev-add to the guest's virtio-blk reading the disk: median {median} ms over {} plugs",
                plugs.len()
            );
        }
    });
}

#[test]
fn linux_on_q35_moves_data_through_a_pci_nic_hot_plugged_into_a_root_port() {
    check_scenario("q35-nic", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        assert_eq!(v("add-returns"), "2", "{}", t());
        assert_eq!(v("backend-count"), "1", "{}", t());
        // Killed while the guest's bytes were on their way to L1, the backend was replaced by
        // another on the same tap: the interface the launcher created (index, MAC, L1's
        // address) outlived it.
        let at_kill: u64 = v("rx-at-kill").parse().unwrap_or(0);
        assert!(
            at_kill > 0 && at_kill < 4 << 20,
            "L1 had {at_kill} bytes when the backend was killed\n{}",
            t()
        );
        assert_eq!(v("backend-restarted"), "yes", "{}", t());
        assert_eq!(v("takeovers"), "1", "{}", t());
        assert_eq!(v("tap-kept"), "yes", "{}", t());
        assert_eq!(v("tap-address"), "1", "{}", t());
        // The card has the MAC device_add gave, its link is up, and frames cross both ways
        // intact, the backend's death in between.
        assert_eq!(v("eth0-mac"), "52:54:00:12:34:56", "{}", t());
        assert_eq!(v("eth0-carrier"), "1", "{}", t());
        for step in ["ping", "send", "receive"] {
            assert_eq!(v(step), "0", "{step}\n{}", t());
        }
        assert_eq!(v("rx-md5"), v("l1-tx-md5"), "{}", t());
        assert_eq!(v("l1-rx-md5"), v("guest-tx-md5"), "{}", t());
        assert_eq!(v("rx-size"), (4u64 << 20).to_string(), "{}", t());
        assert_eq!(v("l1-rx-size"), (4u64 << 20).to_string(), "{}", t());
        // device_del first, DEVICE_DELETED once the guest released the slot, eth0 gone.
        assert_eq!(v("del-order"), "\"return\":{} DEVICE_DELETED ", "{}", t());
        assert_eq!(
            v("del-data"),
            r#""data":{"device":"net-0","path":"net-0"}"#,
            "{}",
            t()
        );
        assert_eq!(v("eth0-after"), "gone", "{}", t());
        assert_eq!(v("hotplug-errors"), "0", "{}", t());
        // The netdev kept its backend for a second card; netdev_del ended it.
        assert_eq!(v("replug"), "3 1", "{}", t());
        assert_eq!(v("backend-after-device-del"), "alive", "{}", t());
        assert_eq!(v("backend-gone"), "yes", "{}", t());
        assert_eq!(v("q35nic.exit-code"), "0", "{}", t());
    });
}

#[test]
fn linux_on_q35_finds_the_command_lines_pci_cards_at_boot() {
    check_scenario("q35-coldplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        assert_eq!(v("disks"), "1", "{}", t());
        assert_eq!(
            v("pci-functions"),
            "0000:00:00.0=8086:29c0/060000 0000:00:01.0=1b36:000c/060400 \
             0000:00:02.0=1b36:000c/060400 0000:01:00.0=1af4:1042/010000 \
             0000:02:00.0=1af4:1041/020000",
            "{}",
            t()
        );
        assert_eq!(
            v("pci-drivers"),
            "0000:00:00.0=none 0000:00:01.0=pcieport 0000:00:02.0=pcieport \
             0000:01:00.0=virtio-pci 0000:02:00.0=virtio-pci",
            "{}",
            t()
        );
        assert_eq!(v("pci-problems"), "0", "{}", t());
        assert_eq!(v("kernel-errors"), "0", "{}", t());
        assert_eq!(v("del-order"), "\"return\":{} DEVICE_DELETED ", "{}", t());
        assert_eq!(
            v("del-data"),
            r#""data":{"device":"disk0","path":"disk0"}"#,
            "{}",
            t()
        );
        assert_eq!(v("q35cold.exit-code"), "0", "{}", t());
    });
}

#[test]
fn linux_uses_a_disk_of_a_backend_it_did_not_start_attached_with_chardev_add() {
    check_scenario("chardev-hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        assert_eq!(v("add-returns"), "2", "{}", t());
        // Linux took the configuration change of a slot whose limits the backend honours.
        assert_eq!(v("vdb-size"), (64u64 << 20 >> 9).to_string(), "{}", t());
        assert_eq!(v("vdb-new-size-messages"), "1", "{}", t());
        assert_eq!(v("vdb-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        for step in ["mkfs", "mount", "file-write", "umount"] {
            assert_eq!(v(step), "0", "{step}\n{}", t());
        }
        // device_del's event before its return, then chardev-remove's return.
        assert_eq!(
            v("del-order"),
            "DEVICE_DELETED \"return\":{} \"return\":{} ",
            "{}",
            t()
        );
        assert_eq!(v("vdb-size-after"), "0", "{}", t());
        assert_eq!(v("ch.exit-code"), "0", "{}", t());
        assert_eq!(v("image-file-bytes"), "1", "{}", t());
        // The user's backend is not Citadel's to end.
        assert_eq!(v("backend-alive"), "yes", "{}", t());
    });
}

#[test]
fn linux_pings_over_a_nic_hot_plugged_over_qmp_and_loses_the_carrier_on_unplug() {
    check_scenario("nic-hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        // Two NIC slots from boot, each with its fixed MAC, eth0's carrier down while empty.
        assert_eq!(v("nics"), "2", "{}", t());
        assert_eq!(v("eth0-mac"), "52:54:00:c1:7a:00", "{}", t());
        assert_eq!(v("carrier-empty"), "0", "{}", t());
        assert_eq!(v("add-returns"), "2", "{}", t());
        // The NIC is served by a process of its own, confined.
        assert_eq!(v("backend-count"), "1", "{}", t());
        assert_eq!(v("backend-seccomp"), "2", "{}", t());
        // Linux took the configuration change: carrier up, and L1 answers over the tap.
        assert_eq!(v("carrier"), "1", "{}", t());
        assert_eq!(v("ping"), "0", "{}", t());
        // device_del: the event before the return, the carrier goes down, the netdev stays
        // until netdev_del ends its process.
        assert_eq!(v("del-order"), "DEVICE_DELETED \"return\":{} ", "{}", t());
        assert_eq!(v("carrier-after"), "0", "{}", t());
        assert_eq!(v("backend-after-device-del"), "alive", "{}", t());
        assert_eq!(v("backend-gone"), "yes", "{}", t());
        assert_eq!(v("nic.exit-code"), "0", "{}", t());
    });
}

#[test]
fn linux_gives_memory_back_through_the_balloon_and_the_host_gets_it() {
    check_scenario("balloon", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        let n = |key| -> u64 {
            v(key)
                .parse()
                .unwrap_or_else(|_| panic!("{key} is not a number\n{}", t()))
        };
        let ram = GUEST_RAM_KB * 1024;
        let half = ram / 2;
        assert_eq!(v("fill"), "0", "{}", t());
        // Nothing asked yet: the guest has all of its RAM.
        assert_eq!(n("actual-before"), ram, "{}", t());
        // Half of RAM asked back: query-balloon, the last BALLOON_CHANGE and the guest's
        // MemTotal (128 MiB less, to the page: the driver counts out every page it holds)
        // agree.
        assert_eq!(n("actual-inflated"), half, "{}", t());
        let changes: Vec<u64> = v("changes-inflated")
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect();
        assert_eq!(changes.last(), Some(&half), "{}", t());
        assert!(changes.iter().all(|&c| (half..ram).contains(&c)), "{}", t());
        let before = n("memtotal-before");
        let inflated = n("memtotal-inflated");
        assert_eq!(before - inflated, half / 1024, "{}", t());
        // The pages left the host: the guest RAM memfd lost at least 90% of them.
        assert!(
            n("returned-mib") >= (half >> 20) * 9 / 10,
            "returned {} MiB of {} MiB\n{}",
            n("returned-mib"),
            half >> 20,
            t()
        );
        // All of RAM asked again: the guest takes its pages back.
        assert_eq!(n("actual-deflated"), ram, "{}", t());
        assert_eq!(n("last-change"), ram, "{}", t());
        assert_eq!(n("memtotal-deflated"), before, "{}", t());
        assert_eq!(v("balloon.exit-code"), "0", "{}", t());
        // The benchmark figure: host memory returned per second of inflation, from the
        // command to the guest reporting the target.
        eprintln!(
            "balloon: {} MiB returned to the host in {} ms ({} MiB/s)",
            n("returned-mib"),
            n("inflate-ms"),
            n("returned-mib-per-s")
        );
        // free-page-reporting: most of the 200 MiB the guest wrote and deleted leave the host
        // without a balloon command.
        assert!(n("written-mib") >= 200, "{}", t());
        assert!(n("reported-mib") >= 100, "{}", t());
        // deflate-on-oom: a write larger than what the target leaves succeeds and kills
        // nothing, the driver deflating instead.
        assert_eq!(n("oom-actual-inflated"), half, "{}", t());
        assert_eq!(v("oom-alloc"), "0", "{}", t());
        assert_eq!(v("oom-kills"), "0", "{}", t());
        assert!(n("oom-actual-after") > half, "{}", t());
        assert_eq!(v("balloon-oom.exit-code"), "0", "{}", t());
    });
}

#[test]
fn debian_stock_kernel_finds_the_slots_through_acpi_and_uses_a_hot_plugged_disk() {
    check_scenario("stock-hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        assert_eq!(v("disks"), "6", "{}", t());
        assert_eq!(v("add-returns"), "2", "{}", t());
        assert_eq!(v("vdb-size"), (32u64 << 20 >> 9).to_string(), "{}", t());
        assert_eq!(v("vdb-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        assert_eq!(v("raw-write"), "0", "{}", t());
        assert_eq!(v("vdb-size-after"), "0", "{}", t());
        assert_eq!(v("shp.exit-code"), "0", "{}", t());
        assert_eq!(v("image"), "written-by-the-guest", "{}", t());
    });
}

#[test]
fn debian_stock_kernel_on_q35_uses_a_pci_disk_hot_plugged_into_a_root_port_and_releases_it() {
    check_scenario("stock-q35-hotplug", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        // Both rounds: device_add answered (with blockdev-add the first time; the second
        // plugs the same node again), the built-in pciehp found the card, Debian's virtio-pci
        // and virtio-blk modules bound it as vda with its 64 MiB and the host's marker.
        assert!(outcome.get("stock-q35hp.boot_ms").is_some(), "{}", t());
        assert_eq!(v("added"), "2", "{}", t());
        assert_eq!(v("backend-count"), "1", "{}", t());
        assert_eq!(v("node-kept-backend"), "1 alive", "{}", t());
        assert_eq!(v("round1-size"), (64u64 << 20 >> 9).to_string(), "{}", t());
        assert_eq!(v("round1-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        assert_eq!(v("round2-marker"), "citadel-lab-hotplug-marker!", "{}", t());
        for step in ["mkfs", "mount", "file-write", "umount"] {
            assert_eq!(v(step), "0", "{step}\n{}", t());
        }
        // device_del returns first; DEVICE_DELETED follows once the guest has powered the slot
        // off, and the disk is gone from the guest by then.
        assert_eq!(v("del-order"), "\"return\":{} DEVICE_DELETED ", "{}", t());
        assert_eq!(
            v("del-data"),
            r#""data":{"device":"drive-0","path":"drive-0"}"#,
            "{}",
            t()
        );
        assert_eq!(v("deleted-after-release"), "2", "{}", t());
        assert_eq!(v("round1-after"), "none", "{}", t());
        assert_eq!(v("round2-after"), "none", "{}", t());
        assert_eq!(v("guest-done"), "yes", "{}", t());
        // Neither pciehp nor AER complained, blockdev-del ended the backend, and what the guest
        // wrote through the file system is in the image.
        assert_eq!(v("hotplug-errors"), "0", "{}", t());
        assert_eq!(v("backend-gone"), "yes", "{}", t());
        assert_eq!(v("stock-q35hp.exit-code"), "0", "{}", t());
        assert_eq!(v("image-file-bytes"), "1", "{}", t());
    });
}

/// A slot's disk name: slot N is the Nth virtio disk Linux finds, vda..vdf.
const SLOT_DISKS: [&str; 6] = ["vda", "vdb", "vdc", "vdd", "vde", "vdf"];

#[test]
fn six_disks_hot_plugged_at_once_each_reach_linux_in_their_own_slot() {
    check_scenario("disks-six", |outcome| {
        let t = || outcome.transcript();
        let v = |key: &str| value(outcome, key);
        assert_eq!(v("add-returns"), "12", "{}", t());
        assert_eq!(v("backend-count"), "6", "{}", t());
        // Plugged in reverse order, each image is still found in the slot its addr named:
        // its marker and its size (N + 1 MiB) say which image it is.
        for (n, disk) in SLOT_DISKS.iter().enumerate() {
            assert_eq!(
                v(&format!("{disk}-marker")),
                format!("citadel-lab-six-slot-{n}!"),
                "{}",
                t()
            );
            assert_eq!(
                v(&format!("{disk}-size")),
                ((n as u64 + 1) << 20 >> 9).to_string(),
                "{disk}\n{}",
                t()
            );
        }
        assert_eq!(v("del-returns"), "6", "{}", t());
        assert_eq!(v("del-events"), "6", "{}", t());
        for disk in SLOT_DISKS {
            assert_eq!(v(&format!("{disk}-size-after")), "0", "{disk}\n{}", t());
        }
        assert_eq!(v("backends-left"), "0", "{}", t());
        assert_eq!(v("six.exit-code"), "0", "{}", t());
    });
}

#[test]
fn a_read_only_hot_plugged_disk_refuses_the_guests_writes() {
    check_scenario("disk-readonly", |outcome| {
        let t = || outcome.transcript();
        let v = |key: &str| value(outcome, key);
        assert_eq!(v("add-returns"), "2", "{}", t());
        assert_eq!(v("vdc-size"), (16u64 << 20 >> 9).to_string(), "{}", t());
        assert_eq!(v("ro-marker"), "citadel-lab-read-only-marker!", "{}", t());
        // dd's O_DIRECT write fails, and the guest still reads the host's bytes.
        assert_ne!(v("ro-write"), "0", "{}", t());
        assert_eq!(
            v("ro-marker-after"),
            "citadel-lab-read-only-marker!",
            "{}",
            t()
        );
        assert_eq!(v("vdc-size-after"), "0", "{}", t());
        assert_eq!(v("ro.exit-code"), "0", "{}", t());
        let before = v("image-md5-before");
        assert_eq!(before.len(), 32, "{}", t());
        assert_eq!(v("image-md5-after"), before, "{}", t());
    });
}

/// Rounds of the `disk-replug` scenario.
const REPLUG_ROUNDS: u64 = 10;

#[test]
fn a_disk_replugged_ten_times_shows_its_new_size_and_keeps_what_the_guest_wrote() {
    check_scenario("disk-replug", |outcome| {
        let t = || outcome.transcript();
        let v = |key: &str| value(outcome, key);
        assert_eq!(v("rounds"), REPLUG_ROUNDS.to_string(), "{}", t());
        for r in 1..=REPLUG_ROUNDS {
            let key = |what: &str| format!("replug-{r}-{what}");
            assert_eq!(v(&key("add-returns")), "2", "round {r}\n{}", t());
            // L1 grew the image while it was out: 8 + R MiB.
            assert_eq!(
                v(&key("size")),
                ((8 + r) << 20 >> 9).to_string(),
                "round {r}\n{}",
                t()
            );
            assert_eq!(
                v(&key("read")),
                format!("replug-round-{:02}", r - 1),
                "round {r}\n{}",
                t()
            );
            assert_eq!(v(&key("write")), "0", "round {r}\n{}", t());
            assert_eq!(
                v(&key("image")),
                format!("replug-round-{r:02}"),
                "round {r}\n{}",
                t()
            );
        }
        assert_eq!(v("backends-left"), "0", "{}", t());
        assert_eq!(v("rp.exit-code"), "0", "{}", t());
    });
}

/// Bytes the `nic-two` scenario moves each way over each NIC.
const NIC_TWO_BYTES: u64 = 10 << 20;

#[test]
fn two_hot_plugged_nics_each_carry_10_mib_each_way() {
    check_scenario("nic-two", |outcome| {
        let t = || outcome.transcript();
        let v = |key: &str| value(outcome, key);
        let number = |key: &str| -> u64 {
            v(key)
                .parse()
                .unwrap_or_else(|_| panic!("{key} is not a number\n{}", t()))
        };
        assert_eq!(v("add-returns"), "4", "{}", t());
        assert_eq!(v("backend-count"), "2", "{}", t());
        let guest_sent = v("guest-tx-md5");
        let l1_sent = v("l1-tx-md5");
        assert_eq!(guest_sent.len(), 32, "{}", t());
        assert_ne!(guest_sent, l1_sent, "{}", t());
        for n in 0..2 {
            let eth = |what: &str| format!("eth{n}-{what}");
            assert_eq!(v(&eth("carrier")), "1", "eth{n}\n{}", t());
            for step in ["ping", "send", "receive"] {
                assert_eq!(v(&eth(step)), "0", "eth{n} {step}\n{}", t());
            }
            // What each end sent is what the other received, whole.
            assert_eq!(v(&format!("l1-rx{n}-md5")), guest_sent, "eth{n}\n{}", t());
            assert_eq!(number(&format!("l1-rx{n}-size")), NIC_TWO_BYTES, "{}", t());
            assert_eq!(v(&eth("rx-md5")), l1_sent, "eth{n}\n{}", t());
            assert_eq!(number(&eth("rx-size")), NIC_TWO_BYTES, "{}", t());
            // Each NIC carried its own transfers: at least 10 MiB each way on its counters
            // and on its tap's (two subnets, so neither can take the other's traffic).
            for key in [
                eth("rx-bytes"),
                eth("tx-bytes"),
                format!("tap{n}-rx-bytes"),
                format!("tap{n}-tx-bytes"),
            ] {
                assert!(number(&key) >= NIC_TWO_BYTES, "{key}\n{}", t());
            }
            assert_eq!(v(&eth("carrier-after")), "0", "eth{n}\n{}", t());
        }
        assert_eq!(v("del-events"), "2", "{}", t());
        assert_eq!(v("backends-left"), "0", "{}", t());
        assert_eq!(v("nic2.exit-code"), "0", "{}", t());
    });
}

#[test]
fn a_linux_user_space_with_a_disk_snapshotted_mid_run_carries_on_in_two_restored_vms() {
    check_scenario("snapshot", check_snapshot_scenario);
}

#[test]
fn a_q35_linux_with_a_pci_disk_snapshotted_mid_run_carries_on_in_two_restored_vms() {
    check_scenario("q35-snapshot", check_snapshot_scenario);
}

#[test]
fn a_q35_linux_pinging_through_a_pci_nic_carries_on_in_a_vm_restored_from_its_snapshot() {
    check_scenario("q35-nic-snapshot", |outcome| {
        let t = || outcome.transcript();
        let v = |key| value(outcome, key);
        assert_eq!(v("answered-before"), "yes", "{}", t());
        assert_eq!(v("migrate"), "ok", "{}", t());
        assert_eq!(v("stop-event"), "yes", "{}", t());
        assert_eq!(v("status"), "completed", "{}", t());
        assert_eq!(v("nicsnap.exit-code"), "0", "{}", t());
        // The restored guest's first whole line is its next ping (or the one whose line the
        // snapshot cut short): its count carried on, through its new backend, with no boot.
        let last: u64 = v("last-ping").parse().unwrap();
        let first: u64 = v("first-ping").parse().unwrap();
        assert!(
            first == last + 1 || first == last + 2,
            "carried on at {first} after {last}\n{}",
            t()
        );
        let answered: u32 = v("answered-after").parse().unwrap_or(0);
        assert!(
            answered >= 3,
            "{answered} pings answered after the restore\n{}",
            t()
        );
        assert_eq!(v("boots"), "0", "{}", t());
        assert_eq!(v("backends"), "1", "{}", t());
        assert_eq!(v("nicsnap-restored.exit-code"), "0", "{}", t());
        eprintln!(
            "lab: q35 VM with a NIC card restored, 3 pings answered {} ms after its start",
            v("answered-after-restore-ms")
        );
    });
}

/// What `snapshot` and `q35-snapshot` show.
fn check_snapshot_scenario(outcome: &ScenarioOutcome) {
    let t = || outcome.transcript();
    assert_eq!(value(outcome, "plug-returns"), "2", "{}", t());
    assert_eq!(value(outcome, "migrate"), "ok", "{}", t());
    assert_eq!(value(outcome, "stop-event"), "yes", "{}", t());
    assert_eq!(value(outcome, "status"), "completed", "{}", t());
    assert_eq!(
        value(outcome, "memory-bytes"),
        (GUEST_RAM_KB * 1024).to_string(),
        "{}",
        t()
    );
    let last: u64 = value(outcome, "last-seq").parse().unwrap();
    assert!(last >= 20, "{}", t());
    eprintln!(
        "lab: snapshot of 256 MiB written in {} ms",
        value(outcome, "migrate-ms")
    );
    for vm in ["snap-a", "snap-b"] {
        // The first whole line after the restore is the next number (or the one whose
        // line the snapshot cut short), never a new start.
        let first: u64 = value(outcome, &format!("{vm}.first-seq")).parse().unwrap();
        assert!(
            first == last + 1 || first == last + 2,
            "{vm} carried on at {first} after {last}\n{}",
            t()
        );
        assert_eq!(value(outcome, &format!("{vm}.continued")), "yes", "{}", t());
        assert_eq!(value(outcome, &format!("{vm}.boots")), "0", "{}", t());
        assert_eq!(value(outcome, &format!("{vm}.broken")), "0", "{}", t());
        // Every number the restored VM printed is in its image, the ones written before
        // the snapshot included.
        assert_eq!(value(outcome, &format!("{vm}.disk-errors")), "0", "{}", t());
        let printed: u64 = value(outcome, &format!("{vm}.last-seq")).parse().unwrap();
        assert!(printed >= first + 20, "{}", t());
        assert_eq!(
            value(outcome, &format!("{vm}.disk-missing")),
            "0",
            "{}",
            t()
        );
        assert_eq!(value(outcome, &format!("{vm}.exit-code")), "0", "{}", t());
        eprintln!(
            "lab: {vm} restored, first guest line after {} ms",
            value(outcome, &format!("{vm}.first-line-ms"))
        );
    }
}
