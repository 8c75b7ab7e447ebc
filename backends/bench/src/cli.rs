//! Command-line options of citadel-vu-bench.

use std::path::PathBuf;
use std::time::Duration;

use crate::ring::MAX_QUEUE_SIZE;

/// Descriptors each virtio-blk request uses: header, data, status.
pub const DESCRIPTORS_PER_REQUEST: u32 = 3;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;
/// Largest number of queues accepted.
pub const MAX_QUEUES: u16 = 64;

/// Usage text printed by `--help` and after a usage error.
pub const USAGE: &str = "\
usage: citadel-vu-bench --socket PATH [options]

Drives a vhost-user-blk backend from the host, with no guest, and reports IOPS, MB/s and
the backend's CPU time per I/O.

  --socket PATH        vhost-user-blk socket of the backend (required)
  --pattern P          randread | randwrite | seqread (default randread)
  --bs N               bytes per I/O, a multiple of 512; k/m suffixes allowed (default 4096)
  --seg-size N         bytes per data descriptor, a multiple of 512 (default: --bs, one
                       descriptor); 4k splits each I/O as a guest's pages do
  --iodepth N          requests in flight per queue (default 1)
  --queues N           queues, each driven by its own thread (default 1)
  --seconds S          measure for S seconds (default 5) ...
  --ios N              ... or until N I/Os have completed
  --warmup S           run the job unmeasured for S seconds first (default 0)
  --backend-pid PID    backend process whose CPU time is charged per I/O
  --event-idx          negotiate VIRTIO_RING_F_EVENT_IDX
  --queue-size N       descriptors per queue, a power of two (default: fits iodepth, >= 128)
  --timeout S          give up when a queue sees no completion for S seconds (default 30)
  --seed N             seed of the random offsets (default 1)
  --label NAME         name of the backend in the output (default: the socket path)
  -h, --help           this text";

/// Errors in the command line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An option the program does not know.
    #[error("unknown option {0}")]
    Unknown(String),
    /// An option given without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {option}: {why}")]
    Invalid {
        /// The option.
        option: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// `--socket` is missing.
    #[error("--socket is required")]
    NoSocket,
    /// Both stopping conditions were given.
    #[error("give either --seconds or --ios, not both")]
    BothLimits,
    /// The queue cannot hold the requested depth.
    #[error("--iodepth {iodepth} needs {needed} descriptors but --queue-size is {size}")]
    QueueTooSmall {
        /// `--iodepth`.
        iodepth: u32,
        /// Descriptors needed.
        needed: u32,
        /// `--queue-size`.
        size: u16,
    },
}

/// The I/O pattern of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Reads at uniformly random block-aligned offsets.
    RandRead,
    /// Writes at uniformly random block-aligned offsets.
    RandWrite,
    /// Reads at consecutive offsets, wrapping at the end of the disk.
    SeqRead,
}

impl Pattern {
    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "seqread",
        }
    }

    /// Whether the pattern writes to the disk.
    pub fn writes(self) -> bool {
        self == Pattern::RandWrite
    }
}

/// When a job stops issuing I/O.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// After this much time.
    Time(Duration),
    /// After this many I/Os in total.
    Ios(u64),
}

/// Everything a run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Backend socket.
    pub socket: PathBuf,
    /// I/O pattern.
    pub pattern: Pattern,
    /// Bytes per I/O.
    pub block_size: u32,
    /// Bytes per data descriptor: each I/O is `block_size / segment_size` (rounded up) of them.
    pub segment_size: u32,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Number of queues.
    pub queues: u16,
    /// When to stop.
    pub limit: Limit,
    /// Unmeasured time before the measurement.
    pub warmup: Duration,
    /// Backend process to account CPU to.
    pub backend_pid: Option<u32>,
    /// Negotiate EVENT_IDX.
    pub event_idx: bool,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Longest wait for a completion before the backend is declared stuck.
    pub timeout: Duration,
    /// Seed for random offsets.
    pub seed: u64,
    /// Backend name in the output.
    pub label: String,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Run a job.
    Run(Box<Options>),
    /// Print the usage.
    Help,
}

fn invalid(option: &'static str, value: &str, why: impl Into<String>) -> CliError {
    CliError::Invalid {
        option,
        value: value.to_string(),
        why: why.into(),
    }
}

fn parse_size(option: &'static str, value: &str) -> Result<u64, CliError> {
    let (digits, multiplier) = match value.char_indices().last() {
        Some((i, 'k' | 'K')) => (&value[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&value[..i], 1u64 << 20),
        _ => (value, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| invalid(option, value, format!("{e}")))?;
    n.checked_mul(multiplier)
        .ok_or_else(|| invalid(option, value, "too large"))
}

fn parse_int<T: std::str::FromStr>(option: &'static str, value: &str) -> Result<T, CliError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| invalid(option, value, format!("{e}")))
}

fn parse_seconds(option: &'static str, value: &str) -> Result<Duration, CliError> {
    let secs: f64 = parse_int(option, value)?;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(invalid(option, value, "must be between 0 and 86400"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut socket = None;
    let mut pattern = Pattern::RandRead;
    let mut block_size = 4096u32;
    let mut segment_size = None;
    let mut iodepth = 1u32;
    let mut queues = 1u16;
    let mut seconds = None;
    let mut ios = None;
    let mut warmup = Duration::ZERO;
    let mut backend_pid = None;
    let mut event_idx = false;
    let mut queue_size = None;
    let mut seed = 1u64;
    let mut timeout = Duration::from_secs(30);
    let mut label = None;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--event-idx" => {
                event_idx = true;
                continue;
            }
            _ => {}
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| CliError::MissingValue(name.clone()))
        };
        match name.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--pattern" => {
                let v = value()?;
                pattern = match v.as_str() {
                    "randread" => Pattern::RandRead,
                    "randwrite" => Pattern::RandWrite,
                    "seqread" => Pattern::SeqRead,
                    _ => {
                        return Err(invalid(
                            "--pattern",
                            &v,
                            "expected randread, randwrite or seqread",
                        ))
                    }
                };
            }
            "--bs" => {
                let v = value()?;
                let n = parse_size("--bs", &v)?;
                if n == 0 || n % 512 != 0 || n > u64::from(MAX_BLOCK_SIZE) {
                    return Err(invalid(
                        "--bs",
                        &v,
                        format!("must be a non-zero multiple of 512 up to {MAX_BLOCK_SIZE}"),
                    ));
                }
                block_size = n as u32;
            }
            "--seg-size" => {
                let v = value()?;
                let n = parse_size("--seg-size", &v)?;
                if n == 0 || n % 512 != 0 || n > u64::from(MAX_BLOCK_SIZE) {
                    return Err(invalid(
                        "--seg-size",
                        &v,
                        format!("must be a non-zero multiple of 512 up to {MAX_BLOCK_SIZE}"),
                    ));
                }
                segment_size = Some(n as u32);
            }
            "--iodepth" => {
                let v = value()?;
                iodepth = parse_int("--iodepth", &v)?;
                if iodepth == 0 {
                    return Err(invalid("--iodepth", &v, "must be at least 1"));
                }
            }
            "--queues" => {
                let v = value()?;
                queues = parse_int("--queues", &v)?;
                if queues == 0 || queues > MAX_QUEUES {
                    return Err(invalid(
                        "--queues",
                        &v,
                        format!("must be between 1 and {MAX_QUEUES}"),
                    ));
                }
            }
            "--seconds" => {
                let v = value()?;
                let d = parse_seconds("--seconds", &v)?;
                if d.is_zero() {
                    return Err(invalid("--seconds", &v, "must be positive"));
                }
                seconds = Some(d);
            }
            "--ios" => {
                let v = value()?;
                let n: u64 = parse_int("--ios", &v)?;
                if n == 0 {
                    return Err(invalid("--ios", &v, "must be at least 1"));
                }
                ios = Some(n);
            }
            "--warmup" => warmup = parse_seconds("--warmup", &value()?)?,
            "--backend-pid" => {
                let v = value()?;
                let pid: u32 = parse_int("--backend-pid", &v)?;
                if pid == 0 {
                    return Err(invalid("--backend-pid", &v, "must be a process id"));
                }
                backend_pid = Some(pid);
            }
            "--queue-size" => {
                let v = value()?;
                let n: u16 = parse_int("--queue-size", &v)?;
                if n == 0 || !n.is_power_of_two() || n > MAX_QUEUE_SIZE {
                    return Err(invalid(
                        "--queue-size",
                        &v,
                        format!("must be a power of two up to {MAX_QUEUE_SIZE}"),
                    ));
                }
                queue_size = Some(n);
            }
            "--timeout" => {
                let v = value()?;
                timeout = parse_seconds("--timeout", &v)?;
                if timeout < Duration::from_millis(1) {
                    return Err(invalid("--timeout", &v, "must be at least 0.001"));
                }
            }
            "--seed" => seed = parse_int("--seed", &value()?)?,
            "--label" => label = Some(value()?),
            _ => return Err(CliError::Unknown(arg)),
        }
    }

    let socket = socket.ok_or(CliError::NoSocket)?;
    let limit = match (seconds, ios) {
        (Some(_), Some(_)) => return Err(CliError::BothLimits),
        (None, Some(n)) => Limit::Ios(n),
        (Some(d), None) => Limit::Time(d),
        (None, None) => Limit::Time(Duration::from_secs(5)),
    };
    let segment_size = segment_size.unwrap_or(block_size).min(block_size);
    let per_request = DESCRIPTORS_PER_REQUEST - 1 + block_size.div_ceil(segment_size);
    let needed = iodepth.saturating_mul(per_request);
    let queue_size = match queue_size {
        Some(size) => size,
        None => needed
            .max(128)
            .checked_next_power_of_two()
            .filter(|&n| n <= u32::from(MAX_QUEUE_SIZE))
            .map(|n| n as u16)
            .unwrap_or(MAX_QUEUE_SIZE),
    };
    if needed > u32::from(queue_size) {
        return Err(CliError::QueueTooSmall {
            iodepth,
            needed,
            size: queue_size,
        });
    }
    let label = label.unwrap_or_else(|| socket.display().to_string());
    Ok(Command::Run(Box::new(Options {
        socket,
        pattern,
        block_size,
        segment_size,
        iodepth,
        queues,
        limit,
        warmup,
        backend_pid,
        event_idx,
        queue_size,
        timeout,
        seed,
        label,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, CliError> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(o) => Ok(*o),
            Command::Help => panic!("unexpected help"),
        }
    }

    #[test]
    fn defaults() {
        let o = run(&["--socket", "/tmp/s"]).unwrap();
        assert_eq!(o.pattern, Pattern::RandRead);
        assert_eq!(o.block_size, 4096);
        assert_eq!(o.iodepth, 1);
        assert_eq!(o.queues, 1);
        assert_eq!(o.limit, Limit::Time(Duration::from_secs(5)));
        assert_eq!(o.queue_size, 128);
        assert_eq!(o.label, "/tmp/s");
        assert_eq!(o.timeout, Duration::from_secs(30));
    }

    #[test]
    fn full_command_line() {
        let o = run(&[
            "--socket=/tmp/s",
            "--pattern",
            "seqread",
            "--bs",
            "128k",
            "--iodepth",
            "64",
            "--queues=2",
            "--ios",
            "1000",
            "--warmup",
            "0.5",
            "--backend-pid",
            "42",
            "--event-idx",
            "--label",
            "qsd",
            "--timeout",
            "2.5",
        ])
        .unwrap();
        assert_eq!(o.pattern, Pattern::SeqRead);
        assert_eq!(o.block_size, 128 << 10);
        assert_eq!(o.iodepth, 64);
        assert_eq!(o.queues, 2);
        assert_eq!(o.limit, Limit::Ios(1000));
        assert_eq!(o.warmup, Duration::from_millis(500));
        assert_eq!(o.backend_pid, Some(42));
        assert!(o.event_idx);
        assert_eq!(o.queue_size, 256, "64 requests of 3 descriptors");
        assert_eq!(o.label, "qsd");
        assert_eq!(o.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn segments_split_each_io_and_size_the_ring() {
        let o = run(&["--socket", "s", "--bs", "1016k", "--seg-size", "4k"]).unwrap();
        assert_eq!(o.segment_size, 4096);
        assert_eq!(
            o.queue_size, 256,
            "254 data descriptors, a header and a status"
        );
        let o = run(&[
            "--socket",
            "s",
            "--bs",
            "6k",
            "--seg-size",
            "4k",
            "--iodepth",
            "64",
        ])
        .unwrap();
        assert_eq!(o.queue_size, 256, "64 requests of 4 descriptors");
        let o = run(&["--socket", "s", "--bs", "4k", "--seg-size", "64k"]).unwrap();
        assert_eq!(o.segment_size, 4096, "never larger than one I/O");
        assert!(run(&["--socket", "s", "--seg-size", "100"]).is_err());
        // 8194 descriptors per request, four requests: more than a ring can hold.
        assert!(run(&[
            "--socket",
            "s",
            "--bs",
            "4m",
            "--seg-size",
            "512",
            "--iodepth",
            "4"
        ])
        .is_err());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(run(&[]), Err(CliError::NoSocket)));
        assert!(matches!(
            run(&["--socket", "s", "--bs", "1000"]),
            Err(CliError::Invalid { option: "--bs", .. })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--bs", "99999999999999999999k"]),
            Err(CliError::Invalid { option: "--bs", .. })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--pattern", "randrw"]),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--seconds", "1", "--ios", "5"]),
            Err(CliError::BothLimits)
        ));
        assert!(matches!(
            run(&["--socket", "s", "--seconds", "nan"]),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--iodepth", "64", "--queue-size", "128"]),
            Err(CliError::QueueTooSmall { needed: 192, .. })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--timeout", "0"]),
            Err(CliError::Invalid {
                option: "--timeout",
                ..
            })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--queue-size", "100"]),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(
            run(&["--socket", "s", "--iodepth", "20000"]),
            Err(CliError::QueueTooSmall { .. })
        ));
        assert!(matches!(run(&["--socket"]), Err(CliError::MissingValue(_))));
        assert!(matches!(run(&["--bogus"]), Err(CliError::Unknown(_))));
        assert!(matches!(parse(["-h".to_string()]), Ok(Command::Help)));
    }
}
