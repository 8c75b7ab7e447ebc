//! Command-line parsing for citadel-blk.

use std::os::fd::RawFd;
use std::path::PathBuf;

/// Where the disk image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A path opened by the backend.
    Path(PathBuf),
    /// A descriptor inherited from the parent, already open.
    Fd(RawFd),
}

/// How the backend meets its frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Listen on a Unix socket path, serving one frontend at a time.
    Listen(PathBuf),
    /// An already connected Unix stream socket; the backend exits when it closes.
    Fd(RawFd),
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The disk image.
    pub image: ImageSource,
    /// The frontend connection.
    pub connection: Connection,
    /// Refuse writes and advertise VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// Open the image with O_DIRECT.
    pub direct: bool,
    /// Number of request queues (one worker thread each).
    pub num_queues: u16,
    /// Largest queue size accepted from the frontend.
    pub queue_size: u16,
    /// Logical block size advertised to the guest.
    pub block_size: u32,
    /// Serial number returned by GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// What a syscall outside the seccomp allowlist does.
    pub seccomp: citadel_seccomp::Mode,
    /// Uids allowed to connect besides the backend's own (`--socket` only).
    pub allow_uids: Vec<u32>,
    /// Gids whose processes may connect (`--socket` only).
    pub allow_gids: Vec<u32>,
    /// Map memory files the frontend has not sealed against shrinking.
    pub allow_unsealed_memory: bool,
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    /// Serve a disk.
    Run(Args),
    /// Print the usage text.
    Help,
}

/// A command-line mistake, reported as one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    /// An option that is not known.
    #[error("unknown option {0:?}")]
    Unknown(String),
    /// An option given without its value.
    #[error("option {0} needs a value")]
    MissingValue(&'static str),
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {option}: {why}")]
    BadValue {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// A required option is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// Two options that exclude each other.
    #[error("{0} and {1} cannot be used together")]
    Conflict(&'static str, &'static str),
    /// An option given twice.
    #[error("option {0} given more than once")]
    Repeated(&'static str),
}

/// Usage text printed by `--help`.
pub const USAGE: &str = "\
usage: citadel-blk (--image PATH | --image-fd N) (--socket PATH | --fd N) [options]

Serves a raw disk image as a vhost-user-blk device.

  --image PATH        raw image file or block device to serve
  --image-fd N        serve the already open descriptor N instead
  --socket PATH       listen on PATH; serve one frontend at a time, accept the next after a
                      disconnect
  --fd N              serve the already connected Unix socket N; exit 0 when it closes
  --readonly          refuse writes (VIRTIO_BLK_F_RO)
  --direct            open the image with O_DIRECT
  --num-queues N      request queues, one worker thread each (1-16, default 1)
  --queue-size N      largest queue size accepted (power of two, 1-1024, default 256)
  --block-size N      logical block size (power of two, 512-65536;
                      default 512, or 4096 with --direct)
  --serial STRING     serial number reported by GET_ID (at most 20 bytes)
  --seccomp MODE      kill (default) or log: what a syscall outside the allowlist does
  --allow-uid N       with --socket, also serve frontends running as uid N (repeatable);
                      by default only the backend's own uid is served
  --allow-gid N       with --socket, also serve frontends whose gid is N (repeatable)
  --allow-unsealed-memory
                      also map guest memory and inflight files not sealed against shrinking
                      (F_SEAL_SHRINK); a frontend that truncates one kills the backend (SIGBUS)
  -h, --help          print this text

The --socket file is created with mode 0600; a connecting process whose uid or gid is not
allowed is logged and disconnected before it can send a message.
Logs go to stderr (RUST_LOG sets the level, default info). SIGUSR1 prints the counters,
SIGTERM exits cleanly.";

fn parse_number<T: std::str::FromStr>(option: &'static str, value: &str) -> Result<T, UsageError> {
    value.parse().map_err(|_| UsageError::BadValue {
        option,
        value: value.to_string(),
        why: "not a number",
    })
}

fn parse_fd(option: &'static str, value: &str) -> Result<RawFd, UsageError> {
    let fd: RawFd = parse_number(option, value)?;
    if fd < 3 {
        return Err(UsageError::BadValue {
            option,
            value: value.to_string(),
            why: "descriptors 0-2 are stdio",
        });
    }
    Ok(fd)
}

fn set_once<T>(slot: &mut Option<T>, option: &'static str, value: T) -> Result<(), UsageError> {
    if slot.is_some() {
        return Err(UsageError::Repeated(option));
    }
    *slot = Some(value);
    Ok(())
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, UsageError> {
    let mut image = None;
    let mut connection = None;
    let mut readonly = false;
    let mut direct = false;
    let mut num_queues = None;
    let mut queue_size = None;
    let mut block_size = None;
    let mut serial = None;
    let mut seccomp = None;
    let mut allow_uids = Vec::new();
    let mut allow_gids = Vec::new();
    let mut allow_unsealed_memory = false;

    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        macro_rules! value {
            ($opt:literal) => {
                match inline.clone() {
                    Some(v) => v,
                    None => it.next().ok_or(UsageError::MissingValue($opt))?,
                }
            };
        }
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--image" => {
                let v = value!("--image");
                if v.is_empty() {
                    return Err(UsageError::BadValue {
                        option: "--image",
                        value: v,
                        why: "empty path",
                    });
                }
                if image.is_some() {
                    return Err(UsageError::Conflict("--image", "--image-fd"));
                }
                image = Some(ImageSource::Path(v.into()));
            }
            "--image-fd" => {
                let v = value!("--image-fd");
                if image.is_some() {
                    return Err(UsageError::Conflict("--image", "--image-fd"));
                }
                image = Some(ImageSource::Fd(parse_fd("--image-fd", &v)?));
            }
            "--socket" => {
                let v = value!("--socket");
                if v.is_empty() {
                    return Err(UsageError::BadValue {
                        option: "--socket",
                        value: v,
                        why: "empty path",
                    });
                }
                if connection.is_some() {
                    return Err(UsageError::Conflict("--socket", "--fd"));
                }
                connection = Some(Connection::Listen(v.into()));
            }
            "--fd" => {
                let v = value!("--fd");
                if connection.is_some() {
                    return Err(UsageError::Conflict("--socket", "--fd"));
                }
                connection = Some(Connection::Fd(parse_fd("--fd", &v)?));
            }
            "--readonly" => readonly = true,
            "--allow-unsealed-memory" => allow_unsealed_memory = true,
            "--direct" => direct = true,
            "--num-queues" => {
                let v = value!("--num-queues");
                let n: u16 = parse_number("--num-queues", &v)?;
                if !(1..=16).contains(&n) {
                    return Err(UsageError::BadValue {
                        option: "--num-queues",
                        value: v,
                        why: "expected 1 to 16",
                    });
                }
                set_once(&mut num_queues, "--num-queues", n)?;
            }
            "--queue-size" => {
                let v = value!("--queue-size");
                let n: u16 = parse_number("--queue-size", &v)?;
                if !n.is_power_of_two() || n > 1024 {
                    return Err(UsageError::BadValue {
                        option: "--queue-size",
                        value: v,
                        why: "expected a power of two up to 1024",
                    });
                }
                set_once(&mut queue_size, "--queue-size", n)?;
            }
            "--block-size" => {
                let v = value!("--block-size");
                let n: u32 = parse_number("--block-size", &v)?;
                if !n.is_power_of_two() || !(512..=65536).contains(&n) {
                    return Err(UsageError::BadValue {
                        option: "--block-size",
                        value: v,
                        why: "expected a power of two from 512 to 65536",
                    });
                }
                set_once(&mut block_size, "--block-size", n)?;
            }
            "--serial" => {
                let v = value!("--serial");
                if v.len() > 20 {
                    return Err(UsageError::BadValue {
                        option: "--serial",
                        value: v,
                        why: "at most 20 bytes",
                    });
                }
                set_once(&mut serial, "--serial", v)?;
            }
            "--seccomp" => {
                let v = value!("--seccomp");
                let mode = v.parse().map_err(|_| UsageError::BadValue {
                    option: "--seccomp",
                    value: v.clone(),
                    why: "expected kill or log",
                })?;
                set_once(&mut seccomp, "--seccomp", mode)?;
            }
            "--allow-uid" => {
                let v = value!("--allow-uid");
                allow_uids.push(parse_number("--allow-uid", &v)?);
            }
            "--allow-gid" => {
                let v = value!("--allow-gid");
                allow_gids.push(parse_number("--allow-gid", &v)?);
            }
            _ => return Err(UsageError::Unknown(arg)),
        }
    }

    let image = image.ok_or(UsageError::Missing("--image or --image-fd"))?;
    let connection = connection.ok_or(UsageError::Missing("--socket or --fd"))?;
    if let (ImageSource::Fd(a), Connection::Fd(b)) = (&image, &connection) {
        if a == b {
            return Err(UsageError::Conflict(
                "--image-fd",
                "--fd with the same number",
            ));
        }
    }
    if matches!(connection, Connection::Fd(_)) {
        if !allow_uids.is_empty() {
            return Err(UsageError::Conflict("--allow-uid", "--fd"));
        }
        if !allow_gids.is_empty() {
            return Err(UsageError::Conflict("--allow-gid", "--fd"));
        }
    }
    Ok(Command::Run(Args {
        image,
        connection,
        readonly,
        direct,
        num_queues: num_queues.unwrap_or(1),
        queue_size: queue_size.unwrap_or(256),
        block_size: block_size.unwrap_or(if direct { 4096 } else { 512 }),
        serial,
        seccomp: seccomp.unwrap_or_default(),
        allow_uids,
        allow_gids,
        allow_unsealed_memory,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Args, UsageError> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(a) => Ok(a),
            Command::Help => panic!("unexpected help"),
        }
    }

    #[test]
    fn minimal_and_defaults() {
        let a = run(&["--image", "/tmp/x", "--socket=/tmp/s"]).unwrap();
        assert_eq!(a.image, ImageSource::Path("/tmp/x".into()));
        assert_eq!(a.connection, Connection::Listen("/tmp/s".into()));
        assert_eq!((a.num_queues, a.queue_size, a.block_size), (1, 256, 512));
        assert!(!a.readonly && !a.direct);
        assert!(a.allow_uids.is_empty() && a.allow_gids.is_empty());
        assert!(!a.allow_unsealed_memory);
        let u = run(&["--image", "/i", "--fd", "5", "--allow-unsealed-memory"]).unwrap();
        assert!(u.allow_unsealed_memory);
        let w = run(&[
            "--image",
            "/i",
            "--socket",
            "/s",
            "--allow-uid",
            "1000",
            "--allow-uid=1001",
            "--allow-gid",
            "50",
        ])
        .unwrap();
        assert_eq!((w.allow_uids, w.allow_gids), (vec![1000, 1001], vec![50]));
        let d = run(&["--image-fd", "5", "--fd", "6", "--direct", "--readonly"]).unwrap();
        assert_eq!(d.block_size, 4096);
        assert!(d.readonly);
    }

    #[test]
    fn errors() {
        assert_eq!(
            run(&["--socket", "/s"]).unwrap_err(),
            UsageError::Missing("--image or --image-fd")
        );
        assert_eq!(
            run(&["--image", "/i", "--socket"]).unwrap_err(),
            UsageError::MissingValue("--socket")
        );
        assert!(matches!(
            run(&["--image", "/i", "--socket", "/s", "--num-queues", "0"]),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            run(&["--image", "/i", "--socket", "/s", "--queue-size", "100"]),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            run(&["--image", "/i", "--fd", "2"]),
            Err(UsageError::BadValue { .. })
        ));
        assert_eq!(
            run(&["--image", "/i", "--image-fd", "4", "--fd", "5"]).unwrap_err(),
            UsageError::Conflict("--image", "--image-fd")
        );
        assert_eq!(
            run(&["--image", "/i", "--fd", "5", "--allow-uid", "7"]).unwrap_err(),
            UsageError::Conflict("--allow-uid", "--fd")
        );
        assert!(matches!(
            run(&["--image", "/i", "--socket", "/s", "--allow-gid", "-1"]),
            Err(UsageError::BadValue { .. })
        ));
        assert_eq!(
            run(&["--image", "/i", "--fd", "5", "--bogus"]).unwrap_err(),
            UsageError::Unknown("--bogus".into())
        );
        assert!(matches!(
            run(&[
                "--image",
                "/i",
                "--fd",
                "5",
                "--serial",
                "012345678901234567890"
            ]),
            Err(UsageError::BadValue { .. })
        ));
    }
}
