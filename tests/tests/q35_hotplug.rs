//! Hotplug on the standard machine seen from QMP, with a guest that never answers: every
//! `device_add` Citadel must refuse is refused with the reason and leaves the node, its
//! backend and the slot as they were; a card whose guest never releases it stays plugged,
//! `device_del` answers at once and again says the card is already being removed (QEMU's
//! text), no DEVICE_DELETED is announced, and its node stays busy. A snapshot of a q35
//! machine is refused. The `idle` guest program has no PCI driver at all.

use std::path::Path;
use std::time::Duration;

use citadel_tests::disk::{blk_backend_missing, error_desc, image_with_marker};
use citadel_tests::guest_program;
use citadel_tests::procfs::{blk_backends, wait_gone};
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const IMAGE_LEN: usize = 1 << 20;

fn q35(ports: &[&str]) -> Vm {
    let mut args = vec!["-machine", "q35", "-m", "32"];
    for port in ports {
        args.extend(["-device", port]);
    }
    let mut vm = Vm::start(&guest_program("idle"), &args);
    vm.wait_serial("ready", Duration::from_secs(30));
    vm
}

fn blockdev_add(qmp: &mut Qmp, node: &str, file: &Path) -> Value {
    qmp.execute(
        "blockdev-add",
        Some(
            json!({"node-name": node, "file": {"driver": "file", "filename": file},
            "cache": {"direct": false}}),
        ),
    )
}

fn device_add(qmp: &mut Qmp, args: Value) -> Value {
    qmp.execute("device_add", Some(args))
}

fn disk(id: &str, bus: &str) -> Value {
    json!({"driver": "virtio-blk-pci", "id": id, "drive": id, "bus": bus, "addr": "0x0"})
}

#[test]
fn pci_hotplug_refusals_name_the_reason_and_leave_node_backend_and_slot_alone() {
    if blk_backend_missing(
        "pci_hotplug_refusals_name_the_reason_and_leave_node_backend_and_slot_alone",
    ) {
        return;
    }
    let dir = TempDir::new("q35-hotplug");
    let img = image_with_marker(dir.path(), "a.img", IMAGE_LEN, b"a");
    let img2 = image_with_marker(dir.path(), "b.img", IMAGE_LEN, b"b");
    let vm = q35(&["pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(blockdev_add(&mut qmp, "drive-0", &img)["return"], json!({}));
    let backend = blk_backends(vm.pid());
    assert_eq!(backend.len(), 1);

    let refused = |qmp: &mut Qmp, args: Value| error_desc(&device_add(qmp, args));
    let mut no_bus = disk("drive-0", "pcie.1");
    no_bus.as_object_mut().unwrap().remove("bus");
    assert_eq!(refused(&mut qmp, no_bus), "Parameter 'bus' is missing");
    assert_eq!(
        refused(&mut qmp, disk("drive-0", "pcie.9")),
        "Bus 'pcie.9' not found"
    );
    assert_eq!(
        refused(&mut qmp, disk("drive-0", "pcie.0")),
        "Bus 'pcie.0' does not support hotplugging"
    );
    let mut addr = disk("drive-0", "pcie.1");
    addr["addr"] = json!("0x1");
    assert!(refused(&mut qmp, addr).contains("a root port has one slot, addr 0x0"));
    let mut unknown = disk("drive-0", "pcie.1");
    unknown["driver"] = json!("virtio-gpu-pci");
    assert!(refused(&mut qmp, unknown).contains("virtio-gpu-pci"));
    let mut mmio = disk("drive-0", "pcie.1");
    mmio["driver"] = json!("virtio-blk-mmio");
    assert!(refused(&mut qmp, mmio).contains("is the microvm machine's"));
    assert_eq!(
        refused(&mut qmp, disk("drive-9", "pcie.1")),
        "Failed to find block node 'drive-9'"
    );
    // None of that used the node or its backend.
    assert_eq!(blk_backends(vm.pid()), backend);

    assert_eq!(
        device_add(&mut qmp, disk("drive-0", "pcie.1"))["return"],
        json!({})
    );
    // query-block lists the card, with its node and image.
    let block = qmp.execute("query-block", None);
    let entries = block["return"].as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{block}");
    assert_eq!(entries[0]["qdev"], "drive-0");
    assert_eq!(entries[0]["inserted"]["node-name"], "drive-0");
    assert_eq!(entries[0]["inserted"]["file"], img.to_str().unwrap());
    // A second card for the same slot is refused; its node stays usable (and deletable).
    assert_eq!(
        blockdev_add(&mut qmp, "drive-1", &img2)["return"],
        json!({})
    );
    assert!(refused(&mut qmp, disk("drive-1", "pcie.1")).contains("holds a device"));
    assert_eq!(
        refused(&mut qmp, disk("drive-0", "pcie.1")),
        "drive-0 is already registered."
    );
    let second: Vec<u32> = blk_backends(vm.pid())
        .into_iter()
        .filter(|pid| !backend.contains(pid))
        .collect();
    assert_eq!(second.len(), 1);
    assert_eq!(
        qmp.execute("blockdev-del", Some(json!({"node-name": "drive-1"})))["return"],
        json!({})
    );
    assert!(wait_gone(second[0], Duration::from_secs(10)));

    // The guest never releases the slot: device_del answers at once, twice differently, and
    // the card stays with its node busy.
    let del = || Some(json!({"id": "drive-0"}));
    assert_eq!(qmp.execute("device_del", del())["return"], json!({}));
    assert_eq!(
        error_desc(&qmp.execute("device_del", del())),
        "Device drive-0 is already in the process of unplug"
    );
    assert!(
        error_desc(&qmp.execute("blockdev-del", Some(json!({"node-name": "drive-0"}))))
            .contains("is busy")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );
    assert!(
        qmp.events.iter().all(|e| e["event"] != "DEVICE_DELETED"),
        "no DEVICE_DELETED while the guest holds the card: {:?}",
        qmp.events
    );
    assert_eq!(blk_backends(vm.pid()), backend);

    // A q35 machine is snapshotted with its root ports and the card the guest holds.
    let snap = dir.path().join("snap");
    assert_eq!(qmp.migrate(&snap)["return"], json!({}));
    let state = std::fs::read(snap.join("state")).expect("the state file");
    let text = String::from_utf8_lossy(&state);
    assert!(
        text.contains(r#""bus":"pcie.1""#),
        "the card is in the state"
    );
}

#[test]
fn pci_cards_need_the_q35_machine() {
    if blk_backend_missing("pci_cards_need_the_q35_machine") {
        return;
    }
    let dir = TempDir::new("q35-hotplug");
    let img = image_with_marker(dir.path(), "a.img", IMAGE_LEN, b"a");
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("ready", Duration::from_secs(30));
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(blockdev_add(&mut qmp, "drive-0", &img)["return"], json!({}));
    assert!(error_desc(&device_add(&mut qmp, disk("drive-0", "pcie.1")))
        .contains("needs the q35 machine"));
}
