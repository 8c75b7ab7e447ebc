//! `citadel-hotplug-bench`: how long disk hotplug takes over QMP.
//!
//! ```text
//! citadel-hotplug-bench [--rounds N] [--jailer]
//! ```
//!
//! Boots the `virtio_blk` guest program in `hotplug` mode with slot 0 on its command line, lets
//! it follow one plug and unplug (so that its driver has started the slot and every later plug
//! hands the guest's ring to the new backend), then times N rounds (default 200) of
//! `blockdev-add`, `device_add` and `device_del` as a client sees them: from writing the
//! command to reading its reply. Each round also times a `fork`+`exec` of `citadel-blk --help`
//! from this process, the floor under anything that starts a backend, so that host load hits
//! both alike. Between rounds it waits for the ended backend to be reaped. Prints the median
//! and the 90th percentile of each.
//!
//! `--jailer` runs Citadel under `citadel-jailer` (as root; new PID and user namespaces,
//! Landlock, a new network namespace and a pids cgroup) with the backends (`citadel-blk`,
//! `citadel-net`) copied into the jail and the image placed in it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use citadel_tests::kernel::ConsoleProcess;
use citadel_tests::procfs::children;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::{json, Value};

const STEP: Duration = Duration::from_secs(30);
const IMAGE_LEN: usize = 1 << 20;
/// Sector 0 of the image: what the guest must read through the first plugged backend.
const MARKER: &str = "citadel-hotplug-bench-sector0";
const GUEST_ARGS: [&str; 4] = [
    "-m",
    "32",
    "-append",
    "virtio_mmio.device=4K@0xd0000000:5 hotplug",
];
/// The uid and gid the jailed VMM runs as.
const JAIL_ID: u32 = 41_301;
/// Median of blockdev-add + device_add that the hotplug path aims to stay under.
const GOAL: Duration = Duration::from_millis(15);

fn usage(why: &str) -> ExitCode {
    eprintln!("citadel-hotplug-bench: {why}\nusage: citadel-hotplug-bench [--rounds N] [--jailer]");
    ExitCode::from(2)
}

/// The VM under measurement, plain or jailed.
enum Target {
    Plain {
        vm: Vm,
        /// Holds the image; removed on drop.
        _dir: TempDir,
    },
    Jailed(Jailed),
}

/// Citadel started by `citadel-jailer --keep-stdio`, its jail removed on drop.
struct Jailed {
    console: ConsoleProcess,
    base: TempDir,
    id: String,
    parent_cgroup: String,
}

impl Jailed {
    fn root(&self) -> PathBuf {
        self.base.path().join("citadel").join(&self.id).join("root")
    }

    /// The VMM's pid, from the jailer's pid file.
    fn vmm_pid(&self) -> Result<u32, String> {
        let file = self
            .base
            .path()
            .join("citadel")
            .join(&self.id)
            .join("citadel.pid");
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(pid) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                return Err(format!("no pid in {}", file.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        // The jailer passes SIGTERM on to the VMM (SIGKILL, the console's own drop, would leave
        // the VMM running). Once reaped, its pid may be another process's: only a process
        // whose parent is this one is still the jailer.
        let pid = self.console.pid();
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PPid:").map(|v| v.trim().to_string()));
        if ppid == Some(std::process::id().to_string()) {
            // SAFETY: kill(2) on a child of this process; it has not been reaped, since its
            // parent is still this process, so the pid is still the jailer's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            self.console.wait_exit(Duration::from_secs(10));
        }
        remove_cgroups(&self.parent_cgroup, &self.id);
    }
}

/// Removes the jail's cgroup and its parent in every hierarchy this process belongs to.
fn remove_cgroups(parent: &str, id: &str) {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let hierarchy = if controllers.is_empty() {
            PathBuf::from("/sys/fs/cgroup/unified")
        } else {
            Path::new("/sys/fs/cgroup").join(controllers)
        };
        let parent_dir = hierarchy.join(path.trim_start_matches('/')).join(parent);
        if !parent_dir.is_dir() {
            continue;
        }
        // The kernel frees a cgroup a moment after its last process exits.
        for _ in 0..100 {
            if std::fs::remove_dir(parent_dir.join(id)).is_ok() || !parent_dir.join(id).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir(&parent_dir);
    }
}

impl Target {
    /// The VM, its QMP socket and the image path to give `blockdev-add`.
    fn plain() -> (Target, PathBuf, PathBuf) {
        let dir = TempDir::new("hotplug-bench");
        let img = write_image(&dir.path().join("disk.img"));
        let vm = Vm::start(&citadel_tests::guest_program("virtio_blk"), &GUEST_ARGS);
        let qmp = vm.qmp_path.clone();
        (Target::Plain { vm, _dir: dir }, qmp, img)
    }

    /// Like [`Target::plain`], in a jail.
    fn jailed() -> Result<(Target, PathBuf, PathBuf), String> {
        let base = TempDir::new("hotplug-bench-jail");
        let id = format!("hotplug-bench-{}", std::process::id());
        let root = base.path().join("citadel").join(&id).join("root");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let guest = citadel_tests::guest_program("virtio_blk");
        std::fs::copy(&guest, root.join("virtio_blk.elf"))
            .map_err(|e| format!("copying {} into the jail: {e}", guest.display()))?;
        std::fs::set_permissions(
            root.join("virtio_blk.elf"),
            std::fs::Permissions::from_mode(0o644),
        )
        .map_err(|e| format!("chmod the guest program: {e}"))?;
        let img = write_image(&root.join("disk.img"));
        std::os::unix::fs::chown(&img, Some(JAIL_ID), Some(JAIL_ID))
            .map_err(|e| format!("chown {}: {e}", img.display()))?;
        let mut cmd = Command::new(citadel_tests::binary("citadel-jailer"));
        cmd.args(["--id", &id, "--exec-file"])
            .arg(citadel_tests::binary("citadel"))
            .arg("--backend-file")
            .arg(citadel_tests::binary("citadel-blk"))
            // Citadel starts its launcher only with both backends next to it.
            .arg("--backend-file")
            .arg(citadel_tests::binary("citadel-net"))
            .args(["--uid", &JAIL_ID.to_string(), "--gid", &JAIL_ID.to_string()])
            .arg("--chroot-base-dir")
            .arg(base.path())
            .args(["--parent-cgroup", &format!("citadel-bench-{id}")])
            .args(["--new-pid-ns", "--userns", "--landlock", "--keep-stdio"])
            .args(["--", "-machine", "microvm", "-kernel", "/virtio_blk.elf"])
            .args(["-qmp", "unix:/qmp.sock,server,nowait", "-serial", "stdio"])
            .args(GUEST_ARGS);
        let console =
            ConsoleProcess::spawn(cmd).map_err(|e| format!("starting citadel-jailer: {e}"))?;
        let jailed = Jailed {
            console,
            base,
            parent_cgroup: format!("citadel-bench-{id}"),
            id,
        };
        let qmp = jailed.root().join("qmp.sock");
        Ok((Target::Jailed(jailed), qmp, PathBuf::from("/disk.img")))
    }

    fn wait_serial(&mut self, needle: &str) -> Result<String, String> {
        match self {
            Target::Plain { vm, .. } => Ok(vm.wait_serial(needle, STEP)),
            Target::Jailed(j) => j.console.wait_for(needle, STEP).ok_or_else(|| {
                format!(
                    "no serial line containing {needle:?}\n{}",
                    j.console.transcript()
                )
            }),
        }
    }
}

fn write_image(path: &Path) -> PathBuf {
    let mut bytes = vec![0u8; IMAGE_LEN];
    bytes[..MARKER.len()].copy_from_slice(MARKER.as_bytes());
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_path_buf()
}

/// Sends `command` and returns how long its reply took, refusing anything but success.
fn timed(qmp: &mut Qmp, command: &str, arguments: Value) -> Result<Duration, String> {
    let start = Instant::now();
    let reply = qmp.execute(command, Some(arguments));
    let took = start.elapsed();
    if reply != json!({"return": {}}) {
        return Err(format!("{command}: {reply}"));
    }
    Ok(took)
}

/// `blockdev-add` and `device_add` of `img`: their times.
fn plug(qmp: &mut Qmp, img: &Path) -> Result<[Duration; 2], String> {
    let add = timed(
        qmp,
        "blockdev-add",
        json!({"node-name": "drive-0", "file": {"driver": "file", "filename": img},
            "cache": {"direct": false}, "read-only": false}),
    )?;
    let plug = timed(
        qmp,
        "device_add",
        json!({"id": "drive-0", "driver": "virtio-blk-mmio", "addr": "0x0", "drive": "drive-0"}),
    )?;
    Ok([add, plug])
}

/// `device_del`: its time.
fn unplug(qmp: &mut Qmp) -> Result<Duration, String> {
    let took = timed(qmp, "device_del", json!({"id": "drive-0"}))?;
    qmp.events.clear();
    Ok(took)
}

/// Waits until no process below `pid` other than its launcher (its one child) remains, so
/// that a backend still ending does not share the CPUs with the next round.
fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while children(pid)
        .into_iter()
        .flat_map(children)
        .next()
        .is_some()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `fork`+`exec` of `citadel-blk --help`, to its exit.
fn floor(blk: &Path) -> Result<Duration, String> {
    let start = Instant::now();
    let status = Command::new(blk)
        .arg("--help")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", blk.display()))?;
    let took = start.elapsed();
    if !status.success() {
        return Err(format!("{} --help: {status}", blk.display()));
    }
    Ok(took)
}

/// Nearest-rank percentile of sorted `values`.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(rounds: usize, jailer: bool) -> Result<(), String> {
    let blk = citadel_tests::binary("citadel-blk");
    let (mut target, qmp_path, img) = if jailer {
        Target::jailed()?
    } else {
        Target::plain()
    };
    target.wait_serial("citadel-guest: hotplug waiting-for-plug")?;
    let mut qmp = Qmp::connect(&qmp_path, STEP);
    if qmp.execute("qmp_capabilities", None) != json!({"return": {}}) {
        return Err("QMP negotiation refused".into());
    }
    let vmm = match &target {
        Target::Plain { vm, .. } => vm.pid(),
        Target::Jailed(j) => j.vmm_pid()?,
    };

    // The guest follows the first round, one step at a time (it sees one configuration change
    // per step); its driver keeps the slot started afterwards.
    plug(&mut qmp, &img)?;
    let line = target.wait_serial("citadel-guest: hotplug read status=")?;
    if !line.contains(&format!("status=0 sector0={MARKER}")) {
        return Err(format!("the guest could not read the plugged disk: {line}"));
    }
    target.wait_serial("citadel-guest: hotplug waiting-for-unplug")?;
    unplug(&mut qmp)?;
    let line = target.wait_serial("citadel-guest: hotplug unplugged-read status=")?;
    if !line.ends_with("status=1") {
        return Err(format!("the guest saw the warm-up round wrong: {line}"));
    }

    let mut series: [Vec<Duration>; 5] = Default::default();
    for _ in 0..rounds {
        settle(vmm);
        let floor = floor(&blk)?;
        settle(vmm);
        let [add, plug] = plug(&mut qmp, &img)?;
        let unplug = unplug(&mut qmp)?;
        for (list, value) in series
            .iter_mut()
            .zip([add + plug, add, plug, unplug, floor])
        {
            list.push(value);
        }
    }
    for list in series.iter_mut() {
        list.sort_unstable();
    }
    let profile = citadel_tests::profile_dir();
    let profile = profile
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "disk hotplug over QMP, {rounds} rounds, {profile} build{}; ms, median / p90",
        if jailer {
            ", citadel-jailer (pidns, userns, landlock, netns, pids cgroup)"
        } else {
            ""
        }
    );
    let names = [
        "blockdev-add + device_add",
        "blockdev-add",
        "device_add",
        "device_del",
        "fork+exec citadel-blk --help (floor)",
    ];
    for (name, list) in names.iter().zip(&series) {
        println!(
            "  {name:<38} {:8.2} / {:8.2}",
            ms(percentile(list, 50)),
            ms(percentile(list, 90))
        );
    }
    let plug_median = percentile(&series[0], 50);
    let floor_median = percentile(&series[4], 50);
    println!(
        "  blockdev-add + device_add / floor, medians: {:.2}x",
        plug_median.as_secs_f64() / floor_median.as_secs_f64()
    );
    println!(
        "  goal, median blockdev-add + device_add <= {} ms: {}",
        GOAL.as_millis(),
        if plug_median <= GOAL {
            "met"
        } else {
            "not met"
        }
    );
    if qmp.execute("quit", None) != json!({"return": {}}) {
        return Err("quit refused".into());
    }
    match &mut target {
        Target::Plain { vm, .. } => {
            vm.wait_exit(STEP);
        }
        Target::Jailed(j) => {
            j.console.wait_exit(STEP);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut rounds = 200;
    let mut jailer = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => match args.next().and_then(|v| v.parse::<usize>().ok()) {
                Some(n) if n > 0 => rounds = n,
                _ => return usage("--rounds takes a positive number"),
            },
            "--jailer" => jailer = true,
            "-h" | "--help" => return usage("help"),
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    match run(rounds, jailer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("citadel-hotplug-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
