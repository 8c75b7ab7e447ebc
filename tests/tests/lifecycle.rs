//! The lifecycle transcript of the "Managing VMs" guide, against a real citadel process booting
//! the guest test programs, observed on the serial port, the QMP socket and /proc.

use std::time::Duration;

use citadel_tests::guest_program;
use citadel_tests::vm::{Qmp, Vm};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(20);

fn counter_of(line: &str) -> Option<u64> {
    line.split("counter=").nth(1)?.trim().parse().ok()
}

fn assert_timestamp(event: &Value) {
    let ts = &event["timestamp"];
    assert!(ts["seconds"].as_u64().unwrap() > 1_600_000_000, "{event}");
    assert!(ts["microseconds"].as_u64().unwrap() < 1_000_000, "{event}");
}

#[test]
fn guide_lifecycle_transcript() {
    let mut vm = Vm::start(&guest_program("counter"), &["-smp", "2", "-m", "64"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    vm.wait_serial("counter=", BOOT);

    let mut qmp = Qmp::connect(&vm.qmp_path, Duration::from_secs(5));
    assert_eq!(
        qmp.greeting["QMP"]["version"]["qemu"],
        json!({"major": 5, "minor": 0, "micro": 1})
    );
    assert_eq!(
        qmp.greeting["QMP"]["version"]["package"],
        concat!("citadel-", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(qmp.greeting["QMP"]["capabilities"], json!([]));
    assert_eq!(qmp.execute("qmp_capabilities", None), json!({"return": {}}));

    assert_eq!(
        qmp.execute("query-status", None),
        json!({"return": {"running": true, "singlestep": false, "status": "running"}})
    );

    // query-cpus: one entry per vCPU, each thread id a real task of the citadel process.
    let cpus = qmp.execute("query-cpus", None);
    let list = cpus["return"].as_array().expect("query-cpus list");
    assert_eq!(list.len(), 2);
    for (i, cpu) in list.iter().enumerate() {
        assert_eq!(cpu["CPU"], i);
        assert_eq!(cpu["arch"], "x86");
        assert_eq!(cpu["current"], i == 0);
        assert!(cpu["halted"].is_boolean());
        if i > 0 {
            // counter.elf never starts its application processors: they wait for SIPI.
            assert_eq!(cpu["halted"], true, "{cpu}");
        }
        assert_eq!(cpu["qom_path"], format!("/machine/unattached/device[{i}]"));
        assert_eq!(cpu["props"]["core-id"], i);
        let tid = cpu["thread_id"].as_u64().expect("thread_id");
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.pid()))
            .expect("vCPU thread id is a task of citadel");
        assert_eq!(comm.trim(), format!("vcpu{i}"));
    }
    let hot = qmp.execute("query-hotpluggable-cpus", None);
    assert_eq!(hot["return"].as_array().unwrap().len(), 2);
    assert_eq!(hot["return"][0]["type"], "host-x86-cpu");
    assert_eq!(hot["return"][0]["vcpus-count"], 1);

    // stop: the STOP event comes before the return, and the guest's counter freezes.
    qmp.send_raw(br#"{"execute":"stop"}"#);
    let first = qmp.read_value().unwrap();
    assert_eq!(first["event"], "STOP", "STOP precedes the reply");
    assert_timestamp(&first);
    assert_eq!(qmp.read_reply(), json!({"return": {}}));
    assert_eq!(
        qmp.execute("query-status", None),
        json!({"return": {"running": false, "singlestep": false, "status": "paused"}})
    );
    // Lines already in flight may still arrive; after that nothing moves.
    vm.serial_lines_for(Duration::from_millis(200));
    let while_paused = vm.serial_lines_for(Duration::from_millis(800));
    assert!(
        while_paused.is_empty(),
        "guest ran while paused: {while_paused:?}"
    );

    // cont: RESUME, then the counter moves on from where it stopped.
    qmp.send_raw(br#"{"execute":"cont"}"#);
    let first = qmp.read_value().unwrap();
    assert_eq!(first["event"], "RESUME");
    assert_timestamp(&first);
    assert_eq!(qmp.read_reply(), json!({"return": {}}));
    let line = vm.wait_serial("counter=", Duration::from_secs(10));
    assert!(counter_of(&line).is_some(), "{line}");
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );

    // quit: the return, then SHUTDOWN, then the process exits 0.
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_timestamp(&shutdown);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!vm.qmp_path.exists(), "QMP socket removed at exit");
}

#[test]
fn qmp_protocol_errors_keep_the_connection() {
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut qmp = Qmp::connect(&vm.qmp_path, Duration::from_secs(5));

    // Before negotiation only qmp_capabilities is accepted.
    let r = qmp.execute("query-status", None);
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");

    // Two commands in one write, the second split over two writes; numeric and object ids.
    qmp.send_raw(br#"{"execute":"qmp_capabilities","id":1}{"execute":"query-st"#);
    assert_eq!(qmp.read_reply(), json!({"return": {}, "id": 1}));
    qmp.send_raw(br#"atus","id":{"a":[1,2]}}"#);
    let r = qmp.read_reply();
    assert_eq!(r["id"], json!({"a": [1, 2]}));
    assert_eq!(r["return"]["status"], "running");

    // Malformed JSON gets an error and the connection stays usable.
    qmp.send_raw(b"{\"execute\": nonsense}\n");
    let r = qmp.read_reply();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(
        qmp.execute("query-uuid", None),
        json!({"return": {"UUID": "00000000-0000-0000-0000-000000000000"}})
    );
    let r = qmp.execute("query-version", None);
    assert_eq!(
        r["return"],
        json!({
            "qemu": {"major": 5, "minor": 0, "micro": 1},
            "package": concat!("citadel-", env!("CARGO_PKG_VERSION")),
        }),
        "{r}"
    );

    // Unknown command, unexpected argument.
    let r = qmp.execute("no-such-command", None);
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = qmp.execute("query-status", Some(json!({"bogus": 1})));
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("bogus"),
        "{r}"
    );

    // query-commands lists what we accept.
    let r = qmp.execute("query-commands", None);
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in ["query-status", "stop", "cont", "quit", "query-cpus"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }

    // An oversized object is refused without taking the connection down.
    let mut big = b"{\"execute\":\"query-status\",\"id\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 1 << 20));
    big.extend(b"\"}");
    qmp.send_raw(&big);
    let r = qmp.read_reply();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let r = qmp.execute("query-status", None);
    assert_eq!(r["return"]["status"], "running", "{r}");
}

#[test]
fn pipelined_commands_spanning_many_reads_are_all_answered_in_order() {
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    // One write of more than the VMM reads from a client per wake-up (8 reads of 16 KiB), so
    // objects are cut at read boundaries, reads come back short whenever the VMM catches up
    // with the writer, and the rest is only seen on later wake-ups.
    const COMMANDS: usize = 6000;
    let batch: Vec<u8> = (0..COMMANDS)
        .flat_map(|i| format!("{{\"execute\":\"query-status\",\"id\":{i}}}\n").into_bytes())
        .collect();
    assert!(batch.len() > 8 * 16 * 1024, "{} bytes", batch.len());
    qmp.send_raw(&batch);
    for i in 0..COMMANDS {
        let r = qmp.read_reply();
        assert_eq!(r["id"], json!(i), "{r}");
        assert_eq!(r["return"]["status"], "running", "{r}");
    }
    assert_eq!(
        qmp.execute("query-uuid", None),
        json!({"return": {"UUID": "00000000-0000-0000-0000-000000000000"}})
    );
}

#[test]
fn events_reach_every_client_and_a_stalled_client_blocks_nothing() {
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut a = Qmp::negotiated(&vm.qmp_path);
    let mut b = Qmp::negotiated(&vm.qmp_path);
    // A client that never reads: flood it with commands whose replies pile up.
    let mut stalled = Qmp::negotiated(&vm.qmp_path);
    let flood = br#"{"execute":"query-commands"}"#.repeat(4000);
    let writer = std::thread::spawn(move || {
        // The VMM drops this client once its unread output passes the cap; the write then
        // fails, which is expected.
        let _ = stalled.try_send_raw(&flood);
    });

    assert_eq!(a.execute("stop", None), json!({"return": {}}));
    assert_eq!(a.wait_event("STOP")["event"], "STOP");
    assert_eq!(b.wait_event("STOP")["event"], "STOP");
    assert_eq!(b.execute("cont", None), json!({"return": {}}));
    assert_eq!(a.wait_event("RESUME")["event"], "RESUME");
    assert_eq!(b.wait_event("RESUME")["event"], "RESUME");
    writer.join().unwrap();
    assert_eq!(
        a.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn guest_reset_ends_the_vm_with_shutdown_event() {
    // -S keeps the guest from resetting before the client is there to see it.
    let mut vm = Vm::start(&guest_program("reset"), &["-m", "32", "-S"]);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        qmp.execute("query-status", None)["return"],
        json!({"running": false, "singlestep": false, "status": "prelaunch"})
    );
    assert!(
        vm.serial_lines_for(Duration::from_millis(300)).is_empty(),
        "no guest code runs before cont"
    );
    // Every thread already carries its filter, the waiting vCPU included.
    for task in std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    vm.wait_serial("citadel-guest: resetting", BOOT);
    let ev = qmp.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": true, "reason": "guest-reset"}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    // The vCPU stopped at the reset write: the guest's fallback message never ran.
    let after = vm.serial_lines_for(Duration::from_millis(100));
    assert!(
        !after.iter().any(|l| l.contains("reset-failed")),
        "{after:?}"
    );
}

#[test]
fn kernel_command_line_reaches_the_guest() {
    let mut vm = Vm::start(
        &guest_program("cmdline"),
        &["-m", "32", "-append", "console=ttyS0 citadel.test=42"],
    );
    let line = vm.wait_serial("citadel-guest: cmdline=", BOOT);
    assert!(
        line.ends_with("cmdline=console=ttyS0 citadel.test=42"),
        "{line}"
    );
}

#[test]
fn smp_brings_up_every_vcpu() {
    let mut vm = Vm::start(&guest_program("smp"), &["-m", "32", "-smp", "4"]);
    let line = vm.wait_serial("citadel-guest: cpus=", BOOT);
    assert!(line.ends_with("cpus=4"), "{line}");
    let line = vm.wait_serial("citadel-guest: acpi-cpus=", BOOT);
    assert!(line.ends_with("acpi-cpus=4"), "{line}");
    let line = vm.wait_serial("citadel-guest: mptable-cpus=", BOOT);
    assert!(line.ends_with("mptable-cpus=4"), "{line}");
}

#[test]
fn bad_command_lines_fail_before_anything_is_created() {
    let bin = citadel_tests::binary("citadel");
    let cases: &[&[&str]] = &[
        &["-bogus"],
        &["-machine", "microvm"],
        &["-machine", "microvm", "-kernel", "/k", "-m", "12X"],
        &["-machine", "microvm", "-kernel", "/k", "-smp", "0"],
        &[
            "-machine",
            "microvm",
            "-kernel",
            "/k",
            "-qmp",
            "tcp:1,server",
        ],
        &["-machine", "microvm", "-kernel", "/nonexistent/kernel"],
    ];
    for args in cases {
        let out = std::process::Command::new(&bin)
            .args(*args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("citadel: "), "{args:?}: {err}");
    }
}

#[test]
fn daemonize_returns_once_the_vm_is_up_and_the_pid_file_allows_a_kill() {
    let dir = citadel_tests::vm::TempDir::new("daemon");
    let pidfile = dir.path().join("citadel.pid");
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let out = std::process::Command::new(citadel_tests::binary("citadel"))
        .args(["-machine", "microvm", "-m", "32", "-daemonize", "-kernel"])
        .arg(guest_program("idle"))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", sock.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // The parent returned only after the VM was built: the pid file and socket exist now.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file written before the parent returns")
        .trim()
        .parse()
        .unwrap();
    assert!(sock.exists());
    let mut qmp = Qmp::negotiated(&sock);
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );
    let deadline = std::time::Instant::now() + BOOT;
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("citadel-guest: ready")
    {
        assert!(std::time::Instant::now() < deadline, "guest never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: plain kill(2) on the pid the daemon wrote.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let ev = qmp.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pidfile.exists() {
        assert!(std::time::Instant::now() < deadline, "pid file not removed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn daemonize_reports_a_failed_start_to_the_caller() {
    let dir = citadel_tests::vm::TempDir::new("daemon-fail");
    let out = std::process::Command::new(citadel_tests::binary("citadel"))
        .args([
            "-machine",
            "microvm",
            "-daemonize",
            "-serial",
            "none",
            "-kernel",
            "/nonexistent/vmlinux",
        ])
        .arg("-pidfile")
        .arg(dir.path().join("pid"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn system_reset_reboots_the_guest_from_its_kernel() {
    let mut vm = Vm::start(&guest_program("smp"), &["-m", "32", "-smp", "2"]);
    let line = vm.wait_serial("citadel-guest: cpus=", BOOT);
    assert!(line.ends_with("cpus=2"), "{line}");
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    qmp.send_raw(br#"{"execute":"system_reset","id":"r1"}"#);
    let first = qmp.read_value().unwrap();
    assert_eq!(first["event"], "RESET", "RESET precedes the reply");
    assert_eq!(
        first["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_timestamp(&first);
    assert_eq!(qmp.read_reply(), json!({"return": {}, "id": "r1"}));

    // The guest boots again: the boot vCPU from the kernel entry, the other one through
    // INIT/SIPI, which only works if it was put back into wait-for-SIPI.
    vm.wait_serial("citadel-guest: entry=", BOOT);
    let line = vm.wait_serial("citadel-guest: cpus=", BOOT);
    assert!(line.ends_with("cpus=2"), "{line}");
    // The boot tables are there again, checksums and all.
    let line = vm.wait_serial("citadel-guest: acpi-cpus=", BOOT);
    assert!(line.ends_with("acpi-cpus=2"), "{line}");
    // The program's last line: nothing is in flight once it is seen.
    vm.wait_serial("citadel-guest: mptable-cpus=", BOOT);
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "running"
    );

    // A paused VM is reset and stays paused until cont.
    assert_eq!(qmp.execute("stop", None), json!({"return": {}}));
    assert_eq!(qmp.execute("system_reset", None), json!({"return": {}}));
    assert!(
        vm.serial_lines_for(Duration::from_millis(300)).is_empty(),
        "guest ran while paused"
    );
    assert_eq!(qmp.execute("cont", None), json!({"return": {}}));
    vm.wait_serial("citadel-guest: entry=", BOOT);
    let line = vm.wait_serial("citadel-guest: cpus=", BOOT);
    assert!(line.ends_with("cpus=2"), "{line}");
}

#[test]
fn system_reset_boots_the_kernel_it_started_with_or_ends_the_vm() {
    let dir = citadel_tests::vm::TempDir::new("reset-kernel");
    let kernel = dir.path().join("kernel.elf");
    std::fs::copy(guest_program("smp"), &kernel).unwrap();
    // A handle on the booted file, to modify it in place later.
    let booted = std::fs::OpenOptions::new()
        .write(true)
        .open(&kernel)
        .unwrap();
    let mut vm = Vm::start(&kernel, &["-m", "32", "-smp", "2"]);
    vm.wait_serial("citadel-guest: mptable-cpus=", BOOT);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);

    // Another kernel renamed over the path: the reset still boots the file the VM started
    // with (the smp program, not the idle one, which would print "ready").
    let other = dir.path().join("other.elf");
    std::fs::copy(guest_program("idle"), &other).unwrap();
    std::fs::rename(&other, &kernel).unwrap();
    assert_eq!(qmp.execute("system_reset", None), json!({"return": {}}));
    let line = vm.wait_serial("citadel-guest: cpus=", BOOT);
    assert!(line.ends_with("cpus=2"), "{line}");
    vm.wait_serial("citadel-guest: mptable-cpus=", BOOT);

    // The booted file truncated in place: the reset is refused before anything is written
    // into the guest, and the VM ends instead of running on.
    booted.set_len(64).unwrap();
    let reply = qmp.execute("system_reset", None);
    let desc = reply["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("modified since boot"), "{reply}");
    let ev = qmp.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-error"}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(1));
    let after: Vec<String> = vm.serial_lines_for(Duration::from_millis(100));
    assert!(
        !after.iter().any(|l| l.contains("citadel-guest: entry=")),
        "the guest ran again: {after:?}"
    );
}

#[test]
fn qmp_connections_beyond_the_limit_are_closed_and_the_rest_keep_working() {
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut clients: Vec<Qmp> = (0..16).map(|_| Qmp::negotiated(&vm.qmp_path)).collect();
    // The 17th is accepted by the kernel, then closed by citadel without a greeting.
    let extra = std::os::unix::net::UnixStream::connect(&vm.qmp_path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(std::io::Read::read(&mut &extra, &mut buf).unwrap(), 0);
    for qmp in &mut clients {
        assert_eq!(
            qmp.execute("query-status", None)["return"]["status"],
            "running"
        );
    }
    // A slot freed by a client that leaves is usable again.
    clients.pop();
    std::thread::sleep(Duration::from_millis(100));
    let mut again = Qmp::negotiated(&vm.qmp_path);
    assert_eq!(
        again.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn a_kvm_internal_error_stops_the_vm_in_the_internal_error_state() {
    let log_dir = citadel_tests::vm::TempDir::new("internal-error-log");
    let log = log_dir.path().join("citadel.log");
    let log_arg = log.to_str().expect("utf-8 path");
    // internal_error.elf jumps to 512 MiB, where this VM has no memory: KVM cannot emulate
    // the instruction fetch and exits with KVM_EXIT_INTERNAL_ERROR.
    let mut vm = Vm::start(
        &guest_program("internal_error"),
        &["-m", "64", "-D", log_arg],
    );
    vm.wait_serial("citadel-guest: ready", BOOT);
    // The first client, which sends nothing more, still hears the VM stop (with its
    // negotiation's reply when the stop came first).
    let mut listener = Qmp::negotiated(&vm.qmp_path);
    assert_timestamp(&listener.wait_event("STOP"));
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    let deadline = std::time::Instant::now() + BOOT;
    let status = loop {
        let status = qmp.execute("query-status", None);
        if status["return"]["status"] != "running" {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status,
        json!({"return": {"running": false, "singlestep": false, "status": "internal-error"}})
    );
    assert!(
        qmp.events.iter().all(|e| e["event"] != "SHUTDOWN"),
        "{:?}",
        qmp.events
    );
    // The VM stays for inspection: the vCPUs still answer, `cont` is refused.
    assert_eq!(
        qmp.execute("query-cpus", None)["return"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let cont = qmp.execute("cont", None);
    assert_eq!(cont["error"]["class"], "GenericError", "{cont}");
    assert_eq!(
        qmp.execute("query-status", None)["return"]["status"],
        "internal-error"
    );
    let logged = std::fs::read_to_string(&log).expect("read the log file");
    assert!(
        logged.contains(
            "vCPU 0: KVM_EXIT_INTERNAL_ERROR: emulation failure (suberror 1) at rip 0x20000000"
        ),
        "exit reason not logged:\n{logged}"
    );
    assert_eq!(qmp.execute("quit", None), json!({"return": {}}));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}
