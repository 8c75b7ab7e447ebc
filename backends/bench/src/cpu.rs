//! CPU time of a process (all its threads, live and exited) from `/proc/<pid>/stat`.

use std::io;
use std::time::Duration;

/// Errors reading a process's CPU time.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The stat file could not be read (the process may have exited).
    #[error("reading /proc/{pid}/stat: {source}")]
    Read {
        /// Process id.
        pid: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The stat file does not have the expected shape.
    #[error("unexpected contents in /proc/{0}/stat")]
    Parse(String),
    /// The clock tick rate is unavailable.
    #[error("sysconf(_SC_CLK_TCK) failed")]
    ClockTicks,
}

/// Which process to measure.
#[derive(Debug, Clone, Copy)]
pub enum Process {
    /// This process.
    This,
    /// Another process.
    Pid(u32),
}

impl Process {
    fn proc_name(self) -> String {
        match self {
            Process::This => "self".to_string(),
            Process::Pid(pid) => pid.to_string(),
        }
    }
}

/// User plus system time the process has used so far.
pub fn cpu_time(process: Process) -> Result<Duration, CpuError> {
    let name = process.proc_name();
    let stat =
        std::fs::read_to_string(format!("/proc/{name}/stat")).map_err(|source| CpuError::Read {
            pid: name.clone(),
            source,
        })?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| CpuError::Parse(name.clone()))?;
    // SAFETY: sysconf reads a configuration value and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err(CpuError::ClockTicks);
    }
    let hz = hz as u64;
    Ok(Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz))
}

/// utime + stime in clock ticks from the text of a stat file. The command name (field 2) is
/// in parentheses and may itself contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_after_an_awkward_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 37 0 0 20 0 3 0 5 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(287));
    }

    #[test]
    fn rejects_truncated_stat() {
        assert_eq!(parse_stat_ticks("1234 (x) S 1 2 3"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = cpu_time(Process::This).unwrap();
        // Spin until the kernel has charged at least one more tick; on a loaded host that can
        // take many wall-clock ticks, hence the generous bound.
        let start = std::time::Instant::now();
        let mut x = 1u64;
        let mut after = before;
        while after == before && start.elapsed() < Duration::from_secs(20) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            after = cpu_time(Process::This).unwrap();
        }
        assert!(after > before, "{before:?} -> {after:?}");
    }
}
