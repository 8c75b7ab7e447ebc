//! `citadel`: the VMM binary.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;

use citadel::boot::BootSource;
use citadel::cli::{self, CliError, Config, NetdevTap, SerialTarget};
use citadel::daemon::{self, PidFile};
use citadel::devices::legacy::{Discard, SerialOut};
use citadel::devices::vhost_user::BACKEND_TIMEOUT;
use citadel::devices::vhost_user_blk::VhostUserBlk;
use citadel::hotplug::Hotplug;
use citadel::lockdown::{self, LandlockChoice};
use citadel::machine::{Incoming, Machine, MachineSpec, MachineWiring};
use citadel::monitor::{Channels, Monitor};
use citadel::vcpu;
use citadel_launcher::{Launcher, LauncherConfig};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};

/// Anything that stops the VMM before or while running, as one line for the user.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error("serial output {path}: {source}")]
    Serial {
        path: String,
        source: std::io::Error,
    },
    #[error("log file {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Monitor(#[from] citadel::monitor::MonitorError),
    #[error(transparent)]
    Machine(#[from] citadel::machine::MachineError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Lockdown(#[from] lockdown::LockdownError),
    #[error("installing the vhost-user deadline signal handler: {0}")]
    DeadlineSignal(std::io::Error),
    #[error(transparent)]
    Disk(#[from] citadel::devices::vhost_user::VhostUserError),
    #[error(transparent)]
    ColdPlug(#[from] citadel::hotplug::ColdPlugError),
    #[error("the current directory, for relative -drive and -chardev paths: {0}")]
    CurrentDir(std::io::Error),
    #[error(transparent)]
    Inherit(#[from] citadel::passed_fds::InheritError),
    #[error("-add-fd fd={fd}: {why}")]
    AddFd { fd: i32, why: String },
    #[error("-netdev tap,id={id},fds={fd}: {why}")]
    NetdevFd { id: String, fd: i32, why: String },
    #[error("-incoming file:{dir}: {source}")]
    Incoming {
        dir: String,
        source: citadel::snapshot::format::FormatError,
    },
}

/// The descriptors inherited from the parent, owned.
struct Inherited {
    /// Those of `-add-fd`.
    add_fds: Vec<(cli::AddFdConfig, OwnedFd)>,
    /// The taps of `-netdev tap,fds=`, by netdev id.
    taps: BTreeMap<String, OwnedFd>,
}

/// Takes the descriptors `-add-fd` and `-netdev tap,fds=` name before anything else is
/// opened (see [`citadel::passed_fds::adopt_inherited`]); a tap's is checked to be one, so
/// that a wrong number is refused before the VM starts.
fn adopt_inherited(config: &Config) -> Result<Inherited, RunError> {
    let add_fds = config
        .add_fds
        .iter()
        .map(|add| Ok((add.clone(), citadel::passed_fds::adopt_inherited(add.fd)?)))
        .collect::<Result<_, RunError>>()?;
    let mut taps = BTreeMap::new();
    for netdev in &config.netdevs {
        let NetdevTap::Fd(fd) = netdev.tap else {
            continue;
        };
        let refuse = |why: String| RunError::NetdevFd {
            id: netdev.id.clone(),
            fd,
            why,
        };
        let owned =
            citadel::passed_fds::adopt_inherited(fd).map_err(|e| refuse(e.source.to_string()))?;
        citadel_tap::check_tap(owned.as_fd()).map_err(|e| refuse(e.to_string()))?;
        taps.insert(netdev.id.clone(), owned);
    }
    Ok(Inherited { add_fds, taps })
}

fn init_logging(config: &Config) -> Result<(), RunError> {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(path) = &config.log_file {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| RunError::Log {
                path: path.display().to_string(),
                source,
            })?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    builder.init();
    Ok(())
}

fn serial_output(target: &SerialTarget) -> Result<SerialOut, RunError> {
    Ok(match target {
        SerialTarget::Stdio => {
            Box::new(daemon::dup_stdout().map_err(|source| RunError::Serial {
                path: "stdout".into(),
                source,
            })?)
        }
        SerialTarget::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| RunError::Serial {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
        SerialTarget::None => Box::new(Discard),
    })
}

/// Starts the device launcher with the backends installed next to citadel's own executable:
/// `/proc/self/exe`, or where an absolute `argv[0]` says it is (in a jail, which has no /proc,
/// the jailer passes the executable's path in the jail).
fn start_launcher(config: &Config) -> Result<Launcher, String> {
    let exe = std::env::current_exe()
        .or_else(|e| {
            std::env::args_os()
                .next()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .ok_or(e)
        })
        .map_err(|e| format!("cannot locate citadel's own executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let blk_binary = dir.join("citadel-blk");
    let net_binary = dir.join("citadel-net");
    for binary in [&blk_binary, &net_binary] {
        if !binary.is_file() {
            return Err(format!("no backend binary at {}", binary.display()));
        }
    }
    Launcher::start(LauncherConfig {
        blk_binary,
        net_binary,
        seccomp_action: config.seccomp,
        landlock: config.landlock != LandlockChoice::Off,
    })
    .map_err(|e| e.to_string())
}

fn run(config: Config, inherited: Inherited) -> Result<i32, RunError> {
    let readiness = if config.daemonize {
        Some(daemon::daemonize()?)
    } else {
        None
    };
    build_and_run(&config, inherited, readiness)
}

fn build_and_run(
    config: &Config,
    inherited: Inherited,
    mut readiness: Option<daemon::Readiness>,
) -> Result<i32, RunError> {
    let setup = || -> Result<(Monitor, Option<PidFile>), RunError> {
        // Decided before anything is created, so that a refusal leaves nothing behind.
        let plan = lockdown::plan(citadel_sandbox::kernel_landlock_abi(), config.landlock)?;
        log::info!(
            "starting VM {}{} ({} vCPUs, {} MiB, kernel {})",
            config.name.as_deref().unwrap_or("(unnamed)"),
            config
                .uuid
                .as_deref()
                .map(|u| format!(" {u}"))
                .unwrap_or_default(),
            config.vcpus,
            config.mem_bytes >> 20,
            config.kernel.display()
        );
        // Every check of a snapshot to restore passes before anything is made or started.
        let incoming = config
            .incoming
            .as_ref()
            .map(|incoming| {
                let dir = &incoming.dir;
                let refused = |source| RunError::Incoming {
                    dir: dir.display().to_string(),
                    source,
                };
                let snapshot = citadel::snapshot::files::read(
                    dir,
                    config.mem_bytes,
                    u32::from(config.vcpus),
                    incoming.verify,
                )
                .map_err(refused)?;
                let disk_slots: Vec<u64> = config.blk_devices.iter().map(|d| d.slot).collect();
                citadel::snapshot::check_plugged(
                    &snapshot.state,
                    &disk_slots,
                    config.nic_devices.len(),
                )
                .map_err(refused)?;
                let cards: Vec<(String, u32)> = config
                    .pci_devices
                    .iter()
                    .map(|d| {
                        let kind = if d.netdev.is_some() {
                            VIRTIO_ID_NET
                        } else {
                            VIRTIO_ID_BLOCK
                        };
                        (d.bus.clone(), kind)
                    })
                    .collect();
                citadel::snapshot::pci::check_cards(&snapshot.state, &cards).map_err(refused)?;
                Ok::<_, RunError>(snapshot)
            })
            .transpose()?;
        // Forked while the process is still single-threaded, before anything else is made.
        let launcher = start_launcher(config);
        if let Err(why) = &launcher {
            log::warn!("disk and NIC hotplug unavailable: {why}");
        }
        // Every disk slot may get a backend, whose answers are bounded by a deadline.
        citadel::devices::deadline::register_handler().map_err(RunError::DeadlineSignal)?;
        let mut hotplug = Hotplug::new(launcher);
        for (add, fd) in inherited.add_fds {
            hotplug
                .fds_mut()
                .add(Some(add.set), fd, add.opaque)
                .map_err(|e| RunError::AddFd {
                    fd: add.fd,
                    why: e.desc,
                })?;
        }
        // The command line's drives start before any file is made, so that one refusing
        // leaves nothing behind.
        if !config.drives.is_empty() {
            let cwd = std::env::current_dir().map_err(RunError::CurrentDir)?;
            hotplug.add_drives(&config.drives, &config.blk_devices, &cwd)?;
        }
        hotplug.add_netdevs(&config.netdevs, inherited.taps)?;
        if !config.disks.is_empty() || !config.chardevs.is_empty() {
            let cwd = std::env::current_dir().map_err(RunError::CurrentDir)?;
            hotplug.add_chardevs(&config.disks, &config.chardevs, &cwd)?;
        }
        // Backends are reached before any file is made, so that one refusing leaves nothing
        // behind, and before the process is confined: afterwards it may open no socket.
        let disks = config
            .disks
            .iter()
            .map(|d| {
                log::info!(
                    "disk {}: connecting to its vhost-user backend at {}",
                    d.id.as_deref().unwrap_or("(no id)"),
                    d.socket.display()
                );
                VhostUserBlk::connect(&d.socket, BACKEND_TIMEOUT)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serial_out = serial_output(&config.serial)?;
        // Written before the process is confined: afterwards it may create no file.
        let mut pidfile = config.pidfile.as_deref().map(PidFile::create).transpose()?;
        let mut qmp = config
            .qmp
            .as_deref()
            .map(|path| Monitor::bind_qmp(path, config.qmp_mode))
            .transpose()?;
        if !plan.removes_its_files() {
            pidfile.iter_mut().for_each(PidFile::keep);
            if let Some((server, _)) = qmp.as_mut() {
                server.keep_socket_file();
            }
        }
        let channels = Channels::new()?;
        let (events_tx, events_rx) = mpsc::channel();
        vcpu::register_kick_handler()?;
        let boot = BootSource {
            kernel: config.kernel.clone(),
            pcie: false,
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            virtio_mmio: Vec::new(),
        };
        let spec = MachineSpec {
            boot: &boot,
            pcie: (config.machine == cli::MachineType::Q35).then_some(&config.root_ports[..]),
            vcpus: config.vcpus,
            mem_bytes: config.mem_bytes,
            cpu_template: config.cpu_template,
            balloon: config.balloon.as_ref(),
            incoming: incoming
                .as_ref()
                .zip(config.incoming.as_ref())
                .map(|(snapshot, options)| Incoming {
                    snapshot,
                    prefault: options.prefault,
                    share: options.share,
                }),
        };
        let mode = config.seccomp;
        let vcpu_filter = std::sync::Arc::new(lockdown::vcpu_filter(mode)?);
        let removable: Vec<PathBuf> = [config.qmp.as_deref(), config.pidfile.as_deref()]
            .into_iter()
            .flatten()
            .map(|p| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        let wiring = MachineWiring {
            serial_out,
            events: events_tx,
            events_ready: channels
                .vcpu_ready
                .try_clone()
                .map_err(citadel::monitor::MonitorError::Io)?,
            vcpu_lockdown: Box::new(move |_| {
                let filter = vcpu_filter.clone();
                Box::new(move || filter.install().map_err(|e| e.to_string()))
            }),
            before_vcpu_threads: Box::new(move || {
                let dirs: Vec<&Path> = removable.iter().map(PathBuf::as_path).collect();
                lockdown::confine_process(&plan, &dirs).map_err(|e| e.to_string())
            }),
            disks,
        };
        let mut machine = Machine::create(&spec, wiring)?;
        hotplug.cold_plug(machine.virtio(), &config.blk_devices, &config.nic_devices)?;
        hotplug.cold_plug_pci(machine.virtio(), &config.pci_devices)?;
        machine.restore_pci()?;
        let monitor = Monitor::new(
            machine,
            hotplug,
            channels,
            events_rx,
            qmp,
            config.serial == SerialTarget::Stdio,
            config.start_paused,
        )?;
        let monitor = match &config.uuid {
            Some(uuid) => monitor.with_uuid(uuid.clone()),
            None => monitor,
        };
        lockdown::event_loop_thread(&plan, mode)?;
        Ok((monitor, pidfile))
    };
    let (monitor, _pidfile) = match setup() {
        Ok(v) => v,
        Err(e) => {
            if let Some(r) = readiness.take() {
                r.failed(&e.to_string());
            }
            return Err(e);
        }
    };
    if let Some(r) = readiness.take() {
        r.ready();
    }
    let reason = monitor.run()?;
    if let citadel::monitor::ExitReason::Fatal(why) = &reason {
        eprintln!("citadel: {why}");
    }
    Ok(reason.exit_code())
}

fn main() -> ExitCode {
    // First of all, so that no crash, even during setup, writes guest data to a core file.
    if let Err(e) = citadel_sandbox::core_dump::disable_core_dumps() {
        eprintln!("citadel: {e}");
        return ExitCode::from(1);
    }
    let config = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(CliError::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(CliError::Version) => {
            println!("citadel {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("citadel: {e}");
            return ExitCode::from(1);
        }
    };
    let inherited = match adopt_inherited(&config) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("citadel: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = init_logging(&config) {
        eprintln!("citadel: {e}");
        return ExitCode::from(1);
    }
    match run(config, inherited) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("citadel: {e}");
            ExitCode::from(1)
        }
    }
}
