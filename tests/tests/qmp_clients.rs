//! Citadel's QMP socket driven by the clients people already use: QEMU's own Python library
//! (`qemu.qmp`), its `qmp-shell`, and `ncat -U` by hand.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use citadel_tests::foreign::{ForeignClient, ForeignOutcome, NOBODY};
use citadel_tests::guest_program;
use citadel_tests::vm::Vm;

const BOOT: Duration = Duration::from_secs(20);

fn have(cmd: &str, probe: &[&str]) -> bool {
    Command::new(cmd)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const PYTHON_CLIENT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient

async def main(path):
    qmp = QMPClient("citadel-test")
    await qmp.connect(path)
    status = await qmp.execute("query-status")
    assert status == {"running": True, "singlestep": False, "status": "running"}, status
    cpus = await qmp.execute("query-cpus")
    assert len(cpus) == 1 and cpus[0]["thread_id"] > 0, cpus
    with qmp.listener(("STOP", "RESUME")) as listener:
        await qmp.execute("stop")
        ev = await asyncio.wait_for(listener.get(), 10)
        assert ev["event"] == "STOP", ev
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("cont")
        ev = await asyncio.wait_for(listener.get(), 10)
        assert ev["event"] == "RESUME", ev
    try:
        await qmp.execute("no-such-command")
        raise SystemExit("unknown command accepted")
    except Exception as e:
        assert "CommandNotFound" in repr(e) or "has not been found" in str(e), repr(e)
    with qmp.listener("SHUTDOWN") as listener:
        await qmp.execute("quit")
        ev = await asyncio.wait_for(listener.get(), 10)
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, ev
    # citadel closes the socket right after quit, as QEMU does; the library may see that
    # end of file before it disconnects itself.
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    print("python-client: ok")

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn qemu_python_library_drives_the_lifecycle() {
    if !have("python3", &["-c", "import qemu.qmp"]) {
        citadel_tests::skip(
            "qemu_python_library_drives_the_lifecycle",
            "python3 module qemu.qmp is not installed (pip install qemu.qmp)",
            true,
        );
        return;
    }
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let out = Command::new("python3")
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(&vm.qmp_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("python-client: ok"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn qmp_shell_talks_to_citadel() {
    // The module behind pip's `qmp-shell` script, run through python3 so that a console
    // script missing from PATH (pyenv without a rehash, say) does not matter.
    if !have("python3", &["-m", "qemu.qmp.qmp_shell", "--help"]) {
        citadel_tests::skip(
            "qmp_shell_talks_to_citadel",
            "qmp-shell (from pip qemu.qmp) is not installed",
            true,
        );
        return;
    }
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut shell = Command::new("python3")
        .args(["-m", "qemu.qmp.qmp_shell"])
        .arg(&vm.qmp_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-status\nstop\nquery-status\nquit\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"status\": \"running\""), "{stdout}");
    assert!(stdout.contains("\"status\": \"paused\""), "{stdout}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn ncat_by_hand() {
    if !have("ncat", &["--version"]) {
        citadel_tests::skip("ncat_by_hand", "ncat is not installed", true);
        return;
    }
    let mut vm = Vm::start(&guest_program("idle"), &["-m", "32"]);
    vm.wait_serial("citadel-guest: ready", BOOT);
    let mut nc = Command::new("ncat")
        .arg("-U")
        .arg(&vm.qmp_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Typed by hand: one command per line, with the usual newline after each.
    nc.stdin
        .take()
        .unwrap()
        .write_all(
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n{\"execute\":\"quit\"}\n",
        )
        .unwrap();
    let out = nc.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(
        lines[0]["QMP"]["version"],
        serde_json::json!({
            "qemu": {"major": 5, "minor": 0, "micro": 1},
            "package": concat!("citadel-", env!("CARGO_PKG_VERSION")),
        }),
        "{text}"
    );
    assert_eq!(lines[1], serde_json::json!({"return": {}}));
    assert_eq!(lines[2]["return"]["status"], "running");
    assert_eq!(lines[3], serde_json::json!({"return": {}}));
    assert_eq!(lines[4]["event"], "SHUTDOWN");
    assert!(text.contains("\r\n"), "QEMU-style CRLF line ends");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

/// The QMP socket of a VM started under umask 0 with `qmp_options`, reachable through its
/// directory by anyone, so that only the socket's own mode decides.
fn vm_under_umask_0(qmp_options: &str) -> Vm {
    use std::os::unix::fs::PermissionsExt;
    let vm = Vm::start_with(&guest_program("idle"), &[], qmp_options, Some(0));
    let dir = vm.qmp_path.parent().expect("socket directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The greeting arrives once the socket is listening.
    vm.qmp();
    vm
}

fn socket_mode(vm: &Vm) -> u32 {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(&vm.qmp_path).unwrap();
    assert!(meta.file_type().is_socket());
    meta.mode() & 0o7777
}

#[test]
fn qmp_socket_is_0600_whatever_the_umask_and_mode_widens_it() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        citadel_tests::skip(
            "qmp_clients::qmp_socket_is_0600",
            "needs root to act as a second uid",
            false,
        );
        return;
    }
    let request = br#"{"execute":"qmp_capabilities"}"#;
    let private = vm_under_umask_0("");
    assert_eq!(
        socket_mode(&private),
        0o600,
        "QMP socket mode under umask 0"
    );
    assert_eq!(
        ForeignClient::spawn(&private.qmp_path, NOBODY, NOBODY, request).outcome(),
        ForeignOutcome::ConnectFailed(libc::EACCES)
    );
    // The owner is still served after the refusal.
    let mut qmp = private.qmp();
    assert_eq!(
        qmp.execute("qmp_capabilities", None),
        serde_json::json!({"return": {}})
    );

    let open = vm_under_umask_0(",mode=0666");
    assert_eq!(socket_mode(&open), 0o666);
    assert_eq!(
        ForeignClient::spawn(&open.qmp_path, NOBODY, NOBODY, request).outcome(),
        ForeignOutcome::Answered,
        "mode=0666 lets another uid have the greeting"
    );
    let group = vm_under_umask_0(",mode=0660");
    assert_eq!(socket_mode(&group), 0o660);
}
