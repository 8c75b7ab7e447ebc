//! The standard machine (`-machine q35`) seen from inside the guest: the `pci_enum` guest
//! program enumerates PCI segment 0 through ECAM and port 0xCF8 on the host's KVM, and these
//! tests compare every line it prints with what Citadel's host bridge and PCIe root ports
//! must show: identities, the capability list, the root port's slot and link registers, bus
//! numbers the guest programs, empty slots and buses reading all-ones. The same program on
//! the microvm machine finds no PCI at all. Command lines that put a root port where it cannot
//! be fail before anything boots, and QMP drives a q35 VM as it drives a microvm one.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use citadel_tests::kernel::ConsoleProcess;
use citadel_tests::vm::{Qmp, TempDir};
use citadel_tests::{binary, guest_program};
use serde_json::json;

/// Generous: the whole enumeration takes well under a second even where KVM emulates guest
/// instructions.
const BOOT: Duration = Duration::from_secs(30);
/// What every line a guest program prints starts with.
const PREFIX: &str = "citadel-guest: ";
/// The program's last line, printed once everything else has been.
const DONE: &str = "pci-enum done";

/// Two root ports: a single-function one at 00:01.0 and a multifunction one at 00:02.0.
/// Their port numbers differ from their device numbers, so that the link and slot
/// capabilities show which of the two they were taken from.
const TWO_ROOT_PORTS: [&str; 4] = [
    "-device",
    "pcie-root-port,id=rp1,port=0x3,bus=pcie.0,addr=0x1",
    "-device",
    "pcie-root-port,id=rp2,port=0x4,bus=pcie.0,addr=0x2.0x0,chassis=2,multifunction=on",
];

/// A citadel process running a guest program, killed on drop.
struct Guest {
    console: ConsoleProcess,
    qmp_path: PathBuf,
    _dir: TempDir,
}

impl Guest {
    /// Starts `citadel -machine <machine> -m 64 -kernel <program>.elf -serial stdio -qmp ...`
    /// plus `extra`.
    fn start(machine: &str, program: &str, extra: &[&str]) -> Guest {
        let dir = TempDir::new("q35");
        let qmp_path = dir.path().join("qmp.sock");
        let mut cmd = Command::new(binary("citadel"));
        cmd.args(["-machine", machine, "-m", "64", "-kernel"])
            .arg(guest_program(program))
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp_path.display()))
            .args(["-serial", "stdio"])
            .args(extra);
        Guest {
            console: ConsoleProcess::spawn(cmd).expect("spawn citadel"),
            qmp_path,
            _dir: dir,
        }
    }

    /// The program's lines (prefix removed) up to and including the one containing `last`.
    fn lines_until(&mut self, last: &str) -> Vec<String> {
        let deadline = Instant::now() + BOOT;
        let mut lines = Vec::new();
        loop {
            for line in self.console.lines_for(Duration::from_millis(50)) {
                let Some(text) = line.strip_prefix(PREFIX) else {
                    continue;
                };
                lines.push(text.to_string());
                if text.contains(last) {
                    return lines;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no guest line containing {last:?} within {BOOT:?}\n{}",
                self.console.transcript()
            );
        }
    }

    /// Every line of one run of `pci_enum`, from its entry line to its summary.
    fn enumeration(&mut self) -> Vec<String> {
        let lines = self.lines_until(DONE);
        let start = lines
            .iter()
            .rposition(|l| l.starts_with("entry="))
            .unwrap_or_else(|| panic!("no entry line before the summary: {lines:?}"));
        lines[start..].to_vec()
    }
}

/// What `pci_enum` prints about a PCIe root port at `bdf` with port number `port`, which it
/// gives bus `bus` (secondary and subordinate). The port has a PCI Express capability at 0x40
/// (a root port with a slot), then a 64-bit MSI capability at 0x80 ending the list, and 4 KiB
/// of configuration space, the extended part reachable through ECAM. The slot has an
/// attention button, a power controller, attention and power indicators, native hot-plug, no
/// command-completed support and the port number as physical slot number; the link reports
/// data-link-layer activity. Nothing is plugged, so presence detect and the link are down and
/// bus `bus` is empty; the slot's power-controller bit reads back what is written.
fn root_port_lines(bdf: &str, port: u8, bus: u8) -> Vec<String> {
    vec![
        format!("caps {bdf} status-cap-list 1 0x40:10 0x80:05"),
        format!("extcfg {bdf} readable 1"),
        format!("msi {bdf} at 0x80 64bit 1"),
        format!("pcie {bdf} at 0x40 type 4 slot-implemented 1"),
        format!("slotcap {bdf} abp pcp aip pip hpc nccs psn {port}"),
        format!("linkcap {bdf} dll-active-reporting port {port}"),
        format!("slot {bdf} presence 0 dll-active 0"),
        format!("bridge {bdf} buses 00/00/00 -> 00/{bus:02x}/{bus:02x} cf8-same"),
        format!("behind {bdf} {bus:02x}:00.0 ecam 0xffffffff cf8 0xffffffff"),
        format!("slotctl {bdf} power-off 1 power-on 1"),
    ]
}

/// The lines `pci_enum` prints after the bridges: the host bridge probed directly, then
/// functions and buses where nothing is, through both mechanisms.
fn probe_lines(host_bridge: &str) -> Vec<String> {
    vec![
        format!("probe 00:00.0 ecam {host_bridge} cf8 {host_bridge}"),
        "probe 00:02.1 ecam 0xffffffff cf8 0xffffffff".into(),
        "probe 00:1f.0 ecam 0xffffffff cf8 0xffffffff".into(),
        "probe c8:00.0 ecam 0xffffffff cf8 0xffffffff".into(),
        "pci buses 1-255 ecam 0 cf8 0".into(),
    ]
}

/// The whole enumeration of a q35 VM with `functions` (lines after the prefix "pci ") on bus
/// 0 and the root ports `ports` (address, port number), given buses 1, 2, ... in that order.
fn q35_lines(entry: &str, functions: &[&str], ports: &[(&str, u8)]) -> Vec<String> {
    let mut lines = vec![
        format!("entry={entry}"),
        "pci cf8 address-register 0x80000000".into(),
        "pci cf8 disabled-data 0xffffffff".into(),
        "pci 00:00.0 8086:29c0 class 060000 hdr 00".into(),
    ];
    lines.extend(functions.iter().map(|f| format!("pci {f}")));
    lines.push("pci cf8 agrees".into());
    // Identity and class are read-only: the program's writes over them change nothing.
    lines.extend(
        std::iter::once("00:00.0 8086:29c0 class 060000")
            .chain(
                functions
                    .iter()
                    .map(|f| f.rsplit_once(" hdr ").map_or(*f, |(head, _)| head)),
            )
            .map(|f| format!("readonly {f}")),
    );
    for (i, (bdf, port)) in ports.iter().enumerate() {
        lines.extend(root_port_lines(bdf, *port, i as u8 + 1));
    }
    lines.extend(probe_lines("0x29c08086"));
    lines.push(format!(
        "{DONE} functions={} bridges={n} root-ports={n}",
        functions.len() + 1,
        n = ports.len()
    ));
    lines
}

/// Compares line by line, so that a failure names the first line that differs.
fn assert_lines(got: &[String], want: &[String]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "line {i} differs\ngot:\n{}", got.join("\n"));
    }
    assert_eq!(
        got.len(),
        want.len(),
        "different number of lines\ngot:\n{}\nwant:\n{}",
        got.join("\n"),
        want.join("\n")
    );
}

/// Boots `program` (the PVH or the 64-bit Linux entry build of `pci_enum`) on q35 with
/// [`TWO_ROOT_PORTS`] and checks the whole enumeration.
fn two_root_ports_seen_through(program: &str, entry: &str) {
    let mut guest = Guest::start("q35", program, &TWO_ROOT_PORTS);
    let got = guest.enumeration();
    let want = q35_lines(
        entry,
        &[
            "00:01.0 1b36:000c class 060400 hdr 01",
            "00:02.0 1b36:000c class 060400 hdr 81",
        ],
        &[("00:01.0", 3), ("00:02.0", 4)],
    );
    assert_lines(&got, &want);
}

#[test]
fn q35_guest_enumerates_the_host_bridge_and_two_root_ports() {
    two_root_ports_seen_through("pci_enum", "pvh");
}

#[test]
fn q35_boots_through_the_64bit_linux_entry_with_the_same_pci_segment() {
    two_root_ports_seen_through("pci_enum-linux64", "linux64");
}

#[test]
fn q35_without_devices_has_only_the_host_bridge() {
    let mut guest = Guest::start("q35", "pci_enum", &[]);
    let got = guest.enumeration();
    assert_lines(&got, &q35_lines("pvh", &[], &[]));
}

#[test]
fn q35_root_ports_as_functions_of_one_multifunction_device() {
    let mut guest = Guest::start(
        "q35",
        "pci_enum",
        &[
            "-device",
            "pcie-root-port,id=rp1,port=0x5,bus=pcie.0,addr=0x3.0x0,multifunction=on",
            "-device",
            "pcie-root-port,id=rp2,port=0x6,bus=pcie.0,addr=0x3.0x1,chassis=2",
        ],
    );
    let got = guest.enumeration();
    let want = q35_lines(
        "pvh",
        &[
            "00:03.0 1b36:000c class 060400 hdr 81",
            "00:03.1 1b36:000c class 060400 hdr 01",
        ],
        &[("00:03.0", 5), ("00:03.1", 6)],
    );
    assert_lines(&got, &want);
}

#[test]
fn microvm_guest_finds_no_pci_through_ecam_or_cf8() {
    let mut guest = Guest::start("microvm", "pci_enum", &[]);
    let got = guest.enumeration();
    // No host bridge: the ECAM window is unmapped MMIO and ports 0xCF8-0xCFF are decoded by
    // nothing, so every read, the address register's included, returns all-ones.
    let mut want: Vec<String> = vec![
        "entry=pvh".into(),
        "pci cf8 address-register 0xffffffff".into(),
        "pci cf8 disabled-data 0xffffffff".into(),
        "pci cf8 agrees".into(),
    ];
    want.extend(probe_lines("0xffffffff"));
    want.push(format!("{DONE} functions=0 bridges=0 root-ports=0"));
    assert_lines(&got, &want);
}

/// Runs citadel with `args` on the `pci_enum` program, expecting it to refuse the command
/// line: its exit code, console output and log, and whether the QMP socket was created.
fn run_refused(args: &[&str]) -> (i32, String, String, bool) {
    use std::io::Read;
    let dir = TempDir::new("q35-refused");
    let qmp_path = dir.path().join("qmp.sock");
    let child = Command::new(binary("citadel"))
        .args(["-m", "64", "-kernel"])
        .arg(guest_program("pci_enum"))
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", qmp_path.display()))
        .args(["-serial", "stdio"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn citadel");
    let mut child = citadel_tests::Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for citadel") {
            break status;
        }
        // The guest prints a few KiB at most, far less than a pipe holds, so a VM that
        // booted by mistake runs on here instead of blocking on its console.
        assert!(Instant::now() < deadline, "{args:?}: citadel kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut console, mut log) = (String::new(), String::new());
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    let mut stderr = child.0.stderr.take().expect("stderr is piped");
    stdout
        .read_to_string(&mut console)
        .expect("read the console");
    stderr.read_to_string(&mut log).expect("read the log");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("{args:?}: killed by a signal: {status}"));
    (code, console, log, qmp_path.exists())
}

#[test]
fn root_ports_that_cannot_be_placed_fail_before_anything_boots() {
    let port = |id: &str, number: u8, addr: &str| {
        format!("pcie-root-port,id={id},port={number:#x},bus=pcie.0,addr={addr}")
    };
    // Each case: the arguments, then groups of words of which the message must name at
    // least one per group.
    let cases: Vec<(Vec<String>, &[&[&str]])> = vec![
        // The microvm machine has no PCI segment.
        (
            vec![
                "-machine".into(),
                "microvm".into(),
                "-device".into(),
                port("rp1", 1, "0x1"),
            ],
            &[&["pcie-root-port"], &["q35", "microvm"]],
        ),
        // pcie.0 is the only bus a root port can sit on.
        (
            vec![
                "-machine".into(),
                "q35".into(),
                "-device".into(),
                "pcie-root-port,id=rp1,port=0x1,bus=pcie.1,addr=0x1".into(),
            ],
            &[&["pcie.1"]],
        ),
        // Two devices at one address.
        (
            vec![
                "-machine".into(),
                "q35".into(),
                "-device".into(),
                port("rp1", 1, "0x1"),
                "-device".into(),
                port("rp2", 2, "0x1"),
            ],
            &[&["00:01.0", "addr=0x1"]],
        ),
        // A second function beside a function 0 that is not multifunction.
        (
            vec![
                "-machine".into(),
                "q35".into(),
                "-device".into(),
                port("rp1", 1, "0x1"),
                "-device".into(),
                format!("{},chassis=2", port("rp2", 2, "0x1.0x1")),
            ],
            &[&["00:01.1", "addr=0x1.0x1"], &["multifunction"]],
        ),
    ];
    for (args, groups) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, console, log, socket) = run_refused(&args);
        assert_ne!(
            code, 0,
            "{args:?}: exit status 0
{log}"
        );
        assert_eq!(log.trim_end().lines().count(), 1, "{args:?}: {log}");
        assert!(log.starts_with("citadel: "), "{args:?}: {log}");
        for words in groups {
            assert!(
                words.iter().any(|w| log.contains(w)),
                "{args:?}: the message names none of {words:?}: {log}"
            );
        }
        assert!(console.is_empty(), "{args:?}: the guest ran: {console}");
        assert!(!socket, "{args:?}: the QMP socket was created");
    }
}

#[test]
fn qmp_starts_stops_and_quits_a_q35_vm() {
    let args = [&["-S"][..], &TWO_ROOT_PORTS[..]].concat();
    let mut guest = Guest::start("q35", "pci_enum", &args);
    let mut qmp = Qmp::negotiated(&guest.qmp_path);
    assert_eq!(
        qmp.execute("query-status", None),
        json!({"return": {"running": false, "singlestep": false, "status": "prelaunch"}})
    );
    let early = guest.console.lines_for(Duration::from_millis(300));
    assert!(early.is_empty(), "guest code ran before cont: {early:?}");

    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    let got = guest.enumeration();
    assert_eq!(
        got.last().map(String::as_str),
        Some("pci-enum done functions=3 bridges=2 root-ports=2"),
        "{got:?}"
    );
    assert_eq!(
        qmp.execute("query-status", None),
        json!({"return": {"running": true, "singlestep": false, "status": "running"}})
    );
    let cpus = qmp.execute("query-cpus", None);
    assert_eq!(cpus["return"].as_array().map(Vec::len), Some(1), "{cpus}");

    assert_eq!(qmp.execute("stop", None), json!({"return": {}}));
    qmp.wait_event("STOP");
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "paused"
    );
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    qmp.wait_event("RESUME");
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );

    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(guest.console.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!guest.qmp_path.exists(), "QMP socket removed at exit");
}

#[test]
fn system_reset_on_q35_boots_again_into_root_ports_with_no_bus_numbers() {
    let mut guest = Guest::start("q35", "pci_enum", &TWO_ROOT_PORTS);
    let want = q35_lines(
        "pvh",
        &[
            "00:01.0 1b36:000c class 060400 hdr 01",
            "00:02.0 1b36:000c class 060400 hdr 81",
        ],
        &[("00:01.0", 3), ("00:02.0", 4)],
    );
    assert_lines(&guest.enumeration(), &want);
    let mut qmp = Qmp::negotiated(&guest.qmp_path);
    assert_eq!(qmp.execute("system_reset", None), json!({"return": {}}));
    assert_eq!(
        qmp.wait_event("RESET")["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    // The run after the reset sees the same segment, and root ports without the bus numbers
    // the first run gave them: a reset puts every function back in its power-on state.
    assert_lines(&guest.enumeration(), &want);
}

/// The root port a card is hot-plugged into: 00:01.0, port number 1, named `pcie.1`.
const PCIE_1: [&str; 2] = [
    "-device",
    "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1",
];
/// The scratch disk: 1 MiB, 2048 sectors.
const DISK_LEN: usize = 1 << 20;
/// What the test writes at the start of sector 0 (31 bytes: the program prints 32, the last
/// a zero byte shown as a dot).
const DISK_MARKER: &[u8] = b"citadel-q35-disk-sector0-marker";
/// What `virtio_pci_blk` writes over sector 1, repeated.
const PCI_GUEST_PATTERN: &[u8] = b"citadel-guest-pci-blk-wrote-sector-one.";

/// The first line starting with `start` (the program's lines, prefix removed), its position
/// and the rest of it.
fn line_starting<'a>(lines: &'a [String], start: &str) -> (usize, &'a str) {
    lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.strip_prefix(start).map(|rest| (i, rest)))
        .unwrap_or_else(|| panic!("no line starting with {start:?}:\n{}", lines.join("\n")))
}

/// The program's lines (prefix removed) up to and including the one containing `last`,
/// taken one at a time, so that the lines after it stay for the next call.
fn lines_through(guest: &mut Guest, last: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = guest.console.wait_for(PREFIX, BOOT).unwrap_or_else(|| {
            panic!(
                "no guest line containing {last:?} within {BOOT:?}\n{}",
                guest.console.transcript()
            )
        });
        let Some(text) = line.strip_prefix(PREFIX) else {
            continue;
        };
        lines.push(text.to_string());
        if text.contains(last) {
            return lines;
        }
    }
}

/// A virtio-blk-pci card hot-plugged over QMP into a root port, driven by the
/// `virtio_pci_blk` guest program on the host's KVM as Linux's pciehp and virtio-pci drivers
/// would: the root port's MSI announces the plug, the card answers at 01:00.0 once the slot is
/// powered, BAR 0 and MSI-X are set up, virtio 1.x is negotiated through the common
/// configuration and requests served by the citadel-blk backend complete with the queue's
/// MSI-X interrupt. `device_del` presses the attention button; the card leaves, and
/// DEVICE_DELETED is sent, only once the guest has powered the slot off and turned its power
/// indicator off. The node keeps its backend until `blockdev-del` ends it.
#[test]
fn q35_guest_drives_a_hotplugged_virtio_blk_pci_card_and_releases_it() {
    if citadel_tests::disk::blk_backend_missing(
        "q35_guest_drives_a_hotplugged_virtio_blk_pci_card_and_releases_it",
    ) {
        return;
    }
    let dir = TempDir::new("q35-pci-blk");
    let image =
        citadel_tests::disk::image_with_marker(dir.path(), "disk.img", DISK_LEN, DISK_MARKER);
    let mut guest = Guest::start("q35", "virtio_pci_blk", &PCIE_1);
    let vm = guest.console.pid();

    // The port before the plug: bus 1 behind it, its memory window, its MSI aimed at local
    // APIC 0 and the slot's events enabled. The empty slot starts powered off (PCC set),
    // both indicators off.
    let want: Vec<String> = [
        "entry=pvh",
        "pci-blk port 00:01.0 1b36:000c pcie 0x40 msi 0x80",
        "pci-blk port buses 00/01/01 window 0xd0100000-0xd01fffff",
        "pci-blk port msi address 0xfee00000 data 0x50 enabled 1",
        "pci-blk slot control 07c0 -> 17e9",
        "pci-blk slot empty status 0000 presence 0 presence-changed 0 dll-changed 0 attention 0 \
         link-active 0 port-interrupts 0",
        "pci-blk waiting",
    ]
    .map(String::from)
    .to_vec();
    assert_lines(&lines_through(&mut guest, "pci-blk waiting"), &want);

    let mut qmp = Qmp::negotiated(&guest.qmp_path);
    assert!(citadel_tests::procfs::blk_backends(vm).is_empty());
    assert_eq!(
        qmp.execute(
            "blockdev-add",
            Some(json!({"node-name": "drive-0", "file": {"driver": "file", "filename": image}}))
        ),
        json!({"return": {}})
    );
    let pids = citadel_tests::procfs::blk_backends(vm);
    assert_eq!(
        pids.len(),
        1,
        "one citadel-blk after blockdev-add: {pids:?}"
    );
    let backend = pids[0];
    assert_eq!(
        qmp.execute(
            "device_add",
            Some(
                json!({"driver": "virtio-blk-pci", "id": "drive-0", "drive": "drive-0",
                "bus": "pcie.1", "addr": "0x0"})
            )
        ),
        json!({"return": {}})
    );

    let mut got = lines_through(&mut guest, "pci-blk done");
    // The device's features are its backend's: only the two the program asks for matter.
    let (at, features) = line_starting(&got, "pci-blk features device 0x");
    let (device, driver) = features
        .split_once(" driver ")
        .unwrap_or_else(|| panic!("{features}"));
    let device = u64::from_str_radix(device, 16).unwrap_or_else(|e| panic!("{features}: {e}"));
    assert_ne!(
        device & (1 << 32),
        0,
        "VIRTIO_F_VERSION_1 offered: {features}"
    );
    assert_ne!(
        device & (1 << 9),
        0,
        "VIRTIO_BLK_F_FLUSH offered: {features}"
    );
    assert_eq!(driver, "0x100000200");
    got[at] = "pci-blk features (checked)".into();
    // The program waits for an interrupt of the queue for each of its three requests.
    let (at, counts) = line_starting(&got, "pci-blk interrupts port 1 config 0 queue ");
    let queue: u64 = counts.parse().unwrap_or_else(|e| panic!("{counts}: {e}"));
    assert!(queue >= 3, "queue interrupts {queue}");
    got[at] = "pci-blk interrupts (checked)".into();
    let want: Vec<String> = [
        // One MSI for the plug: present, presence and data-link-layer state changed, link up.
        "pci-blk slot plugged status 0148 presence 1 presence-changed 1 dll-changed 1 \
         attention 0 link-active 1 port-interrupts 1",
        // The changes cleared by writing 1s; power on (PCC clear), power indicator on.
        "pci-blk slot acknowledged status 0040 control 11e9",
        "pci-blk card 01:00.0 1af4:1042 class 010000 hdr 00",
        "pci-blk caps status-cap-list 1 0x40:09 0x50:09 0x64:09 0x74:09 0x84:11 0x90:10",
        "pci-blk virtio-cap common bar 0 offset 0x0 length 0x38",
        "pci-blk virtio-cap notify bar 0 offset 0x2000 length 0x1000 multiplier 4",
        "pci-blk virtio-cap isr bar 0 offset 0x800 length 0x4",
        "pci-blk virtio-cap device bar 0 offset 0x1000 length 0x1000",
        "pci-blk msix table-size 2 table-bar 0 table-offset 0x3000 pba-bar 0 pba-offset 0x3800",
        "pci-blk pcie type 0",
        "pci-blk bar0 sizing 0xffffc000 size 0x4000 at 0xd0100000 command 0x6",
        "pci-blk msix control 0x8001 entry0 address 0xfee00000 data 0x51 control 0x0 \
         entry1 address 0xfee00000 data 0x52 control 0x0",
        "pci-blk reset status 0x0",
        "pci-blk features (checked)",
        "pci-blk features-ok set 1",
        "pci-blk queue 0 queues 1 size-max 256 size 4 msix-vector 1 enabled 1 notify 0x2000 \
         config-vector 0",
        "pci-blk driver-ok status 0xf",
        &format!("pci-blk capacity={}", DISK_LEN / 512),
        &format!(
            "pci-blk read status=0 sector0={}{}",
            String::from_utf8_lossy(DISK_MARKER),
            ".".repeat(32 - DISK_MARKER.len())
        ),
        "pci-blk write status=0",
        "pci-blk flush status=0",
        "pci-blk interrupts (checked)",
        "pci-blk done",
    ]
    .map(String::from)
    .to_vec();
    assert_lines(&got, &want);
    // Flushed: the bytes are in the image.
    let written = std::fs::read(&image).unwrap()[512..1024].to_vec();
    let expected: Vec<u8> = PCI_GUEST_PATTERN
        .iter()
        .copied()
        .cycle()
        .take(512)
        .collect();
    assert_eq!(written, expected, "sector 1 of the image");

    // device_del only presses the attention button: the card stays until the guest lets go.
    qmp.events.clear();
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "drive-0"}))),
        json!({"return": {}})
    );
    assert!(
        qmp.events.iter().all(|e| e["event"] != "DEVICE_DELETED"),
        "DEVICE_DELETED before the guest released the slot: {:?}",
        qmp.events
    );
    let want: Vec<String> = [
        "pci-blk unplug requested status 0041 presence 1 presence-changed 0 dll-changed 0 \
         attention 1 link-active 1 port-interrupts 2",
        "pci-blk device reset status 0x0",
        "pci-blk slot powered-off control 15e9",
    ]
    .map(String::from)
    .to_vec();
    assert_lines(
        &lines_through(&mut guest, "pci-blk slot powered-off"),
        &want,
    );
    // Powered off with its power indicator still on (the program waits two seconds before
    // turning it off): the card is still in the slot.
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );
    assert!(
        qmp.events.iter().all(|e| e["event"] != "DEVICE_DELETED"),
        "DEVICE_DELETED while the power indicator was on: {:?}",
        qmp.events
    );
    assert_lines(
        &lines_through(&mut guest, "pci-blk released"),
        &["pci-blk released control 17e9".to_string()],
    );
    assert_eq!(
        qmp.wait_event("DEVICE_DELETED")["data"],
        json!({"device": "drive-0", "path": "drive-0"})
    );
    // The card's absence is announced in turn, and bus 1 is empty.
    let want: Vec<String> = [
        "pci-blk slot removed status 0108 presence 0 presence-changed 1 dll-changed 1 \
         attention 0 link-active 0 port-interrupts 3",
        "pci-blk gone status 0x0 card 0xffffffff",
        "pci-blk idle",
    ]
    .map(String::from)
    .to_vec();
    assert_lines(&lines_through(&mut guest, "pci-blk idle"), &want);

    // The node keeps its backend, still connected, until blockdev-del ends it.
    assert_eq!(
        citadel_tests::procfs::blk_backends(vm),
        vec![backend],
        "the node's citadel-blk ended with the card"
    );
    assert_eq!(
        qmp.execute("blockdev-del", Some(json!({"node-name": "drive-0"}))),
        json!({"return": {}})
    );
    assert!(
        citadel_tests::procfs::wait_gone(backend, Duration::from_secs(5)),
        "citadel-blk[{backend}] outlived blockdev-del"
    );
    assert!(citadel_tests::procfs::blk_backends(vm).is_empty());
}
