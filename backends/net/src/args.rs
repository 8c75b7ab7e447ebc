//! Command line of citadel-net.

use std::os::fd::RawFd;
use std::path::PathBuf;

/// Usage text printed by `--help` and after an argument error.
pub const USAGE: &str = "\
usage: citadel-net (--socket PATH | --fd N) (--tap NAME | --tap-fd N[,N...])
                   [--queues PAIRS] [--mac XX:XX:XX:XX:XX:XX] [--seccomp kill|log]
                   [--allow-uid N]... [--allow-gid N]... [--allow-unsealed-memory]

  --socket PATH    listen on PATH for vhost-user frontends, one at a time
  --fd N           serve the already-connected vhost-user socket N, then exit
  --tap NAME       attach to (or create) the tap NAME through /dev/net/tun
  --tap-fd N,...   use inherited tap queue fds (one per queue pair; IFF_VNET_HDR required)
  --queues PAIRS   number of RX/TX queue pairs with --tap (default 1)
  --mac ADDR       MAC address in the config space (default: random, locally administered)
  --seccomp MODE   kill (default) or log: what a syscall outside the allowlist does
  --allow-uid N    with --socket, also serve frontends running as uid N (repeatable);
                   by default only the backend's own uid is served
  --allow-gid N    with --socket, also serve frontends whose gid is N (repeatable)
  --allow-unsealed-memory
                   also map guest memory files not sealed against shrinking (F_SEAL_SHRINK);
                   a frontend that truncates one kills the backend (SIGBUS)

The --socket file is created with mode 0600; a connecting process whose uid or gid is not
allowed is logged and disconnected before it can send a message.

SIGUSR1 logs the counters; SIGTERM and SIGINT log them and exit.";

/// Most queue pairs a device may have (the vhost-user-backend worker masks are 64 bits).
pub const MAX_PAIRS: usize = 16;

/// Where the frontend comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// Listen on a path.
    Socket(PathBuf),
    /// An already-connected socket.
    Fd(RawFd),
}

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Open or create by name, with this many queues.
    Name(String, usize),
    /// Inherited queue fds.
    Fds(Vec<RawFd>),
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// The tap.
    pub tap: TapSource,
    /// MAC address, if given.
    pub mac: Option<[u8; 6]>,
    /// Seccomp mode.
    pub seccomp: citadel_seccomp::Mode,
    /// Uids allowed to connect besides the backend's own (`--socket` only).
    pub allow_uids: Vec<u32>,
    /// Gids whose processes may connect (`--socket` only).
    pub allow_gids: Vec<u32>,
    /// Map memory files the frontend has not sealed against shrinking.
    pub allow_unsealed_memory: bool,
}

/// A bad command line, reported in one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    /// `--help` was asked for.
    #[error("help requested")]
    Help,
    /// An option this program does not know.
    #[error("unknown argument {0:?}")]
    Unknown(String),
    /// An option without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// An option given twice or two that exclude each other.
    #[error("{0}")]
    Conflict(&'static str),
    /// A value that does not parse.
    #[error("invalid {what} {value:?}: {why}")]
    BadValue {
        /// The option.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is wrong.
        why: &'static str,
    },
}

fn parse_fd(what: &'static str, value: &str) -> Result<RawFd, ArgError> {
    match value.parse::<RawFd>() {
        Ok(fd) if fd > 2 => Ok(fd),
        _ => Err(ArgError::BadValue {
            what,
            value: value.to_string(),
            why: "expected a file descriptor number above 2",
        }),
    }
}

fn parse_id(what: &'static str, value: &str) -> Result<u32, ArgError> {
    value.parse().map_err(|_| ArgError::BadValue {
        what,
        value: value.to_string(),
        why: "expected a numeric id",
    })
}

fn parse_mac(value: &str) -> Result<[u8; 6], ArgError> {
    let bad = |why| ArgError::BadValue {
        what: "--mac",
        value: value.to_string(),
        why,
    };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6 {
        return Err(bad("expected six hex bytes separated by ':'"));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad("expected six hex bytes separated by ':'"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad("not hexadecimal"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad("a multicast address cannot be a NIC's address"));
    }
    Ok(mac)
}

impl Args {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, ArgError> {
        let mut frontend = None;
        let mut tap_name = None;
        let mut tap_fds = None;
        let mut queues = None;
        let mut mac = None;
        let mut seccomp = None;
        let mut allow_uids = Vec::new();
        let mut allow_gids = Vec::new();
        let mut allow_unsealed_memory = false;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &'static str| {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or(ArgError::MissingValue(name))
            };
            match key.as_str() {
                "-h" | "--help" => return Err(ArgError::Help),
                "--socket" => {
                    let v = value("--socket")?;
                    if frontend.replace(Frontend::Socket(v.into())).is_some() {
                        return Err(ArgError::Conflict("give exactly one of --socket and --fd"));
                    }
                }
                "--fd" => {
                    let v = parse_fd("--fd", &value("--fd")?)?;
                    if frontend.replace(Frontend::Fd(v)).is_some() {
                        return Err(ArgError::Conflict("give exactly one of --socket and --fd"));
                    }
                }
                "--tap" => {
                    let v = value("--tap")?;
                    if tap_name.replace(v).is_some() {
                        return Err(ArgError::Conflict("--tap given twice"));
                    }
                }
                "--tap-fd" => {
                    let v = value("--tap-fd")?;
                    let fds = v
                        .split(',')
                        .map(|s| parse_fd("--tap-fd", s))
                        .collect::<Result<Vec<_>, _>>()?;
                    if tap_fds.replace(fds).is_some() {
                        return Err(ArgError::Conflict("--tap-fd given twice"));
                    }
                }
                "--queues" => {
                    let v = value("--queues")?;
                    let n = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_PAIRS).contains(n));
                    let Some(n) = n else {
                        return Err(ArgError::BadValue {
                            what: "--queues",
                            value: v,
                            why: "expected a number of queue pairs from 1 to 16",
                        });
                    };
                    queues = Some(n);
                }
                "--mac" => mac = Some(parse_mac(&value("--mac")?)?),
                "--seccomp" => {
                    let v = value("--seccomp")?;
                    seccomp = Some(v.parse().map_err(|_| ArgError::BadValue {
                        what: "--seccomp",
                        value: v,
                        why: "expected kill or log",
                    })?);
                }
                "--allow-unsealed-memory" => allow_unsealed_memory = true,
                "--allow-uid" => allow_uids.push(parse_id("--allow-uid", &value("--allow-uid")?)?),
                "--allow-gid" => allow_gids.push(parse_id("--allow-gid", &value("--allow-gid")?)?),
                _ => return Err(ArgError::Unknown(arg)),
            }
        }
        let frontend =
            frontend.ok_or(ArgError::Conflict("give exactly one of --socket and --fd"))?;
        let tap = match (tap_name, tap_fds) {
            (Some(name), None) => TapSource::Name(name, queues.unwrap_or(1)),
            (None, Some(fds)) => {
                if fds.len() > MAX_PAIRS {
                    return Err(ArgError::Conflict("at most 16 --tap-fd queues"));
                }
                if queues.is_some_and(|q| q != fds.len()) {
                    return Err(ArgError::Conflict(
                        "--queues must match the number of --tap-fd fds",
                    ));
                }
                let mut sorted = fds.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != fds.len() {
                    return Err(ArgError::Conflict("--tap-fd lists an fd twice"));
                }
                TapSource::Fds(fds)
            }
            _ => return Err(ArgError::Conflict("give exactly one of --tap and --tap-fd")),
        };
        let fds_clash = match (&frontend, &tap) {
            (Frontend::Fd(f), TapSource::Fds(t)) => t.contains(f),
            _ => false,
        };
        if matches!(frontend, Frontend::Fd(_)) && !(allow_uids.is_empty() && allow_gids.is_empty())
        {
            return Err(ArgError::Conflict(
                "--allow-uid and --allow-gid apply to --socket only",
            ));
        }
        if fds_clash {
            return Err(ArgError::Conflict("--fd and --tap-fd name the same fd"));
        }
        Ok(Args {
            frontend,
            tap,
            mac,
            seccomp: seccomp.unwrap_or_default(),
            allow_uids,
            allow_gids,
            allow_unsealed_memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, ArgError> {
        Args::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn good_lines() {
        let a = parse("--socket /tmp/x --tap tap0 --queues 2 --mac 02:00:00:00:00:01").unwrap();
        assert_eq!(a.frontend, Frontend::Socket("/tmp/x".into()));
        assert_eq!(a.tap, TapSource::Name("tap0".into(), 2));
        assert_eq!(a.mac, Some([2, 0, 0, 0, 0, 1]));
        let a = parse("--fd=3 --tap-fd=4,5 --seccomp log").unwrap();
        assert_eq!(a.frontend, Frontend::Fd(3));
        assert_eq!(a.tap, TapSource::Fds(vec![4, 5]));
        assert_eq!(a.seccomp, citadel_seccomp::Mode::Log);
        assert!(a.allow_uids.is_empty() && a.allow_gids.is_empty());
        assert!(!a.allow_unsealed_memory);
        assert!(
            parse("--fd 3 --tap t --allow-unsealed-memory")
                .unwrap()
                .allow_unsealed_memory
        );
        let a = parse("--socket /s --tap t --allow-uid 1000 --allow-uid=7 --allow-gid 50").unwrap();
        assert_eq!((a.allow_uids, a.allow_gids), (vec![1000, 7], vec![50]));
    }

    #[test]
    fn bad_lines() {
        for line in [
            "",
            "--tap t",
            "--socket a --fd 3 --tap t",
            "--socket a",
            "--socket a --tap t --tap-fd 4",
            "--socket a --tap t --queues 0",
            "--socket a --tap t --queues 17",
            "--socket a --tap t --mac 01:00:00:00:00:00",
            "--socket a --tap t --mac zz:00:00:00:00:00",
            "--socket a --tap t --mac 00:00:00:00:00",
            "--fd 1 --tap t",
            "--fd 3 --tap-fd 3",
            "--fd 3 --tap-fd 4,4",
            "--fd 3 --tap-fd 4 --queues 2",
            "--socket a --tap t --seccomp off",
            "--socket a --tap t --bogus",
            "--socket",
            "--fd 3 --tap t --allow-uid 7",
            "--socket a --tap t --allow-gid x",
        ] {
            assert!(parse(line).is_err(), "{line:?} was accepted");
        }
        assert_eq!(parse("--help"), Err(ArgError::Help));
    }
}
