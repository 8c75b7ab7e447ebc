//! The nested-KVM lab: full Linux guests under Citadel on a host whose own KVM cannot run
//! Linux user space.
//!
//! QEMU with TCG emulates AMD SVM with nested paging, so a QEMU-TCG q35 machine (the lab's
//! first level, L1) running Debian's cloud kernel loads `kvm-amd` and offers a real
//! `/dev/kvm`. The lab boots L1 from an initramfs that carries Citadel's static binaries, the
//! project's guest kernel and guest initramfs (the second level, L2), the scenario scripts in
//! `tests/lab/scenarios/` and their helpers; L1's `/init` runs the scenarios it is asked for,
//! each under a time limit, and powers off. L1's console comes back line by line: L1's own
//! lines, every L2 serial line (`[L2 NAME] ...`) and every QMP exchange (`[qmp NAME >] ...`),
//! plus the results each scenario reports (`lab-result: SCENARIO KEY=VALUE`), which the tests
//! assert.
//!
//! Prerequisites, all installed or cached by `scripts/setup.sh`: `qemu-system-x86_64`, the L1
//! kernel (`scripts/lab-kernel.sh`), the guest kernel (`scripts/guest-kernel.sh`), busybox
//! (static), gcc (the guest's `aio-randread` and `edu-probe`, built from `tests/lab/*.c` into
//! the guest initramfs) and the workspace's binaries (`cargo build --workspace`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpio::append_newc_entry;
use crate::kernel::{guest_kernel, initramfs_with_files, qemu, ConsoleProcess};
use crate::vm::TempDir;

/// The binaries the lab carries into L1 (in `/lab/bin`).
const BINARIES: &[&str] = &[
    "citadel",
    "citadel-jailer",
    "citadel-blk",
    "citadel-net",
    "citadel-qmp",
];

/// The guest's C tools (`tests/lab/NAME.c`), built into its initramfs as `/bin/NAME`:
/// `aio-randread` for queue-depth benchmarks, `edu-probe` for the VFIO variant's `edu` device.
const GUEST_TOOLS: &[&str] = &["aio-randread", "edu-probe"];

/// Modules L1 loads, relative to `lib/modules/<release>/kernel/`.
const MODULES: &[&str] = &[
    "virt/lib/irqbypass.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
    "drivers/net/tun.ko",
    "drivers/vfio/vfio.ko",
    "drivers/vfio/vfio_virqfd.ko",
    "drivers/vfio/vfio_iommu_type1.ko",
    "drivers/vfio/pci/vfio-pci-core.ko",
    "drivers/vfio/pci/vfio-pci.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
];

/// Debian's own virtio modules, in load order, for its stock kernel as a guest (L2): its cloud
/// kernel builds them as modules, and the guest initramfs has no module tree. virtio-mmio
/// drives the microvm machine's devices, virtio-pci (with its legacy and modern transport
/// libraries) the cards plugged into the q35 machine's root ports; pcieport and pciehp are
/// built in.
const STOCK_GUEST_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

/// What the lab machine looks like.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// L1's RAM in MiB.
    pub memory_mib: u32,
    /// L1's CPUs.
    pub cpus: u32,
    /// Adds QEMU's intel-iommu, its `edu` PCI device and a virtio-blk function, bound to
    /// vfio-pci inside L1, and a two-function device whose shared IOMMU group is not viable.
    pub vfio: bool,
    /// Time limit of each scenario inside L1.
    pub scenario_timeout: Duration,
    /// Time limit of the whole run, L1 boot included.
    pub timeout: Duration,
    /// Carries this host's `qemu-system-x86_64` (with its libraries and x86 firmware) into L1
    /// as `/usr/bin/qemu-system-x86_64`, as a peer for benchmarks.
    pub with_qemu: bool,
    /// Appends every console line here as it arrives, so a long run can be followed
    /// (`tail -f`) and a hung one read before it times out.
    pub live_transcript: Option<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            memory_mib: 2048,
            cpus: 2,
            vfio: false,
            scenario_timeout: Duration::from_secs(420),
            timeout: Duration::from_secs(1800),
            with_qemu: false,
            live_transcript: None,
        }
    }
}

/// Why the lab could not run.
#[derive(Debug)]
pub enum LabError {
    /// Something the lab needs is not installed or built here.
    Missing(String),
    /// Building the L1 initramfs or running QEMU failed.
    Failed(String),
}

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabError::Missing(what) => write!(f, "the lab cannot start: {what}"),
            LabError::Failed(what) => write!(f, "the lab failed: {what}"),
        }
    }
}

/// What one scenario reported.
#[derive(Clone, Debug, Default)]
pub struct ScenarioOutcome {
    /// Its exit status inside L1 (124 when its time limit ended it), `None` if it never ended.
    pub rc: Option<i32>,
    /// `KEY=VALUE` results in the order reported.
    pub results: Vec<(String, String)>,
    /// Every console line between its begin and end markers.
    pub lines: Vec<String>,
}

impl ScenarioOutcome {
    /// The last value reported for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The scenario's console lines, for assertion messages.
    pub fn transcript(&self) -> String {
        self.lines.join("\n")
    }
}

/// One lab boot: what each scenario reported, and the whole console.
#[derive(Debug)]
pub struct LabRun {
    /// Every console line, L1's own prefixed with `[L1] `.
    pub transcript: Vec<String>,
    /// Scenario name to outcome.
    pub scenarios: BTreeMap<String, ScenarioOutcome>,
    /// From QEMU's start to L1's first line of user space.
    pub l1_boot: Option<Duration>,
    /// From QEMU's start to its exit.
    pub total: Duration,
}

impl LabRun {
    /// The outcome of `name`, or a panic that shows the console.
    pub fn scenario(&self, name: &str) -> &ScenarioOutcome {
        self.scenarios.get(name).unwrap_or_else(|| {
            panic!(
                "scenario {name} did not run in the lab\n{}",
                self.transcript.join("\n")
            )
        })
    }
}

/// A prepared lab: the L1 kernel and an initramfs with everything the scenarios need.
pub struct Lab {
    options: LabOptions,
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// The VFIO variant's disk for passthrough: 16 MiB starting with [`PASSTHROUGH_MARKER`].
    passthrough_disk: PathBuf,
    _dir: TempDir,
}

/// What the VFIO variant's passthrough disk starts with (the guest's `pci-hotplug` mode reads
/// this many bytes of a disk and reports them).
const PASSTHROUGH_MARKER: &[u8; 27] = b"citadel-lab-hotplug-marker!";

impl Lab {
    /// Checks the prerequisites and builds the L1 initramfs.
    pub fn prepare(options: LabOptions) -> Result<Lab, LabError> {
        let qemu = qemu().ok_or_else(|| {
            LabError::Missing("qemu-system-x86_64 is not installed (scripts/setup.sh)".into())
        })?;
        let l1 = lab_kernel_dir()?;
        let guest = guest_kernel().ok_or_else(|| {
            LabError::Missing("the guest kernel is not built (scripts/guest-kernel.sh)".into())
        })?;
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() {
            return Err(LabError::Missing(
                "/bin/busybox is not installed (busybox-static)".into(),
            ));
        }
        let dir = TempDir::new("lab");
        let failed = |what: &str, e: io::Error| LabError::Failed(format!("{what}: {e}"));

        let guest_initramfs = dir.path().join("guest-initramfs.cpio.gz");
        let lab_files = crate::workspace_root().join("tests/lab");
        let guest_script = read(&lab_files.join("guest-test.sh"))?;
        let mut tools = Vec::new();
        for name in GUEST_TOOLS {
            let binary = dir.path().join(name);
            compile_guest_tool(&lab_files.join(format!("{name}.c")), &binary)?;
            tools.push((format!("bin/{name}"), read(&binary)?));
        }
        let tool_files: Vec<(&str, u32, &[u8])> = tools
            .iter()
            .map(|(path, data)| (path.as_str(), 0o755, data.as_slice()))
            .collect();
        initramfs_with_files(
            &guest.initramfs,
            &String::from_utf8_lossy(&guest_script),
            &tool_files,
            &guest_initramfs,
        )
        .map_err(|e| failed("writing the guest initramfs", e))?;

        let release = String::from_utf8_lossy(&read(&l1.join("release"))?)
            .trim()
            .to_string();
        let module_root = format!("lib/modules/{release}/kernel");
        // The stock kernel's guest initramfs: the same, with its virtio modules in /modules,
        // which the guest's test script loads in the order given.
        let stock_initramfs = dir.path().join("stock-initramfs.cpio.gz");
        let mut stock_modules = Vec::new();
        for module in STOCK_GUEST_MODULES {
            let name = module.rsplit('/').next().unwrap_or(module);
            let data = read(&l1.join(&module_root).join(module))?;
            stock_modules.push((format!("modules/{name}"), data));
        }
        let files: Vec<(&str, u32, &[u8])> = stock_modules
            .iter()
            .map(|(path, data)| (path.as_str(), 0o644, data.as_slice()))
            .collect();
        initramfs_with_files(
            &guest.initramfs,
            &String::from_utf8_lossy(&guest_script),
            &files,
            &stock_initramfs,
        )
        .map_err(|e| failed("writing the stock kernel's guest initramfs", e))?;
        let mut archive = Archive::default();
        for d in [
            "bin",
            "lab",
            "lab/bin",
            "lab/guest",
            "lab/stock",
            "lab/scenarios",
            "lib",
            "proc",
            "sys",
            "dev",
            "tmp",
            "srv",
        ] {
            archive.dir(d)?;
        }
        archive.file("bin/busybox", 0o755, &read(busybox)?)?;
        archive.file("init", 0o755, &read(&lab_files.join("init"))?)?;
        archive.file("lab/lib.sh", 0o644, &read(&lab_files.join("lib.sh"))?)?;
        for entry in std::fs::read_dir(lab_files.join("scenarios"))
            .map_err(|e| failed("listing tests/lab/scenarios", e))?
        {
            let path = entry
                .map_err(|e| failed("listing tests/lab/scenarios", e))?
                .path();
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                archive.file(&format!("lab/scenarios/{name}"), 0o644, &read(&path)?)?;
            }
        }
        for name in BINARIES {
            let stripped = dir.path().join(name);
            strip(&crate::binary(name), &stripped)?;
            archive.file(&format!("lab/bin/{name}"), 0o755, &read(&stripped)?)?;
        }
        archive.file("lab/guest/vmlinux", 0o644, &read(&guest.vmlinux)?)?;
        archive.file("lab/guest/bzImage", 0o644, &read(&guest.bzimage)?)?;
        archive.file(
            "lab/guest/initramfs.cpio.gz",
            0o644,
            &read(&guest_initramfs)?,
        )?;
        // L2's stock kernel is L1's own: Debian's unmodified cloud kernel.
        archive.file("lab/stock/vmlinuz", 0o644, &read(&l1.join("vmlinuz"))?)?;
        archive.file(
            "lab/stock/initramfs.cpio.gz",
            0o644,
            &read(&stock_initramfs)?,
        )?;
        for module in MODULES {
            let source = l1.join(&module_root).join(module);
            archive.file(&format!("{module_root}/{module}"), 0o644, &read(&source)?)?;
        }
        if options.with_qemu {
            add_qemu(&mut archive, &qemu)?;
        }
        let initramfs = dir.path().join("l1-initramfs.cpio");
        std::fs::write(&initramfs, archive.finish()?)
            .map_err(|e| failed("writing the L1 initramfs", e))?;
        let passthrough_disk = dir.path().join("passthrough.img");
        if options.vfio {
            let mut image = PASSTHROUGH_MARKER.to_vec();
            image.resize(16 << 20, 0);
            std::fs::write(&passthrough_disk, image)
                .map_err(|e| failed("writing the passthrough disk", e))?;
        }

        Ok(Lab {
            options,
            qemu,
            kernel: l1.join("vmlinuz"),
            initramfs,
            passthrough_disk,
            _dir: dir,
        })
    }

    /// QEMU's command line for L1 running `scenarios` (none: an interactive shell).
    pub fn command(&self, scenarios: &[&str]) -> Command {
        let o = &self.options;
        let mut append = format!(
            "console=ttyS0 panic=-1 loglevel=4 lab.scenarios={} lab.scenario_timeout={}",
            scenarios.join(","),
            o.scenario_timeout.as_secs().max(1)
        );
        let mut command = Command::new(&self.qemu);
        // L1 has no XSAVE: with it, Debian 6.1's KVM in L1 (on TCG) reports CPUID 0xD.0 EBX as
        // the legacy 576 bytes once a guest has enabled AVX and PKRU in XCR0, and every L2 kernel
        // warns at boot ("XSAVE consistency problem: size 2696 != kernel_size 576"), under QEMU
        // as under Citadel (measured in the lab, both with `-cpu host`). The warning belongs to
        // the lab, not to the VMM under test, and would hide the ones that do.
        command
            .args(["-M", "q35,accel=tcg", "-cpu", "max,xsave=off"])
            .args(["-m", &o.memory_mib.to_string()])
            .args(["-smp", &o.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs);
        if o.vfio {
            command.args(["-device", "intel-iommu,intremap=on", "-device", "edu"]);
            // A modern virtio-blk function (1af4:1042, MSI-X) whose DMA goes through the IOMMU,
            // as a passed-through function's must.
            let mut drive = std::ffi::OsString::from("if=none,id=passthrough,format=raw,file=");
            drive.push(&self.passthrough_disk);
            command.arg("-drive").arg(drive).args([
                "-device",
                "virtio-blk-pci,drive=passthrough,disable-legacy=on,iommu_platform=on",
            ]);
            // Two functions of one device without ACS share an IOMMU group: L1 gives function 0
            // to vfio-pci and leaves function 1 to its own virtio-pci driver.
            command.args([
                "-device",
                "virtio-rng-pci,addr=0x6.0,multifunction=on,disable-legacy=on",
                "-device",
                "virtio-rng-pci,addr=0x6.1,disable-legacy=on",
            ]);
            append.push_str(" intel_iommu=on lab.vfio=1");
        }
        command.arg("-append").arg(append);
        command
    }

    /// Boots L1, runs `scenarios` in order, and collects what they reported.
    ///
    /// L1's own kernel can die under QEMU's TCG (seen here: a stack-guard-page hit in its
    /// exception entry code, and a "corrupted stack end" panic while KVM reset a vCPU of an SMP
    /// guest that had triple-faulted) or livelock (QEMU spinning, L1's console and heartbeat
    /// silent, its own time limits never firing). That is the emulated lab failing, not the VMM
    /// under test: when L1 dies or falls silent before its scenarios end, the lab boots again (at most [`L1_BOOTS`] times in
    /// all) and runs the scenario that was interrupted and those after it; the transcript keeps
    /// every boot.
    pub fn run(&self, scenarios: &[&str]) -> Result<LabRun, LabError> {
        let mut attempt = self.run_once(scenarios)?;
        let mut boots = 1;
        while attempt.l1_died && boots < L1_BOOTS {
            let remaining: Vec<&str> = scenarios
                .iter()
                .copied()
                .filter(|s| attempt.run.scenarios.get(*s).is_none_or(|o| o.rc.is_none()))
                .collect();
            let mut next = self.run_once(&remaining)?;
            boots += 1;
            let mut run = attempt.run;
            run.transcript.push(format!(
                "[lab] L1 died before its scenarios ended; boot {boots} of the lab runs {}",
                remaining.join(", ")
            ));
            run.transcript.append(&mut next.run.transcript);
            for name in remaining {
                run.scenarios.remove(name);
            }
            run.scenarios.append(&mut next.run.scenarios);
            run.total += next.run.total;
            next.run = run;
            attempt = next;
        }
        attempt.finish(self.options.timeout, boots)
    }

    fn run_once(&self, scenarios: &[&str]) -> Result<Attempt, LabError> {
        let mut live = match &self.options.live_transcript {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| LabError::Failed(format!("opening {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let mut command = self.command(scenarios);
        command.args(["-serial", "stdio"]);
        let started = Instant::now();
        let mut console = ConsoleProcess::spawn(command)
            .map_err(|e| LabError::Failed(format!("starting QEMU: {e}")))?;
        let mut run = LabRun {
            transcript: Vec::new(),
            scenarios: BTreeMap::new(),
            l1_boot: None,
            total: Duration::ZERO,
        };
        let deadline = started + self.options.timeout;
        let mut current: Option<String> = None;
        let mut done = false;
        let mut last_line = Instant::now();
        let mut stuck = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let lines = console.lines_for(left.min(Duration::from_millis(200)));
            if !lines.is_empty() {
                last_line = Instant::now();
            } else if run.l1_boot.is_some() && last_line.elapsed() > L1_SILENCE {
                run.transcript.push(format!(
                    "[lab] L1 silent for {L1_SILENCE:?} (its heartbeat stopped): stuck, killing QEMU"
                ));
                console.kill();
                stuck = true;
                break;
            }
            for line in lines {
                if run.l1_boot.is_none() && line.starts_with("lab: L1 up") {
                    run.l1_boot = Some(started.elapsed());
                }
                let tagged = if is_tagged(&line) {
                    line.clone()
                } else {
                    format!("[L1] {line}")
                };
                if let Some(live) = live.as_mut() {
                    let _ = writeln!(live, "{tagged}");
                }
                run.transcript.push(tagged.clone());
                if let Some(name) = line.strip_prefix("lab-scenario: begin ") {
                    let name = name.trim().to_string();
                    run.scenarios
                        .insert(name.clone(), ScenarioOutcome::default());
                    current = Some(name);
                    continue;
                }
                if let Some(rest) = line.strip_prefix("lab-scenario: end ") {
                    if let Some(outcome) = current.as_ref().and_then(|c| run.scenarios.get_mut(c)) {
                        outcome.rc = rest
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("rc="))
                            .and_then(|rc| rc.parse().ok());
                    }
                    current = None;
                    continue;
                }
                if line.starts_with("lab: done") {
                    done = true;
                }
                if line.starts_with("lab: heartbeat") {
                    continue;
                }
                let Some(outcome) = current.as_ref().and_then(|c| run.scenarios.get_mut(c)) else {
                    continue;
                };
                outcome.lines.push(tagged);
                if let Some(rest) = line.strip_prefix("lab-result: ") {
                    if let Some((_, kv)) = rest.split_once(' ') {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        outcome.results.push((k.to_string(), v.to_string()));
                    }
                }
            }
            if let Some(code) = console.wait_exit(Duration::ZERO) {
                run.transcript
                    .push(format!("[lab] QEMU exited with {code}"));
                break;
            }
            if done && console.wait_exit(Duration::from_secs(10)).is_some() {
                break;
            }
        }
        run.total = started.elapsed();
        // QEMU ending before L1 said it was done means L1 died (it reboots on panic, and QEMU
        // runs with -no-reboot), and so does L1 falling silent; a deadline that passed while
        // L1 kept talking is a hang of the scenarios, not a death.
        let l1_died = !done && (stuck || run.total < self.options.timeout);
        Ok(Attempt {
            run,
            done,
            l1_died,
            console: console.transcript(),
        })
    }
}

/// How many times [`Lab::run`] boots L1 when it keeps dying before its scenarios end.
const L1_BOOTS: u32 = 3;

/// How long L1 may say nothing on its console (it prints a heartbeat every 15 s) before the
/// harness takes it for stuck and kills QEMU.
const L1_SILENCE: Duration = Duration::from_secs(90);

/// Whether a console line already carries the tag of the level it comes from: an L2 serial line
/// or a QMP exchange relayed by a scenario. L1's kernel messages also start with `[` (their
/// timestamp) and are L1's own.
fn is_tagged(line: &str) -> bool {
    line.starts_with("[L2 ") || line.starts_with("[qmp ")
}

/// One boot of the lab.
struct Attempt {
    run: LabRun,
    /// L1 printed that every scenario ended.
    done: bool,
    /// L1 ended before its scenarios did.
    l1_died: bool,
    /// QEMU's console and stderr, for reports.
    console: String,
}

impl Attempt {
    fn finish(self, timeout: Duration, boots: u32) -> Result<LabRun, LabError> {
        let run = self.run;
        if !self.done {
            let mut why = String::from("L1 did not finish its scenarios");
            if self.l1_died {
                let _ = write!(why, ": it died in each of {boots} boots");
            } else if run.total >= timeout {
                let _ = write!(why, " within {timeout:?}");
            }
            let _ = write!(why, "\n{}\n{}", run.transcript.join("\n"), self.console);
            return Err(LabError::Failed(why));
        }
        if !run.transcript.iter().any(|l| l.contains("lab: kvm ready")) {
            return Err(LabError::Failed(format!(
                "L1 has no /dev/kvm\n{}",
                run.transcript.join("\n")
            )));
        }
        Ok(run)
    }
}

/// The cached L1 kernel directory (`scripts/lab-kernel.sh --path`).
fn lab_kernel_dir() -> Result<PathBuf, LabError> {
    let output = Command::new(crate::workspace_root().join("scripts/lab-kernel.sh"))
        .arg("--path")
        .stderr(Stdio::null())
        .output()
        .map_err(|e| LabError::Missing(format!("running scripts/lab-kernel.sh: {e}")))?;
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || dir.is_empty() {
        return Err(LabError::Missing(
            "the L1 kernel is not fetched (scripts/lab-kernel.sh)".into(),
        ));
    }
    Ok(PathBuf::from(dir))
}

fn read(path: &Path) -> Result<Vec<u8>, LabError> {
    std::fs::read(path).map_err(|e| LabError::Failed(format!("reading {}: {e}", path.display())))
}

/// Compiles a freestanding C tool for the guest (no C library: see its header) into a static
/// executable at `out`.
fn compile_guest_tool(source: &Path, out: &Path) -> Result<(), LabError> {
    let output = Command::new("gcc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            // Keeps the compiler from turning the tool's own memset loop into a call to memset.
            "-fno-tree-loop-distribute-patterns",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-fno-asynchronous-unwind-tables",
            "-Os",
            "-s",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(out)
        .arg(source)
        .output()
        .map_err(|e| LabError::Missing(format!("running gcc (scripts/setup.sh): {e}")))?;
    if !output.status.success() {
        return Err(LabError::Failed(format!(
            "compiling {}: {}",
            source.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies `from` to `to` without debug information: the lab's initramfs is unpacked by an
/// emulated CPU, so every megabyte costs boot time.
fn strip(from: &Path, to: &Path) -> Result<(), LabError> {
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| LabError::Failed(format!("copying {}: {e}", from.display()))),
    }
}

/// A newc archive under construction. Folders are added once, parents before children.
#[derive(Default)]
struct Archive {
    image: Vec<u8>,
    next_ino: u32,
    folders: std::collections::BTreeSet<String>,
}

impl Archive {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), LabError> {
        self.next_ino += 1;
        append_newc_entry(&mut self.image, self.next_ino, name, mode, data)
            .map_err(|e| LabError::Failed(format!("adding {name} to the initramfs: {e}")))
    }

    fn dir(&mut self, name: &str) -> Result<(), LabError> {
        let name = name.trim_matches('/');
        if name.is_empty() || self.folders.contains(name) {
            return Ok(());
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.folders.insert(name.to_string());
        self.entry(name, 0o040_755, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), LabError> {
        let name = name.trim_start_matches('/');
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(name, 0o100_000 | perm, data)
    }

    fn finish(mut self) -> Result<Vec<u8>, LabError> {
        append_newc_entry(&mut self.image, 0, "TRAILER!!!", 0, &[])
            .map_err(|e| LabError::Failed(format!("closing the initramfs: {e}")))?;
        Ok(self.image)
    }
}

/// Firmware QEMU's microvm machine loads when it boots a kernel directly.
const QEMU_FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "pvh.bin",
    "linuxboot_dma.bin",
    "kvmvapic.bin",
];

/// Adds `qemu` at /usr/bin/qemu-system-x86_64 with every library `ldd` names, at the same
/// paths, its microvm firmware and, when installed, SeaBIOS for its q35 machine.
fn add_qemu(archive: &mut Archive, qemu: &Path) -> Result<(), LabError> {
    // The storage daemon is QEMU's vhost-user-blk backend, the peer of citadel-blk.
    let storage_daemon = qemu.with_file_name("qemu-storage-daemon");
    if !storage_daemon.is_file() {
        return Err(LabError::Missing(format!(
            "{} is not installed (qemu-system-x86)",
            storage_daemon.display()
        )));
    }
    let mut libraries = std::collections::BTreeSet::new();
    for binary in [qemu, storage_daemon.as_path()] {
        let output = Command::new("ldd")
            .arg(binary)
            .output()
            .map_err(|e| LabError::Missing(format!("running ldd on {}: {e}", binary.display())))?;
        if !output.status.success() {
            return Err(LabError::Failed(format!(
                "ldd {}: {}",
                binary.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        // Lines are "name => /path (addr)" or "/path (addr)" for the dynamic loader.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
                libraries.insert(PathBuf::from(path));
            }
        }
    }
    for path in libraries {
        let data = read(&path)?;
        archive.file(&path.to_string_lossy(), 0o755, &data)?;
    }
    archive.file(
        "usr/bin/qemu-storage-daemon",
        0o755,
        &read(&storage_daemon)?,
    )?;
    archive.file("usr/bin/qemu-system-x86_64", 0o755, &read(qemu)?)?;
    for firmware in QEMU_FIRMWARE {
        let path = Path::new("/usr/share/qemu").join(firmware);
        archive.file(&path.to_string_lossy(), 0o644, &read(&path)?)?;
    }
    // QEMU's q35 firmware, SeaBIOS, which Debian keeps in its own package's directory: placed
    // where QEMU looks by default. Without it QEMU's q35 is benchmarked with qboot.
    if let Some(seabios) = SEABIOS.iter().map(Path::new).find(|p| p.exists()) {
        archive.file("usr/share/qemu/bios-256k.bin", 0o644, &read(seabios)?)?;
    }
    Ok(())
}

/// Where SeaBIOS (`bios-256k.bin`) may be on this host.
const SEABIOS: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/bios-256k.bin",
];
