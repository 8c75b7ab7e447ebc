//! Cgroups of the jail: v2 when the unified hierarchy offers every controller asked for, v1
//! otherwise (or when asked). The jail's cgroup is created beneath the jailer's own cgroup in
//! each hierarchy, the values are written, and then the process is moved in, once.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Step};

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// Where it is mounted.
    point: PathBuf,
    /// The part of the hierarchy that is mounted there (`/` unless a namespace narrowed it).
    root: PathBuf,
    /// cgroup2, or the v1 controllers bound to this mount.
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    V2,
    V1(BTreeSet<String>),
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|e| Error::path(Step::Cgroup, "read", path, e))
}

/// Parses /proc/self/mountinfo into the cgroup mounts.
fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let after: Vec<&str> = after.split(' ').collect();
            let root = PathBuf::from(fields.get(3)?);
            let point = PathBuf::from(fields.get(4)?);
            let kind = match *after.first()? {
                "cgroup2" => Kind::V2,
                "cgroup" => Kind::V1(
                    after
                        .get(2)?
                        .split(',')
                        .map(|opt| opt.strip_prefix("name=").unwrap_or(opt).to_string())
                        .collect(),
                ),
                _ => return None,
            };
            Some(Mount { point, root, kind })
        })
        .collect()
}

/// The jailer's own cgroup in the v2 hierarchy and in the v1 hierarchy of each controller,
/// from /proc/self/cgroup.
fn own_cgroups(proc_cgroup: &str) -> Vec<(Vec<String>, PathBuf)> {
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = if controllers.is_empty() {
                Vec::new()
            } else {
                controllers
                    .split(',')
                    .map(|c| c.strip_prefix("name=").unwrap_or(c).to_string())
                    .collect()
            };
            Some((controllers, PathBuf::from(path)))
        })
        .collect()
}

/// Host path of cgroup `own` (as /proc/self/cgroup names it) in the hierarchy at `mount`.
fn host_path(mount: &Mount, own: &Path) -> PathBuf {
    let relative = own.strip_prefix(&mount.root).unwrap_or(own);
    let relative = relative.strip_prefix("/").unwrap_or(relative);
    mount.point.join(relative)
}

/// A cgroup directory to create (or reuse) and fill.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// The jailer's own cgroup in that hierarchy: the jail's goes beneath it.
    own: PathBuf,
    /// The jail's cgroup.
    leaf: PathBuf,
    /// Files to write in the leaf.
    files: Vec<(String, String)>,
    v2: bool,
    controllers: BTreeSet<String>,
}

/// The cgroups set up for the jail.
pub struct Cgroups {
    targets: Vec<Target>,
    created: Vec<PathBuf>,
}

/// The controller a setting belongs to: the part of the file name before the first dot.
fn controller(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// Plans the cgroup directories for `settings`.
fn plan(
    settings: &[(String, String)],
    version: Option<u8>,
    relative: &Path,
    mountinfo: &str,
    proc_cgroup: &str,
) -> Result<Vec<Target>, Error> {
    let wanted: BTreeSet<String> = settings
        .iter()
        .map(|(file, _)| controller(file).to_string())
        .collect();
    let mounts = mounts(mountinfo);
    let own = own_cgroups(proc_cgroup);

    let v2 = mounts
        .iter()
        .find(|m| m.kind == Kind::V2)
        .and_then(|mount| {
            let own = own.iter().find(|(c, _)| c.is_empty())?;
            Some(host_path(mount, &own.1))
        });
    let v2_has_all = v2.as_ref().is_some_and(|own| {
        fs::read_to_string(own.join("cgroup.controllers")).is_ok_and(|offered| {
            let offered: BTreeSet<&str> = offered.split_whitespace().collect();
            wanted.iter().all(|c| offered.contains(c.as_str()))
        })
    });
    if version == Some(2) && !v2_has_all {
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        return Err(Error::refused(
            Step::Cgroup,
            format!(
                "cgroup v2 asked for, but this process's unified hierarchy lacks {}",
                wanted.join(",")
            ),
        ));
    }
    let use_v2 = match version {
        Some(2) => true,
        Some(_) => false,
        None => v2_has_all,
    };
    if use_v2 {
        let own = v2.expect("v2_has_all implies a v2 mount");
        return Ok(vec![Target {
            leaf: own.join(relative),
            own,
            files: settings.to_vec(),
            v2: true,
            controllers: wanted,
        }]);
    }

    let mut targets: Vec<Target> = Vec::new();
    for (file, value) in settings {
        let name = controller(file);
        let mount = mounts
            .iter()
            .find(|m| matches!(&m.kind, Kind::V1(c) if c.contains(name)))
            .ok_or_else(|| {
                Error::refused(
                    Step::Cgroup,
                    format!("no cgroup v1 hierarchy has the {name} controller ({file})"),
                )
            })?;
        let (_, own_path) = own
            .iter()
            .find(|(c, _)| c.iter().any(|c| c == name))
            .ok_or_else(|| {
                Error::refused(
                    Step::Cgroup,
                    format!("/proc/self/cgroup lists no {name} hierarchy"),
                )
            })?;
        let own_dir = host_path(mount, own_path);
        let leaf = own_dir.join(relative);
        match targets.iter_mut().find(|t| t.leaf == leaf) {
            Some(target) => target.files.push((file.clone(), value.clone())),
            None => targets.push(Target {
                own: own_dir,
                leaf,
                files: vec![(file.clone(), value.clone())],
                v2: false,
                controllers: BTreeSet::from([name.to_string()]),
            }),
        }
    }
    Ok(targets)
}

impl Cgroups {
    /// Creates the jail's cgroups (`<own cgroup>/<relative>`) and writes `settings` into them.
    /// The process is not moved yet.
    ///
    /// `default_pids_max`, when given, is placed in a plan of its own, so that the hierarchy
    /// the pids controller lives in does not decide where the operator's settings go (on a
    /// hybrid host, v2 for those and v1 for pids).
    pub fn create(
        settings: &[(String, String)],
        default_pids_max: Option<u32>,
        version: Option<u8>,
        relative: &Path,
    ) -> Result<Cgroups, Error> {
        let mut cgroups = Cgroups {
            targets: Vec::new(),
            created: Vec::new(),
        };
        if settings.is_empty() && default_pids_max.is_none() {
            return Ok(cgroups);
        }
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let proc_cgroup = read(Path::new("/proc/self/cgroup"))?;
        if !settings.is_empty() {
            cgroups.targets = plan(settings, version, relative, &mountinfo, &proc_cgroup)?;
        }
        if let Some(max) = default_pids_max {
            let pids = [("pids.max".to_string(), max.to_string())];
            let extra = plan(&pids, version, relative, &mountinfo, &proc_cgroup).map_err(|e| {
                let why = match e {
                    Error::Refused { message, .. } => message,
                    other => other.to_string(),
                };
                Error::refused(
                    Step::Cgroup,
                    format!(
                        "{why} (the default pids.max={max}; --no-pids-limit runs without a \
                         pids limit)"
                    ),
                )
            })?;
            for target in extra {
                match cgroups.targets.iter_mut().find(|t| t.leaf == target.leaf) {
                    Some(same) => {
                        same.files.extend(target.files);
                        same.controllers.extend(target.controllers);
                    }
                    None => cgroups.targets.push(target),
                }
            }
        }
        for target in cgroups.targets.clone() {
            cgroups.build(&target)?;
        }
        Ok(cgroups)
    }

    fn build(&mut self, target: &Target) -> Result<(), Error> {
        let mut dirs: Vec<&Path> = target
            .leaf
            .ancestors()
            .take_while(|dir| *dir != target.own)
            .collect();
        dirs.reverse();
        let mut parent = target.own.clone();
        for dir in dirs {
            if target.v2 {
                // Controllers must be enabled in every ancestor's subtree_control for the leaf
                // to have their files.
                let control = parent.join("cgroup.subtree_control");
                let enable: Vec<String> =
                    target.controllers.iter().map(|c| format!("+{c}")).collect();
                fs::write(&control, enable.join(" "))
                    .map_err(|e| Error::path(Step::Cgroup, "enable controllers in", &control, e))?;
            }
            match fs::create_dir(dir) {
                Ok(()) => self.created.push(dir.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::path(Step::Cgroup, "mkdir", dir, e)),
            }
            if !target.v2 && target.controllers.contains("cpuset") {
                // A v1 cpuset cgroup accepts no task until it has CPUs and memory nodes.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let mine = dir.join(file);
                    if read(&mine)?.trim().is_empty() {
                        let inherited = read(&parent.join(file))?;
                        fs::write(&mine, inherited.trim())
                            .map_err(|e| Error::path(Step::Cgroup, "write", &mine, e))?;
                    }
                }
            }
            parent = dir.to_path_buf();
        }
        for (file, value) in &target.files {
            let path = target.leaf.join(file);
            fs::write(&path, value).map_err(|e| Error::path(Step::Cgroup, "write", &path, e))?;
        }
        Ok(())
    }

    /// Moves the calling process into every jail cgroup. Children inherit them.
    pub fn enter(&self) -> Result<(), Error> {
        let pid = std::process::id().to_string();
        for target in &self.targets {
            let procs = target.leaf.join("cgroup.procs");
            fs::write(&procs, &pid)
                .map_err(|e| Error::path(Step::Cgroup, "move into", &procs, e))?;
        }
        Ok(())
    }

    /// Gives up removing anything: the cgroups are in use.
    pub fn keep(&mut self) {
        self.created.clear();
    }
}

/// How long a cgroup whose last task is exiting may stay busy before its removal is given up.
const BUSY_RETRIES: u32 = 200;

impl Drop for Cgroups {
    /// Removes the cgroups this run created, deepest first. The caller has reaped every process
    /// that was in them; a task still leaving makes the kernel answer EBUSY for a moment.
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            let mut tries = 0;
            let result = loop {
                match fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < BUSY_RETRIES => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    other => break other,
                }
            };
            if let Err(e) = result {
                log::warn!(
                    "could not remove cgroup {} after a failure: {e}",
                    dir.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct
33 25 0:29 /inner /sys/fs/cgroup/pids rw,nosuid shared:13 - cgroup cgroup rw,pids
";
    const PROC_CGROUP: &str = "\
4:memory:/process_api/abc
3:cpu,cpuacct:/
2:pids:/inner/x
0::/
";

    #[test]
    fn v1_cgroups_go_beneath_the_jailers_own() {
        let settings = vec![
            ("memory.limit_in_bytes".to_string(), "64M".to_string()),
            ("cpu.shares".to_string(), "512".to_string()),
            ("pids.max".to_string(), "10".to_string()),
            ("memory.swappiness".to_string(), "0".to_string()),
        ];
        let targets = plan(
            &settings,
            None,
            Path::new("citadel/vm1"),
            MOUNTINFO,
            PROC_CGROUP,
        )
        .unwrap();
        let leaves: Vec<_> = targets.iter().map(|t| t.leaf.clone()).collect();
        assert_eq!(
            leaves,
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/citadel/vm1"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/citadel/vm1"),
                PathBuf::from("/sys/fs/cgroup/pids/x/citadel/vm1"),
            ]
        );
        assert_eq!(targets[0].files.len(), 2);
        assert!(targets.iter().all(|t| !t.v2));
    }

    #[test]
    fn v2_forced_without_the_controllers_is_refused() {
        let settings = vec![("memory.max".to_string(), "64M".to_string())];
        let err = plan(&settings, Some(2), Path::new("c"), MOUNTINFO, PROC_CGROUP).unwrap_err();
        assert!(err.to_string().starts_with("cgroup: cgroup v2 asked for"));
    }

    #[test]
    fn unknown_controller_is_refused() {
        let settings = vec![("nosuch.max".to_string(), "1".to_string())];
        let err = plan(&settings, Some(1), Path::new("c"), MOUNTINFO, PROC_CGROUP).unwrap_err();
        assert!(err.to_string().contains("nosuch"));
    }
}
