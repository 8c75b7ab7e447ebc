//! The balloon over QMP: `balloon` and `query-balloon` answer as QEMU's do without a balloon
//! device, and with one the `virtio_balloon` guest program (a driver behaving like Linux's)
//! inflates and deflates on the host's request. Pages it inflates must leave the guest RAM
//! memfd (its allocated blocks drop), `BALLOON_CHANGE` and `query-balloon` follow the size
//! the guest reports, pages deflated come back zeroed, and `system_reset` empties the
//! balloon.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, Vm};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(30);
const RAM: u64 = 64 << 20;
/// The balloon takes the virtio-mmio slot after the six disk and two NIC slots: slot 8,
/// IOAPIC pin 16.
const BALLOON_SLOT: &str = "virtio_mmio.device=4K@0xd0008000:16";

fn error(reply: &Value) -> (&str, &str) {
    (
        reply["error"]["class"].as_str().unwrap_or("none"),
        reply["error"]["desc"].as_str().unwrap_or("none"),
    )
}

fn query_balloon(qmp: &mut Qmp) -> u64 {
    let r = qmp.execute("query-balloon", None);
    r["return"]["actual"]
        .as_u64()
        .unwrap_or_else(|| panic!("{r}"))
}

/// Bytes the host holds for the guest RAM memfd of citadel process `pid`.
fn guest_ram_allocated(pid: u32) -> u64 {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list fds");
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy().contains("citadel-guest-ram") {
            return std::fs::metadata(fd.path()).expect("stat memfd").blocks() * 512;
        }
    }
    panic!("no guest RAM memfd among the descriptors of {pid}");
}

/// Waits for `BALLOON_CHANGED` (StratoVirt's name) and `BALLOON_CHANGE` (QEMU's) reporting
/// `actual`, skipping earlier sizes; returns the latter.
fn wait_balloon_change(qmp: &mut Qmp, actual: u64) -> Value {
    let mut wait = |name: &str| loop {
        let event = qmp.wait_event(name);
        if event["data"]["actual"] == json!(actual) {
            return event;
        }
    };
    wait("BALLOON_CHANGED");
    wait("BALLOON_CHANGE")
}

#[test]
fn without_a_balloon_device_the_commands_answer_device_not_active() {
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let inactive = ("DeviceNotActive", "No balloon device has been activated");
    let r = qmp.execute("balloon", Some(json!({"value": 16 << 20})));
    assert_eq!(error(&r), inactive, "{r}");
    let r = qmp.execute("query-balloon", None);
    assert_eq!(error(&r), inactive, "{r}");
    // As in QEMU, the target is checked before the device is looked for.
    let r = qmp.execute("balloon", Some(json!({"value": -1})));
    assert_eq!(
        error(&r),
        ("GenericError", "Parameter 'target' expects a size"),
        "{r}"
    );
    let r = qmp.execute("query-commands", None);
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"balloon") && names.contains(&"query-balloon"),
        "{names:?}"
    );
}

#[test]
fn an_undriven_balloon_reports_all_of_ram_and_refuses_bad_targets() {
    let mut vm = Vm::start(
        &guest_program("idle"),
        &["-m", "64", "-device", "virtio-balloon-device,id=balloon0"],
    );
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(query_balloon(&mut qmp), RAM);
    for (value, expected) in [
        (json!(0), "Parameter 'target' expects a size"),
        (json!(-4096), "Parameter 'target' expects a size"),
        (
            json!("32M"),
            "Invalid parameter type for 'value', expected: integer",
        ),
        (
            json!(1.5),
            "Invalid parameter type for 'value', expected: integer",
        ),
    ] {
        let r = qmp.execute("balloon", Some(json!({ "value": value })));
        assert_eq!(error(&r), ("GenericError", expected), "{value}: {r}");
    }
    let r = qmp.execute("balloon", None);
    assert_eq!(
        error(&r),
        ("GenericError", "Parameter 'value' is missing"),
        "{r}"
    );
    // A target the guest does not act on changes nothing it reports.
    let r = qmp.execute("balloon", Some(json!({"value": 32 << 20})));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(query_balloon(&mut qmp), RAM);
}

#[test]
fn inflated_pages_leave_the_host_and_deflated_ones_come_back_zeroed() {
    let mut vm = Vm::start(
        &guest_program("virtio_balloon"),
        &[
            "-m",
            "64",
            "-device",
            "virtio-balloon-device",
            "-append",
            BALLOON_SLOT,
        ],
    );
    vm.wait_serial("citadel-guest: virtio-balloon waiting", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(query_balloon(&mut qmp), RAM);
    let before = guest_ram_allocated(vm.pid());

    // 8 MiB (2048 pages) of the guest's 16 MiB pool, which it filled before.
    let target = RAM - (8 << 20);
    let r = qmp.execute("balloon", Some(json!({ "value": target })));
    assert_eq!(r, json!({"return": {}}));
    vm.wait_serial("citadel-guest: virtio-balloon num-pages=2048", BOOT);
    vm.wait_serial("citadel-guest: virtio-balloon actual=2048", BOOT);
    let event = wait_balloon_change(&mut qmp, target);
    assert!(
        event["timestamp"]["seconds"].as_u64().unwrap() > 0,
        "{event}"
    );
    assert_eq!(query_balloon(&mut qmp), target);
    let after = guest_ram_allocated(vm.pid());
    let returned = before.saturating_sub(after);
    assert!(
        returned >= (8 << 20) * 9 / 10,
        "the memfd held {before} bytes before inflating, {after} after"
    );

    // Back to all of RAM: the guest deflates and finds the pages zeroed.
    let r = qmp.execute("balloon", Some(json!({ "value": RAM })));
    assert_eq!(r, json!({"return": {}}));
    vm.wait_serial("citadel-guest: virtio-balloon actual=0", BOOT);
    vm.wait_serial("citadel-guest: virtio-balloon deflated-zeroed=1", BOOT);
    wait_balloon_change(&mut qmp, RAM);
    assert_eq!(query_balloon(&mut qmp), RAM);
}

#[test]
fn system_reset_empties_the_balloon() {
    let mut vm = Vm::start(
        &guest_program("virtio_balloon"),
        &[
            "-m",
            "64",
            "-device",
            "virtio-balloon-device",
            "-append",
            BALLOON_SLOT,
        ],
    );
    vm.wait_serial("citadel-guest: virtio-balloon waiting", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let target = RAM - (4 << 20);
    qmp.execute("balloon", Some(json!({ "value": target })));
    vm.wait_serial("citadel-guest: virtio-balloon actual=1024", BOOT);
    wait_balloon_change(&mut qmp, target);
    assert_eq!(qmp.execute("system_reset", None), json!({"return": {}}));
    assert_eq!(query_balloon(&mut qmp), RAM);
    wait_balloon_change(&mut qmp, RAM);
    // The rebooted guest starts its driver again and finds no target.
    vm.wait_serial("citadel-guest: entry=", BOOT);
    vm.wait_serial("citadel-guest: virtio-balloon waiting", BOOT);
    let lines = vm.serial_lines_for(Duration::from_millis(500));
    assert!(!lines.iter().any(|l| l.contains("num-pages")), "{lines:?}");
}
