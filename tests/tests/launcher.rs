//! The device launcher, driven the way the VMM drives it and checked from outside: the
//! backends it starts answer vhost-user on the sockets it returns, run confined under its
//! filter and their own, and are gone (reaped, not zombies) once stopped or once the launcher's
//! handle is dropped; bad images are refused with one line and start nothing; and the
//! launcher's Landlock rules let it execute the two backends and nothing else.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use citadel_launcher::{BlkSpec, ImageSource, Launcher, LauncherConfig, LauncherError, NetSpec};
use citadel_tests::vhost_user::{
    Frontend, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
};

/// VIRTIO_BLK_F_RO.
const F_RO: u64 = 1 << 5;
/// VHOST_USER_PROTOCOL_F_CONFIG.
const PF_CONFIG: u64 = 1 << 9;
/// Size of the test images: 2048 sectors.
const IMAGE_BYTES: u64 = 1 << 20;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn config() -> LauncherConfig {
    LauncherConfig {
        blk_binary: citadel_tests::binary("citadel-blk"),
        net_binary: citadel_tests::binary("citadel-net"),
        seccomp_action: citadel_seccomp::Mode::Kill,
        landlock: true,
    }
}

/// A scratch directory with a 1 MiB image; removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("citadel-launcher-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_BYTES)
            .unwrap();
        Scratch { dir }
    }

    fn image(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn blk(image: PathBuf, read_only: bool) -> BlkSpec {
    BlkSpec {
        id: "disk0".into(),
        image: ImageSource::Path(image),
        read_only,
        direct: false,
        serial: None,
    }
}

/// The value of `field` in /proc/<pid>/status.
fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The children of `pid`, as the kernel lists them.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// True once /proc/<pid> is gone (exited and reaped) within `limit`.
fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// GET_FEATURES, then the first `len` bytes of GET_CONFIG (with the CONFIG protocol feature).
fn features_and_config(fe: &mut Frontend, len: u32) -> (u64, Vec<u8>) {
    let features = fe.get_u64(GET_FEATURES);
    let protocol = fe.get_u64(GET_PROTOCOL_FEATURES);
    assert_ne!(
        protocol & PF_CONFIG,
        0,
        "CONFIG protocol feature not offered"
    );
    fe.send(SET_PROTOCOL_FEATURES, 0, &PF_CONFIG.to_le_bytes(), &[])
        .unwrap();
    let config = fe.get_config(0, len);
    assert_eq!(config.len(), 12 + len as usize);
    (features, config[12..].to_vec())
}

/// GET_FEATURES and the capacity citadel-blk reports in GET_CONFIG.
fn features_and_capacity(fe: &mut Frontend) -> (u64, u64) {
    let (features, config) = features_and_config(fe, 8);
    (
        features,
        u64::from_le_bytes(config[..8].try_into().unwrap()),
    )
}

#[test]
fn a_started_citadel_blk_serves_the_image_confined_under_both_filters() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(config()).expect("launcher starts");
    let lpid = launcher.pid();
    assert_eq!(status_field(lpid, "Seccomp"), "2");
    assert_eq!(status_field(lpid, "Seccomp_filters"), "1");
    assert_eq!(status_field(lpid, "NoNewPrivs"), "1");
    // The launcher holds /dev/null as stdin and stdout, the test's stderr, its control socket
    // and its signalfd: nothing else of the test's.
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{lpid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).unwrap();
            let fd = e.file_name().to_string_lossy().parse().unwrap();
            (fd, target.to_string_lossy().into_owned())
        })
        .collect();
    fds.sort();
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4], "launcher descriptors: {fds:?}");
    assert_eq!(fds[0].1, "/dev/null");
    assert_eq!(fds[1].1, "/dev/null");
    assert!(fds[3].1.starts_with("socket:"), "{fds:?}");
    assert_eq!(fds[4].1, "anon_inode:[signalfd]");

    for read_only in [false, true] {
        let backend = launcher
            .spawn_blk(blk(scratch.image(), read_only))
            .expect("citadel-blk starts");
        assert_eq!(children(lpid), vec![backend.pid]);
        let mut fe = Frontend::new(backend.socket);
        let (features, capacity) = features_and_capacity(&mut fe);
        assert_eq!(capacity, IMAGE_BYTES / 512);
        assert_eq!(features & F_RO != 0, read_only, "features {features:#x}");
        let pid = backend.pid;
        assert_eq!(status_field(pid, "PPid"), lpid.to_string());
        assert_eq!(status_field(pid, "Seccomp"), "2");
        // The launcher's filter and citadel-blk's own, stacked.
        assert_eq!(status_field(pid, "Seccomp_filters"), "2");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        launcher.stop(pid).expect("stop");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} left behind"
        );
        assert!(children(lpid).is_empty());
        drop(fe);
    }
}

#[test]
fn log_mode_is_handed_on_to_the_backends() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(LauncherConfig {
        seccomp_action: citadel_seccomp::Mode::Log,
        ..config()
    })
    .expect("launcher starts");
    let backend = launcher.spawn_blk(blk(scratch.image(), true)).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", backend.pid)).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).skip(1).collect();
    assert_eq!(
        args,
        [
            &b"--fd"[..],
            b"3",
            b"--image-fd",
            b"4",
            b"--readonly",
            b"--seccomp",
            b"log",
            b""
        ]
    );
}

#[test]
fn an_image_descriptor_is_served_as_given() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(config()).expect("launcher starts");
    let image = std::fs::File::open(scratch.image()).unwrap();
    let backend = launcher
        .spawn_blk(BlkSpec {
            id: "disk1".into(),
            image: ImageSource::Fd(image.into()),
            read_only: true,
            direct: false,
            serial: Some("CITADEL SN-0001".into()),
        })
        .expect("citadel-blk starts");
    // The serial number reaches citadel-blk as its own argument.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", backend.pid)).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == b"--serial" && w[1] == b"CITADEL SN-0001"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let mut fe = Frontend::new(backend.socket);
    let (features, capacity) = features_and_capacity(&mut fe);
    assert_eq!(capacity, IMAGE_BYTES / 512);
    assert_ne!(features & F_RO, 0);
}

#[test]
fn a_bad_serial_number_is_refused_and_starts_nothing() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(config()).expect("launcher starts");
    for serial in ["twenty-one-bytes-long", "--image=/etc/x\n", "new\nline"] {
        let mut spec = blk(scratch.image(), true);
        spec.serial = Some(serial.to_string());
        match launcher.spawn_blk(spec) {
            Err(LauncherError::Refused(message)) => assert_eq!(
                message, "a serial number is at most 20 printable ASCII bytes",
                "{serial:?}"
            ),
            other => panic!("{serial:?}: {other:?}"),
        }
        assert!(children(launcher.pid()).is_empty(), "{serial:?}");
    }
}

#[test]
fn backends_are_reaped_and_none_outlives_the_launchers_handle() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(config()).expect("launcher starts");
    let lpid = launcher.pid();
    let first = launcher.spawn_blk(blk(scratch.image(), true)).unwrap();
    let second = launcher.spawn_blk(blk(scratch.image(), true)).unwrap();
    // A backend that dies on its own is reaped by the launcher, not left a zombie.
    // SAFETY: signals a process this test started through the launcher.
    assert_eq!(unsafe { libc::kill(first.pid, libc::SIGKILL) }, 0);
    assert!(
        gone_within(first.pid, Duration::from_secs(5)),
        "zombie {}",
        first.pid
    );
    match launcher.stop(first.pid) {
        Err(LauncherError::Refused(m)) => {
            assert_eq!(m, format!("no running backend has pid {}", first.pid))
        }
        other => panic!("stop of a reaped backend: {other:?}"),
    }
    // A backend for the same image starts after the death, as a restart asks.
    let third = launcher.spawn_blk(blk(scratch.image(), true)).unwrap();
    assert!(std::path::Path::new(&format!("/proc/{}", third.pid)).exists());
    let started = Instant::now();
    drop(launcher);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "drop took {:?}",
        started.elapsed()
    );
    assert!(
        gone_within(lpid, Duration::from_secs(1)),
        "launcher {lpid} still there"
    );
    for pid in [second.pid, third.pid] {
        assert!(
            gone_within(pid, Duration::from_secs(1)),
            "backend {pid} outlived the launcher"
        );
    }
}

#[test]
fn a_killed_launcher_takes_its_backends_with_it() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(config()).expect("launcher starts");
    let backend = launcher.spawn_blk(blk(scratch.image(), true)).unwrap();
    // SAFETY: signals the launcher this test started.
    assert_eq!(unsafe { libc::kill(launcher.pid(), libc::SIGKILL) }, 0);
    // Its parent-death signal ends the backend, whoever reaps it.
    assert!(
        gone_within(backend.pid, Duration::from_secs(5)),
        "backend {} outlived its launcher",
        backend.pid
    );
    assert!(matches!(
        launcher.spawn_blk(blk(scratch.image(), true)),
        Err(LauncherError::Gone)
    ));
}

#[test]
fn bad_images_are_refused_with_one_line_and_start_nothing() {
    let scratch = Scratch::new();
    let launcher = Launcher::start(config()).expect("launcher starts");
    let lpid = launcher.pid();
    let missing = scratch.dir.join("missing.raw");
    let cases = [
        (
            missing.clone(),
            false,
            format!(
                "Could not open '{}': No such file or directory (os error 2)",
                missing.display()
            ),
        ),
        // The launcher may list directories (it checks snapshot directories are
        // empty), so a directory opens and is refused for what it is.
        (
            scratch.dir.clone(),
            true,
            format!(
                "Could not open '{}': not a regular file or block device",
                scratch.dir.display()
            ),
        ),
        (
            scratch.dir.clone(),
            false,
            format!(
                "Could not open '{}': Is a directory (os error 21)",
                scratch.dir.display()
            ),
        ),
        (
            PathBuf::from("/proc/self/exe"),
            true,
            "Could not open '/proc/self/exe': Too many levels of symbolic links (os error 40)"
                .to_string(),
        ),
        (
            PathBuf::from("/dev/null"),
            true,
            "Could not open '/dev/null': not a regular file or block device".to_string(),
        ),
    ];
    for (path, read_only, expected) in cases {
        match launcher.spawn_blk(blk(path.clone(), read_only)) {
            Err(LauncherError::Refused(message)) => assert_eq!(message, expected),
            other => panic!("{}: {other:?}", path.display()),
        }
        assert!(
            children(lpid).is_empty(),
            "{}: a backend started",
            path.display()
        );
    }
    // Read-write on an immutable file (root ignores modes, not the immutable attribute).
    let frozen = scratch.dir.join("frozen.raw");
    std::fs::write(&frozen, vec![0u8; 4096]).unwrap();
    let chattr = Command::new("chattr").arg("+i").arg(&frozen).status();
    if !chattr.is_ok_and(|s| s.success()) {
        citadel_tests::skip(
            "bad_images_are_refused_with_one_line_and_start_nothing (immutable file)",
            "chattr +i is not supported here",
            false,
        );
        return;
    }
    let outcome = launcher.spawn_blk(blk(frozen.clone(), false));
    let _ = Command::new("chattr").arg("-i").arg(&frozen).status();
    match outcome {
        Err(LauncherError::Refused(message)) => assert_eq!(
            message,
            format!(
                "Could not open '{}': Operation not permitted (os error 1)",
                frozen.display()
            )
        ),
        other => panic!("read-write on an immutable file: {other:?}"),
    }
    assert!(children(lpid).is_empty());
    // Read-only, the same file is served.
    let backend = launcher
        .spawn_blk(blk(frozen, true))
        .expect("read-only open");
    assert_eq!(children(lpid), vec![backend.pid]);
}

#[test]
fn a_started_citadel_net_serves_a_tap_confined_under_both_filters() {
    if !Path::new("/dev/net/tun").exists() {
        citadel_tests::skip(
            "a_started_citadel_net_serves_a_tap_confined_under_both_filters",
            "no /dev/net/tun",
            true,
        );
        return;
    }
    let launcher = Launcher::start(config()).expect("launcher starts");
    let name = format!("cl{}", std::process::id() % 100_000);
    // The launcher attaches (here: creates) the tap and hands its queue over.
    let queue = launcher
        .open_tap(&name)
        .expect("the launcher attaches a tap");
    let tap_dir = Path::new("/sys/class/net").join(&name);
    assert!(tap_dir.exists());
    let by_name = launcher
        .spawn_net(NetSpec {
            id: "net0".into(),
            queues: vec![queue.try_clone().unwrap()],
            mac: Some([0x02, 0, 0, 0, 0, 0x42]),
        })
        .expect("citadel-net starts on the attached tap");
    let mut fe = Frontend::new(by_name.socket);
    let (_, mac) = features_and_config(&mut fe, 6);
    assert_eq!(mac, [0x02, 0, 0, 0, 0, 0x42]);
    let pid = by_name.pid;
    assert_eq!(status_field(pid, "PPid"), launcher.pid().to_string());
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "Seccomp_filters"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // A MAC no NIC may have is refused before anything starts.
    let before = children(launcher.pid()).len();
    match launcher.spawn_net(NetSpec {
        id: "net2".into(),
        queues: vec![queue.try_clone().unwrap()],
        mac: Some([0x01, 0, 0x5e, 0, 0, 1]),
    }) {
        Err(LauncherError::Refused(m)) => {
            assert_eq!(m, "a multicast address cannot be a NIC's MAC address")
        }
        other => panic!("multicast MAC: {other:?}"),
    }
    match launcher.spawn_net(NetSpec {
        id: "net3".into(),
        queues: Vec::new(),
        mac: None,
    }) {
        Err(LauncherError::Refused(m)) => {
            assert_eq!(m, "spawn-net needs the tap's queue descriptors")
        }
        other => panic!("no tap queue: {other:?}"),
    }
    assert_eq!(children(launcher.pid()).len(), before);
    // The tap the launcher created lives as long as its queue is held, not as long as the
    // backend serving it: what the VMM relies on to restart a NIC's backend on the same tap.
    launcher.stop(pid).expect("stop citadel-net");
    assert!(tap_dir.exists(), "the tap went with its backend");
    drop(queue);
    assert!(!tap_dir.exists(), "the tap outlived its last queue");
    // A queue the VMM opened itself, handed over as a descriptor.
    let other = format!("cm{}", std::process::id() % 100_000);
    let fd = citadel_tap::open_by_name(&other, 1)
        .expect("tap for the descriptor case")
        .remove(0);
    let by_fd = launcher
        .spawn_net(NetSpec {
            id: "net1".into(),
            queues: vec![OwnedFd::from(fd)],
            mac: None,
        })
        .expect("citadel-net starts on a tap descriptor");
    let mut fe = Frontend::new(by_fd.socket);
    assert_ne!(fe.get_u64(GET_FEATURES), 0);
    assert_eq!(status_field(by_fd.pid, "Seccomp_filters"), "2");
}

/// Applies the launcher's own Landlock rules in a forked child, which then tries to execute
/// /bin/false (must fail with EACCES) and citadel-blk --help (must run: its usage arrives on
/// the pipe).
#[test]
fn the_launchers_landlock_rules_execute_the_backends_and_nothing_else() {
    if citadel_sandbox::kernel_landlock_abi() == 0 {
        citadel_tests::skip(
            "the_launchers_landlock_rules_execute_the_backends_and_nothing_else",
            "kernel without Landlock",
            false,
        );
        return;
    }
    let config = config();
    let blk = std::ffi::CString::new(config.blk_binary.to_str().unwrap()).unwrap();
    let help = c"--help";
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(
        unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
        0
    );
    // SAFETY: the child applies the rules, makes two execve calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: plain syscalls in the forked child on live, NUL-terminated strings.
        unsafe {
            if citadel_launcher::confine::restrict_filesystem(&config).is_err() {
                libc::_exit(10);
            }
            let argv = [c"/bin/false".as_ptr(), std::ptr::null()];
            libc::execve(argv[0], argv.as_ptr(), std::ptr::null());
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EACCES) {
                libc::_exit(11);
            }
            libc::dup2(pipe[1], 1);
            let argv = [blk.as_ptr(), help.as_ptr(), std::ptr::null()];
            libc::execve(argv[0], argv.as_ptr(), std::ptr::null());
            libc::_exit(12);
        }
    }
    // SAFETY: closing the write end this process no longer needs.
    unsafe { libc::close(pipe[1]) };
    // SAFETY: the read end is ours to own.
    let mut out = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(pipe[0]) });
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    let mut status = 0;
    // SAFETY: reaping our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x} (10: rules, 11: /bin/false not refused with EACCES, 12: blk refused)"
    );
    assert!(text.starts_with("usage: citadel-blk"), "{text}");
}

#[test]
fn a_launcher_that_cannot_confine_itself_does_not_start() {
    let relative = LauncherConfig {
        blk_binary: PathBuf::from("citadel-blk"),
        ..config()
    };
    assert_eq!(
        Launcher::start(relative).unwrap_err().to_string(),
        "device launcher: backend binary citadel-blk is not an absolute path"
    );
    if citadel_sandbox::kernel_landlock_abi() == 0 {
        citadel_tests::skip(
            "a_launcher_that_cannot_confine_itself_does_not_start (missing binary)",
            "kernel without Landlock",
            false,
        );
        return;
    }
    let missing = LauncherConfig {
        net_binary: PathBuf::from("/nonexistent/citadel-net"),
        ..config()
    };
    let message = Launcher::start(missing).unwrap_err().to_string();
    assert!(
        message.starts_with(
            "the device launcher could not confine itself: sandbox: Landlock rule for /nonexistent/citadel-net:"
        ),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
}
