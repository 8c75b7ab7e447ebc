//! citadel-jailer, checked from outside as an operator would: the jailed process's
//! /proc/<pid>/status, namespaces, root, cgroups and limits, the jail's files, and every
//! refusal the jailer owes (unsafe copy destinations, bad ids and paths, tiny limits).
//!
//! Most tests jail busybox (a static binary, `busybox-static`) so that the jail itself is
//! tested whatever state the VMM is in; one test jails the real `citadel` and talks QMP to it.

use std::fs;

use citadel_tests::vm::Qmp;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const UID: u32 = 41234;
const GID: u32 = 41235;
const BUSYBOX: &str = "/bin/busybox";
/// Where this host mounts the cgroup v2 hierarchy (hybrid layout).
const UNIFIED: &str = "/sys/fs/cgroup/unified";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn jailer() -> PathBuf {
    citadel_tests::binary("citadel-jailer")
}

/// Why this test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<(&'static str, bool)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(("the jailer needs root", false));
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(("/bin/busybox (busybox-static) is not installed", true));
    }
    None
}

macro_rules! require {
    ($name:expr) => {
        if let Some((why, required)) = missing_prerequisite() {
            citadel_tests::skip($name, why, required);
            return;
        }
    };
}

/// One jail: a unique base directory, id and parent cgroup, and whatever process it holds.
/// Dropping it kills the jailed process and removes the jail and its cgroups.
struct Jail {
    base: PathBuf,
    id: String,
    parent_cgroup: String,
    children: Vec<Child>,
}

impl Jail {
    fn new(tag: &str) -> Jail {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let unique = format!("{}-{n}", std::process::id());
        let base = std::env::temp_dir().join(format!("citadel-jailer-test-{unique}"));
        fs::create_dir_all(&base).expect("create base");
        Jail {
            base,
            id: format!("{tag}-{unique}"),
            parent_cgroup: format!("citadel-test-{unique}"),
            children: Vec::new(),
        }
    }

    fn id_dir(&self) -> PathBuf {
        self.base.join("citadel").join(&self.id)
    }

    fn root(&self) -> PathBuf {
        self.id_dir().join("root")
    }

    fn pid_file(&self) -> PathBuf {
        self.id_dir().join("citadel.pid")
    }

    /// The jailer command with this jail's id, base and cgroup parent, then `extra`.
    fn command(&self, exec: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(jailer());
        cmd.args(["--id", &self.id, "--exec-file"])
            .arg(exec)
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(["--parent-cgroup", &self.parent_cgroup])
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, exec: &Path, extra: &[&str]) -> Output {
        self.command(exec, extra).output().expect("run jailer")
    }

    /// The jailer command that jails busybox.
    fn busybox_command(&self, extra: &[&str]) -> Command {
        self.command(Path::new(BUSYBOX), extra)
    }

    /// Runs the jailer on busybox to completion.
    fn run_busybox(&self, extra: &[&str]) -> Output {
        self.run(Path::new(BUSYBOX), extra)
    }

    /// Waits for the pid file to hold a pid.
    fn wait_pid(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = fs::read_to_string(self.pid_file()) {
                if let Ok(pid) = text.trim().parse() {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no pid in {}",
                self.pid_file().display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill_jailed(&self) {
        if let Ok(text) = fs::read_to_string(self.pid_file()) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                // SAFETY: kill takes integers; the pid came from our own jail's pid file.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_gone(pid);
            }
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        self.kill_jailed();
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.base);
        for (leaf, parent) in cgroup_dirs(&self.parent_cgroup, &self.id) {
            // The last task may take a moment to leave after being killed.
            for _ in 0..50 {
                if !leaf.exists() || fs::remove_dir(&leaf).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = fs::remove_dir(&parent);
        }
    }
}

/// Host directories `(jail cgroup, its parent)` in each v1 hierarchy the test process is in,
/// beneath the test process's own cgroup, as the jailer makes them.
fn cgroup_dirs(parent: &str, id: &str) -> Vec<(PathBuf, PathBuf)> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    own.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?.trim_start_matches('/');
            let dir = match controllers.split(',').next() {
                Some("") | None => PathBuf::from(UNIFIED),
                Some(first) => {
                    let dir = Path::new("/sys/fs/cgroup").join(controllers);
                    if dir.exists() {
                        dir
                    } else {
                        Path::new("/sys/fs/cgroup").join(first)
                    }
                }
            };
            let parent_dir = dir.join(path).join(parent);
            Some((parent_dir.join(id), parent_dir))
        })
        .collect()
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.contains("State:\tZ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn namespace(pid: &str, ns: &str) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("read ns link")
}

/// The names in a directory, sorted.
fn dir_names(dir: impl AsRef<Path>) -> Vec<String> {
    let dir = dir.as_ref();
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The process runs as `UID`, with no_new_privs and every capability set empty.
fn assert_unprivileged(pid: i32) {
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{set}");
    }
}

/// The process shares none of the namespaces the jailer creates with the test process.
fn assert_own_namespaces(pid: i32) {
    let me = std::process::id().to_string();
    for ns in ["mnt", "ipc", "uts", "net", "pid", "user"] {
        assert_ne!(
            namespace(&pid.to_string(), ns),
            namespace(&me, ns),
            "{ns} namespace shared"
        );
    }
}

/// The process has an empty environment and only descriptors 0, 1 and 2 open.
fn assert_bare_environment_and_stdio_only(pid: i32) {
    assert_eq!(fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
    assert_eq!(
        dir_names(format!("/proc/{pid}/fd")),
        ["0", "1", "2"],
        "inherited descriptors reached the jail"
    );
}

fn stderr_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// The jailer failed with exactly one line on stderr that starts with `prefix`.
fn assert_clean_failure(out: &Output, prefix: &str) {
    let err = stderr_line(out);
    assert!(!out.status.success(), "jailer succeeded, stderr: {err}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status {:?}: {err}",
        out.status
    );
    assert_eq!(err.lines().count(), 1, "more than one line: {err}");
    assert!(
        err.starts_with(&format!("citadel-jailer: {prefix}")),
        "expected `citadel-jailer: {prefix}...`, got: {err}"
    );
}

#[test]
fn jailed_process_is_confined_in_every_way_the_operator_can_see() {
    require!("jailed_process_is_confined_in_every_way_the_operator_can_see");
    let jail = Jail::new("confined");
    let out = jail.run_busybox(&[
        "--new-netns",
        "--new-pid-ns",
        "--userns",
        "--daemonize",
        "--cgroup",
        "memory.limit_in_bytes=67108864",
        "--cgroup",
        "pids.max=17",
        "--resource-limit",
        "no-file=123",
        "--resource-limit",
        "fsize=1048576",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "jailer failed: {}", stderr_line(&out));
    let pid = jail.wait_pid();

    assert_unprivileged(pid);
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(pid, "Groups"), "");
    // PID 1 of its own PID namespace.
    let nspid = status_field(pid, "NSpid");
    assert_eq!(nspid, format!("{pid}\t1"));

    assert_own_namespaces(pid);
    let uid_map = fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        [&*UID.to_string(), &*UID.to_string(), "1"]
    );
    let gid_map = fs::read_to_string(format!("/proc/{pid}/gid_map")).unwrap();
    assert_eq!(
        gid_map.split_whitespace().collect::<Vec<_>>(),
        [&*GID.to_string(), &*GID.to_string(), "1"]
    );

    // Its root is the jail: exactly the executable and /dev.
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(dir_names(&proc_root), ["busybox", "dev"]);
    // Owned by root and writable by nobody: the jailed uid can neither rewrite nor chmod it.
    let jailed_exe = fs::metadata(proc_root.join("busybox")).unwrap();
    assert_eq!(
        (
            jailed_exe.uid(),
            jailed_exe.gid(),
            jailed_exe.mode() & 0o7777
        ),
        (0, 0, 0o555)
    );
    assert_eq!(
        fs::metadata(proc_root.join("busybox")).unwrap().ino(),
        fs::metadata(jail.root().join("busybox")).unwrap().ino()
    );

    // /dev holds only the four nodes, 0600, and its folders are 0700, all owned by uid:gid.
    let mut devs: Vec<String> = Vec::new();
    for (rel, major, minor) in [
        ("kvm", 10, 232),
        ("net/tun", 10, 200),
        ("urandom", 1, 9),
        ("null", 1, 3),
    ] {
        let meta = fs::metadata(proc_root.join("dev").join(rel)).unwrap();
        assert_eq!(
            meta.mode() & libc::S_IFMT,
            libc::S_IFCHR,
            "{rel} is not a char device"
        );
        assert_eq!(meta.mode() & 0o7777, 0o600, "{rel} mode");
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{rel} owner");
        assert_eq!(meta.rdev(), libc::makedev(major, minor), "{rel} numbers");
        devs.push(rel.to_string());
    }
    assert_eq!(
        dir_names(proc_root.join("dev")),
        ["kvm", "net", "null", "urandom"]
    );
    for dir in [
        proc_root.join("dev"),
        proc_root.join("dev/net"),
        jail.root(),
    ] {
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700, "{} mode", dir.display());
        assert_eq!(
            (meta.uid(), meta.gid()),
            (UID, GID),
            "{} owner",
            dir.display()
        );
    }

    // Cgroups: beneath the test's own, holding the values, with the process in them.
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let suffix = format!("/{}/{}", jail.parent_cgroup, jail.id);
    for controller in ["memory", "pids"] {
        let line = cgroup
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == controller))
            })
            .unwrap_or_else(|| panic!("no {controller} line in {cgroup}"));
        assert!(line.ends_with(&suffix), "{controller} cgroup {line}");
    }
    let dirs = cgroup_dirs(&jail.parent_cgroup, &jail.id);
    let memory = dirs
        .iter()
        .find(|(leaf, _)| leaf.starts_with("/sys/fs/cgroup/memory"))
        .unwrap();
    assert_eq!(
        fs::read_to_string(memory.0.join("memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        "67108864"
    );
    let pids = dirs
        .iter()
        .find(|(leaf, _)| leaf.starts_with("/sys/fs/cgroup/pids"))
        .unwrap();
    assert_eq!(
        fs::read_to_string(pids.0.join("pids.max")).unwrap().trim(),
        "17"
    );
    let procs = fs::read_to_string(memory.0.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "{pid} not in {procs}"
    );

    // Resource limits.
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(String::from)
            .collect()
    };
    assert_eq!(limit("Max open files"), ["123", "123"]);
    assert_eq!(limit("Max file size"), ["1048576", "1048576"]);

    // The environment is empty and only stdio is open (to /dev/null, daemonized).
    assert_bare_environment_and_stdio_only(pid);
    assert!(jail.children.is_empty());
    jail.kill_jailed();
}

#[test]
fn inherited_descriptors_and_environment_do_not_reach_the_jail() {
    require!("inherited_descriptors_and_environment_do_not_reach_the_jail");
    let mut jail = Jail::new("sanitize");
    let mut cmd = jail.busybox_command(&["--", "sleep", "1000"]);
    cmd.env("SECRET", "leaked-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook only calls dup2, which is async-signal-safe, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            // A descriptor without close-on-exec, as a careless caller would leave open.
            if libc::dup2(2, 9) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    jail.children.push(cmd.spawn().expect("spawn jailer"));
    let pid = jail.wait_pid();
    assert_bare_environment_and_stdio_only(pid);
}

/// Puts a link (made by `link(host file, destination)`) to a host file where the jailer copies
/// busybox to, and checks that the jailer refuses the copy naming `kind`, leaving the host
/// file's contents alone. Returns the jail and the host file for further checks.
fn refused_link_at_copy_destination(
    tag: &str,
    kind: &str,
    link: fn(&Path, &Path) -> std::io::Result<()>,
) -> (Jail, PathBuf) {
    let jail = Jail::new(tag);
    let victim = jail.base.join("victim");
    fs::write(&victim, b"host file").unwrap();
    fs::create_dir_all(jail.root()).unwrap();
    link(&victim, &jail.root().join("busybox")).unwrap();
    let out = jail.run_busybox(&["--", "true"]);
    assert_clean_failure(&out, "copy: ");
    assert!(stderr_line(&out).contains(kind), "{}", stderr_line(&out));
    assert_eq!(fs::read(&victim).unwrap(), b"host file");
    (jail, victim)
}

#[test]
fn symlink_at_the_copy_destination_is_refused() {
    require!("symlink_at_the_copy_destination_is_refused");
    let (jail, _) = refused_link_at_copy_destination("symlink", "symlink", |victim, dest| {
        std::os::unix::fs::symlink(victim, dest)
    });
    assert!(!jail.pid_file().exists());
}

#[test]
fn hard_link_at_the_copy_destination_is_refused() {
    require!("hard_link_at_the_copy_destination_is_refused");
    let (_jail, victim) =
        refused_link_at_copy_destination("hardlink", "hard link", |victim, dest| {
            fs::hard_link(victim, dest)
        });
    assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o644);
}

#[test]
fn bad_ids_and_paths_are_refused_before_anything_is_created() {
    require!("bad_ids_and_paths_are_refused_before_anything_is_created");
    let jail = Jail::new("badargs");
    let long = "x".repeat(65);
    let cases = [
        ("--id", "../evil"),
        ("--id", "a/b"),
        ("--id", long.as_str()),
        ("--id", ""),
        ("--exec-file", "busybox"),
        ("--exec-file", "/bin/../bin/busybox"),
        ("--chroot-base-dir", "/tmp/../etc"),
        ("--parent-cgroup", "/abs"),
        ("--parent-cgroup", "a/../../b"),
        ("--cgroup", "../../memory.limit_in_bytes=1"),
        ("--netns", "/run/netns/../../proc/1/ns/net"),
        ("--resource-limit", "nproc=3"),
    ];
    for (flag, value) in cases {
        // Later flags override the fixture's, so each case tests one bad value.
        let out = jail.run_busybox(&[flag, value]);
        assert_clean_failure(&out, &format!("arguments: {flag}"));
    }
    let out = jail.run_busybox(&["--bogus"]);
    assert_clean_failure(&out, "arguments: unknown argument");
    assert!(
        !jail.base.join("citadel").exists(),
        "a refused command line created files"
    );
}

#[test]
fn too_small_no_file_limit_fails_cleanly() {
    require!("too_small_no_file_limit_fails_cleanly");
    let jail = Jail::new("nofile");
    let out = jail.run_busybox(&["--resource-limit", "no-file=3", "--", "true"]);
    assert_clean_failure(&out, "arguments: --resource-limit no-file=3 is too small");
    assert!(!jail.base.join("citadel").exists());
}

#[test]
fn a_failed_jail_leaves_nothing_a_retry_trips_over() {
    require!("a_failed_jail_leaves_nothing_a_retry_trips_over");
    let jail = Jail::new("retry");
    // Fails at the cgroup step, after the copy.
    let out = jail.run_busybox(&["--cgroup", "nosuch.max=1", "--", "true"]);
    assert_clean_failure(&out, "cgroup: ");
    assert!(
        !jail.base.join("citadel").exists(),
        "half-built jail left behind"
    );
    // Fails at the netns step, after the copy: the retry starts from scratch.
    let missing_netns = jail.base.join("no-such-netns");
    let out = jail.run_busybox(&[
        "--cgroup",
        "pids.max=20",
        "--netns",
        missing_netns.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_clean_failure(&out, "netns: open ");
    let out = jail.run_busybox(&["--cgroup", "pids.max=20", "--", "true"]);
    assert!(out.status.success(), "retry failed: {}", stderr_line(&out));
    let out = jail.run_busybox(&["--cgroup", "pids.max=20", "--", "true"]);
    assert!(
        out.status.success(),
        "second run over a finished jail failed: {}",
        stderr_line(&out)
    );
}

#[test]
fn exit_code_and_errors_after_the_fork_reach_the_operator() {
    require!("exit_code_and_errors_after_the_fork_reach_the_operator");
    let jail = Jail::new("exitcode");
    let out = jail.run_busybox(&["--new-pid-ns", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr_line(&out));
    // Landlock refuses to run a binary the jailed process wrote itself.
    let out = jail.run_busybox(&[
        "--landlock",
        "--keep-stdio",
        "--",
        "sh",
        "-c",
        "busybox cp /busybox /copy && /copy true",
    ]);
    assert!(!out.status.success(), "a copied binary ran under Landlock");
    assert!(
        stderr_line(&out).contains("Permission denied"),
        "{}",
        stderr_line(&out)
    );
    let out = jail.run_busybox(&["--landlock", "--", "true"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
}

#[test]
fn pid_file_allows_a_kill_in_every_daemonize_and_pid_namespace_combination() {
    require!("pid_file_allows_a_kill_in_every_daemonize_and_pid_namespace_combination");
    for daemonize in [false, true] {
        for pid_ns in [false, true] {
            let mut jail = Jail::new("pidfile");
            let mut extra = Vec::new();
            if daemonize {
                extra.push("--daemonize");
            }
            if pid_ns {
                extra.push("--new-pid-ns");
            }
            extra.extend(["--", "sleep", "1000"]);
            let mut cmd = jail.busybox_command(&extra);
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            let what = format!("daemonize={daemonize} new-pid-ns={pid_ns}");
            let mut child = cmd.spawn().expect("spawn jailer");
            if daemonize {
                let status = child.wait().unwrap();
                assert!(status.success(), "{what}: jailer failed");
            }
            let pid = jail.wait_pid();
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            assert_eq!(
                cmdline, b"/busybox\0sleep\x001000\0",
                "{what}: pid file points elsewhere"
            );
            if !daemonize && !pid_ns {
                assert_eq!(
                    status_field(pid, "PPid"),
                    child.id().to_string(),
                    "{what}: the jailer stays as the VMM's parent"
                );
            }
            jail.children.push(child);
            // SAFETY: kill takes integers; pid is our jailed process.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "{what}");
            if let Some(child) = jail.children.last_mut() {
                if !daemonize {
                    let status = child.wait().unwrap();
                    assert!(!status.success(), "{what}: killed VMM reported success");
                }
            }
            wait_gone(pid);
            let state = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            assert!(
                state.is_empty() || state.contains("State:\tZ"),
                "{what}: still alive"
            );
        }
    }
}

/// Places `guest` in the jail's root, as an operator places a kernel before starting the
/// jail (as with Firecracker), and starts citadel daemonized in the jail on it, with the
/// jailer options `jailer` and the VM options `vm`; returns its pid and a QMP client
/// connected in the jail.
fn start_jailed_citadel(jail: &Jail, guest: &Path, jailer: &[&str], vm: &[&str]) -> (i32, Qmp) {
    let name = guest.file_name().and_then(|n| n.to_str()).unwrap();
    fs::create_dir_all(jail.root()).unwrap();
    let placed = jail.root().join(name);
    fs::copy(guest, &placed).unwrap();
    fs::set_permissions(&placed, fs::Permissions::from_mode(0o644)).unwrap();
    let kernel = format!("/{name}");
    let mut args = jailer.to_vec();
    args.extend([
        "--daemonize",
        "--",
        "-machine",
        "microvm",
        "-kernel",
        &kernel,
        "-serial",
        "null",
        "-qmp",
        "unix:/qmp.sock,server,nowait",
    ]);
    args.extend_from_slice(vm);
    let out = jail.run(&citadel_tests::profile_dir().join("citadel"), &args);
    assert!(out.status.success(), "jailer failed: {}", stderr_line(&out));
    let pid = jail.wait_pid();
    let qmp = Qmp::connect(&jail.root().join("qmp.sock"), Duration::from_secs(20));
    (pid, qmp)
}

#[test]
fn jailed_citadel_is_locked_down_and_answers_qmp_in_the_jail() {
    require!("jailed_citadel_is_locked_down_and_answers_qmp_in_the_jail");
    let citadel = citadel_tests::profile_dir().join("citadel");
    let idle = citadel_tests::profile_dir()
        .parent()
        .map(|p| p.join("guest").join("idle.elf"))
        .unwrap();
    if !citadel.exists() || !idle.exists() {
        citadel_tests::skip(
            "jailed_citadel_is_locked_down_and_answers_qmp_in_the_jail",
            "citadel or guest/idle.elf not built (cargo build -p citadel; make -C guest)",
            true,
        );
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        citadel_tests::skip(
            "jailed_citadel_is_locked_down_and_answers_qmp_in_the_jail",
            "no /dev/kvm",
            false,
        );
        return;
    }
    let jail = Jail::new("citadel");
    let (pid, mut qmp) = start_jailed_citadel(
        &jail,
        &idle,
        &[
            "--new-pid-ns",
            "--userns",
            "--landlock",
            "--new-netns",
            "--cgroup",
            "pids.max=64",
        ],
        &["-m", "64", "-smp", "2"],
    );
    let greeting = qmp.greeting.clone();
    assert!(
        greeting["QMP"]["version"].is_object(),
        "greeting {greeting}"
    );
    assert!(qmp.execute("qmp_capabilities", None)["return"].is_object());
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["running"], true, "{status}");

    assert_unprivileged(pid);
    let tasks = dir_names(format!("/proc/{pid}/task"));
    assert!(
        tasks.len() >= 3,
        "expected the event loop and two vCPU threads: {tasks:?}"
    );
    for task in &tasks {
        let status = fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap();
        assert!(
            status.contains("Seccomp:\t2"),
            "task {task} is not filtered:\n{status}"
        );
        assert!(status.contains("NoNewPrivs:\t1"), "task {task}");
    }
    assert_own_namespaces(pid);
    assert!(qmp.execute("quit", None).get("return").is_some());
    wait_gone(pid);
}

/// QMP `migrate` of a jailed VM: the device launcher, in the jail, creates the snapshot
/// directory and files beneath the jail's root (a path climbing out of it stays inside), owned
/// by the jail's uid and private to it, and the VM stays usable.
#[test]
fn a_jailed_vm_is_snapshotted_inside_its_jail() {
    require!("a_jailed_vm_is_snapshotted_inside_its_jail");
    let profile = citadel_tests::profile_dir();
    let counter = citadel_tests::guest_program("counter");
    let jail = Jail::new("snapshot");
    let blk = profile.join("citadel-blk");
    let net = profile.join("citadel-net");
    let (pid, mut qmp) = start_jailed_citadel(
        &jail,
        &counter,
        &[
            "--new-pid-ns",
            "--landlock",
            "--new-netns",
            "--backend-file",
            blk.to_str().unwrap(),
            "--backend-file",
            net.to_str().unwrap(),
        ],
        &["-m", "32"],
    );
    assert!(qmp.execute("qmp_capabilities", None)["return"].is_object());
    let escape = format!("snap-escape-{}", std::process::id());
    for (uri, inside) in [
        ("file:/snap".to_string(), jail.root().join("snap")),
        (
            format!("file:/../../../{escape}"),
            jail.root().join(&escape),
        ),
    ] {
        let reply = qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })));
        assert_eq!(reply["return"], serde_json::json!({}), "{uri}: {reply}");
        for (path, mode) in [
            (inside.clone(), 0o700),
            (inside.join("state"), 0o600),
            (inside.join("memory"), 0o600),
        ] {
            let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (UID, GID, mode),
                "{}",
                path.display()
            );
        }
        assert_eq!(fs::metadata(inside.join("memory")).unwrap().len(), 32 << 20);
    }
    assert!(!Path::new("/").join(&escape).exists());
    let info = qmp.execute("query-migrate", None);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    assert!(qmp.execute("cont", None).get("return").is_some());
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], "running", "{status}");
    assert!(qmp.execute("quit", None).get("return").is_some());
    wait_gone(pid);
}

/// The q35 machine in a jail: a disk card hot-plugged into a root port over QMP, its image
/// inside the jail's root, served by a citadel-blk the launcher starts in the jail. The VMM
/// survives its filters while the card is built (eventfds, MSI routes) and the guest is asked
/// to release it; an idle guest never does, so the card stays and the VM runs on.
#[test]
fn a_jailed_q35_vm_hot_plugs_a_pci_disk_in_its_jail() {
    require!("a_jailed_q35_vm_hot_plugs_a_pci_disk_in_its_jail");
    let profile = citadel_tests::profile_dir();
    let idle = citadel_tests::guest_program("idle");
    let jail = Jail::new("q35");
    let blk = profile.join("citadel-blk");
    let net = profile.join("citadel-net");
    fs::create_dir_all(jail.root()).unwrap();
    let image = jail.root().join("disk.img");
    fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::chown(&image, Some(UID), Some(GID)).unwrap();
    let (pid, mut qmp) = start_jailed_citadel(
        &jail,
        &idle,
        &[
            "--new-pid-ns",
            "--landlock",
            "--new-netns",
            "--backend-file",
            blk.to_str().unwrap(),
            "--backend-file",
            net.to_str().unwrap(),
        ],
        &[
            "-machine",
            "q35",
            "-m",
            "32",
            "-device",
            "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1",
        ],
    );
    assert!(qmp.execute("qmp_capabilities", None)["return"].is_object());
    let add = qmp.execute(
        "blockdev-add",
        Some(serde_json::json!({"node-name": "drive-0",
            "file": {"driver": "file", "filename": "/disk.img"}})),
    );
    assert_eq!(add["return"], serde_json::json!({}), "{add}");
    let card = qmp.execute(
        "device_add",
        Some(
            serde_json::json!({"id": "drive-0", "driver": "virtio-blk-pci",
            "drive": "drive-0", "bus": "pcie.1", "addr": "0x0"}),
        ),
    );
    assert_eq!(card["return"], serde_json::json!({}), "{card}");
    let del = qmp.execute("device_del", Some(serde_json::json!({"id": "drive-0"})));
    assert_eq!(del["return"], serde_json::json!({}), "{del}");
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], "running", "{status}");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert!(qmp.execute("quit", None).get("return").is_some());
    wait_gone(pid);
}

#[test]
fn backends_are_copied_next_to_the_vmm_and_may_run_under_landlock() {
    require!("backends_are_copied_next_to_the_vmm_and_may_run_under_landlock");
    let jail = Jail::new("backends");
    let host_bin = jail.base.join("bin");
    fs::create_dir_all(&host_bin).unwrap();
    // busybox runs as busybox under any name starting with "busybox".
    let blk = host_bin.join("busybox-blk");
    fs::copy(BUSYBOX, &blk).unwrap();
    let out = jail.run_busybox(&[
        "--backend-file",
        blk.to_str().unwrap(),
        "--landlock",
        "--keep-stdio",
        "--",
        "sh",
        "-c",
        "/busybox-blk true && busybox ls -1 /",
    ]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = listing.lines().collect();
    names.sort();
    assert_eq!(names, ["busybox", "busybox-blk", "dev"]);
    let copied = fs::metadata(jail.root().join("busybox-blk")).unwrap();
    assert_eq!(
        (copied.uid(), copied.gid(), copied.mode() & 0o7777),
        (0, 0, 0o555)
    );
    assert_eq!(copied.nlink(), 1);
}

#[test]
fn cgroup_v2_is_used_when_it_offers_the_controllers_and_v1_otherwise() {
    require!("cgroup_v2_is_used_when_it_offers_the_controllers_and_v1_otherwise");
    let offered =
        fs::read_to_string(Path::new(UNIFIED).join("cgroup.controllers")).unwrap_or_default();
    let own_v2 = fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(String::from));
    let usable = offered.split_whitespace().any(|c| c == "hugetlb")
        && own_v2.as_deref() == Some("/")
        && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
    if !usable {
        citadel_tests::skip(
            "cgroup_v2_is_used_when_it_offers_the_controllers_and_v1_otherwise",
            "needs the hybrid layout with hugetlb on the v2 hierarchy and this process in its root",
            false,
        );
        return;
    }
    let jail = Jail::new("cgv2");
    let out = jail.run_busybox(&[
        "--daemonize",
        "--cgroup",
        "hugetlb.2MB.max=0",
        "--cgroup",
        "pids.max=9",
        "--",
        "sleep",
        "1000",
    ]);
    // pids is not on v2 here, so the whole set falls back to v1, where hugetlb is not mounted.
    assert_clean_failure(
        &out,
        "cgroup: no cgroup v1 hierarchy has the hugetlb controller",
    );
    let out = jail.run_busybox(&[
        "--daemonize",
        "--cgroup",
        "hugetlb.2MB.max=0",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let pid = jail.wait_pid();
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let expected = format!("0::/{}/{}", jail.parent_cgroup, jail.id);
    assert!(cgroup.lines().any(|l| l == expected), "{cgroup}");
    let leaf = Path::new(UNIFIED).join(&jail.parent_cgroup).join(&jail.id);
    assert_eq!(
        fs::read_to_string(leaf.join("hugetlb.2MB.max"))
            .unwrap()
            .trim(),
        "0"
    );
    let control = fs::read_to_string(
        Path::new(UNIFIED)
            .join(&jail.parent_cgroup)
            .join("cgroup.subtree_control"),
    )
    .unwrap();
    assert!(
        control.split_whitespace().any(|c| c == "hugetlb"),
        "{control}"
    );
    jail.kill_jailed();
    if !offered.split_whitespace().any(|c| c == "pids") {
        let out = jail.run_busybox(&[
            "--cgroup-version",
            "2",
            "--cgroup",
            "pids.max=9",
            "--",
            "true",
        ]);
        assert_clean_failure(&out, "cgroup: cgroup v2 asked for");
    }
}

#[test]
fn a_foreground_jailer_passes_sigterm_on_to_the_pid_namespace() {
    require!("a_foreground_jailer_passes_sigterm_on_to_the_pid_namespace");
    let mut jail = Jail::new("forward");
    let script = "trap 'exit 3' TERM; while :; do /busybox sleep 0.05; done";
    let mut cmd = jail.busybox_command(&["--new-pid-ns", "--", "sh", "-c", script]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    jail.children.push(cmd.spawn().expect("spawn jailer"));
    let pid = jail.wait_pid();
    // The trap must be installed before the signal arrives: wait until a sleep has started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .is_ok_and(|c| c.trim().is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "the jailed shell never ran its loop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let jailer = &mut jail.children[0];
    // SAFETY: kill takes integers; this is our own child.
    assert_eq!(unsafe { libc::kill(jailer.id() as i32, libc::SIGTERM) }, 0);
    let status = jailer.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "jailer did not hand SIGTERM on: {status:?}"
    );
}

#[test]
fn a_symlink_on_the_jail_path_is_refused_and_nothing_is_made_through_it() {
    require!("a_symlink_on_the_jail_path_is_refused_and_nothing_is_made_through_it");
    let jail = Jail::new("symlinkpath");
    // `<base>/citadel` swapped for a symlink to another directory.
    let elsewhere = jail.base.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, jail.base.join("citadel")).unwrap();
    let out = jail.run_busybox(&["--", "true"]);
    assert_clean_failure(&out, "copy: ");
    assert!(
        stderr_line(&out).ends_with(&format!(
            "{} is a symbolic link: refusing to follow it",
            jail.base.join("citadel").display()
        )),
        "{}",
        stderr_line(&out)
    );
    assert!(dir_names(&elsewhere).is_empty(), "the jail went through it");

    // A symlink above the base: the base given through it is refused the same way.
    let real = jail.base.join("real");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, jail.base.join("via")).unwrap();
    let out = Command::new(jailer())
        .args(["--id", &jail.id, "--exec-file", BUSYBOX])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(jail.base.join("via"))
        .args(["--parent-cgroup", &jail.parent_cgroup, "--", "true"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "copy: ");
    assert!(
        stderr_line(&out).contains("is a symbolic link"),
        "{}",
        stderr_line(&out)
    );
    assert!(dir_names(&real).is_empty(), "the jail went through it");
}

#[test]
fn an_ancestor_others_can_write_or_own_is_refused() {
    require!("an_ancestor_others_can_write_or_own_is_refused");
    let jail = Jail::new("ancestor");
    let shared = jail.base.join("shared");
    fs::create_dir(&shared).unwrap();
    let base = shared.join("jails");
    for (mode, owner, why) in [
        (0o775, 0, "writable by group or others (mode 0775)"),
        (0o757, 0, "writable by group or others (mode 0757)"),
        (0o755, UID, &*format!("owned by uid {UID}, not root")),
    ] {
        fs::set_permissions(&shared, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&shared, Some(owner), None).unwrap();
        let out = Command::new(jailer())
            .args(["--id", &jail.id, "--exec-file", BUSYBOX])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&base)
            .args(["--parent-cgroup", &jail.parent_cgroup, "--", "true"])
            .output()
            .unwrap();
        assert_clean_failure(&out, "copy: ");
        assert_eq!(
            stderr_line(&out),
            format!(
                "citadel-jailer: copy: {}: {why}: refusing to build a jail beneath it",
                shared.display()
            )
        );
        assert!(!base.exists(), "mode {mode:o}: the base was created");
    }
}

#[test]
fn the_jailed_uid_cannot_rewrite_or_replace_the_executables() {
    require!("the_jailed_uid_cannot_rewrite_or_replace_the_executables");
    let jail = Jail::new("readonly");
    let host_bin = jail.base.join("bin");
    fs::create_dir_all(&host_bin).unwrap();
    let blk = host_bin.join("busybox-blk");
    fs::copy(BUSYBOX, &blk).unwrap();
    let original = fs::read(BUSYBOX).unwrap();
    // Each attempt prints its exit status; every one must fail.
    let script = "\
        echo x > /busybox-blk; echo write=$?; \
        echo x >> /busybox; echo append=$?; \
        busybox chmod 0777 /busybox-blk; echo chmod=$?; \
        busybox mv /busybox-blk /moved; echo rename=$?; \
        busybox rm -f /busybox; echo unlink=$?; \
        busybox cp /busybox /copy && busybox mv -f /copy /busybox-blk; echo replace=$?";
    let out = jail.run_busybox(&[
        "--backend-file",
        blk.to_str().unwrap(),
        "--keep-stdio",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for attempt in ["write", "append", "chmod", "rename", "unlink", "replace"] {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{attempt}=")))
            .unwrap_or_else(|| panic!("no {attempt} result in {stdout}"));
        assert_ne!(line, "0", "{attempt} succeeded from inside the jail");
    }
    for name in ["busybox", "busybox-blk"] {
        let path = jail.root().join(name);
        assert_eq!(fs::read(&path).unwrap(), original, "{name} was changed");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o555), "{name}");
    }
}

#[test]
fn an_invalid_cgroup_value_leaves_no_cgroup_and_no_jail() {
    require!("an_invalid_cgroup_value_leaves_no_cgroup_and_no_jail");
    let jail = Jail::new("badvalue");
    // The directories are made, then the kernel refuses the value.
    let out = jail.run_busybox(&["--cgroup", "pids.max=bogus", "--", "true"]);
    assert_clean_failure(&out, "cgroup: write ");
    assert!(
        stderr_line(&out).ends_with("pids.max: Invalid argument (os error 22)"),
        "{}",
        stderr_line(&out)
    );
    assert!(!jail.base.join("citadel").exists(), "jail left behind");
    for (leaf, parent) in cgroup_dirs(&jail.parent_cgroup, &jail.id) {
        assert!(!leaf.exists(), "cgroup {} left", leaf.display());
        assert!(!parent.exists(), "cgroup {} left", parent.display());
    }
}

#[test]
fn a_failure_after_the_cgroup_move_and_the_pivot_leaves_nothing() {
    require!("a_failure_after_the_cgroup_move_and_the_pivot_leaves_nothing");
    for extra in [&[][..], &["--new-pid-ns"][..], &["--daemonize"][..]] {
        let jail = Jail::new("latefail");
        let host_bin = jail.base.join("bin");
        fs::create_dir_all(&host_bin).unwrap();
        // A regular file that is no program: copied in fine, refused by execve, the very last
        // step, after the cgroup move, the pivot and the privilege drop.
        let bogus = host_bin.join("notaprogram");
        fs::write(&bogus, b"neither ELF nor script\n").unwrap();
        let mut args = extra.to_vec();
        args.extend(["--cgroup", "pids.max=10", "--", "x"]);
        let out = jail.run(&bogus, &args);
        assert_clean_failure(&out, "exec: execve /notaprogram: ");
        assert!(
            !jail.base.join("citadel").exists(),
            "{extra:?}: jail left behind: {:?}",
            dir_names(jail.base.join("citadel"))
        );
        for (leaf, parent) in cgroup_dirs(&jail.parent_cgroup, &jail.id) {
            assert!(!leaf.exists(), "{extra:?}: cgroup {} left", leaf.display());
            assert!(
                !parent.exists(),
                "{extra:?}: cgroup {} left",
                parent.display()
            );
        }
    }
}

#[test]
fn stdio_is_dev_null_in_the_jail_and_the_jailer_holds_nothing_open() {
    require!("stdio_is_dev_null_in_the_jail_and_the_jailer_holds_nothing_open");
    let mut jail = Jail::new("stdio");
    let mut cmd = jail.busybox_command(&["--", "sleep", "1000"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn jailer");
    let jailer_pid = child.id();
    jail.children.push(child);
    let pid = jail.wait_pid();
    for fd in 0..3 {
        assert_eq!(
            fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(),
            Path::new("/dev/null"),
            "fd {fd} of the jailed process"
        );
    }
    assert_eq!(dir_names(format!("/proc/{pid}/fd")), ["0", "1", "2"]);
    // The jailer waiting in the foreground keeps only its own stdio: no pid file, no jail
    // directory, no pipe.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = dir_names(format!("/proc/{jailer_pid}/fd"));
        if fds == ["0", "1", "2"] {
            break;
        }
        assert!(Instant::now() < deadline, "the jailer holds {fds:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    for fd in 0..3 {
        let target = fs::read_link(format!("/proc/{jailer_pid}/fd/{fd}")).unwrap();
        assert!(
            !target.starts_with(jail.id_dir()),
            "jailer fd {fd} is {}",
            target.display()
        );
    }

    // With a PID namespace, the process waiting as the VMM's parent holds nothing either.
    let mut pidns = Jail::new("stdiopidns");
    let mut cmd = pidns.busybox_command(&["--new-pid-ns", "--", "sleep", "1000"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    pidns.children.push(cmd.spawn().expect("spawn jailer"));
    let pid = pidns.wait_pid();
    let parent = status_field(pid, "PPid");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = dir_names(format!("/proc/{parent}/fd"));
        if fds == ["0", "1", "2"] {
            break;
        }
        assert!(Instant::now() < deadline, "the VMM's parent holds {fds:?}");
        std::thread::sleep(Duration::from_millis(10));
    }

    // --keep-stdio hands the caller's descriptors on.
    let kept = Jail::new("keepstdio");
    let out = kept.run_busybox(&["--keep-stdio", "--", "echo", "through"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through\n");
}

#[test]
fn by_default_the_jail_has_its_own_network_and_a_pids_limit() {
    require!("by_default_the_jail_has_its_own_network_and_a_pids_limit");
    let pids_leaf = |jail: &Jail| {
        cgroup_dirs(&jail.parent_cgroup, &jail.id)
            .into_iter()
            .map(|(leaf, _)| leaf)
            .find(|leaf| leaf.starts_with("/sys/fs/cgroup/pids"))
    };
    let jail = Jail::new("defaults");
    let out = jail.run_busybox(&["--daemonize", "--", "sleep", "1000"]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let pid = jail.wait_pid();
    let me = std::process::id().to_string();
    assert_ne!(
        namespace(&pid.to_string(), "net"),
        namespace(&me, "net"),
        "the host's network namespace is shared by default"
    );
    let Some(leaf) = pids_leaf(&jail) else {
        citadel_tests::skip(
            "by_default_the_jail_has_its_own_network_and_a_pids_limit",
            "no cgroup v1 pids hierarchy on this host",
            false,
        );
        return;
    };
    assert_eq!(
        fs::read_to_string(leaf.join("pids.max")).unwrap().trim(),
        "1024"
    );
    let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");
    jail.kill_jailed();

    // The explicit opt-outs: the host's network namespace, no pids cgroup.
    let shared = Jail::new("optout");
    let out = shared.run_busybox(&[
        "--daemonize",
        "--host-netns",
        "--no-pids-limit",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", stderr_line(&out));
    let pid = shared.wait_pid();
    assert_eq!(namespace(&pid.to_string(), "net"), namespace(&me, "net"));
    assert!(pids_leaf(&shared).is_some_and(|leaf| !leaf.exists()));
}
