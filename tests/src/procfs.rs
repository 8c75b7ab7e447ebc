//! What /proc says about a running process.

/// The soft and hard "Max core file size" of `pid`, as written in /proc/<pid>/limits.
pub fn core_file_limit(pid: u32) -> (String, String) {
    limit(pid, "Max core file size")
}

/// The soft and hard values of the limit `name` ("Max file size", ...) of `pid`, as written in
/// /proc/<pid>/limits.
pub fn limit(pid: u32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in\n{limits}"));
    let mut fields = line.split_whitespace();
    let soft = fields.next().expect("soft limit").to_string();
    let hard = fields.next().expect("hard limit").to_string();
    (soft, hard)
}

/// The VmFlags of every mapping of `pid` whose path contains `needle`, one entry per mapping.
pub fn vm_flags_of(pid: u32, needle: &str) -> Vec<Vec<String>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut matching = false;
    let mut found = Vec::new();
    for line in smaps.lines() {
        // A mapping header: "start-end perms offset dev inode [path]".
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            matching = line.contains(needle);
            continue;
        }
        if matching {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                found.push(flags.split_whitespace().map(String::from).collect());
            }
        }
    }
    found
}

/// Raises this process's core size limit to unlimited, so that a child showing 0 lowered it
/// itself. Returns false when this process may not (not root and a lower hard limit).
pub fn allow_own_core_dumps() -> bool {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit that outlives the call; only this process's limit changes.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &unlimited) == 0 }
}

/// Direct children of `pid`, from every thread's children list.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// /proc/<pid>/status, or `None` once the process is gone.
pub fn status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// The value of `key` in a /proc/<pid>/status text, empty when absent.
pub fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The citadel-blk processes under citadel `vm` (children of its launcher).
pub fn blk_backends(vm: u32) -> Vec<u32> {
    backends_named(vm, "citadel-blk")
}

/// The citadel-net processes started for `vm` (children of its launcher).
pub fn net_backends(vm: u32) -> Vec<u32> {
    backends_named(vm, "citadel-net")
}

fn backends_named(vm: u32, name: &str) -> Vec<u32> {
    children(vm)
        .into_iter()
        .flat_map(children)
        .filter(|p| status(*p).is_some_and(|s| status_field(&s, "Name") == name))
        .collect()
}

/// Waits until `pid` no longer exists (reaped, not a zombie).
pub fn wait_gone(pid: u32, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// The processes holding a descriptor open on `path`, whoever their parent.
pub fn holders_of(path: &std::path::Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
            })
        })
        .collect()
}

/// The open flags (octal `flags:` of /proc/<pid>/fdinfo) of `pid`'s descriptors on `path`.
pub fn open_flags_on(pid: u32, path: &std::path::Path) -> Vec<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
        .filter_map(|fd| {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str()?))
                    .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .collect()
}
