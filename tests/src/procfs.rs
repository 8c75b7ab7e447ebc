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
