//! Command line of citadel-jailer, parsed and validated before anything is touched.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use citadel_pci::address::MAX_HOST_FUNCTIONS;

use crate::error::{Error, Step};

/// Default directory the jails are created under.
pub const DEFAULT_BASE: &str = "/srv/jailer";
/// Default cgroup, relative to the jailer's own cgroup, under which jail cgroups are created.
pub const DEFAULT_PARENT_CGROUP: &str = "citadel";
/// Default open-file limit of the jailed process.
pub const DEFAULT_NO_FILE: u64 = 2048;
/// `pids.max` of the jail's cgroup unless `--cgroup pids.max=N` or `--no-pids-limit` says
/// otherwise: room for the VMM's threads (one per vCPU, up to 254, plus the event loop) and
/// its backends, and no fork bomb.
pub const DEFAULT_PIDS_MAX: u32 = 1024;
/// Below this many descriptors the VMM cannot even build a VM (KVM, VM and vCPU fds, epoll,
/// eventfds, the QMP socket, the launcher channel), so smaller limits are refused up front.
pub const MIN_NO_FILE: u64 = 32;

const USAGE: &str = "usage: citadel-jailer --id ID --exec-file PATH --uid UID --gid GID \
[--backend-file PATH]... [--chroot-base-dir DIR] [--netns PATH | --new-netns | --host-netns] \
[--new-pid-ns] [--userns] [--cgroup-version 1|2] [--parent-cgroup P] [--cgroup FILE=VALUE]... \
[--no-pids-limit] \
[--resource-limit fsize=N|no-file=N|memlock=N]... [--vfio-device ADDRESS]... \
[--daemonize | --keep-stdio] [--landlock] -- <citadel arguments>";

/// Which network namespace the jail gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// Join the namespace bound at this path (e.g. `/var/run/netns/NAME`).
    Join(PathBuf),
    /// Create a new, empty one (the default).
    New,
    /// Keep the jailer's own (`--host-netns`): the VMM shares the host's network.
    Host,
}

/// The validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Jail id: 1 to 64 of `[A-Za-z0-9-]`.
    pub id: String,
    /// The VMM executable, copied into the jail.
    pub exec_file: PathBuf,
    /// Backend executables the VMM may launch, copied next to it.
    pub backend_files: Vec<PathBuf>,
    /// Identity the VMM runs as.
    pub uid: u32,
    /// Group the VMM runs as.
    pub gid: u32,
    /// Jails live in `<base>/citadel/<id>/root`.
    pub base: PathBuf,
    /// Network namespace choice; a new, empty one unless told otherwise.
    pub netns: Netns,
    /// Start the VMM as PID 1 of a new PID namespace.
    pub new_pid_ns: bool,
    /// Run the VMM in a new user namespace mapping only uid and gid.
    pub userns: bool,
    /// Forced cgroup version; `None` picks v2 when it offers the controllers, else v1.
    pub cgroup_version: Option<u8>,
    /// Relative cgroup path under the jailer's own cgroup.
    pub parent_cgroup: PathBuf,
    /// Cgroup files to write, `(file, value)`, e.g. `("memory.limit_in_bytes", "1G")`.
    pub cgroups: Vec<(String, String)>,
    /// `pids.max` to set in a cgroup of its own when `cgroups` names none; `None` with
    /// `--no-pids-limit`.
    pub default_pids_max: Option<u32>,
    /// RLIMIT_NOFILE.
    pub no_file: u64,
    /// RLIMIT_FSIZE, when asked.
    pub fsize: Option<u64>,
    /// RLIMIT_MEMLOCK, when asked: a passed-through PCI function pins all guest RAM for its
    /// DMA, which the unprivileged VMM may do only within this limit.
    pub memlock: Option<u64>,
    /// Host PCI functions (`dddd:bb:dd.f`) whose VFIO group the VMM may open.
    pub vfio_devices: Vec<String>,
    /// Detach from the terminal and session.
    pub daemonize: bool,
    /// Hand the caller's stdin, stdout and stderr to the VMM (foreground only); by default
    /// they are the jail's /dev/null.
    pub keep_stdio: bool,
    /// Confine the VMM's filesystem access to the jail with Landlock.
    pub landlock: bool,
    /// Arguments passed to the VMM.
    pub vmm_args: Vec<OsString>,
}

fn refused(message: impl Into<String>) -> Error {
    Error::refused(Step::Args, message)
}

/// Parses and validates `argv` (without the program name).
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Args, Error> {
    let mut argv = argv.into_iter();
    let mut id = None;
    let mut exec_file = None;
    let mut backend_files = Vec::new();
    let mut uid = None;
    let mut gid = None;
    let mut base = PathBuf::from(DEFAULT_BASE);
    let mut netns = None;
    let mut netns_flags = 0;
    let mut no_pids_limit = false;
    let mut new_pid_ns = false;
    let mut userns = false;
    let mut cgroup_version = None;
    let mut parent_cgroup = PathBuf::from(DEFAULT_PARENT_CGROUP);
    let mut cgroups = Vec::new();
    let mut no_file = DEFAULT_NO_FILE;
    let mut fsize = None;
    let mut memlock = None;
    let mut vfio_devices: Vec<String> = Vec::new();
    let mut daemonize = false;
    let mut keep_stdio = false;
    let mut landlock = false;
    let mut vmm_args = Vec::new();

    while let Some(arg) = argv.next() {
        let flag = arg
            .to_str()
            .ok_or_else(|| refused(format!("argument {arg:?} is not UTF-8; {USAGE}")))?
            .to_string();
        let mut value = |name: &str| {
            argv.next()
                .ok_or_else(|| refused(format!("{name} needs a value; {USAGE}")))
        };
        match flag.as_str() {
            "--" => {
                vmm_args.extend(argv.by_ref());
                break;
            }
            "--id" => id = Some(utf8(&flag, value(&flag)?)?),
            "--exec-file" => exec_file = Some(path_arg(&flag, value(&flag)?)?),
            "--backend-file" => backend_files.push(path_arg(&flag, value(&flag)?)?),
            "--uid" => uid = Some(number(&flag, &utf8(&flag, value(&flag)?)?)?),
            "--gid" => gid = Some(number(&flag, &utf8(&flag, value(&flag)?)?)?),
            "--chroot-base-dir" => base = path_arg(&flag, value(&flag)?)?,
            "--netns" | "--new-netns" | "--host-netns" => {
                netns_flags += 1;
                netns = Some(match flag.as_str() {
                    "--netns" => Netns::Join(path_arg(&flag, value(&flag)?)?),
                    "--new-netns" => Netns::New,
                    _ => Netns::Host,
                });
            }
            "--new-pid-ns" => new_pid_ns = true,
            "--no-pids-limit" => no_pids_limit = true,
            "--userns" => userns = true,
            "--daemonize" => daemonize = true,
            "--keep-stdio" => keep_stdio = true,
            "--landlock" => landlock = true,
            "--cgroup-version" => {
                let v = utf8(&flag, value(&flag)?)?;
                cgroup_version = match v.as_str() {
                    "1" => Some(1),
                    "2" => Some(2),
                    _ => return Err(refused(format!("--cgroup-version {v:?}: expected 1 or 2"))),
                };
            }
            "--parent-cgroup" => {
                parent_cgroup = cgroup_path(&utf8(&flag, value(&flag)?)?)?;
            }
            "--cgroup" => cgroups.push(cgroup_setting(&utf8(&flag, value(&flag)?)?)?),
            "--resource-limit" => {
                let v = utf8(&flag, value(&flag)?)?;
                match v.split_once('=') {
                    Some(("no-file", n)) => {
                        no_file = number(&flag, n)?;
                        if no_file < MIN_NO_FILE {
                            return Err(refused(format!(
                                "--resource-limit no-file={no_file} is too small: citadel needs at least {MIN_NO_FILE} descriptors"
                            )));
                        }
                    }
                    Some(("fsize", n)) => fsize = Some(number(&flag, n)?),
                    Some(("memlock", n)) => memlock = Some(number(&flag, n)?),
                    _ => {
                        return Err(refused(format!(
                            "--resource-limit {v:?}: expected fsize=N, no-file=N or memlock=N"
                        )))
                    }
                }
            }
            "--vfio-device" => {
                let v = utf8(&flag, value(&flag)?)?;
                let address = citadel_pci::address::host_function(&v).ok_or_else(|| {
                    refused(format!(
                        "--vfio-device {v:?}: expected a PCI address such as 0000:00:01.0"
                    ))
                })?;
                if !vfio_devices.contains(&address) {
                    if vfio_devices.len() == MAX_HOST_FUNCTIONS {
                        return Err(refused(format!(
                            "--vfio-device {v:?}: at most {MAX_HOST_FUNCTIONS} host functions"
                        )));
                    }
                    vfio_devices.push(address);
                }
            }
            other => return Err(refused(format!("unknown argument {other:?}; {USAGE}"))),
        }
    }

    if netns_flags > 1 {
        return Err(refused(
            "--netns, --new-netns and --host-netns exclude each other",
        ));
    }
    let names_pids = cgroups.iter().any(|(file, _)| file.starts_with("pids."));
    if no_pids_limit && names_pids {
        return Err(refused(
            "--no-pids-limit and --cgroup pids.* exclude each other",
        ));
    }
    let default_pids_max = (!no_pids_limit && !names_pids).then_some(DEFAULT_PIDS_MAX);
    if daemonize && keep_stdio {
        return Err(refused(
            "--keep-stdio and --daemonize exclude each other: a daemon has no terminal",
        ));
    }
    let id = id.ok_or_else(|| refused(format!("--id is required; {USAGE}")))?;
    validate_id(&id)?;
    let exec_file =
        exec_file.ok_or_else(|| refused(format!("--exec-file is required; {USAGE}")))?;
    let uid = uid.ok_or_else(|| refused(format!("--uid is required; {USAGE}")))?;
    let gid = gid.ok_or_else(|| refused(format!("--gid is required; {USAGE}")))?;

    let mut names = Vec::new();
    for file in std::iter::once(&exec_file).chain(&backend_files) {
        let name = file
            .file_name()
            .ok_or_else(|| refused(format!("{} names no file", file.display())))?;
        if name == "dev" || names.contains(&name) {
            return Err(refused(format!(
                "{}: its name {name:?} is already taken in the jail",
                file.display()
            )));
        }
        names.push(name);
    }

    Ok(Args {
        id,
        exec_file,
        backend_files,
        uid,
        gid,
        base,
        netns: netns.unwrap_or(Netns::New),
        new_pid_ns,
        userns,
        cgroup_version,
        parent_cgroup,
        cgroups,
        default_pids_max,
        no_file,
        fsize,
        memlock,
        vfio_devices,
        daemonize,
        keep_stdio,
        landlock,
        vmm_args,
    })
}

fn utf8(flag: &str, value: OsString) -> Result<String, Error> {
    value
        .into_string()
        .map_err(|v| refused(format!("{flag} {v:?}: not UTF-8")))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, Error> {
    value
        .parse()
        .map_err(|_| refused(format!("{flag} {value:?}: not a valid number")))
}

/// Jail ids become directory and cgroup names: keep them to a safe, short alphabet.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok =
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(refused(format!(
            "--id {id:?}: expected 1 to 64 characters of [A-Za-z0-9-]"
        )))
    }
}

/// Host paths must be absolute and free of `..`, so that what is checked is what is used.
fn path_arg(flag: &str, value: OsString) -> Result<PathBuf, Error> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(refused(format!(
            "{flag} {}: must be an absolute path",
            path.display()
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refused(format!(
            "{flag} {}: must not contain ..",
            path.display()
        )));
    }
    Ok(path)
}

/// Cgroup paths are relative to the jailer's own cgroup: no leading `/`, no `..`, no empty or
/// odd components.
fn cgroup_path(value: &str) -> Result<PathBuf, Error> {
    let ok = !value.is_empty()
        && !value.starts_with('/')
        && value.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(Path::new(value).to_path_buf())
    } else {
        Err(refused(format!(
            "--parent-cgroup {value:?}: expected a relative path of [A-Za-z0-9._-] components without .."
        )))
    }
}

/// `controller.file=value`, e.g. `memory.limit_in_bytes=128M`.
fn cgroup_setting(value: &str) -> Result<(String, String), Error> {
    let (file, val) = value
        .split_once('=')
        .ok_or_else(|| refused(format!("--cgroup {value:?}: expected FILE=VALUE")))?;
    let file_ok = file
        .split_once('.')
        .is_some_and(|(controller, rest)| !controller.is_empty() && !rest.is_empty())
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    if !file_ok {
        return Err(refused(format!(
            "--cgroup {file:?}: expected a controller file such as memory.max (no / or ..)"
        )));
    }
    if file.contains("..") {
        return Err(refused(format!("--cgroup {file:?}: must not contain ..")));
    }
    if val.is_empty() || val.len() > 4096 || val.contains('\n') {
        return Err(refused(format!(
            "--cgroup {file}: value must be one line of 1 to 4096 bytes"
        )));
    }
    Ok((file.to_string(), val.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, Error> {
        parse(list.iter().map(OsString::from))
    }

    const BASIC: [&str; 8] = [
        "--id",
        "vm-1",
        "--exec-file",
        "/usr/bin/citadel",
        "--uid",
        "100",
        "--gid",
        "100",
    ];

    #[test]
    fn minimal_command_line_gets_the_defaults() {
        let mut list = BASIC.to_vec();
        list.extend(["--", "-machine", "microvm"]);
        let a = args(&list).unwrap();
        assert_eq!(a.id, "vm-1");
        assert_eq!(a.no_file, DEFAULT_NO_FILE);
        assert_eq!(a.base, PathBuf::from(DEFAULT_BASE));
        assert_eq!(a.parent_cgroup, PathBuf::from(DEFAULT_PARENT_CGROUP));
        // The safe defaults: a new, empty network namespace, a pids limit, stdio to /dev/null.
        assert_eq!(a.netns, Netns::New);
        assert_eq!(a.default_pids_max, Some(DEFAULT_PIDS_MAX));
        assert!(!a.keep_stdio);
        assert_eq!(
            a.vmm_args,
            vec![OsString::from("-machine"), "microvm".into()]
        );
    }

    #[test]
    fn bad_ids_are_refused() {
        let long = "a".repeat(65);
        for bad in ["", "a/b", "..", "a_b", "a b", long.as_str(), "é"] {
            let mut list = BASIC.to_vec();
            list[1] = bad;
            let err = args(&list).unwrap_err().to_string();
            assert!(err.starts_with("arguments: --id"), "{bad:?}: {err}");
        }
        assert!(validate_id(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn relative_and_dotdot_paths_are_refused() {
        for (flag, bad) in [
            ("--exec-file", "citadel"),
            ("--exec-file", "/usr/../bin/citadel"),
            ("--chroot-base-dir", "/srv/../etc"),
            ("--backend-file", "/a/../b"),
            ("--netns", "/run/netns/../x"),
        ] {
            let mut list = BASIC.to_vec();
            list.extend([flag, bad]);
            assert!(args(&list).is_err(), "{flag} {bad}");
        }
    }

    #[test]
    fn cgroup_arguments_are_checked() {
        for (flag, bad) in [
            ("--parent-cgroup", "/abs"),
            ("--parent-cgroup", "a/../b"),
            ("--parent-cgroup", "a//b"),
            ("--cgroup", "memory.max"),
            ("--cgroup", "../memory.max=1"),
            ("--cgroup", "memory/x.max=1"),
            ("--cgroup", "nodot=1"),
            ("--cgroup", "memory.max="),
            ("--cgroup-version", "3"),
        ] {
            let mut list = BASIC.to_vec();
            list.extend([flag, bad]);
            assert!(args(&list).is_err(), "{flag} {bad}");
        }
        let mut list = BASIC.to_vec();
        list.extend([
            "--cgroup",
            "memory.limit_in_bytes=1G",
            "--parent-cgroup",
            "a/b.c",
        ]);
        let a = args(&list).unwrap();
        assert_eq!(
            a.cgroups,
            vec![("memory.limit_in_bytes".into(), "1G".into())]
        );
    }

    #[test]
    fn resource_limits_are_parsed_and_floored() {
        let mut list = BASIC.to_vec();
        list.extend([
            "--resource-limit",
            "fsize=1000",
            "--resource-limit",
            "no-file=64",
        ]);
        let a = args(&list).unwrap();
        assert_eq!((a.fsize, a.no_file), (Some(1000), 64));
        let mut list = BASIC.to_vec();
        list.extend(["--resource-limit", "no-file=3"]);
        assert!(args(&list).unwrap_err().to_string().contains("too small"));
        let mut list = BASIC.to_vec();
        list.extend(["--resource-limit", "memlock=268435456"]);
        assert_eq!(args(&list).unwrap().memlock, Some(268_435_456));
    }

    #[test]
    fn vfio_devices_are_pci_addresses_written_as_sysfs_does() {
        let mut list = BASIC.to_vec();
        list.extend(["--vfio-device", "00:03.0", "--vfio-device", "0000:00:03.0"]);
        assert_eq!(args(&list).unwrap().vfio_devices, ["0000:00:03.0"]);
        for bad in ["../../etc", "0000:00:03", "0000:00:03.0/x"] {
            let mut list = BASIC.to_vec();
            list.extend(["--vfio-device", bad]);
            let e = args(&list).unwrap_err().to_string();
            assert!(e.contains("expected a PCI address"), "{bad}: {e}");
        }
        assert!(args(&BASIC).unwrap().vfio_devices.is_empty());
        let mut list = BASIC.to_vec();
        let addresses: Vec<String> = (0..=MAX_HOST_FUNCTIONS)
            .map(|d| format!("0000:00:{d:02x}.0"))
            .collect();
        for address in &addresses {
            list.extend(["--vfio-device", address.as_str()]);
        }
        let e = args(&list).unwrap_err().to_string();
        assert!(e.contains("at most 16 host functions"), "{e}");
    }

    #[test]
    fn the_pids_limit_is_the_default_unless_set_or_refused() {
        let with = |extra: &[&'static str]| {
            let mut list = BASIC.to_vec();
            list.extend(extra);
            args(&list)
        };
        assert_eq!(
            with(&["--cgroup", "pids.max=7"]).unwrap().default_pids_max,
            None
        );
        assert_eq!(with(&["--no-pids-limit"]).unwrap().default_pids_max, None);
        assert!(with(&["--no-pids-limit", "--cgroup", "pids.max=7"]).is_err());
        assert!(with(&["--daemonize", "--keep-stdio"]).is_err());
    }

    #[test]
    fn netns_choices_exclude_each_other_and_names_must_not_collide() {
        for pair in [
            ["--new-netns", "--netns"],
            ["--host-netns", "--netns"],
            ["--host-netns", "--new-netns"],
        ] {
            let mut list = BASIC.to_vec();
            list.extend(pair);
            if pair[1] == "--netns" {
                list.push("/run/netns/x");
            }
            assert!(args(&list).is_err(), "{pair:?}");
        }
        let mut list = BASIC.to_vec();
        list.push("--host-netns");
        assert_eq!(args(&list).unwrap().netns, Netns::Host);
        let mut list = BASIC.to_vec();
        list.extend(["--backend-file", "/other/citadel"]);
        assert!(args(&list).is_err());
        let mut list = BASIC.to_vec();
        list.extend(["--backend-file", "/x/dev"]);
        assert!(args(&list).is_err());
    }
}
