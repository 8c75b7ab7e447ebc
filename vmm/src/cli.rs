//! Command line in StratoVirt's (and QEMU's) syntax: single-dash options, comma-separated
//! sub-options, sizes in MiB unless suffixed.
//!
//! Everything is validated here, before any resource is created, so that a bad command line
//! costs nothing and reports one line.

use std::path::PathBuf;

use crate::cpu::CpuTemplate;
use crate::devices::balloon::BalloonOptions;
use crate::devices::pcie::RootPortSpec;
use crate::lockdown::LandlockChoice;
use citadel_pci::root_port::RootPortConfig;

/// Largest vCPU count accepted; the MP table and APIC ids are 8-bit.
pub const MAX_VCPUS: u8 = 254;

/// A parsed and validated command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `-name`: shown in logs.
    pub name: Option<String>,
    /// `-kernel`.
    pub kernel: PathBuf,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub cmdline: String,
    /// `-smp`.
    pub vcpus: u8,
    /// `-m`, in bytes.
    pub mem_bytes: u64,
    /// `-cpu`.
    pub cpu_template: CpuTemplate,
    /// `-qmp unix:PATH,server,nowait`.
    pub qmp: Option<PathBuf>,
    /// `-qmp ...,mode=OCTAL`: permission bits of the QMP socket file (default 0600).
    pub qmp_mode: u32,
    /// `-serial`.
    pub serial: SerialTarget,
    /// `-D`: log file instead of stderr.
    pub log_file: Option<PathBuf>,
    /// `-daemonize`.
    pub daemonize: bool,
    /// `-pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `-seccomp kill|log`: what a syscall outside a thread's allowlist does.
    pub seccomp: citadel_seccomp::Mode,
    /// `-S`: build the VM but keep its vCPUs stopped until `cont`.
    pub start_paused: bool,
    /// `-sandbox landlock=on|off[,landlock-abi=N]`: whether Landlock is required.
    pub landlock: LandlockChoice,
    /// `-device vhost-user-blk-device,chardev=ID`, in command-line order: the order of their
    /// virtio-mmio slots.
    pub disks: Vec<VhostUserBlkConfig>,
    /// `-drive`: images served by backends the VMM starts, in command-line order.
    pub drives: Vec<DriveConfig>,
    /// `-device virtio-blk-device,drive=ID`, in command-line order: the order of the
    /// hot-replace disk slots they fill.
    pub blk_devices: Vec<BlkDeviceConfig>,
    /// `-netdev tap`: taps served by backends the VMM starts, in command-line order.
    pub netdevs: Vec<NetdevConfig>,
    /// `-device virtio-net-device,netdev=ID`, in command-line order: the order of the
    /// hot-replace NIC slots they fill.
    pub nic_devices: Vec<NicDeviceConfig>,
    /// `-uuid`: the VM's UUID, shown in logs and by `query-uuid`.
    pub uuid: Option<String>,
    /// `-add-fd`: descriptors inherited from the parent, for `/dev/fdset/N` images.
    pub add_fds: Vec<AddFdConfig>,
    /// `-device virtio-balloon-device`: the balloon, which takes the virtio-mmio slot after
    /// every other device.
    pub balloon: Option<BalloonOptions>,
    /// `-chardev` sockets no device of the command line uses, in command-line order.
    pub chardevs: Vec<ChardevConfig>,
    /// `-incoming file:DIR[,prefault=on|off][,share=on|off][,verify=on|off]`: the snapshot
    /// the VM is restored from instead of booting.
    pub incoming: Option<IncomingConfig>,
    /// `-machine`: the machine type.
    pub machine: MachineType,
    /// `-device pcie-root-port`, in command-line order (q35 only).
    pub root_ports: Vec<RootPortSpec>,
    /// `-device virtio-blk-pci` and `virtio-net-pci`: cards in root ports at start (q35
    /// only).
    pub pci_devices: Vec<PciDeviceConfig>,
}

/// `-device virtio-blk-pci,drive=ID,bus=PORT[,addr=0x0][,id=NAME]` or
/// `-device virtio-net-pci,netdev=ID,bus=PORT[,addr=0x0][,id=NAME][,mac=MAC]` or
/// `-device vfio-pci,host=ADDRESS,bus=PORT[,addr=0x0][,id=NAME]`: a card plugged into root
/// port PORT before the guest starts, as `device_add` would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceConfig {
    /// The device model.
    pub driver: String,
    /// The device id `device_del` takes: `id=`, or the drive's or netdev's id.
    pub id: String,
    /// The root port's id.
    pub bus: String,
    /// The `-drive` a disk serves.
    pub drive: Option<String>,
    /// The `-netdev` a NIC serves.
    pub netdev: Option<String>,
    /// A NIC's `mac=`.
    pub mac: Option<[u8; 6]>,
    /// The host PCI function a `vfio-pci` card passes through.
    pub host: Option<String>,
}

/// The machine types Citadel builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineType {
    /// The lightweight machine: virtio-mmio slots, no PCI.
    Microvm,
    /// The standard machine: the microvm machine plus a PCI Express segment with root ports.
    Q35,
}

/// `-incoming file:DIR[,prefault=on|off][,share=on|off][,verify=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingConfig {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Read all of guest RAM before the VM starts (`prefault=on`), instead of each page when
    /// the guest first touches it.
    pub prefault: bool,
    /// Copy guest RAM into the shared memory backends map (`share=on`), so that disks and
    /// NICs served by backend processes can be plugged; on whenever the command line plugs
    /// one.
    pub share: bool,
    /// Check the memory file's checksum before anything runs (`verify=on`, the default), a
    /// read of the whole file; with `verify=off` only its length is checked.
    pub verify: bool,
}

/// `-add-fd fd=F,set=N[,opaque=S]`: descriptor F, inherited from the parent, joins fd set N
/// (then `-drive file=/dev/fdset/N` or QMP's `blockdev-add` can use it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFdConfig {
    /// The inherited descriptor (above stderr).
    pub fd: i32,
    /// The fd set.
    pub set: u64,
    /// A string shown with it by `query-fdsets`.
    pub opaque: Option<String>,
}

/// `-netdev tap,id=ID,ifname=NAME|fds=FD`: a tap the VMM has a `citadel-net` serve, like a
/// QMP `netdev_add` at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevConfig {
    /// The id devices refer to.
    pub id: String,
    /// The tap.
    pub tap: NetdevTap,
}

/// Where a `-netdev tap`'s tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetdevTap {
    /// `ifname=`: opened by name (and created when missing).
    Ifname(String),
    /// `fds=` (or QEMU's `fd=`): a tap descriptor inherited open from the parent, as Kata
    /// Containers passes it.
    Fd(i32),
}

/// `-device virtio-net-device,netdev=ID[,id=NAME][,mac=MAC]`: a netdev cold-plugged into the
/// next hot-replace NIC slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicDeviceConfig {
    /// The device id `device_del` takes: `id=`, or the netdev's id.
    pub id: String,
    /// The `-netdev` it serves.
    pub netdev: String,
    /// `mac=`: must be the slot's own MAC (the guest's driver reads it at boot).
    pub mac: Option<[u8; 6]>,
}

/// `-drive file=PATH,id=ID[,readonly=on|off][,direct=on|off]`: an image the VMM has a
/// `citadel-blk` serve, like a QMP `blockdev-add` at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// The node name devices refer to.
    pub id: String,
    /// The image, as given.
    pub file: PathBuf,
    /// Open the image read-only and fail the guest's writes.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT) with `direct=on`. Off by default, as for
    /// `blockdev-add`: a slot's logical block size is 512 bytes, and direct I/O on an image
    /// whose file system aligns it to 4 KiB cannot serve one.
    pub direct: bool,
}

/// `-device virtio-blk-device,drive=ID[,id=NAME][,addr=N]`: a drive cold-plugged into
/// hot-replace disk slot `addr`, or the lowest one no other device of the command line takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkDeviceConfig {
    /// The device id `device_del` takes: `id=`, or the drive's id.
    pub id: String,
    /// The disk slot it plugs into.
    pub slot: u64,
    /// The `-drive` it serves.
    pub drive: String,
    /// `serial=`: what the guest's GET_ID reads (`/sys/block/vda/serial`).
    pub serial: Option<String>,
}

/// A disk served by a vhost-user backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlkConfig {
    /// The device's `id=`, if given.
    pub id: Option<String>,
    /// The `-chardev` the device names.
    pub chardev: String,
    /// The backend's socket, from the `-chardev socket,path=` the device names.
    pub socket: PathBuf,
}

/// A `-chardev socket,id=ID,path=PATH` no `-device` of the command line uses: connected at
/// start like a QMP `chardev-add`, for a later `device_add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevConfig {
    /// The id `device_add`'s `chardev` refers to.
    pub id: String,
    /// The socket's path.
    pub path: PathBuf,
}

/// `-chardev socket,id=ID,path=PATH`: the client end of a Unix socket.
struct Chardev {
    id: String,
    path: PathBuf,
}

/// `-device virtio-blk-device,drive=ID[,id=DEV][,serial=S][,addr=N]` before its drive is
/// resolved.
struct BlkDeviceArg {
    value: String,
    id: Option<String>,
    drive: String,
    serial: Option<String>,
    addr: Option<u64>,
}

/// `-device vhost-user-blk-device,chardev=ID[,id=DEV]` before its chardev is resolved.
struct DeviceArg {
    value: String,
    id: Option<String>,
    chardev: String,
}

/// Where the COM1 serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// The monitor's own stdin/stdout.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded.
    None,
}

/// A command line that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An option nobody knows.
    #[error("unknown option '{0}' (see `citadel -help`)")]
    Unknown(String),
    /// An option given without its value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid value '{value}' for '{option}': {why}")]
    Invalid {
        /// The option.
        option: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A required option is absent.
    #[error("missing required option '{0}'")]
    Required(&'static str),
    /// A known option or value that Citadel does not implement yet.
    #[error("{0} is not supported by this version of citadel")]
    Unsupported(String),
    /// A known option Citadel refuses on principle.
    #[error("option '{option}' is refused: {why}")]
    Refused {
        /// The option.
        option: String,
        /// Why, and what to use instead.
        why: &'static str,
    },
    /// `-help` was asked for.
    #[error("help requested")]
    Help,
    /// `-version` was asked for.
    #[error("version requested")]
    Version,
}

/// Usage text printed by `-help`.
pub const USAGE: &str = "\
usage: citadel -machine microvm|q35 -kernel PATH [-initrd PATH] [-append CMDLINE]
               [-smp N] [-m SIZE] [-cpu host|baseline]
               [-qmp unix:PATH,server,nowait[,mode=0600|0660|0666]]
               [-serial stdio|file:PATH|none] [-name NAME] [-D LOGFILE]
               [-daemonize] [-pidfile PATH] [-seccomp kill|log] [-S]
               [-sandbox landlock=on|off[,landlock-abi=N]]
               [-uuid UUID] [-add-fd fd=F,set=N[,opaque=S]]...
               [-drive file=PATH,id=ID[,readonly=on|off][,direct=on|off][,if=none]
                       [,format=raw][,aio=native|io_uring|threads|off]]...
               [-device virtio-blk-device,drive=ID[,id=NAME][,serial=S][,addr=N][,bootindex=N]]...
               [-netdev tap,id=ID,ifname=NAME|fds=FD[,script=no][,downscript=no]
                        [,vhost=off][,vnet_hdr=on][,queues=1]]...
               [-device virtio-net-device,netdev=ID[,id=NAME][,mac=MAC]]...
               [-chardev socket,id=ID,path=PATH
                [-device vhost-user-blk-device,chardev=ID[,id=NAME]]]...
               [-device virtio-balloon-device[,id=NAME][,deflate-on-oom=on|off]
                       [,free-page-reporting=on|off]]
               [-incoming file:DIR[,prefault=on|off][,share=on|off][,verify=on|off]]
SIZE is in MiB unless suffixed with K, M or G. The QMP socket is created with mode 0600
(only the VMM's uid may connect) whatever the umask; mode= widens it to a group or everyone.
Landlock is required unless -sandbox landlock=off; landlock-abi=N uses at most ABI N (for
testing older kernels). Each vhost-user-blk device connects to its backend's socket at
start and takes the next virtio-mmio slot after the hot-replace ones (at most 8); a
-chardev no device names is connected at start for QMP's device_add. Each -drive (at most 16) starts a
citadel-blk serving its image, through the page cache unless direct=on; flushes reach the
disk either way. Each virtio-blk-device plugs a drive into one of the 6 hot-replace disk
slots before the guest starts (addr=, or the lowest one left); device_del takes it out like a disk plugged over QMP. A
-drive no device uses is a block node for QMP's device_add. serial= is at most 20
printable ASCII bytes, read by the guest's GET_ID. -add-fd puts descriptor F, inherited
open from the parent, in fd set N: -drive file=/dev/fdset/N (or QMP's blockdev-add) then
serves a file the VMM need not be able to open. Each -netdev (at most 8) starts a
citadel-net on the tap (created when missing), or on tap descriptor FD inherited open from the
parent (fds=; one queue: one descriptor); each virtio-net-device plugs one into the
next of the 2 NIC slots, whose MACs are fixed (52:54:00:c1:7a:00 and :01): a different
mac= is refused. One virtio-balloon-device lets QMP's balloon take memory back from the
guest; the pages it gives up are returned to the host. It takes the slot after the
vhost-user-blk devices (then at most 7 of them). -incoming restores the snapshot QMP's
migrate wrote into DIR, given the same -smp, -m and devices; the VM runs at once (-S keeps
it paused). Its RAM is read from DIR/memory as the guest touches it, or all before it starts
with prefault=on; share=on (implied by -drive and -netdev devices, which must plug the slots,
or the q35 root ports' cards, the saved VM had plugged) copies it into shared memory first, so that disk and NIC backends
can map it; verify=off skips the memory file's checksum (its length is still checked), which
otherwise reads the whole file before the VM starts. -disable-seccomp is refused: -seccomp log logs a forbidden system call instead
of killing the VMM.";

fn invalid(option: &str, value: &str, why: impl Into<String>) -> CliError {
    CliError::Invalid {
        option: option.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// Parses a memory size: a plain number is MiB; K, M, G (optionally followed by `B` or `iB`)
/// are binary multiples.
pub fn parse_size(option: &str, value: &str) -> Result<u64, CliError> {
    let trimmed = value.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(invalid(option, value, "expected a number"));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| invalid(option, value, "number out of range"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(invalid(
                option,
                value,
                "unknown size suffix (use K, M or G)",
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| invalid(option, value, "size out of range"))
}

/// Splits `a,b=c,d` into the leading positional part (empty when the first part is itself a
/// `key=value`) and the `key=value` pairs.
fn split_options(value: &str) -> (&str, Vec<(&str, Option<&str>)>) {
    let mut parts = value.split(',').peekable();
    let head = match parts.peek() {
        Some(first) if !first.contains('=') => parts.next().unwrap_or(""),
        _ => "",
    };
    let rest = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
        .collect();
    (head, rest)
}

fn parse_machine(value: &str) -> Result<MachineType, CliError> {
    let (head, opts) = split_options(value);
    let mut machine = head;
    for (key, val) in opts {
        match (key, val) {
            ("type", Some(v)) => machine = v,
            // Accepted for compatibility with StratoVirt command lines; Citadel has no
            // alternative to either.
            ("dump-guest-core" | "mem-share", Some(_)) => {}
            _ => {
                return Err(invalid(
                    "-machine",
                    value,
                    format!("unknown property '{key}'"),
                ))
            }
        }
    }
    match machine {
        "microvm" => Ok(MachineType::Microvm),
        "q35" => Ok(MachineType::Q35),
        "pc" | "standard_vm" => Err(CliError::Unsupported(format!(
            "machine type '{machine}' (the standard machine is q35)"
        ))),
        _ => Err(invalid(
            "-machine",
            value,
            "unknown machine type (expected microvm or q35)",
        )),
    }
}

fn parse_smp(value: &str) -> Result<u8, CliError> {
    let (head, opts) = split_options(value);
    let mut cpus: Option<&str> = (!head.is_empty()).then_some(head);
    for (key, val) in opts {
        match (key, val) {
            ("cpus", Some(v)) => cpus = Some(v),
            ("maxcpus" | "sockets" | "dies" | "clusters" | "cores" | "threads", Some(v)) => {
                v.parse::<u32>()
                    .map_err(|_| invalid("-smp", value, format!("'{key}' must be a number")))?;
            }
            _ => return Err(invalid("-smp", value, format!("unknown property '{key}'"))),
        }
    }
    let cpus = cpus.ok_or_else(|| invalid("-smp", value, "no CPU count"))?;
    let n: u32 = cpus
        .parse()
        .map_err(|_| invalid("-smp", value, "expected a CPU count"))?;
    if n == 0 || n > u32::from(MAX_VCPUS) {
        return Err(invalid(
            "-smp",
            value,
            format!("CPU count must be between 1 and {MAX_VCPUS}"),
        ));
    }
    Ok(n as u8)
}

/// Default mode of the QMP socket file: only the VMM's own uid (and root) can connect.
pub const QMP_DEFAULT_MODE: u32 = 0o600;

/// Parses `-qmp unix:PATH,server,nowait[,mode=OCTAL]` into the path and the socket mode.
fn parse_qmp(value: &str) -> Result<(PathBuf, u32), CliError> {
    let (head, opts) = split_options(value);
    let path = head
        .strip_prefix("unix:")
        .ok_or_else(|| invalid("-qmp", value, "only unix:PATH sockets are supported"))?;
    if path.is_empty() {
        return Err(invalid("-qmp", value, "empty socket path"));
    }
    let mut server = false;
    let mut mode = None;
    for (key, val) in opts {
        match (key, val) {
            ("server", None | Some("on")) => server = true,
            ("mode", Some(m)) => {
                if mode.is_some() {
                    return Err(invalid("-qmp", value, "mode given twice"));
                }
                // Read and write are what connect needs; execute bits mean nothing on a
                // socket, and the owner always keeps access.
                mode = match u32::from_str_radix(m, 8) {
                    Ok(bits @ (0o600 | 0o660 | 0o666)) => Some(bits),
                    _ => return Err(invalid("-qmp", value, "mode must be 0600, 0660 or 0666")),
                };
            }
            ("nowait", None) | ("wait", Some("off")) => {}
            ("wait", Some("on")) => {
                return Err(CliError::Unsupported("-qmp with wait=on".to_string()))
            }
            _ => return Err(invalid("-qmp", value, format!("unknown property '{key}'"))),
        }
    }
    if !server {
        return Err(invalid(
            "-qmp",
            value,
            "citadel listens for QMP clients: add ',server,nowait'",
        ));
    }
    Ok((PathBuf::from(path), mode.unwrap_or(QMP_DEFAULT_MODE)))
}

fn parse_serial(value: &str) -> Result<SerialTarget, CliError> {
    match value {
        "stdio" => Ok(SerialTarget::Stdio),
        "none" | "null" => Ok(SerialTarget::None),
        _ => match value.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialTarget::File(PathBuf::from(path))),
            _ => Err(invalid(
                "-serial",
                value,
                "expected stdio, file:PATH or none",
            )),
        },
    }
}

fn non_empty_path(option: &str, value: &str) -> Result<PathBuf, CliError> {
    if value.is_empty() {
        return Err(invalid(option, value, "empty path"));
    }
    Ok(PathBuf::from(value))
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Config, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args = args.into_iter().map(Into::into);
    let mut machine = None;
    let mut root_ports: Vec<RootPortSpec> = Vec::new();
    let mut pci_devices: Vec<PciDeviceConfig> = Vec::new();
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = String::new();
    let mut vcpus = 1u8;
    let mut mem_bytes = 256u64 << 20;
    let mut cpu_template = CpuTemplate::Host;
    let mut qmp = None;
    let mut serial = SerialTarget::None;
    let mut log_file = None;
    let mut daemonize = false;
    let mut pidfile = None;
    let mut name = None;
    let mut seccomp = citadel_seccomp::Mode::Kill;
    let mut start_paused = false;
    let mut landlock = LandlockChoice::Required;
    let mut chardevs: Vec<Chardev> = Vec::new();
    let mut devices: Vec<DeviceArg> = Vec::new();
    let mut drives: Vec<DriveConfig> = Vec::new();
    let mut blk_devices: Vec<BlkDeviceArg> = Vec::new();
    let mut netdevs: Vec<NetdevConfig> = Vec::new();
    let mut nic_devices: Vec<NicDeviceArg> = Vec::new();
    let mut uuid = None;
    let mut add_fds: Vec<AddFdConfig> = Vec::new();
    let mut balloon: Option<(String, BalloonOptions)> = None;
    let mut incoming = None;

    while let Some(arg) = args.next() {
        // QEMU accepts `--opt` as well as `-opt`.
        let option = match arg.strip_prefix("--") {
            Some(rest) if arg.len() > 2 => format!("-{rest}"),
            _ => arg.clone(),
        };
        let mut value = |opt: &str| {
            args.next()
                .ok_or_else(|| CliError::MissingValue(opt.into()))
        };
        match option.as_str() {
            "-h" | "-help" => return Err(CliError::Help),
            "-version" => return Err(CliError::Version),
            "-machine" | "-M" => {
                machine = Some(parse_machine(&value(&option)?)?);
            }
            "-kernel" => kernel = Some(non_empty_path(&option, &value(&option)?)?),
            "-initrd" => initrd = Some(non_empty_path(&option, &value(&option)?)?),
            "-append" => cmdline = value(&option)?,
            "-smp" => vcpus = parse_smp(&value(&option)?)?,
            "-m" => {
                let v = value(&option)?;
                let (head, opts) = split_options(&v);
                let mut size = (!head.is_empty()).then_some(head);
                for (key, val) in opts {
                    match (key, val) {
                        ("size", Some(s)) => size = Some(s),
                        _ => return Err(invalid("-m", &v, format!("unknown property '{key}'"))),
                    }
                }
                let size = size.ok_or_else(|| invalid("-m", &v, "no size"))?;
                mem_bytes = parse_size("-m", size)?;
            }
            "-cpu" => {
                let v = value(&option)?;
                cpu_template = v
                    .parse()
                    .map_err(|_| invalid("-cpu", &v, "expected host or baseline"))?;
            }
            "-qmp" => qmp = Some(parse_qmp(&value(&option)?)?),
            "-serial" => serial = parse_serial(&value(&option)?)?,
            "-D" => log_file = Some(non_empty_path(&option, &value(&option)?)?),
            "-daemonize" => daemonize = true,
            "-S" => start_paused = true,
            "-pidfile" => pidfile = Some(non_empty_path(&option, &value(&option)?)?),
            "-name" => name = Some(value(&option)?),
            "-seccomp" => {
                let v = value(&option)?;
                seccomp = v
                    .parse()
                    .map_err(|_| invalid("-seccomp", &v, "expected kill or log"))?;
            }
            "-sandbox" => landlock = parse_sandbox(&value(&option)?)?,
            "-chardev" => {
                let chardev = parse_chardev(&value(&option)?)?;
                if chardevs.iter().any(|c| c.id == chardev.id) {
                    return Err(invalid(
                        "-chardev",
                        &chardev.id,
                        "a chardev with this id already exists",
                    ));
                }
                chardevs.push(chardev);
            }
            "-device" => {
                let v = value(&option)?;
                if split_options(&v).0 == "virtio-blk-device" {
                    blk_devices.push(parse_blk_device(&v)?);
                } else if split_options(&v).0 == "virtio-net-device" {
                    nic_devices.push(parse_nic_device(&v)?);
                } else if matches!(
                    split_options(&v).0,
                    "virtio-blk-pci" | "virtio-net-pci" | "vfio-pci"
                ) {
                    pci_devices.push(parse_pci_device(&v)?);
                } else if split_options(&v).0 == "pcie-root-port" {
                    let port = parse_root_port(&v)?;
                    if root_ports.iter().any(|p| p.id == port.id) {
                        return Err(invalid(
                            "-device",
                            &v,
                            "a root port with this id already exists",
                        ));
                    }
                    root_ports.push(port);
                } else if split_options(&v).0 == "virtio-balloon-device" {
                    if balloon.is_some() {
                        return Err(invalid("-device", &v, "a VM has at most one balloon"));
                    }
                    balloon = Some((v.clone(), parse_balloon_device(&v)?));
                } else {
                    devices.push(parse_device(&v)?);
                }
            }
            "-drive" => {
                let v = value(&option)?;
                let drive = parse_drive(&v)?;
                // Each drive is a backend process.
                if drives.len() == crate::hotplug::MAX_NODES {
                    return Err(invalid(
                        "-drive",
                        &v,
                        format!(
                            "too many drives: a VM has at most {} block nodes",
                            crate::hotplug::MAX_NODES
                        ),
                    ));
                }
                if drives.iter().any(|d| d.id == drive.id) {
                    return Err(invalid(
                        "-drive",
                        &drive.id,
                        "a drive with this id already exists",
                    ));
                }
                drives.push(drive);
            }
            "-uuid" => uuid = Some(parse_uuid(&value(&option)?)?),
            "-add-fd" => {
                let v = value(&option)?;
                let add = parse_add_fd(&v)?;
                if add_fds.len() == crate::passed_fds::MAX_IN_FDSETS {
                    return Err(invalid(
                        "-add-fd",
                        &v,
                        format!(
                            "too many: a VM holds at most {} descriptors in fd sets",
                            crate::passed_fds::MAX_IN_FDSETS
                        ),
                    ));
                }
                if add_fds.iter().any(|a| a.fd == add.fd) {
                    return Err(invalid("-add-fd", &v, "this descriptor is given already"));
                }
                add_fds.push(add);
            }
            "-disable-seccomp" => {
                return Err(CliError::Refused {
                    option,
                    why: "citadel always runs under its seccomp filters; '-seccomp log' logs a \
                          forbidden system call instead of killing the VMM",
                })
            }
            "-netdev" => {
                let v = value(&option)?;
                let netdev = parse_netdev(&v)?;
                // Each netdev is a backend process.
                if netdevs.len() == crate::net_hotplug::MAX_NETDEVS {
                    return Err(invalid(
                        "-netdev",
                        &v,
                        format!(
                            "too many netdevs: a VM has at most {}",
                            crate::net_hotplug::MAX_NETDEVS
                        ),
                    ));
                }
                if netdevs.iter().any(|n| n.id == netdev.id) {
                    return Err(invalid(
                        "-netdev",
                        &netdev.id,
                        "a netdev with this id already exists",
                    ));
                }
                netdevs.push(netdev);
            }
            "-incoming" => incoming = Some(parse_incoming(&value(&option)?)?),
            "-object" => return Err(CliError::Unsupported(format!("option '{option}'"))),
            _ => return Err(CliError::Unknown(arg)),
        }
    }

    let machine = machine.ok_or(CliError::Required("-machine"))?;
    if machine == MachineType::Microvm && !root_ports.is_empty() {
        return Err(invalid(
            "-device",
            "pcie-root-port",
            "root ports need the q35 machine (-machine q35)",
        ));
    }
    check_pci_devices(&pci_devices, &root_ports, &drives, &netdevs)?;
    if machine == MachineType::Q35 && !(blk_devices.is_empty() && nic_devices.is_empty()) {
        return Err(invalid(
            "-device",
            if blk_devices.is_empty() {
                "virtio-net-device"
            } else {
                "virtio-blk-device"
            },
            "the q35 machine has no virtio-mmio disk or NIC slots (hot-plug virtio-blk-pci into a pcie-root-port)",
        ));
    }
    let kernel = kernel.ok_or(CliError::Required("-kernel"))?;
    if daemonize && serial == SerialTarget::Stdio {
        return Err(invalid(
            "-serial",
            "stdio",
            "stdio is not available with -daemonize",
        ));
    }
    check_inherited_descriptors(&netdevs, &add_fds)?;
    let disks = resolve_devices(&devices, &chardevs)?;
    let chardevs = chardevs
        .into_iter()
        .filter(|c| !disks.iter().any(|d| d.chardev == c.id))
        .map(|c| ChardevConfig {
            id: c.id,
            path: c.path,
        })
        .collect();
    let blk_devices = resolve_blk_devices(&blk_devices, &drives, &disks)?;
    let nic_devices = resolve_nic_devices(&nic_devices, &netdevs, &disks, &blk_devices)?;
    let balloon = resolve_balloon(balloon, &disks, &blk_devices, &nic_devices)?;
    // A snapshot never holds a vhost-user-blk device or a passed-through host function (see
    // `Machine::check_snapshot`), so none may come back with one; disks and NICs plugged into
    // slots need RAM they can share.
    if let Some(incoming) = incoming.as_mut() {
        let refuse = |why| {
            invalid(
                "-incoming",
                &format!("file:{}", incoming.dir.display()),
                why,
            )
        };
        if !disks.is_empty() {
            return Err(refuse(
                "snapshots never hold vhost-user-blk devices; restore without them",
            ));
        }
        if pci_devices.iter().any(|d| d.host.is_some()) {
            return Err(refuse(
                "snapshots never hold passed-through host functions; restore without vfio-pci",
            ));
        }
        incoming.share |=
            !blk_devices.is_empty() || !nic_devices.is_empty() || !pci_devices.is_empty();
    }
    Ok(Config {
        machine,
        root_ports,
        pci_devices,
        incoming,
        balloon,
        disks,
        chardevs,
        netdevs,
        nic_devices,
        drives,
        blk_devices,
        uuid,
        add_fds,
        name,
        kernel,
        initrd,
        cmdline,
        vcpus,
        mem_bytes,
        cpu_template,
        qmp_mode: qmp.as_ref().map_or(QMP_DEFAULT_MODE, |(_, mode)| *mode),
        qmp: qmp.map(|(path, _)| path),
        serial,
        log_file,
        daemonize,
        pidfile,
        seccomp,
        start_paused,
        landlock,
    })
}

/// `-incoming file:DIR[,prefault=on|off][,share=on|off][,verify=on|off]`, the only kind of
/// incoming migration Citadel restores. A comma always starts an option: DIR cannot hold one.
fn parse_incoming(value: &str) -> Result<IncomingConfig, CliError> {
    let refuse = || {
        invalid(
            "-incoming",
            value,
            "Citadel restores snapshots from \
             'file:<directory>[,prefault=on|off][,share=on|off][,verify=on|off]' only",
        )
    };
    let rest = value.strip_prefix("file:").ok_or_else(refuse)?;
    let (dir, options) = rest.split_once(',').unwrap_or((rest, ""));
    if dir.is_empty() {
        return Err(refuse());
    }
    let (head, opts) = split_options(options);
    if !head.is_empty() {
        return Err(invalid(
            "-incoming",
            value,
            format!("unknown property '{head}'"),
        ));
    }
    let mut prefault = false;
    let mut share = false;
    let mut verify = true;
    for (key, val) in opts {
        match (key, val) {
            ("prefault", Some(v)) => prefault = on_off("-incoming", value, key, v)?,
            ("share", Some(v)) => share = on_off("-incoming", value, key, v)?,
            ("verify", Some(v)) => verify = on_off("-incoming", value, key, v)?,
            _ => {
                return Err(invalid(
                    "-incoming",
                    value,
                    format!("unknown property '{key}'"),
                ))
            }
        }
    }
    Ok(IncomingConfig {
        dir: PathBuf::from(dir),
        prefault,
        share,
        verify,
    })
}

/// Each inherited descriptor is taken once: by one `-netdev fds=` or by `-add-fd`.
fn check_inherited_descriptors(
    netdevs: &[NetdevConfig],
    add_fds: &[AddFdConfig],
) -> Result<(), CliError> {
    let mut taken: Vec<i32> = add_fds.iter().map(|a| a.fd).collect();
    for netdev in netdevs {
        if let NetdevTap::Fd(fd) = netdev.tap {
            if taken.contains(&fd) {
                return Err(invalid(
                    "-netdev",
                    &netdev.id,
                    format!("descriptor {fd} is given to another -netdev or -add-fd already"),
                ));
            }
            taken.push(fd);
        }
    }
    Ok(())
}

fn parse_add_fd(v: &str) -> Result<AddFdConfig, CliError> {
    let (head, opts) = split_options(v);
    if !head.is_empty() {
        return Err(invalid("-add-fd", v, format!("unknown property '{head}'")));
    }
    let (mut fd, mut set, mut opaque) = (None, None, None);
    for (key, val) in opts {
        match (key, val) {
            ("fd", Some(f)) => {
                fd = Some(
                    f.parse::<i32>()
                        .map_err(|_| invalid("-add-fd", v, "fd must be a descriptor number"))?,
                )
            }
            ("set", Some(n)) => {
                set = Some(
                    n.parse::<u64>()
                        .map_err(|_| invalid("-add-fd", v, "set must be a non-negative number"))?,
                )
            }
            ("opaque", Some(o)) => {
                if o.len() > citadel_qmp::fds::MAX_OPAQUE_LEN {
                    return Err(invalid("-add-fd", v, "opaque is too long"));
                }
                opaque = Some(o.to_string())
            }
            _ => return Err(invalid("-add-fd", v, format!("unknown property '{key}'"))),
        }
    }
    let fd = fd.ok_or_else(|| invalid("-add-fd", v, "fd option is required"))?;
    if fd <= libc::STDERR_FILENO {
        return Err(invalid("-add-fd", v, "fd cannot be a standard I/O stream"));
    }
    let set = set.ok_or_else(|| invalid("-add-fd", v, "set option is required"))?;
    Ok(AddFdConfig { fd, set, opaque })
}

fn parse_chardev(v: &str) -> Result<Chardev, CliError> {
    let (backend, opts) = split_options(v);
    if backend != "socket" {
        return Err(CliError::Unsupported(format!(
            "chardev backend '{backend}' (only 'socket')"
        )));
    }
    let (mut id, mut path) = (None, None);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("path", Some(p)) => path = Some(non_empty_path("-chardev", p)?),
            _ => {
                return Err(invalid(
                    "-chardev",
                    v,
                    format!("unknown or empty property '{key}' (expected socket,id=ID,path=PATH)"),
                ))
            }
        }
    }
    Ok(Chardev {
        id: id.ok_or_else(|| invalid("-chardev", v, "no id="))?,
        path: path.ok_or_else(|| invalid("-chardev", v, "no path="))?,
    })
}

/// `pcie-root-port,id=ID,port=N,bus=pcie.0,addr=D[.F][,chassis=N][,multifunction=on|off]`,
/// StratoVirt's syntax. `chassis` is accepted and has no effect: the slot's physical number
/// is its port number.
fn parse_root_port(v: &str) -> Result<RootPortSpec, CliError> {
    let (_, opts) = split_options(v);
    let (mut id, mut port, mut bus, mut addr) = (None, None, None, None);
    let mut multifunction = false;
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("port", Some(p)) => {
                port = Some(
                    parse_number(p)
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| invalid("-device", v, "port must be a number up to 255"))?,
                )
            }
            ("bus", Some(b)) => bus = Some(b),
            ("addr", Some(a)) => {
                addr = Some(parse_pci_addr(a).ok_or_else(|| {
                    invalid(
                    "-device",
                    v,
                    "addr must be a device number up to 0x1f, optionally with .function up to 0x7",
                )
                })?)
            }
            ("chassis", Some(c)) => {
                parse_number(c).ok_or_else(|| invalid("-device", v, "chassis must be a number"))?;
            }
            ("multifunction", Some(m)) => multifunction = on_off("-device", v, key, m)?,
            _ => {
                return Err(invalid(
                    "-device",
                    v,
                    format!(
                        "unknown or empty property '{key}' (expected \
                         id=ID,port=N,bus=pcie.0,addr=D[.F][,chassis=N][,multifunction=on|off])"
                    ),
                ))
            }
        }
    }
    match bus {
        Some("pcie.0") => {}
        Some(other) => {
            return Err(invalid(
                "-device",
                v,
                format!("bus '{other}' is not the root bus: root ports sit on pcie.0"),
            ))
        }
        None => return Err(invalid("-device", v, "no bus=")),
    }
    let (device, function) = addr.ok_or_else(|| invalid("-device", v, "no addr="))?;
    Ok(RootPortSpec {
        id: id.ok_or_else(|| invalid("-device", v, "no id="))?,
        device,
        function,
        config: RootPortConfig {
            port: port.ok_or_else(|| invalid("-device", v, "no port="))?,
            multifunction,
        },
    })
}

/// `virtio-blk-pci,drive=ID,bus=PORT[,addr=0x0][,id=NAME]`,
/// `virtio-net-pci,netdev=ID,bus=PORT[,addr=0x0][,id=NAME][,mac=MAC]` or
/// `vfio-pci,host=ADDRESS,bus=PORT[,addr=0x0][,id=NAME]`.
fn parse_pci_device(v: &str) -> Result<PciDeviceConfig, CliError> {
    let (driver, opts) = split_options(v);
    let nic = driver == "virtio-net-pci";
    let vfio = driver == "vfio-pci";
    let expected = if nic {
        "netdev=ID,bus=PORT[,addr=0x0][,id=NAME][,mac=MAC]"
    } else if vfio {
        "host=ADDRESS,bus=PORT[,addr=0x0][,id=NAME]"
    } else {
        "drive=ID,bus=PORT[,addr=0x0][,id=NAME]"
    };
    let (mut id, mut bus, mut backend, mut mac) = (None, None, None, None);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("bus", Some(b)) if !b.is_empty() => bus = Some(b.to_string()),
            ("drive", Some(d)) if !nic && !vfio && !d.is_empty() => backend = Some(d.to_string()),
            ("host", Some(h)) if vfio => {
                backend = Some(citadel_pci::address::host_function(h).ok_or_else(|| {
                    invalid(
                        "-device",
                        v,
                        "host= expects a PCI address such as 0000:00:01.0",
                    )
                })?)
            }
            ("netdev", Some(n)) if nic && !n.is_empty() => backend = Some(n.to_string()),
            ("addr", Some(a)) => {
                if parse_pci_addr(a) != Some((0, 0)) {
                    return Err(invalid(
                        "-device",
                        v,
                        "a root port has one slot: addr must be 0x0",
                    ));
                }
            }
            ("mac", Some(m)) if nic => {
                mac = Some(citadel_qmp::device::parse_mac(m).ok_or_else(|| {
                    invalid(
                        "-device",
                        v,
                        "mac= expects a MAC address such as 52:54:00:12:34:56",
                    )
                })?)
            }
            _ => {
                return Err(invalid(
                    "-device",
                    v,
                    format!("unknown or empty property '{key}' (expected {expected})"),
                ))
            }
        }
    }
    let backend = backend.ok_or_else(|| invalid("-device", v, format!("expected {expected}")))?;
    Ok(PciDeviceConfig {
        driver: driver.to_string(),
        id: id.unwrap_or_else(|| backend.clone()),
        bus: bus.ok_or_else(|| invalid("-device", v, "no bus= (a pcie-root-port's id)"))?,
        drive: (!nic && !vfio).then(|| backend.clone()),
        netdev: nic.then(|| backend.clone()),
        mac,
        host: vfio.then_some(backend),
    })
}

/// Checks the command line's PCI cards: each in a root port of its own, each serving a
/// drive or netdev of the command line no other card uses, ids unique.
fn check_pci_devices(
    devices: &[PciDeviceConfig],
    root_ports: &[RootPortSpec],
    drives: &[DriveConfig],
    netdevs: &[NetdevConfig],
) -> Result<(), CliError> {
    for (i, dev) in devices.iter().enumerate() {
        let refuse =
            |why: String| invalid("-device", &format!("{},id={}", dev.driver, dev.id), why);
        if !root_ports.iter().any(|p| p.id == dev.bus) {
            return Err(refuse(format!(
                "bus '{}' is not a pcie-root-port of the command line",
                dev.bus
            )));
        }
        let before = &devices[..i];
        if before.iter().any(|d| d.bus == dev.bus) {
            return Err(refuse(format!(
                "root port '{}' already holds a device",
                dev.bus
            )));
        }
        if before.iter().any(|d| d.id == dev.id) {
            return Err(refuse("a device with this id already exists".to_string()));
        }
        if let Some(drive) = &dev.drive {
            if !drives.iter().any(|d| &d.id == drive) {
                return Err(refuse(format!("no -drive with id '{drive}'")));
            }
            if before.iter().any(|d| d.drive.as_ref() == Some(drive)) {
                return Err(refuse(format!(
                    "drive '{drive}' is already used by another device"
                )));
            }
        }
        if let Some(netdev) = &dev.netdev {
            if !netdevs.iter().any(|n| &n.id == netdev) {
                return Err(refuse(format!("no -netdev with id '{netdev}'")));
            }
            if before.iter().any(|d| d.netdev.as_ref() == Some(netdev)) {
                return Err(refuse(format!(
                    "netdev '{netdev}' is already used by another device"
                )));
            }
        }
    }
    Ok(())
}

/// A decimal or `0x` hexadecimal number.
fn parse_number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// A PCI `addr`: `D` or `D.F`, each decimal or hexadecimal.
fn parse_pci_addr(v: &str) -> Option<(u8, u8)> {
    let (device, function) = match v.split_once('.') {
        Some((d, f)) => (parse_number(d)?, parse_number(f)?),
        None => (parse_number(v)?, 0),
    };
    (device < 32 && function < 8).then_some((device as u8, function as u8))
}

fn parse_device(v: &str) -> Result<DeviceArg, CliError> {
    let (driver, opts) = split_options(v);
    if !matches!(driver, "vhost-user-blk-device" | "vhost-user-blk-mmio") {
        return Err(CliError::Unsupported(format!("device '{driver}'")));
    }
    let (mut id, mut chardev) = (None, None);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("chardev", Some(c)) if !c.is_empty() => chardev = Some(c.to_string()),
            _ => {
                return Err(invalid(
                    "-device",
                    v,
                    format!("unknown or empty property '{key}' (expected chardev=ID[,id=NAME])"),
                ))
            }
        }
    }
    Ok(DeviceArg {
        value: v.to_string(),
        id,
        chardev: chardev.ok_or_else(|| invalid("-device", v, "no chardev="))?,
    })
}

/// Ties each device to its chardev: every chardev named must exist and serve one device
/// only (a vhost-user connection carries one device), device ids must be unique, and there
/// must be a slot for each.
fn resolve_devices(
    devices: &[DeviceArg],
    chardevs: &[Chardev],
) -> Result<Vec<VhostUserBlkConfig>, CliError> {
    let disks = crate::machine::DISK_SLOTS as usize;
    let nics = crate::machine::NIC_SLOTS as usize;
    let max = crate::boot::layout::VIRTIO_MMIO_GSIS.len() - disks - nics;
    if devices.len() > max {
        return Err(invalid(
            "-device",
            &devices[max].value,
            format!(
                "too many devices: the microvm machine has {max} virtio-mmio slots besides its {disks} hot-replace disk slots and {nics} NIC slots"
            ),
        ));
    }
    let mut disks: Vec<VhostUserBlkConfig> = Vec::with_capacity(devices.len());
    for (i, dev) in devices.iter().enumerate() {
        let chardev = chardevs
            .iter()
            .find(|c| c.id == dev.chardev)
            .ok_or_else(|| {
                invalid(
                    "-device",
                    &dev.value,
                    format!("no -chardev with id '{}'", dev.chardev),
                )
            })?;
        if devices[..i].iter().any(|d| d.chardev == dev.chardev) {
            return Err(invalid(
                "-device",
                &dev.value,
                format!(
                    "chardev '{}' is already used by another device",
                    dev.chardev
                ),
            ));
        }
        if dev.id.is_some() && disks.iter().any(|d| d.id == dev.id) {
            return Err(invalid(
                "-device",
                &dev.value,
                "a device with this id already exists",
            ));
        }
        disks.push(VhostUserBlkConfig {
            id: dev.id.clone(),
            chardev: chardev.id.clone(),
            socket: chardev.path.clone(),
        });
    }
    Ok(disks)
}

/// `on`/`off` (and QEMU's other spellings) of a boolean sub-option.
fn on_off(option: &str, value: &str, key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(invalid(option, value, format!("'{key}' must be on or off"))),
    }
}

fn parse_drive(v: &str) -> Result<DriveConfig, CliError> {
    let (head, opts) = split_options(v);
    if !head.is_empty() {
        return Err(invalid("-drive", v, format!("unknown property '{head}'")));
    }
    let (mut id, mut file) = (None, None);
    let (mut read_only, mut direct) = (false, false);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("file", Some(f)) => file = Some(non_empty_path("-drive", f)?),
            ("readonly", Some(b)) => read_only = on_off("-drive", v, key, b)?,
            ("direct", Some(b)) => direct = on_off("-drive", v, key, b)?,
            ("if", Some("none")) | ("format", Some("raw")) => {}
            // citadel-blk picks its own I/O engine; the choice changes no data.
            ("aio", Some("native" | "io_uring" | "threads" | "off")) => {}
            ("if" | "format" | "aio", Some(other)) => {
                return Err(CliError::Unsupported(format!("-drive {key}={other}")))
            }
            _ => {
                return Err(invalid(
                    "-drive",
                    v,
                    format!(
                        "unknown or empty property '{key}' (expected file=PATH,id=ID[,readonly=on|off][,direct=on|off])"
                    ),
                ))
            }
        }
    }
    Ok(DriveConfig {
        id: id.ok_or_else(|| invalid("-drive", v, "no id="))?,
        file: file.ok_or_else(|| invalid("-drive", v, "no file="))?,
        read_only,
        direct,
    })
}

fn parse_blk_device(v: &str) -> Result<BlkDeviceArg, CliError> {
    let (_, opts) = split_options(v);
    let (mut id, mut drive, mut serial, mut addr) = (None, None, None, None);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("drive", Some(d)) if !d.is_empty() => drive = Some(d.to_string()),
            ("addr", Some(a)) => {
                addr = Some(
                    parse_number(a)
                        .filter(|&n| n < crate::machine::DISK_SLOTS)
                        .ok_or_else(|| {
                            invalid(
                                "-device",
                                v,
                                format!(
                                    "addr= names a disk slot, 0x0 to {:#x}",
                                    crate::machine::DISK_SLOTS - 1
                                ),
                            )
                        })?,
                );
            }
            ("serial", Some(s)) if citadel_launcher::protocol::valid_serial(s) => {
                serial = Some(s.to_string())
            }
            ("serial", Some(_)) => {
                return Err(invalid(
                    "-device",
                    v,
                    format!(
                        "a serial number is at most {} printable ASCII bytes",
                        citadel_launcher::protocol::MAX_SERIAL_LEN
                    ),
                ))
            }
            // The kernel is loaded directly: there is no firmware to choose a boot disk.
            ("bootindex", Some(n)) if n.parse::<u32>().is_ok() => {}
            _ => {
                return Err(invalid(
                    "-device",
                    v,
                    format!(
                    "unknown or empty property '{key}' (expected drive=ID[,id=NAME][,serial=S][,addr=N][,bootindex=N])"
                ),
                ))
            }
        }
    }
    Ok(BlkDeviceArg {
        value: v.to_string(),
        id,
        drive: drive.ok_or_else(|| invalid("-device", v, "no drive="))?,
        serial,
        addr,
    })
}

/// Ties each virtio-blk device to its drive: the drive must exist and serve one device only,
/// device ids must be unique (vhost-user devices' included), and each needs a hot-replace
/// slot.
fn resolve_blk_devices(
    devices: &[BlkDeviceArg],
    drives: &[DriveConfig],
    vhost_user: &[VhostUserBlkConfig],
) -> Result<Vec<BlkDeviceConfig>, CliError> {
    let slots = crate::machine::DISK_SLOTS as usize;
    if devices.len() > slots {
        return Err(invalid(
            "-device",
            &devices[slots].value,
            format!("too many virtio-blk devices: the microvm machine has {slots} hot-replace disk slots"),
        ));
    }
    let mut resolved: Vec<BlkDeviceConfig> = Vec::with_capacity(devices.len());
    let mut taken_slots: Vec<u64> = Vec::with_capacity(devices.len());
    for dev in devices {
        if let Some(addr) = dev.addr {
            if taken_slots.contains(&addr) {
                return Err(invalid(
                    "-device",
                    &dev.value,
                    format!("disk slot {addr:#x} is taken by another device"),
                ));
            }
            taken_slots.push(addr);
        }
    }
    for dev in devices {
        if !drives.iter().any(|d| d.id == dev.drive) {
            return Err(invalid(
                "-device",
                &dev.value,
                format!("no -drive with id '{}'", dev.drive),
            ));
        }
        if resolved.iter().any(|d| d.drive == dev.drive) {
            return Err(invalid(
                "-device",
                &dev.value,
                format!("drive '{}' is already used by another device", dev.drive),
            ));
        }
        let id = dev.id.clone().unwrap_or_else(|| dev.drive.clone());
        let taken = resolved.iter().any(|d| d.id == id)
            || vhost_user
                .iter()
                .any(|d| d.id.as_deref() == Some(id.as_str()));
        if taken {
            return Err(invalid(
                "-device",
                &dev.value,
                format!("a device with id '{id}' already exists"),
            ));
        }
        // At most DISK_SLOTS devices, so a free slot is left for each one without addr=.
        let slot = match dev.addr {
            Some(addr) => addr,
            None => {
                let free = (0..slots as u64)
                    .find(|n| !taken_slots.contains(n))
                    .unwrap_or_default();
                taken_slots.push(free);
                free
            }
        };
        resolved.push(BlkDeviceConfig {
            id,
            slot,
            drive: dev.drive.clone(),
            serial: dev.serial.clone(),
        });
    }
    Ok(resolved)
}

/// `-netdev tap,id=ID,ifname=NAME[,script=no][,downscript=no]`.
fn parse_netdev(v: &str) -> Result<NetdevConfig, CliError> {
    let (kind, opts) = split_options(v);
    if kind != "tap" {
        return Err(CliError::Unsupported(format!(
            "netdev type '{kind}' (only 'tap')"
        )));
    }
    let (mut id, mut ifname, mut fd) = (None, None, None);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("ifname", Some(n)) => ifname = Some(n.to_string()),
            ("fds" | "fd", Some(list)) => {
                // A NIC slot has one queue pair: one tap queue.
                if list.contains(':') {
                    return Err(CliError::Unsupported(format!(
                        "-netdev tap {key}={list} (multiqueue taps; a NIC has one queue pair, so {key}= takes one descriptor)"
                    )));
                }
                let number = list
                    .parse::<i32>()
                    .map_err(|_| invalid("-netdev", v, format!("{key} must be a descriptor number")))?;
                if number <= libc::STDERR_FILENO {
                    return Err(invalid(
                        "-netdev",
                        v,
                        format!("{key} cannot be a standard I/O stream"),
                    ));
                }
                fd = Some(number);
            }
            // Citadel runs no script on the host.
            ("script" | "downscript", Some("no")) => {}
            // What citadel-net does anyway: frames in user space, with a virtio-net header,
            // on one queue pair.
            ("vhost", Some(b)) if !on_off("-netdev", v, key, b)? => {}
            ("vnet_hdr", Some(b)) if on_off("-netdev", v, key, b)? => {}
            ("queues", Some("1")) => {}
            ("vhost", Some(_)) => {
                return Err(CliError::Unsupported(
                    "-netdev tap vhost=on (in-kernel vhost-net; citadel-net serves the tap from its own sandboxed process: use vhost=off)".to_string(),
                ))
            }
            ("vhostfd" | "vhostfds", _) => {
                return Err(CliError::Unsupported(format!(
                    "-netdev tap {key}= (in-kernel vhost-net)"
                )))
            }
            ("vnet_hdr", Some(_)) => {
                return Err(CliError::Unsupported(
                    "-netdev tap vnet_hdr=off (citadel-net needs a tap with IFF_VNET_HDR)"
                        .to_string(),
                ))
            }
            ("queues", Some(n)) => {
                return Err(CliError::Unsupported(format!(
                    "-netdev tap queues={n} (a NIC has one queue pair)"
                )))
            }
            _ => {
                return Err(invalid(
                    "-netdev",
                    v,
                    format!(
                        "unknown or empty property '{key}' (expected tap,id=ID,ifname=NAME|fds=FD[,script=no][,downscript=no][,vhost=off][,vnet_hdr=on][,queues=1])"
                    ),
                ))
            }
        }
    }
    let id = id.ok_or_else(|| invalid("-netdev", v, "no id="))?;
    citadel_qmp::device::check_id("id", &id).map_err(|e| invalid("-netdev", v, e.desc))?;
    let tap = match (ifname, fd) {
        (Some(ifname), None) => {
            // The same check as QMP's netdev_add.
            citadel_qmp::netdev::check_ifname(&ifname)
                .map_err(|e| invalid("-netdev", v, e.desc))?;
            NetdevTap::Ifname(ifname)
        }
        (None, Some(fd)) => NetdevTap::Fd(fd),
        (None, None) => return Err(invalid("-netdev", v, "no ifname= or fds=")),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "-netdev",
                v,
                "ifname= and fds= are mutually exclusive",
            ))
        }
    };
    Ok(NetdevConfig { id, tap })
}

/// `-device virtio-net-device,netdev=ID[,id=DEV][,mac=MAC]` before its netdev is resolved.
struct NicDeviceArg {
    value: String,
    id: Option<String>,
    netdev: String,
    mac: Option<[u8; 6]>,
}

fn parse_nic_device(v: &str) -> Result<NicDeviceArg, CliError> {
    let (_, opts) = split_options(v);
    let (mut id, mut netdev, mut mac) = (None, None, None);
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(i)) if !i.is_empty() => id = Some(i.to_string()),
            ("netdev", Some(n)) if !n.is_empty() => netdev = Some(n.to_string()),
            ("mac", Some(m)) => {
                mac = Some(citadel_qmp::device::parse_mac(m).ok_or_else(|| {
                    invalid(
                        "-device",
                        v,
                        "mac= expects a MAC address such as 52:54:00:c1:7a:00",
                    )
                })?)
            }
            _ => {
                return Err(invalid(
                    "-device",
                    v,
                    format!(
                        "unknown or empty property '{key}' (expected netdev=ID[,id=NAME][,mac=MAC])"
                    ),
                ))
            }
        }
    }
    Ok(NicDeviceArg {
        value: v.to_string(),
        id,
        netdev: netdev.ok_or_else(|| invalid("-device", v, "no netdev="))?,
        mac,
    })
}

/// Ties each virtio-net device to its netdev: the netdev must exist and serve one device
/// only, device ids must be unique among all devices, and each needs a NIC slot.
fn resolve_nic_devices(
    devices: &[NicDeviceArg],
    netdevs: &[NetdevConfig],
    vhost_user: &[VhostUserBlkConfig],
    disks: &[BlkDeviceConfig],
) -> Result<Vec<NicDeviceConfig>, CliError> {
    let slots = crate::machine::NIC_SLOTS as usize;
    if devices.len() > slots {
        return Err(invalid(
            "-device",
            &devices[slots].value,
            format!("too many virtio-net devices: the microvm machine has {slots} NIC slots"),
        ));
    }
    let mut resolved: Vec<NicDeviceConfig> = Vec::with_capacity(devices.len());
    for dev in devices {
        if !netdevs.iter().any(|n| n.id == dev.netdev) {
            return Err(invalid(
                "-device",
                &dev.value,
                format!("no -netdev with id '{}'", dev.netdev),
            ));
        }
        if resolved.iter().any(|d| d.netdev == dev.netdev) {
            return Err(invalid(
                "-device",
                &dev.value,
                format!("netdev '{}' is already used by another device", dev.netdev),
            ));
        }
        let id = dev.id.clone().unwrap_or_else(|| dev.netdev.clone());
        let taken = resolved.iter().any(|d| d.id == id)
            || disks.iter().any(|d| d.id == id)
            || vhost_user
                .iter()
                .any(|d| d.id.as_deref() == Some(id.as_str()));
        if taken {
            return Err(invalid(
                "-device",
                &dev.value,
                format!("a device with id '{id}' already exists"),
            ));
        }
        resolved.push(NicDeviceConfig {
            id,
            netdev: dev.netdev.clone(),
            mac: dev.mac,
        });
    }
    Ok(resolved)
}

/// `-uuid`: 32 hex digits in the 8-4-4-4-12 form, kept in lower case.
fn parse_uuid(v: &str) -> Result<String, CliError> {
    let groups: Vec<&str> = v.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let hex = groups
        .iter()
        .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    if lengths != [8, 4, 4, 4, 12] || !hex {
        return Err(invalid(
            "-uuid",
            v,
            "expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex digits)",
        ));
    }
    Ok(v.to_ascii_lowercase())
}

/// `-sandbox landlock=on|off[,landlock-abi=N]`. The cap only makes sense with Landlock on.
fn parse_sandbox(v: &str) -> Result<LandlockChoice, CliError> {
    let mut on = true;
    let mut cap = None;
    for part in v.split(',') {
        match part.split_once('=') {
            Some(("landlock", "on")) => on = true,
            Some(("landlock", "off")) => on = false,
            Some(("landlock-abi", n)) => {
                let n: u32 = n
                    .parse()
                    .map_err(|_| invalid("-sandbox", v, "landlock-abi expects a number"))?;
                cap = Some(n);
            }
            _ => {
                return Err(invalid(
                    "-sandbox",
                    v,
                    "expected landlock=on|off[,landlock-abi=N]",
                ))
            }
        }
    }
    match (on, cap) {
        (true, None) => Ok(LandlockChoice::Required),
        (true, Some(n)) => Ok(LandlockChoice::AtMost(n)),
        (false, None) => Ok(LandlockChoice::Off),
        (false, Some(_)) => Err(invalid(
            "-sandbox",
            v,
            "landlock-abi only applies with landlock=on",
        )),
    }
}

/// `-device virtio-balloon-device[,id=NAME][,deflate-on-oom=on|off][,free-page-reporting=on|off]`.
fn parse_balloon_device(v: &str) -> Result<BalloonOptions, CliError> {
    let (_, opts) = split_options(v);
    let mut options = BalloonOptions::default();
    for (key, val) in opts {
        match (key, val) {
            ("id", Some(id)) if !id.is_empty() => options.id = Some(id.to_string()),
            ("deflate-on-oom", Some(b)) => options.deflate_on_oom = on_off("-device", v, key, b)?,
            ("free-page-reporting", Some(b)) => {
                options.free_page_reporting = on_off("-device", v, key, b)?
            }
            _ => {
                return Err(invalid(
                    "-device",
                    v,
                    format!(
                        "unknown or empty property '{key}' (virtio-balloon-device takes id=, deflate-on-oom= and free-page-reporting=)"
                    ),
                ))
            }
        }
    }
    Ok(options)
}

/// The balloon needs a virtio-mmio slot after every other device, and an id no other device
/// has.
fn resolve_balloon(
    balloon: Option<(String, BalloonOptions)>,
    disks: &[VhostUserBlkConfig],
    blk_devices: &[BlkDeviceConfig],
    nic_devices: &[NicDeviceConfig],
) -> Result<Option<BalloonOptions>, CliError> {
    let Some((value, options)) = balloon else {
        return Ok(None);
    };
    let taken = (crate::machine::DISK_SLOTS + crate::machine::NIC_SLOTS) as usize + disks.len();
    if taken >= crate::boot::layout::VIRTIO_MMIO_GSIS.len() {
        return Err(invalid(
            "-device",
            &value,
            "no virtio-mmio slot is left for the balloon: use one vhost-user-blk device fewer",
        ));
    }
    if let Some(id) = options.id.as_deref() {
        let clash = disks.iter().any(|d| d.id.as_deref() == Some(id))
            || blk_devices.iter().any(|d| d.id == id)
            || nic_devices.iter().any(|d| d.id == id);
        if clash {
            return Err(invalid(
                "-device",
                &value,
                "a device with this id already exists",
            ));
        }
    }
    Ok(Some(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec!["-machine", "microvm", "-kernel", "/k"]
    }

    fn with(extra: &[&'static str]) -> Result<Config, CliError> {
        let mut v = base();
        v.extend_from_slice(extra);
        parse(v)
    }

    #[test]
    fn guide_command_line() {
        let c = parse([
            "-machine",
            "microvm",
            "-kernel",
            "/path/to/kernel",
            "-append",
            "console=ttyS0 reboot=k panic=1",
            "-initrd",
            "/path/to/initrd",
            "-smp",
            "4",
            "-m",
            "1024",
            "-qmp",
            "unix:/tmp/stratovirt.socket,server,nowait",
            "-serial",
            "stdio",
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/path/to/kernel"));
        assert_eq!(c.initrd, Some(PathBuf::from("/path/to/initrd")));
        assert_eq!(c.cmdline, "console=ttyS0 reboot=k panic=1");
        assert_eq!(c.vcpus, 4);
        assert_eq!(c.mem_bytes, 1024 << 20);
        assert_eq!(c.qmp, Some(PathBuf::from("/tmp/stratovirt.socket")));
        assert_eq!(c.qmp_mode, 0o600);
        assert_eq!(c.serial, SerialTarget::Stdio);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("-m", "64").unwrap(), 64 << 20);
        assert_eq!(parse_size("-m", "65536K").unwrap(), 64 << 20);
        assert_eq!(parse_size("-m", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("-m", "2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("-m", "2g").unwrap(), 2 << 30);
        assert!(parse_size("-m", "").is_err());
        assert!(parse_size("-m", "12T").is_err());
        assert!(parse_size("-m", "G").is_err());
        assert!(parse_size("-m", "-5").is_err());
        assert!(parse_size("-m", "99999999999999999999").is_err());
        assert!(parse_size("-m", "17179869184G").is_err());
        assert_eq!(with(&["-m", "size=128M"]).unwrap().mem_bytes, 128 << 20);
        assert!(with(&["-m", "64,slots=2"]).is_err());
        assert_eq!(
            parse(["-machine", "type=microvm", "-kernel", "/k"])
                .unwrap()
                .kernel,
            PathBuf::from("/k")
        );
    }

    #[test]
    fn smp_forms() {
        assert_eq!(with(&["-smp", "2"]).unwrap().vcpus, 2);
        assert_eq!(with(&["-smp", "cpus=3"]).unwrap().vcpus, 3);
        assert_eq!(with(&["-smp", "2,maxcpus=2,sockets=1"]).unwrap().vcpus, 2);
        assert!(with(&["-smp", "0"]).is_err());
        assert!(with(&["-smp", "255"]).is_err());
        assert!(with(&["-smp", "x"]).is_err());
        assert!(with(&["-smp", "2,bogus=1"]).is_err());
        assert!(with(&["-smp", "cpus=x"]).is_err());
    }

    #[test]
    fn q35_takes_root_ports_in_stratovirts_syntax() {
        let config = parse([
            "-machine",
            "q35",
            "-kernel",
            "/k",
            "-device",
            "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1",
            "-device",
            "pcie-root-port,id=pcie.2,port=2,bus=pcie.0,addr=0x2.0x1,chassis=3,multifunction=on",
        ])
        .unwrap();
        assert_eq!(config.machine, MachineType::Q35);
        assert_eq!(
            config.root_ports,
            vec![
                RootPortSpec {
                    id: "pcie.1".into(),
                    device: 1,
                    function: 0,
                    config: RootPortConfig {
                        port: 1,
                        multifunction: false
                    },
                },
                RootPortSpec {
                    id: "pcie.2".into(),
                    device: 2,
                    function: 1,
                    config: RootPortConfig {
                        port: 2,
                        multifunction: true
                    },
                },
            ]
        );
        assert_eq!(with(&[]).unwrap().machine, MachineType::Microvm);
    }

    #[test]
    fn q35_takes_pci_cards_for_drives_and_netdevs_in_root_ports() {
        let config = parse([
            "-machine",
            "q35",
            "-kernel",
            "/k",
            "-device",
            "pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=1",
            "-device",
            "pcie-root-port,id=pcie.2,port=2,bus=pcie.0,addr=2",
            "-drive",
            "file=/d,id=d0",
            "-netdev",
            "tap,id=n0,ifname=tap0",
            "-device",
            "virtio-blk-pci,drive=d0,bus=pcie.1,addr=0x0",
            "-device",
            "virtio-net-pci,netdev=n0,id=nic,bus=pcie.2,mac=52:54:00:12:34:56",
        ])
        .unwrap();
        assert_eq!(
            config.pci_devices,
            vec![
                PciDeviceConfig {
                    driver: "virtio-blk-pci".into(),
                    id: "d0".into(),
                    bus: "pcie.1".into(),
                    drive: Some("d0".into()),
                    netdev: None,
                    mac: None,
                    host: None,
                },
                PciDeviceConfig {
                    driver: "virtio-net-pci".into(),
                    id: "nic".into(),
                    bus: "pcie.2".into(),
                    drive: None,
                    netdev: Some("n0".into()),
                    mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                    host: None,
                },
            ]
        );
        let q35 = |extra: &[&str]| {
            let mut args = vec![
                "-machine",
                "q35",
                "-kernel",
                "/k",
                "-device",
                "pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=1",
                "-drive",
                "file=/d,id=d0",
            ];
            args.extend_from_slice(extra);
            parse(args).unwrap_err().to_string()
        };
        let card = "virtio-blk-pci,drive=d0";
        assert!(q35(&["-device", &format!("{card},bus=pcie.9")]).contains("not a pcie-root-port"));
        assert!(
            q35(&["-device", &format!("{card},bus=pcie.1,addr=0x1")]).contains("addr must be 0x0")
        );
        assert!(q35(&["-device", "virtio-blk-pci,drive=d9,bus=pcie.1"]).contains("no -drive"));
        assert!(q35(&["-device", card]).contains("no bus="));
        assert!(q35(&["-device", &format!("{card},bus=pcie.1,netdev=x")]).contains("'netdev'"));
        let twice = [
            "-device",
            "virtio-blk-pci,drive=d0,id=a,bus=pcie.1",
            "-device",
            "virtio-blk-pci,drive=d0,id=b,bus=pcie.1",
        ];
        assert!(q35(&twice).contains("already holds a device"));
        assert!(q35(&["-device", "vfio-pci,host=0000:00:1f.8,bus=pcie.1"])
            .contains("host= expects a PCI address"));
        assert!(q35(&["-device", "vfio-pci,host=00:03.0,bus=pcie.1,drive=d0"]).contains("'drive'"));
    }

    #[test]
    fn q35_takes_a_host_function_for_a_root_port() {
        let config = parse([
            "-machine",
            "q35",
            "-kernel",
            "/k",
            "-device",
            "pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=1",
            "-device",
            "vfio-pci,host=00:03.0,bus=pcie.1,addr=0x0",
        ])
        .unwrap();
        assert_eq!(
            config.pci_devices,
            vec![PciDeviceConfig {
                driver: "vfio-pci".into(),
                id: "0000:00:03.0".into(),
                bus: "pcie.1".into(),
                drive: None,
                netdev: None,
                mac: None,
                host: Some("0000:00:03.0".into()),
            }]
        );
        // No snapshot holds one, so none comes back with one.
        let err = parse([
            "-machine",
            "q35",
            "-kernel",
            "/k",
            "-device",
            "pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=1",
            "-device",
            "vfio-pci,host=00:03.0,bus=pcie.1",
            "-incoming",
            "file:/s",
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value 'file:/s' for '-incoming': snapshots never hold passed-through host \
             functions; restore without vfio-pci"
        );
    }

    #[test]
    fn bad_root_ports_are_refused_with_the_reason() {
        let q35 = |device: &str| {
            parse(["-machine", "q35", "-kernel", "/k", "-device", device])
                .unwrap_err()
                .to_string()
        };
        let port = "pcie-root-port,id=p,port=1,bus=pcie.0";
        assert!(q35(&format!("{port},addr=0x20")).contains("up to 0x1f"));
        assert!(q35(&format!("{port},addr=0x1.0x8")).contains("up to 0x1f"));
        assert!(q35(port).contains("no addr="));
        assert!(q35("pcie-root-port,id=p,port=1,bus=pcie.1,addr=1").contains("not the root bus"));
        assert!(q35("pcie-root-port,id=p,port=256,bus=pcie.0,addr=1").contains("up to 255"));
        assert!(q35("pcie-root-port,port=1,bus=pcie.0,addr=1").contains("no id="));
        assert!(q35(&format!("{port},addr=1,hotplug=on")).contains("'hotplug'"));
        let twice = parse([
            "-machine",
            "q35",
            "-kernel",
            "/k",
            "-device",
            "pcie-root-port,id=p,port=1,bus=pcie.0,addr=1",
            "-device",
            "pcie-root-port,id=p,port=2,bus=pcie.0,addr=2",
        ]);
        assert!(twice.unwrap_err().to_string().contains("already exists"));
        let microvm = with(&["-device", "pcie-root-port,id=p,port=1,bus=pcie.0,addr=1"]);
        assert!(microvm.unwrap_err().to_string().contains("-machine q35"));
        let restore = parse(["-machine", "q35", "-kernel", "/k", "-incoming", "file:/s"]);
        assert!(
            restore.unwrap().incoming.is_some(),
            "q35 machines are restored too"
        );
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(
            with(&["-bogus"]).unwrap_err(),
            CliError::Unknown("-bogus".into())
        );
        assert_eq!(
            with(&["-m"]).unwrap_err(),
            CliError::MissingValue("-m".into())
        );
        assert_eq!(
            parse(["-kernel", "/k"]).unwrap_err(),
            CliError::Required("-machine")
        );
        assert_eq!(
            parse(["-machine", "microvm"]).unwrap_err(),
            CliError::Required("-kernel")
        );
        assert!(matches!(
            with(&["-machine", "pc"]).unwrap_err(),
            CliError::Unsupported(_)
        ));
        assert!(matches!(
            with(&["-qmp", "tcp:1234,server"]).unwrap_err(),
            CliError::Invalid { .. }
        ));
        assert!(matches!(
            with(&["-qmp", "unix:/x"]).unwrap_err(),
            CliError::Invalid { .. }
        ));
        for bad in [
            "unix:/x,server,nowait,mode=0777",
            "unix:/x,server,nowait,mode=0644",
            "unix:/x,server,nowait,mode=0400",
            "unix:/x,server,nowait,mode=rw",
            "unix:/x,server,nowait,mode=0660,mode=0666",
        ] {
            assert!(
                matches!(with(&["-qmp", bad]).unwrap_err(), CliError::Invalid { .. }),
                "{bad} accepted"
            );
        }
        let c = with(&["-qmp", "unix:/x,server,nowait,mode=0660"]).unwrap();
        assert_eq!((c.qmp, c.qmp_mode), (Some(PathBuf::from("/x")), 0o660));
        assert!(matches!(
            with(&["-serial", "pty"]).unwrap_err(),
            CliError::Invalid { .. }
        ));
        assert!(matches!(
            with(&["-cpu", "max"]).unwrap_err(),
            CliError::Invalid { .. }
        ));
        assert!(with(&["-daemonize", "-serial", "stdio"]).is_err());
    }

    #[test]
    fn add_fd_options() {
        let c = with(&[
            "-add-fd",
            "fd=7,set=2,opaque=rw disk",
            "-add-fd",
            "set=0,fd=8",
        ])
        .unwrap();
        assert_eq!(
            c.add_fds,
            [
                AddFdConfig {
                    fd: 7,
                    set: 2,
                    opaque: Some("rw disk".into())
                },
                AddFdConfig {
                    fd: 8,
                    set: 0,
                    opaque: None
                }
            ]
        );
        for bad in [
            "fd=2,set=0",
            "fd=7",
            "set=1",
            "fd=7,set=-1",
            "fd=x,set=1",
            "fd=7,set=1,mode=rw",
            "7,set=1",
        ] {
            assert!(
                matches!(
                    with(&["-add-fd", bad]).unwrap_err(),
                    CliError::Invalid { .. }
                ),
                "{bad} accepted"
            );
        }
        assert!(with(&["-add-fd", "fd=7,set=1", "-add-fd", "fd=7,set=2"]).is_err());
    }

    #[test]
    fn double_dash_and_misc() {
        let c = with(&[
            "--serial",
            "file:/tmp/s.log",
            "-name",
            "vm1",
            "-D",
            "/tmp/l",
            "-pidfile",
            "/tmp/p",
            "-daemonize",
            "-cpu",
            "baseline",
            "-seccomp",
            "log",
            "-S",
        ])
        .unwrap();
        assert!(c.start_paused);
        assert_eq!(c.serial, SerialTarget::File("/tmp/s.log".into()));
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert!(c.daemonize);
        assert_eq!(c.cpu_template, CpuTemplate::Baseline);
        assert_eq!(c.seccomp, citadel_seccomp::Mode::Log);
    }

    #[test]
    fn sandbox_choices() {
        assert_eq!(with(&[]).unwrap().landlock, LandlockChoice::Required);
        let landlock = |v: &'static str| with(&["-sandbox", v]).map(|c| c.landlock);
        assert_eq!(landlock("landlock=on"), Ok(LandlockChoice::Required));
        assert_eq!(landlock("landlock=off"), Ok(LandlockChoice::Off));
        assert_eq!(
            landlock("landlock=on,landlock-abi=3"),
            Ok(LandlockChoice::AtMost(3))
        );
        assert_eq!(landlock("landlock-abi=0"), Ok(LandlockChoice::AtMost(0)));
        for bad in [
            "landlock=off,landlock-abi=3",
            "landlock=maybe",
            "on",
            "landlock-abi=x",
        ] {
            assert!(
                matches!(landlock(bad), Err(CliError::Invalid { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn nics_resolve_their_netdevs_in_slot_order() {
        let c = with(&[
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-netdev",
            "tap,ifname=tap1,id=n1",
            "-device",
            "virtio-net-device,netdev=n1,id=eth-a,mac=52:54:00:c1:7a:00",
            "-device",
            "virtio-net-device,netdev=n0",
        ])
        .unwrap();
        assert_eq!(
            c.netdevs,
            vec![
                NetdevConfig {
                    id: "n0".into(),
                    tap: NetdevTap::Ifname("tap0".into())
                },
                NetdevConfig {
                    id: "n1".into(),
                    tap: NetdevTap::Ifname("tap1".into())
                },
            ]
        );
        assert_eq!(
            c.nic_devices,
            vec![
                NicDeviceConfig {
                    id: "eth-a".into(),
                    netdev: "n1".into(),
                    mac: Some([0x52, 0x54, 0x00, 0xc1, 0x7a, 0x00]),
                },
                NicDeviceConfig {
                    id: "n0".into(),
                    netdev: "n0".into(),
                    mac: None,
                },
            ]
        );
    }

    #[test]
    fn a_netdev_takes_an_inherited_tap_descriptor_and_katas_harmless_options() {
        let c = with(&[
            "-netdev",
            "tap,id=n0,fds=3,vhost=off,vnet_hdr=on,queues=1,script=no,downscript=no",
            "-netdev",
            "tap,id=n1,fd=7",
        ])
        .unwrap();
        assert_eq!(c.netdevs[0].tap, NetdevTap::Fd(3));
        assert_eq!(c.netdevs[1].tap, NetdevTap::Fd(7));
        let err = |args: &[&'static str]| with(args).unwrap_err().to_string();
        for (value, expected) in [
            ("tap,id=n0,fds=3:4", "multiqueue taps"),
            ("tap,id=n0,fds=3,vhost=on", "vhost=on (in-kernel vhost-net"),
            ("tap,id=n0,fds=3,vhostfds=5", "vhostfds="),
            ("tap,id=n0,fds=3,vnet_hdr=off", "IFF_VNET_HDR"),
            ("tap,id=n0,fds=3,queues=2", "one queue pair"),
            ("tap,id=n0,fds=2", "standard I/O stream"),
            ("tap,id=n0,fds=x", "descriptor number"),
            ("tap,id=n0,fds=3,ifname=t", "mutually exclusive"),
            (
                "tap,id=n0,fds=3,sndbuf=1",
                "unknown or empty property 'sndbuf'",
            ),
        ] {
            let e = err(&["-netdev", value]);
            assert!(e.contains(expected), "{value}: {e}");
        }
        assert!(
            err(&["-netdev", "tap,id=n0,fds=5", "-netdev", "tap,id=n1,fds=5"])
                .contains("descriptor 5 is given to another")
        );
        assert!(
            err(&["-add-fd", "fd=5,set=1", "-netdev", "tap,id=n0,fds=5"])
                .contains("descriptor 5 is given to another")
        );
    }

    #[test]
    fn bad_nic_arguments_are_refused() {
        let err = |args: &[&'static str]| with(args).unwrap_err().to_string();
        assert_eq!(
            err(&["-device", "virtio-net-device,netdev=n9"]),
            "invalid value 'virtio-net-device,netdev=n9' for '-device': no -netdev with id 'n9'"
        );
        assert_eq!(
            err(&["-netdev", "user,id=n0"]),
            "netdev type 'user' (only 'tap') is not supported by this version of citadel"
        );
        assert!(err(&["-netdev", "tap,id=n0"]).ends_with("no ifname= or fds="));
        assert!(err(&["-netdev", "tap,ifname=t"]).ends_with("no id="));
        assert!(err(&["-netdev", "tap,id=n0,ifname=../t"]).contains("Parameter 'ifname' expects"));
        assert!(err(&["-netdev", "tap,id=n0,ifname=t,script=/etc/ifup"]).contains("'script'"));
        assert!(err(&[
            "-netdev",
            "tap,id=n0,ifname=a",
            "-netdev",
            "tap,id=n0,ifname=b"
        ])
        .contains("a netdev with this id already exists"));
        assert!(err(&[
            "-netdev",
            "tap,id=n0,ifname=a",
            "-device",
            "virtio-net-device,netdev=n0,mac=1:2"
        ])
        .contains("mac= expects a MAC address"));
        assert!(err(&[
            "-netdev",
            "tap,id=n0,ifname=a",
            "-device",
            "virtio-net-device,netdev=n0",
            "-device",
            "virtio-net-device,netdev=n0,id=x"
        ])
        .contains("netdev 'n0' is already used by another device"));
        assert!(err(&[
            "-netdev",
            "tap,id=n0,ifname=a",
            "-netdev",
            "tap,id=n1,ifname=b",
            "-drive",
            "file=/i,id=d",
            "-device",
            "virtio-blk-device,drive=d,id=x",
            "-device",
            "virtio-net-device,netdev=n0,id=x"
        ])
        .contains("a device with id 'x' already exists"));
        assert_eq!(
            err(&[
                "-netdev",
                "tap,id=n0,ifname=a",
                "-netdev",
                "tap,id=n1,ifname=b",
                "-netdev",
                "tap,id=n2,ifname=c",
                "-device",
                "virtio-net-device,netdev=n0",
                "-device",
                "virtio-net-device,netdev=n1",
                "-device",
                "virtio-net-device,netdev=n2"
            ]),
            "invalid value 'virtio-net-device,netdev=n2' for '-device': too many virtio-net devices: the microvm machine has 2 NIC slots"
        );
    }

    #[test]
    fn vhost_user_blk_devices_resolve_their_chardevs_in_order() {
        let c = with(&[
            "-device",
            "vhost-user-blk-device,chardev=c1,id=data",
            "-chardev",
            "socket,id=c0,path=/run/a.sock",
            "-chardev",
            "socket,path=/run/b.sock,id=c1",
            "-device",
            "vhost-user-blk-mmio,chardev=c0",
            "-chardev",
            "socket,id=spare,path=/run/c.sock",
        ])
        .unwrap();
        // A chardev no device uses waits for QMP's device_add.
        assert_eq!(
            c.chardevs,
            vec![ChardevConfig {
                id: "spare".into(),
                path: PathBuf::from("/run/c.sock")
            }]
        );
        assert_eq!(
            c.disks,
            vec![
                VhostUserBlkConfig {
                    id: Some("data".into()),
                    chardev: "c1".into(),
                    socket: PathBuf::from("/run/b.sock")
                },
                VhostUserBlkConfig {
                    id: None,
                    chardev: "c0".into(),
                    socket: PathBuf::from("/run/a.sock")
                },
            ]
        );
        assert!(with(&[]).unwrap().disks.is_empty());
    }

    #[test]
    fn bad_device_and_chardev_arguments_are_refused() {
        let err = |args: &[&'static str]| with(args).unwrap_err().to_string();
        assert_eq!(
            err(&["-device", "vhost-user-blk-device,chardev=c9"]),
            "invalid value 'vhost-user-blk-device,chardev=c9' for '-device': no -chardev with id 'c9'"
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c0"]),
            "invalid value 'socket,id=c0' for '-chardev': no path="
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c0,path="]),
            "invalid value '' for '-chardev': empty path"
        );
        assert!(err(&["-chardev", "socket,path=/s"]).ends_with("no id="));
        assert!(err(&["-chardev", "socket,id=c0,path=/s,server=on"]).contains("'server'"));
        assert_eq!(
            err(&["-chardev", "pty,id=c0"]),
            "chardev backend 'pty' (only 'socket') is not supported by this version of citadel"
        );
        assert!(err(&[
            "-chardev",
            "socket,id=c0,path=/a",
            "-chardev",
            "socket,id=c0,path=/b"
        ])
        .contains("already exists"));
        assert!(err(&["-device", "vhost-user-blk-device"]).ends_with("no chardev="));
        assert!(
            err(&["-device", "vhost-user-blk-device,chardev=c0,num-queues=2"])
                .contains("'num-queues'")
        );
        assert_eq!(
            err(&["-device", "virtio-gpu-pci"]),
            "device 'virtio-gpu-pci' is not supported by this version of citadel"
        );
        assert!(err(&[
            "-chardev",
            "socket,id=c0,path=/a",
            "-device",
            "vhost-user-blk-device,chardev=c0",
            "-device",
            "vhost-user-blk-device,chardev=c0"
        ])
        .contains("already used by another device"));
        assert!(err(&[
            "-chardev",
            "socket,id=c0,path=/a",
            "-chardev",
            "socket,id=c1,path=/b",
            "-device",
            "vhost-user-blk-device,chardev=c0,id=d",
            "-device",
            "vhost-user-blk-device,chardev=c1,id=d"
        ])
        .contains("a device with this id already exists"));
        assert!(matches!(
            with(&["-netdev", "id=x"]).unwrap_err(),
            CliError::Unsupported(_)
        ));
    }

    #[test]
    fn incoming_takes_a_snapshot_directory_and_no_vhost_user_blk_device() {
        let c = with(&["-incoming", "file:/var/lib/snap", "-smp", "2"]).unwrap();
        let snap = |prefault, share| {
            Some(IncomingConfig {
                dir: PathBuf::from("/var/lib/snap"),
                prefault,
                share,
                verify: true,
            })
        };
        assert_eq!(c.incoming, snap(false, false));
        let c = with(&["-incoming", "file:/var/lib/snap,prefault=on"]).unwrap();
        assert_eq!(c.incoming, snap(true, false));
        let c = with(&["-incoming", "file:/var/lib/snap,prefault=off,share=on"]).unwrap();
        assert_eq!(c.incoming, snap(false, true));
        let c = with(&["-incoming", "file:/var/lib/snap,verify=off"]).unwrap();
        assert!(c.incoming.is_some_and(|i| !i.verify));
        assert_eq!(with(&[]).unwrap().incoming, None);
        let err = |args: &[&'static str]| with(args).unwrap_err().to_string();
        for bad in [
            "tcp:0:4444",
            "file:",
            "file:,prefault=on",
            "defer",
            "/var/lib/snap",
        ] {
            assert_eq!(
                err(&["-incoming", bad]),
                format!(
                    "invalid value '{bad}' for '-incoming': Citadel restores snapshots from \
                     'file:<directory>[,prefault=on|off][,share=on|off][,verify=on|off]' only"
                )
            );
        }
        assert_eq!(
            err(&["-incoming", "file:/s,prefault=maybe"]),
            "invalid value 'file:/s,prefault=maybe' for '-incoming': 'prefault' must be on or off"
        );
        assert_eq!(
            err(&["-incoming", "file:/s,eager"]),
            "invalid value 'file:/s,eager' for '-incoming': unknown property 'eager'"
        );
        assert_eq!(
            err(&[
                "-incoming",
                "file:/s",
                "-chardev",
                "socket,id=c0,path=/a",
                "-device",
                "vhost-user-blk-device,chardev=c0"
            ]),
            "invalid value 'file:/s' for '-incoming': snapshots never hold vhost-user-blk \
             devices; restore without them"
        );
        // Disks plugged into slots need guest RAM their backends can share.
        let c = with(&[
            "-incoming",
            "file:/var/lib/snap",
            "-drive",
            "file=/d.img,id=d0",
            "-device",
            "virtio-blk-device,drive=d0",
        ])
        .unwrap();
        assert_eq!(c.incoming, snap(false, true));
        // A drive no device plugs is only a block node.
        let c = with(&[
            "-incoming",
            "file:/var/lib/snap",
            "-drive",
            "file=/d.img,id=d0",
        ])
        .unwrap();
        assert_eq!(c.incoming, snap(false, false));
        // The balloon keeps its state across a snapshot.
        let c = with(&["-incoming", "file:/s", "-device", "virtio-balloon-device"]).unwrap();
        assert!(c.balloon.is_some());
    }

    #[test]
    fn more_devices_than_slots_are_refused() {
        let names: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
        let mut args: Vec<String> = base().into_iter().map(String::from).collect();
        for name in &names {
            args.push("-chardev".into());
            args.push(format!("socket,id={name},path=/s/{name}"));
            args.push("-device".into());
            args.push(format!("vhost-user-blk-device,chardev={name}"));
        }
        let err = parse(args.clone()).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid value 'vhost-user-blk-device,chardev=c8' for '-device': too many devices: the microvm machine has 8 virtio-mmio slots besides its 6 hot-replace disk slots and 2 NIC slots"
        );
        args.truncate(args.len() - 4);
        assert_eq!(parse(args).unwrap().disks.len(), 8);
    }

    #[test]
    fn kata_launch_line_parses() {
        let c = parse([
            "-name",
            "sandbox-4f2c",
            "-uuid",
            "7A1B2C3D-0000-4000-8000-00000000ABCD",
            "-machine",
            "type=microvm,dump-guest-core=off,mem-share=on",
            "-kernel",
            "/k",
            "-D",
            "/run/vc/log",
            "-drive",
            "id=rootfs,file=/images/root.img,readonly=on,direct=off",
            "-device",
            "virtio-blk-device,drive=rootfs,id=blk-rootfs",
            "-drive",
            "file=/images/data.img,id=data,if=none,format=raw,aio=native",
            "-device",
            "virtio-blk-device,drive=data,bootindex=1,serial=CITADEL DATA-01",
            "-drive",
            "file=/images/spare.img,id=spare,direct=on",
        ])
        .unwrap();
        assert_eq!(
            c.uuid.as_deref(),
            Some("7a1b2c3d-0000-4000-8000-00000000abcd")
        );
        assert_eq!(
            c.drives,
            vec![
                DriveConfig {
                    id: "rootfs".into(),
                    file: PathBuf::from("/images/root.img"),
                    read_only: true,
                    direct: false,
                },
                DriveConfig {
                    id: "data".into(),
                    file: PathBuf::from("/images/data.img"),
                    read_only: false,
                    direct: false,
                },
                DriveConfig {
                    id: "spare".into(),
                    file: PathBuf::from("/images/spare.img"),
                    read_only: false,
                    direct: true,
                },
            ]
        );
        assert_eq!(
            c.blk_devices,
            vec![
                BlkDeviceConfig {
                    id: "blk-rootfs".into(),
                    slot: 0,
                    drive: "rootfs".into(),
                    serial: None,
                },
                BlkDeviceConfig {
                    id: "data".into(),
                    slot: 1,
                    drive: "data".into(),
                    serial: Some("CITADEL DATA-01".into()),
                },
            ]
        );
    }

    #[test]
    fn blk_devices_take_their_addr_or_the_lowest_slot_left() {
        let c = with(&[
            "-drive",
            "file=/a,id=a",
            "-drive",
            "file=/b,id=b",
            "-drive",
            "file=/c,id=c",
            "-device",
            "virtio-blk-device,drive=a",
            "-device",
            "virtio-blk-device,drive=b,addr=0x0",
            "-device",
            "virtio-blk-device,drive=c,addr=5",
        ])
        .unwrap();
        let slots: Vec<(&str, u64)> = c
            .blk_devices
            .iter()
            .map(|d| (d.drive.as_str(), d.slot))
            .collect();
        assert_eq!(slots, [("a", 1), ("b", 0), ("c", 5)]);
        let err = |args: &[&'static str]| with(args).unwrap_err().to_string();
        for bad in ["0x6", "6", "zz", "", "-1"] {
            let device = format!("virtio-blk-device,drive=a,addr={bad}");
            let device: &'static str = Box::leak(device.into_boxed_str());
            assert_eq!(
                err(&["-drive", "file=/a,id=a", "-device", device]),
                format!(
                    "invalid value '{device}' for '-device': addr= names a disk slot, 0x0 to \
                     0x5"
                )
            );
        }
        assert_eq!(
            err(&[
                "-drive",
                "file=/a,id=a",
                "-drive",
                "file=/b,id=b",
                "-device",
                "virtio-blk-device,drive=a,addr=0x1",
                "-device",
                "virtio-blk-device,drive=b,addr=1"
            ]),
            "invalid value 'virtio-blk-device,drive=b,addr=1' for '-device': disk slot 0x1 is \
             taken by another device"
        );
    }

    #[test]
    fn bad_drives_and_blk_devices_are_refused() {
        let err = |args: &[&'static str]| with(args).unwrap_err().to_string();
        assert_eq!(
            err(&["-device", "virtio-blk-device,drive=d0"]),
            "invalid value 'virtio-blk-device,drive=d0' for '-device': no -drive with id 'd0'"
        );
        assert!(err(&["-drive", "file=/a"]).ends_with("no id="));
        assert!(err(&["-drive", "id=d0"]).ends_with("no file="));
        assert!(err(&["-drive", "id=d0,file=/a,cache=none"]).contains("'cache'"));
        assert!(err(&["-drive", "id=d0,file=/a,readonly=maybe"])
            .contains("'readonly' must be on or off"));
        assert_eq!(
            err(&["-drive", "id=d0,file=/a,format=qcow2"]),
            "-drive format=qcow2 is not supported by this version of citadel"
        );
        assert!(err(&["-drive", "id=d0,file=/a,if=virtio"]).contains("if=virtio"));
        assert!(err(&["-drive", "id=d0,file=/a", "-drive", "id=d0,file=/b"])
            .contains("a drive with this id already exists"));
        assert!(err(&[
            "-drive",
            "id=d0,file=/a",
            "-device",
            "virtio-blk-device,drive=d0",
            "-device",
            "virtio-blk-device,drive=d0,id=other"
        ])
        .contains("drive 'd0' is already used by another device"));
        assert!(err(&[
            "-drive",
            "id=d0,file=/a",
            "-drive",
            "id=d1,file=/b",
            "-device",
            "virtio-blk-device,drive=d0,id=x",
            "-device",
            "virtio-blk-device,drive=d1,id=x"
        ])
        .contains("a device with id 'x' already exists"));
        assert!(err(&[
            "-chardev",
            "socket,id=c0,path=/s",
            "-device",
            "vhost-user-blk-device,chardev=c0,id=d0",
            "-drive",
            "id=d0,file=/a",
            "-device",
            "virtio-blk-device,drive=d0"
        ])
        .contains("a device with id 'd0' already exists"));
        assert!(err(&[
            "-drive",
            "id=d0,file=/a",
            "-device",
            "virtio-blk-device,drive=d0,num-queues=2"
        ])
        .contains("'num-queues'"));
        assert!(err(&[
            "-drive",
            "id=d0,file=/a",
            "-device",
            "virtio-blk-device,drive=d0,bootindex=x"
        ])
        .contains("'bootindex'"));
        assert_eq!(
            err(&[
                "-drive",
                "id=d0,file=/a",
                "-device",
                "virtio-blk-device,drive=d0,serial=twenty-one-bytes-long"
            ]),
            "invalid value 'virtio-blk-device,drive=d0,serial=twenty-one-bytes-long' for '-device': a serial number is at most 20 printable ASCII bytes"
        );
        assert!(err(&[
            "-drive",
            "id=d0,file=/a",
            "-device",
            "virtio-blk-device,drive=d0,serial=tab\there"
        ])
        .contains("printable ASCII"));
        for bad in [
            "7a1b2c3d",
            "7a1b2c3d-0000-4000-8000-00000000abcg",
            "7a1b2c3d00004000800000000000abcd",
        ] {
            assert!(err(&["-uuid", bad]).contains("'-uuid'"), "{bad}");
        }
        assert_eq!(
            err(&["-disable-seccomp"]),
            "option '-disable-seccomp' is refused: citadel always runs under its seccomp filters; '-seccomp log' logs a forbidden system call instead of killing the VMM"
        );
    }

    #[test]
    fn at_most_six_blk_devices_and_sixteen_drives() {
        let mut args: Vec<String> = base().into_iter().map(String::from).collect();
        for i in 0..7 {
            args.push("-drive".into());
            args.push(format!("id=d{i},file=/d{i}"));
            args.push("-device".into());
            args.push(format!("virtio-blk-device,drive=d{i}"));
        }
        assert_eq!(
            parse(args.clone()).unwrap_err().to_string(),
            "invalid value 'virtio-blk-device,drive=d6' for '-device': too many virtio-blk devices: the microvm machine has 6 hot-replace disk slots"
        );
        args.truncate(args.len() - 2);
        let c = parse(args.clone()).unwrap();
        assert_eq!((c.drives.len(), c.blk_devices.len()), (7, 6));
        for i in 7..17 {
            args.push("-drive".into());
            args.push(format!("id=d{i},file=/d{i}"));
        }
        assert_eq!(
            parse(args.clone()).unwrap_err().to_string(),
            "invalid value 'id=d16,file=/d16' for '-drive': too many drives: a VM has at most 16 block nodes"
        );
        args.truncate(args.len() - 2);
        assert_eq!(parse(args).unwrap().drives.len(), 16);
    }

    #[test]
    fn one_balloon_with_its_options() {
        assert_eq!(with(&[]).unwrap().balloon, None);
        assert_eq!(
            with(&["-device", "virtio-balloon-device"]).unwrap().balloon,
            Some(BalloonOptions::default())
        );
        assert_eq!(
            with(&[
                "-device",
                "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=true"
            ])
            .unwrap()
            .balloon,
            Some(BalloonOptions {
                id: Some("balloon0".into()),
                deflate_on_oom: true,
                free_page_reporting: true,
            })
        );
        assert_eq!(
            with(&[
                "-device",
                "virtio-balloon-device,deflate-on-oom=off,free-page-reporting=no"
            ])
            .unwrap()
            .balloon,
            Some(BalloonOptions::default())
        );
        assert_eq!(
            with(&["-device", "virtio-balloon-device", "-device", "virtio-balloon-device,id=b"])
                .unwrap_err()
                .to_string(),
            "invalid value 'virtio-balloon-device,id=b' for '-device': a VM has at most one balloon"
        );
        assert_eq!(
            with(&["-device", "virtio-balloon-device,guest-stats-polling-interval=2"])
                .unwrap_err()
                .to_string(),
            "invalid value 'virtio-balloon-device,guest-stats-polling-interval=2' for '-device': unknown or empty property 'guest-stats-polling-interval' (virtio-balloon-device takes id=, deflate-on-oom= and free-page-reporting=)"
        );
        assert_eq!(
            with(&["-device", "virtio-balloon-device,deflate-on-oom=maybe"])
                .unwrap_err()
                .to_string(),
            "invalid value 'virtio-balloon-device,deflate-on-oom=maybe' for '-device': 'deflate-on-oom' must be on or off"
        );
        assert!(with(&["-device", "virtio-balloon-device,id="]).is_err());
        assert!(with(&["-device", "virtio-balloon-device,free-page-reporting"]).is_err());
        assert_eq!(
            with(&[
                "-drive",
                "id=d0,file=/d0",
                "-device",
                "virtio-blk-device,drive=d0,id=dup",
                "-device",
                "virtio-balloon-device,id=dup"
            ])
            .unwrap_err()
            .to_string(),
            "invalid value 'virtio-balloon-device,id=dup' for '-device': a device with this id already exists"
        );
    }

    #[test]
    fn the_balloon_needs_a_slot_of_its_own() {
        let mut args: Vec<String> = base().into_iter().map(String::from).collect();
        for i in 0..8 {
            args.push("-chardev".into());
            args.push(format!("socket,id=c{i},path=/s{i}"));
            args.push("-device".into());
            args.push(format!("vhost-user-blk-device,chardev=c{i}"));
        }
        assert_eq!(parse(args.clone()).unwrap().disks.len(), 8);
        args.push("-device".into());
        args.push("virtio-balloon-device".into());
        assert_eq!(
            parse(args.clone()).unwrap_err().to_string(),
            "invalid value 'virtio-balloon-device' for '-device': no virtio-mmio slot is left for the balloon: use one vhost-user-blk device fewer"
        );
        args.drain(args.len() - 6..args.len() - 2);
        let c = parse(args).unwrap();
        assert_eq!(c.disks.len(), 7);
        assert!(c.balloon.is_some());
    }
}
