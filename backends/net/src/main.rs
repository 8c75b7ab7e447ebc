//! citadel-net: a sandboxed vhost-user-net backend serving a tap device.
//!
//! Setup (tap, sockets) happens first; then the process sandboxes itself (rlimits, no
//! capabilities, no_new_privs, Landlock without any filesystem access, the `net` seccomp
//! allowlist) before it reads the first byte from a frontend.

mod args;
mod device;
mod handler;
mod stats;
mod tap;

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_sandbox::unix_socket::{listen_private, ListenError, PeerPolicy};
use citadel_vhost_user::session::{recoverable, Session};
use vhost::vhost_user::Error as VhostError;

use crate::args::{ArgError, Args, Frontend, TapSource, USAGE};
use crate::device::NetConfig;
use crate::handler::Connection;
use crate::stats::Stats;
use crate::tap::{TapError, TapQueue};

/// Errors that stop the backend, each shown as one line.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("tap: {0}")]
    Tap(#[from] TapError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("vhost-user socket fd {fd}: {source}")]
    SocketFd { fd: RawFd, source: io::Error },
    #[error("sandbox: {0}")]
    Sandbox(#[from] citadel_sandbox::Error),
    #[error("{0}")]
    Seccomp(#[from] citadel_seccomp::Error),
    #[error("signals: {0}")]
    Signals(io::Error),
    #[error("random MAC: {0}")]
    Random(io::Error),
    #[error("accepting a frontend: {0}")]
    Accept(io::Error),
}

/// Errors of one frontend connection; logged, and the backend goes on to the next one.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("starting the queue pair workers: {0}")]
    Workers(io::Error),
    #[error("duplicating the frontend socket: {0}")]
    Socket(io::Error),
}

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in SIGNALS {
        // SAFETY: as above; `sig` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks the handled signals in this thread and so in every thread created later, so that
/// only the signal thread receives them.
fn block_signals() -> Result<(), Error> {
    let set = signal_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Signals(io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn spawn_signal_thread(stats: Arc<Stats>) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = signal_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match sig {
                    libc::SIGUSR1 => log::info!("{stats}"),
                    _ => {
                        log::info!("{stats}");
                        log::info!("exiting on signal {sig}");
                        std::process::exit(0);
                    }
                }
            }
        })
        .map_err(Error::Signals)?;
    Ok(())
}

fn random_mac() -> Result<[u8; 6], Error> {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        return Err(Error::Random(io::Error::last_os_error()));
    }
    // Unicast, locally administered.
    mac[0] = (mac[0] & 0xfc) | 0x02;
    Ok(mac)
}

/// Serves one frontend connection to its end.
fn serve(config: &Arc<NetConfig>, frontend: UnixStream) -> Result<(), ConnError> {
    let conn = Connection::new(config.clone()).map_err(ConnError::Workers)?;
    let rings = conn.rings();
    let mut session =
        Session::new(frontend, Arc::new(Mutex::new(conn)), rings).map_err(ConnError::Socket)?;
    loop {
        match session.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected | VhostError::PartialMessage) => return Ok(()),
            Err(e) if recoverable(&e) => log::warn!("refused a frontend request: {e}"),
            Err(e) => {
                log::warn!("dropping the frontend: {e}");
                return Ok(());
            }
        }
    }
}

fn open_taps(source: &TapSource) -> Result<Vec<TapQueue>, Error> {
    match source {
        TapSource::Name(name, queues) => Ok(TapQueue::open_by_name(name, *queues)?),
        TapSource::Fds(fds) => fds
            .iter()
            // SAFETY: the fds were handed to this process on its command line for it to own;
            // the parser rejects duplicates and the frontend fd.
            .map(|fd| unsafe { TapQueue::from_inherited_fd(*fd) }.map_err(Error::from))
            .collect(),
    }
}

fn sandbox(args: &Args) -> Result<(), Error> {
    use citadel_sandbox::{Limit, Policy};
    let policy = Policy {
        // No RLIMIT_FSIZE: stderr may be a regular file, and the backend creates no files.
        // RLIMIT_CORE is 0 since main() started.
        limits: vec![Limit::OpenFiles(1024)],
        require_landlock: false,
    };
    citadel_sandbox::restrict_self(&policy)?;
    citadel_seccomp::apply_to_current_thread(citadel_seccomp::Role::Net, args.seccomp)?;
    Ok(())
}

fn run(args: Args) -> Result<(), Error> {
    let taps = open_taps(&args.tap)?;
    let mac = match args.mac {
        Some(mac) => mac,
        None => random_mac()?,
    };
    let stats = Arc::new(Stats::default());
    let config = Arc::new(NetConfig {
        mac,
        taps,
        stats: stats.clone(),
        memory_files: if args.allow_unsealed_memory {
            MemoryFilePolicy::AllowUnsealed
        } else {
            MemoryFilePolicy::SealedOnly
        },
    });
    enum Source {
        Listen(UnixListener, PeerPolicy),
        Once(UnixStream),
    }
    let source = match &args.frontend {
        Frontend::Socket(path) => Source::Listen(
            listen_private(path)?,
            PeerPolicy::own_uid_and(&args.allow_uids, &args.allow_gids),
        ),
        Frontend::Fd(fd) => {
            // SAFETY: F_GETFD only inspects the descriptor table.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(Error::SocketFd {
                    fd: *fd,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: the fd was handed to this process to own; it is open (checked above)
            // and the parser keeps it distinct from the tap fds.
            let stream = unsafe { UnixStream::from_raw_fd(*fd) };
            // SAFETY: F_SETFD with an integer argument on an fd we own.
            unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Source::Once(stream)
        }
    };
    block_signals()?;
    sandbox(&args)?;
    spawn_signal_thread(stats.clone())?;
    log::info!(
        "serving {} queue pair(s), MAC {}",
        config.taps.len(),
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    match source {
        Source::Once(stream) => {
            if let Err(e) = serve(&config, stream) {
                log::error!("{e}");
            }
        }
        Source::Listen(listener, peers) => loop {
            let (stream, _) = listener.accept().map_err(Error::Accept)?;
            // Dropping the stream closes it before a single byte is read or answered.
            match peers.check(&stream) {
                Ok(peer) => log::info!("frontend connected ({peer})"),
                Err(e) => {
                    log::warn!("refused a connection: {e}");
                    continue;
                }
            }
            if let Err(e) = serve(&config, stream) {
                log::error!("{e}");
            }
            log::info!("frontend disconnected; {stats}");
        },
    }
    log::info!("{stats}");
    Ok(())
}

fn main() -> ExitCode {
    // First of all, so that no crash, even during setup, writes guest data to a core file.
    if let Err(e) = citadel_sandbox::core_dump::disable_core_dumps() {
        eprintln!("citadel-net: {e}");
        return ExitCode::FAILURE;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(ArgError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("citadel-net: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eventfds and epoll instances open in this process: what each queue pair's worker of a
    /// connection holds.
    fn worker_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| {
                let target = target.to_string_lossy();
                target == "anon_inode:[eventfd]" || target == "anon_inode:[eventpoll]"
            })
            .count()
    }

    #[test]
    fn frontend_connections_leave_no_descriptor_behind() {
        let (tap, _network) = UnixStream::pair().unwrap();
        let config = NetConfig::over_frame_socket(tap.into());
        const CONNECTIONS: usize = 32;
        let before = worker_descriptors();
        for _ in 0..CONNECTIONS {
            // A frontend that leaves at once; the connection is served to its end.
            let (frontend, peer) = UnixStream::pair().unwrap();
            drop(peer);
            serve(&config, frontend).unwrap();
        }
        // A leak keeps at least one descriptor per connection; other tests running meanwhile
        // may hold a few of their own.
        let grown = worker_descriptors().saturating_sub(before);
        assert!(
            grown < CONNECTIONS / 2,
            "{grown} eventfds or epoll instances left after {CONNECTIONS} connections"
        );
    }
}
