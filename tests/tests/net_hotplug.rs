//! NIC hotplug over QMP on the lightweight machine, with StratoVirt's guide's commands:
//! `netdev_add` starts a citadel-net process on a tap, `device_add` plugs it into a
//! hot-replace NIC slot the guest has driven since boot (the link comes up), `device_del`
//! takes it out (DEVICE_DELETED before the return, the link goes down, the netdev stays) and
//! `netdev_del` ends the process. The `virtio_net` guest program reports the link status and
//! sends a frame at each step; the test reads the frames that reach the tap.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use citadel_tests::disk::error_desc;
use citadel_tests::guest_program;
use citadel_tests::netns::unique;
use citadel_tests::procfs::{net_backends as backends, status, status_field, wait_gone};
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(30);
/// EtherType of the guest program's frames (local experimental).
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// NIC slot 0: virtio-mmio slot 6 (after the six disk slots), IOAPIC pin 14.
const NIC_SLOT_0: &str = "virtio_mmio.device=4K@0xd0006000:14";

/// True (and the test reported as skipped) when citadel-net, root or the tun device is
/// missing.
fn cannot_run(test: &str) -> bool {
    if !citadel_tests::binary("citadel-net").exists() {
        citadel_tests::skip(
            test,
            "citadel-net not built (cargo build --workspace)",
            true,
        );
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        citadel_tests::skip(test, "needs root and /dev/net/tun for the tap", true);
        return true;
    }
    false
}

/// A persistent tap, up, that exists for the lifetime of the guard: frames citadel-net
/// writes to it are received by the host on that interface.
struct Tap(String);

impl Tap {
    fn create() -> Tap {
        let name = unique("cnh");
        for args in [
            vec!["tuntap", "add", "dev", &name, "mode", "tap"],
            vec!["link", "set", &name, "up"],
        ] {
            let ok = Command::new("ip").args(&args).status().unwrap().success();
            assert!(ok, "ip {args:?} failed");
        }
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// A packet socket receiving every frame on one interface.
struct Capture(OwnedFd);

impl Capture {
    fn on(ifname: &str) -> Capture {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain integers, so all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind reads a live sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt reads a live timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Capture(fd)
    }

    /// The payloads of the guest program's frames seen within `window`, with their source
    /// MAC; stops early once `until` has been seen.
    fn guest_frames(&self, window: Duration, until: Option<&str>) -> Vec<([u8; 6], String)> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: recv writes at most buf.len() bytes into the live buffer.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 14 || buf[12..14] != ETHERTYPE {
                continue;
            }
            let payload: String = buf[14..n as usize]
                .iter()
                .take_while(|b| **b != 0)
                .map(|b| *b as char)
                .collect();
            let mut src = [0u8; 6];
            src.copy_from_slice(&buf[6..12]);
            let done = until.is_some_and(|u| payload == u);
            frames.push((src, payload));
            if done {
                break;
            }
        }
        frames
    }
}

fn netdev_add(qmp: &mut Qmp, id: &str, ifname: &str) -> Value {
    qmp.execute("netdev_add", Some(json!({"id": id, "ifname": ifname})))
}

fn device_add(qmp: &mut Qmp, id: &str, addr: &str, netdev: &str) -> Value {
    qmp.execute(
        "device_add",
        Some(json!({"id": id, "driver": "virtio-net-mmio", "addr": addr, "netdev": netdev})),
    )
}
#[test]
fn a_nic_plugged_over_qmp_carries_the_guests_frames_to_the_tap() {
    if cannot_run("a_nic_plugged_over_qmp_carries_the_guests_frames_to_the_tap") {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    let mut vm = Vm::start(
        &guest_program("virtio_net"),
        &["-m", "32", "-append", NIC_SLOT_0],
    );
    let line = vm.wait_serial("citadel-guest: virtio-mmio base=", STEP);
    assert!(
        line.contains("base=0xd0006000 version=2 device=1"),
        "{line}"
    );
    let line = vm.wait_serial("citadel-guest: virtio-net mac=", STEP);
    assert!(line.ends_with("mac=52:54:00:c1:7a:00"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-net boot link=", STEP);
    assert!(line.ends_with("link=0"), "{line}");
    // The empty slot consumes the frame (the driver's TX ring never fills up) and drops it.
    let line = vm.wait_serial("citadel-guest: virtio-net boot tx-used=", STEP);
    assert!(line.ends_with("tx-used=1"), "{line}");
    vm.wait_serial("citadel-guest: virtio-net waiting-for-change-1", STEP);

    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert!(backends(vm.pid()).is_empty());
    assert_eq!(netdev_add(&mut qmp, "net-0", &tap.0), json!({"return": {}}));
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "one citadel-net after netdev_add: {pids:?}");
    let backend = pids[0];
    let st = status(backend).unwrap();
    assert_eq!(status_field(&st, "Seccomp"), "2", "{st}");
    assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{st}");
    // The guide's device_add, with the slot's own MAC spelled out as Kata does.
    assert_eq!(
        qmp.execute(
            "device_add",
            Some(
                json!({"id": "net-0", "driver": "virtio-net-mmio", "netdev": "net-0",
                "addr": "0x0", "mac": "52:54:00:c1:7a:00"})
            ),
        ),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-1 link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-net change-1 tx-used=", STEP);
    assert!(line.ends_with("tx-used=2"), "{line}");
    let frames = capture.guest_frames(
        Duration::from_secs(5),
        Some("citadel-guest-frame-after-change-1"),
    );
    let payloads: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(
        payloads,
        vec!["citadel-guest-frame-after-change-1"],
        "{frames:?}"
    );
    assert_eq!(frames[0].0, [0x52, 0x54, 0x00, 0xc1, 0x7a, 0x00]);
    vm.wait_serial("citadel-guest: virtio-net waiting-for-change-2", STEP);

    qmp.events.clear();
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "net-0"}))),
        json!({"return": {}})
    );
    let deleted: Vec<&Value> = qmp
        .events
        .iter()
        .filter(|e| e["event"] == "DEVICE_DELETED")
        .collect();
    assert_eq!(deleted.len(), 1, "{:?}", qmp.events);
    assert_eq!(
        deleted[0]["data"],
        json!({"device": "net-0", "path": "net-0"})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-2 link=", STEP);
    assert!(line.ends_with("link=0"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-net change-2 tx-used=", STEP);
    assert!(line.ends_with("tx-used=3"), "{line}");
    let frames = capture.guest_frames(Duration::from_millis(500), None);
    assert!(frames.is_empty(), "frames after the unplug: {frames:?}");
    // Unlike a disk's node, the netdev outlives device_del, as in StratoVirt's guide.
    assert_eq!(backends(vm.pid()), vec![backend]);
    assert_eq!(
        qmp.execute("netdev_del", Some(json!({"id": "net-0"}))),
        json!({"return": {}})
    );
    assert!(
        wait_gone(backend, Duration::from_secs(5)),
        "citadel-net[{backend}] outlived netdev_del"
    );
}

#[test]
fn refused_nic_commands_change_nothing() {
    if cannot_run("refused_nic_commands_change_nothing") {
        return;
    }
    let tap = Tap::create();
    let other = Tap::create();
    let vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    let reply = device_add(&mut qmp, "nic-a", "0x0", "net-0");
    assert_eq!(error_desc(&reply), "Failed to find netdev 'net-0'");
    let reply = qmp.execute("netdev_add", Some(json!({"id": "net-0", "ifname": "../x"})));
    assert!(
        error_desc(&reply).starts_with("Parameter 'ifname' expects"),
        "{reply}"
    );
    assert!(backends(vm.pid()).is_empty());

    assert_eq!(netdev_add(&mut qmp, "net-0", &tap.0), json!({"return": {}}));
    let reply = netdev_add(&mut qmp, "net-0", &other.0);
    assert_eq!(error_desc(&reply), "net-0 is already registered.");
    assert_eq!(backends(vm.pid()).len(), 1);

    for addr in ["0x2", "7", "zz"] {
        let reply = device_add(&mut qmp, "nic-a", addr, "net-0");
        assert_eq!(
            error_desc(&reply),
            "Invalid addr for device nic-a",
            "addr {addr}"
        );
    }
    let reply = qmp.execute(
        "device_add",
        Some(
            json!({"id": "nic-a", "driver": "virtio-net-mmio", "addr": "0x0",
            "netdev": "net-0", "mac": "52:54:00:12:34:56"}),
        ),
    );
    assert_eq!(
        error_desc(&reply),
        "Device nic-a cannot have MAC 52:54:00:12:34:56: the guest's driver read the MAC of NIC slot 0, 52:54:00:c1:7a:00, when it probed the slot at boot, and it does not change"
    );
    let reply = qmp.execute(
        "device_add",
        Some(
            json!({"id": "nic-a", "driver": "virtio-net-mmio", "netdev": "net-0",
            "drive": "drive-0"}),
        ),
    );
    assert_eq!(error_desc(&reply), "Parameter 'drive' is unexpected");
    let reply = qmp.execute(
        "device_add",
        Some(json!({"id": "nic-a", "driver": "virtio-net-pci", "netdev": "net-0"})),
    );
    assert!(
        error_desc(&reply).starts_with("virtio-net-pci needs the q35 machine"),
        "{reply}"
    );

    // Plugged while the guest never drove the slot: the NIC waits for the driver.
    assert_eq!(
        device_add(&mut qmp, "nic-a", "1", "net-0"),
        json!({"return": {}})
    );
    let reply = device_add(&mut qmp, "nic-b", "0x0", "net-0");
    assert_eq!(
        error_desc(&reply),
        "Netdev 'net-0' is already in use by device 'nic-a'"
    );
    assert_eq!(
        netdev_add(&mut qmp, "net-1", &other.0),
        json!({"return": {}})
    );
    let reply = device_add(&mut qmp, "nic-b", "0x1", "net-1");
    assert_eq!(error_desc(&reply), "The slot 1 is occupied already.");
    let reply = device_add(&mut qmp, "nic-a", "0x0", "net-1");
    assert_eq!(error_desc(&reply), "nic-a is already registered.");
    let reply = qmp.execute("netdev_del", Some(json!({"id": "net-0"})));
    assert_eq!(
        error_desc(&reply),
        "Netdev 'net-0' is busy: device 'nic-a' uses it"
    );
    let reply = qmp.execute("netdev_del", Some(json!({"id": "nope"})));
    assert_eq!(error_desc(&reply), "Failed to find netdev 'nope'");
    assert_eq!(backends(vm.pid()).len(), 2);

    // Without addr, the first free slot.
    assert_eq!(
        qmp.execute(
            "device_add",
            Some(json!({"id": "nic-b", "driver": "virtio-net-mmio", "netdev": "net-1"})),
        ),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "nic-a"}))),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "nic-b"}))),
        json!({"return": {}})
    );
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 2, "netdevs outlive device_del: {pids:?}");
    for id in ["net-0", "net-1"] {
        assert_eq!(
            qmp.execute("netdev_del", Some(json!({"id": id}))),
            json!({"return": {}})
        );
    }
    for pid in pids {
        assert!(wait_gone(pid, Duration::from_secs(5)), "citadel-net[{pid}]");
    }
    let reply = qmp.execute("device_del", Some(json!({"id": "nic-a"})));
    assert_eq!(reply["error"]["class"], "DeviceNotFound", "{reply}");
}

#[test]
fn a_nic_on_the_command_line_is_up_at_boot_and_leaves_like_a_hotplugged_one() {
    if cannot_run("a_nic_on_the_command_line_is_up_at_boot_and_leaves_like_a_hotplugged_one") {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    let netdev = format!("tap,id=net0,ifname={},script=no,downscript=no", tap.0);
    let mut vm = Vm::start(
        &guest_program("virtio_net"),
        &[
            "-m",
            "32",
            "-append",
            NIC_SLOT_0,
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-device,netdev=net0,id=eth0,mac=52:54:00:c1:7a:00",
        ],
    );
    let line = vm.wait_serial("citadel-guest: virtio-net boot link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-net boot tx-used=", STEP);
    assert!(line.ends_with("tx-used=1"), "{line}");
    let frames = capture.guest_frames(Duration::from_secs(5), Some("citadel-guest-frame-at-boot"));
    let payloads: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(payloads, vec!["citadel-guest-frame-at-boot"], "{frames:?}");
    vm.wait_serial("citadel-guest: virtio-net waiting-for-change-1", STEP);
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let backend = pids[0];
    assert_eq!(status_field(&status(backend).unwrap(), "Seccomp"), "2");

    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "eth0"}))),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-1 link=", STEP);
    assert!(line.ends_with("link=0"), "{line}");
    let line = vm.wait_serial("citadel-guest: virtio-net change-1 tx-used=", STEP);
    assert!(line.ends_with("tx-used=2"), "{line}");
    let frames = capture.guest_frames(Duration::from_millis(500), None);
    assert!(frames.is_empty(), "frames after the unplug: {frames:?}");
    assert_eq!(backends(vm.pid()), vec![backend]);
    // The netdev of the command line goes back into a slot like any other.
    assert_eq!(
        device_add(&mut qmp, "eth0", "0x0", "net0"),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-2 link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let frames = capture.guest_frames(
        Duration::from_secs(5),
        Some("citadel-guest-frame-after-change-2"),
    );
    let payloads: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(
        payloads,
        vec!["citadel-guest-frame-after-change-2"],
        "{frames:?}"
    );
}

#[test]
fn a_command_line_nic_with_another_mac_than_its_slot_is_refused() {
    if cannot_run("a_command_line_nic_with_another_mac_than_its_slot_is_refused") {
        return;
    }
    let tap = Tap::create();
    let out = Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "32", "-kernel"])
        .arg(guest_program("idle"))
        .args(["-serial", "none", "-netdev"])
        .arg(format!("tap,id=net0,ifname={}", tap.0))
        .args([
            "-device",
            "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.trim_end(),
        "citadel: -device virtio-net-device net0: Device net0 cannot have MAC 52:54:00:12:34:56: the guest's driver read the MAC of NIC slot 0, 52:54:00:c1:7a:00, when it probed the slot at boot, and it does not change"
    );
}

#[test]
fn a_netdev_whose_backend_died_is_dropped_at_device_add_and_the_slot_stays_usable() {
    if cannot_run("a_netdev_whose_backend_died_is_dropped_at_device_add_and_the_slot_stays_usable")
    {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    let mut vm = Vm::start(
        &guest_program("virtio_net"),
        &["-m", "32", "-append", NIC_SLOT_0],
    );
    vm.wait_serial("citadel-guest: virtio-net waiting-for-change-1", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(netdev_add(&mut qmp, "net-0", &tap.0), json!({"return": {}}));
    let dead = backends(vm.pid())[0];
    // SAFETY: kill with a pid this test read from /proc and a constant signal.
    assert_eq!(unsafe { libc::kill(dead as i32, libc::SIGKILL) }, 0);
    assert!(wait_gone(dead, Duration::from_secs(5)));
    // The slot's rings cannot be handed to a dead backend: refused, and the netdev is gone.
    let reply = device_add(&mut qmp, "net-0", "0x0", "net-0");
    assert!(
        error_desc(&reply)
            .starts_with("starting the NIC's backend: vhost-user backend at citadel-net["),
        "{reply}"
    );
    let reply = qmp.execute("netdev_del", Some(json!({"id": "net-0"})));
    assert_eq!(error_desc(&reply), "Failed to find netdev 'net-0'");
    // The slot kept its rings: a new netdev plugs into it and the guest's frame gets through.
    assert_eq!(netdev_add(&mut qmp, "net-1", &tap.0), json!({"return": {}}));
    assert_eq!(
        device_add(&mut qmp, "net-1", "0x0", "net-1"),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-1 link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let frames = capture.guest_frames(
        Duration::from_secs(5),
        Some("citadel-guest-frame-after-change-1"),
    );
    let payloads: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(
        payloads,
        vec!["citadel-guest-frame-after-change-1"],
        "{frames:?}"
    );
}

#[test]
fn a_tap_passed_with_getfd_serves_a_hot_plugged_nic() {
    if cannot_run("a_tap_passed_with_getfd_serves_a_hot_plugged_nic") {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    // The management opens the tap, as Kata does, and passes it: the VMM never names it.
    let queue = citadel_tap::open_by_name(&tap.0, 1)
        .expect("open the tap")
        .remove(0);
    let mut vm = Vm::start(
        &guest_program("virtio_net"),
        &["-m", "32", "-append", NIC_SLOT_0],
    );
    vm.wait_serial("citadel-guest: virtio-net waiting-for-change-1", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        qmp.execute_with_fds(
            "getfd",
            Some(json!({"fdname": "tapfd"})),
            &[queue.as_raw_fd()]
        ),
        json!({"return": {}})
    );
    drop(queue);
    // Refusals before the descriptor is used leave it kept.
    let reply = qmp.execute(
        "netdev_add",
        Some(json!({"id": "net-0", "ifname": tap.0, "fds": "tapfd"})),
    );
    assert_eq!(
        error_desc(&reply),
        "ifname= and fds= are mutually exclusive"
    );
    let reply = qmp.execute("netdev_add", Some(json!({"id": "net-0", "fds": "other"})));
    assert_eq!(
        error_desc(&reply),
        "File descriptor named 'other' not found"
    );
    assert_eq!(
        qmp.execute(
            "netdev_add",
            Some(json!({"id": "net-0", "type": "tap", "fds": "tapfd"}))
        ),
        json!({"return": {}})
    );
    // netdev_add took the descriptor, as QEMU's monitor does.
    let reply = qmp.execute("closefd", Some(json!({"fdname": "tapfd"})));
    assert_eq!(
        error_desc(&reply),
        "File descriptor named 'tapfd' not found"
    );
    assert_eq!(backends(vm.pid()).len(), 1);
    assert_eq!(
        device_add(&mut qmp, "net-0", "0x0", "net-0"),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-1 link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let frames = capture.guest_frames(
        Duration::from_secs(5),
        Some("citadel-guest-frame-after-change-1"),
    );
    let payloads: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(
        payloads,
        vec!["citadel-guest-frame-after-change-1"],
        "{frames:?}"
    );
}

#[test]
fn a_tap_inherited_with_netdev_fds_carries_the_guests_frames() {
    if cannot_run("a_tap_inherited_with_netdev_fds_carries_the_guests_frames") {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    // The parent opens the tap, as Kata does, and passes it open: the VMM never names it.
    let queue = citadel_tap::open_by_name(&tap.0, 1)
        .expect("open the tap")
        .remove(0);
    let fd = queue.as_raw_fd();
    let netdev = format!("tap,id=net0,fds={fd},vhost=off,script=no,downscript=no");
    let mut vm = Vm::start_inheriting(
        &guest_program("virtio_net"),
        &[
            "-m",
            "32",
            "-append",
            NIC_SLOT_0,
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-device,netdev=net0,id=eth0",
        ],
        &[fd],
    );
    // Only citadel-net holds the tap now.
    drop(queue);
    let line = vm.wait_serial("citadel-guest: virtio-net boot link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let frames = capture.guest_frames(Duration::from_secs(5), Some("citadel-guest-frame-at-boot"));
    let payloads: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(payloads, vec!["citadel-guest-frame-at-boot"], "{frames:?}");
    assert_eq!(frames[0].0, [0x52, 0x54, 0x00, 0xc1, 0x7a, 0x00]);
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    // The VMM keeps one duplicate, to restart citadel-net on the same tap should it die; the
    // backend has its own.
    let tun_links = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|target| target.to_str() == Some("/dev/net/tun"))
            .count()
    };
    assert_eq!(tun_links(vm.pid()), 1);
    assert_eq!(tun_links(pids[0]), 1);
}

#[test]
fn a_netdev_fds_that_is_no_open_tap_is_refused_before_the_vm_starts() {
    use std::os::unix::process::CommandExt;
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = null.as_raw_fd();
    // A number nothing in this process has open in the child: above every descriptor here.
    let closed = 900;
    for (number, why) in [
        (fd, format!("descriptor {fd} is not a tap (TUNGETIFF:")),
        (closed, "Bad file descriptor".to_string()),
    ] {
        let mut cmd = Command::new(citadel_tests::binary("citadel"));
        // SAFETY: fcntl is async-signal-safe and changes only the child's descriptor.
        unsafe {
            cmd.pre_exec(move || {
                libc::fcntl(fd, libc::F_SETFD, 0);
                Ok(())
            });
        }
        let out = cmd
            .args(["-machine", "microvm", "-m", "32", "-kernel"])
            .arg(guest_program("idle"))
            .args(["-serial", "none", "-netdev"])
            .arg(format!("tap,id=net0,fds={number}"))
            .args(["-device", "virtio-net-device,netdev=net0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("citadel: -netdev tap,id=net0,fds={number}: ")),
            "{err}"
        );
        assert!(err.contains(&why), "{err}");
    }
}

/// The guest program's command line for NIC slot 0 in `restart` mode.
fn streaming_append() -> String {
    format!("{NIC_SLOT_0} restart")
}

/// Boots the `virtio_net` guest program in `restart` mode on NIC slot 0, plugs a NIC on
/// `tap` as `net-0` and waits for its stream of numbered frames to start; returns the VM, a
/// negotiated QMP client and the guest's first count line.
fn streaming_nic(tap: &Tap) -> (Vm, Qmp, String) {
    let mut vm = Vm::start(
        &guest_program("virtio_net"),
        &["-m", "32", "-append", &streaming_append()],
    );
    vm.wait_serial("citadel-guest: virtio-net waiting-for-change-1", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(netdev_add(&mut qmp, "net-0", &tap.0), json!({"return": {}}));
    assert_eq!(
        device_add(&mut qmp, "net-0", "0x0", "net-0"),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net ticks=", STEP);
    (vm, qmp, line)
}

#[test]
fn a_killed_nic_backend_is_restarted_on_the_same_tap_and_frames_flow_again() {
    if cannot_run("a_killed_nic_backend_is_restarted_on_the_same_tap_and_frames_flow_again") {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    let (mut vm, mut qmp, line) = streaming_nic(&tap);
    let ticks: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
    let pids = backends(vm.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: kill has no memory preconditions; the pid is the NIC's backend.
    assert_eq!(unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) }, 0);

    const TOOK_OVER: &str = "NIC net-0: its backend hung up; citadel-net[";
    let deadline = Instant::now() + Duration::from_secs(10);
    let second: u32 = loop {
        let log = vm.log();
        if let Some(line) = log.lines().find(|l| l.contains(TOOK_OVER)) {
            let rest = line.split(TOOK_OVER).nth(1).unwrap();
            break rest[..rest.find(']').unwrap()].parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "citadel-net was not restarted\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_ne!(second, pids[0]);
    assert_eq!(backends(vm.pid()), vec![second]);
    // A frame the guest sends 2 s after the kill reaches the tap through the new backend,
    // and the guest never saw its transmit ring stall for good.
    let later = format!("citadel-guest-frame-tick-{:05}", ticks + 100);
    let frames = capture.guest_frames(Duration::from_secs(15), Some(&later));
    assert_eq!(
        frames.last().map(|f| f.1.as_str()),
        Some(later.as_str()),
        "{}",
        vm.transcript()
    );
    assert!(
        !vm.transcript().contains("error=tx-timeout"),
        "{}",
        vm.transcript()
    );

    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "net-0"}))),
        json!({"return": {}})
    );
    let line = vm.wait_serial("citadel-guest: virtio-net change-2 link=", STEP);
    assert!(line.ends_with("link=0"), "{line}");
    assert_eq!(
        qmp.execute("netdev_del", Some(json!({"id": "net-0"}))),
        json!({"return": {}})
    );
    assert!(wait_gone(second, Duration::from_secs(5)));
}

#[test]
fn a_nic_backend_that_keeps_dying_takes_the_link_down_and_the_vm_lives_on() {
    if cannot_run("a_nic_backend_that_keeps_dying_takes_the_link_down_and_the_vm_lives_on") {
        return;
    }
    let tap = Tap::create();
    let (mut vm, mut qmp, _) = streaming_nic(&tap);
    const TOOK_OVER: &str = "NIC net-0: its backend hung up; citadel-net[";
    const GAVE_UP: &str = "NIC net-0: its backend hung up and cannot be restarted";
    let mut pid = backends(vm.pid())[0];
    // Three restarts a minute are allowed; the fourth death is final.
    for round in 1..=4 {
        // SAFETY: kill has no memory preconditions; the pid is the NIC's backend.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = vm.log();
            let took_over: Vec<&str> = log.lines().filter(|l| l.contains(TOOK_OVER)).collect();
            if round == 4 && log.contains(GAVE_UP) {
                assert_eq!(took_over.len(), 3, "{log}");
                break;
            }
            if round < 4 && took_over.len() == round {
                let rest = took_over[round - 1].split(TOOK_OVER).nth(1).unwrap();
                pid = rest[..rest.find(']').unwrap()].parse().unwrap();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}\n{}",
                vm.transcript()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The driver learns of it through a configuration change: the link is down.
    let line = vm.wait_serial("citadel-guest: virtio-net change-2 link=", STEP);
    assert!(line.ends_with("link=0"), "{line}");
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], "running", "{status}");
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "net-0"}))),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("netdev_del", Some(json!({"id": "net-0"}))),
        json!({"return": {}})
    );
    assert!(backends(vm.pid()).is_empty(), "{:?}", backends(vm.pid()));
}

/// A VM whose NIC is served by citadel-net is snapshotted while its guest sends a stream of
/// frames: `migrate` stops the backend for the snapshot and starts it again, so frames flow
/// on after `cont`. The VM restored from a second snapshot, with the same tap on the command
/// line, gets a new citadel-net that takes both rings from the saved used indices: the
/// guest, which never boots again, sees the plug's configuration change with the link up,
/// and its next frame reaches the tap with the transmit ring's count going on from where it
/// was.
#[test]
fn a_vm_with_a_nic_backend_is_snapshotted_mid_stream_and_restored_with_a_new_backend() {
    if cannot_run(
        "a_vm_with_a_nic_backend_is_snapshotted_mid_stream_and_restored_with_a_new_backend",
    ) {
        return;
    }
    let tap = Tap::create();
    let capture = Capture::on(&tap.0);
    let tmp = TempDir::new("snapshot-nic");
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let (mut vm, mut qmp, _) = streaming_nic(&tap);
    vm.wait_serial("citadel-guest: virtio-net ticks=10", STEP);
    assert_eq!(qmp.migrate(&first), json!({"return": {}}));
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    let line = vm.wait_serial("citadel-guest: virtio-net ticks=", STEP);
    let ticks: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
    let later = format!("citadel-guest-frame-tick-{:05}", ticks + 20);
    let frames = capture.guest_frames(Duration::from_secs(15), Some(&later));
    assert_eq!(
        frames.last().map(|f| f.1.as_str()),
        Some(later.as_str()),
        "{}",
        vm.transcript()
    );
    assert_eq!(qmp.migrate(&second), json!({"return": {}}));
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!vm.transcript().contains("error="), "{}", vm.transcript());

    let netdev = format!("tap,id=net-0,ifname={}", tap.0);
    let incoming = format!("file:{}", second.display());
    let mut restored = Vm::start(
        &guest_program("virtio_net"),
        &[
            "-m",
            "32",
            "-append",
            &streaming_append(),
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-device,netdev=net-0,id=net-0",
            "-incoming",
            &incoming,
        ],
    );
    let line = restored.wait_serial("citadel-guest: virtio-net change-2 link=", STEP);
    assert!(line.ends_with("link=1"), "{line}");
    let frames = capture.guest_frames(
        Duration::from_secs(5),
        Some("citadel-guest-frame-after-change-2"),
    );
    assert_eq!(
        frames.last().map(|f| f.1.as_str()),
        Some("citadel-guest-frame-after-change-2"),
        "{frames:?}"
    );
    let line = restored.wait_serial("citadel-guest: virtio-net change-2 tx-used=", STEP);
    let used: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
    assert!(used > ticks + 20, "{line}: the ring started again");
    let transcript = restored.transcript();
    assert!(
        !transcript.contains("virtio-net boot") && !transcript.contains("error="),
        "{transcript}"
    );
    assert_eq!(backends(restored.pid()).len(), 1);
    let mut qmp = Qmp::negotiated(&restored.qmp_path);
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(restored.wait_exit(Duration::from_secs(10)), Some(0));
}
