//! citadel-net: a sandboxed vhost-user-net backend serving a tap device.
//!
//! Setup (tap, sockets) happens first; then the process sandboxes itself (rlimits, no
//! capabilities, no_new_privs, Landlock without any filesystem access, the `net` seccomp
//! allowlist) before it reads the first byte from a frontend.

mod args;
mod device;
mod proxy;
mod stats;
mod tap;

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::Arc;

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_sandbox::unix_socket::{listen_private, ListenError, PeerPolicy};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::args::{ArgError, Args, Frontend, TapSource, USAGE};
use crate::device::{NetBackend, NetConfig};
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
    #[error("starting the device: {0}")]
    Daemon(String),
    #[error("internal vhost-user channel: {0}")]
    Channel(io::Error),
    #[error("internal vhost-user channel was connected by another process")]
    Hijacked,
    #[error("registering the tap with worker {0}: {1}")]
    Register(usize, io::Error),
    #[error("relay: {0}")]
    Relay(#[from] proxy::ProxyError),
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

/// A listening socket bound to a kernel-chosen abstract address and a client connected to it:
/// the vhost-user-backend daemon accepts through a `Listener`, and this gives it one without
/// any filesystem access.
fn internal_channel() -> io::Result<(UnixListener, UnixStream)> {
    let cvt = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain socket creation; the returned fd is owned by the UnixListener below.
    let lfd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `lfd` was just created and is owned by nothing else.
    let listener = unsafe { UnixListener::from_raw_fd(lfd) };
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Binding with only the family asks the kernel for a unique abstract name (autobind).
    // SAFETY: `addr` is a valid sockaddr_un and the length covers its family field.
    cvt(unsafe {
        libc::bind(
            lfd,
            (&addr as *const libc::sockaddr_un).cast(),
            size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    })?;
    // SAFETY: `lfd` is a bound socket.
    cvt(unsafe { libc::listen(lfd, 1) })?;
    let mut len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` has room for `len` bytes; the kernel writes the bound address there.
    cvt(unsafe { libc::getsockname(lfd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) })?;
    // SAFETY: plain socket creation; the fd is owned by the UnixStream below.
    let cfd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `cfd` was just created and is owned by nothing else.
    let client = unsafe { UnixStream::from_raw_fd(cfd) };
    // SAFETY: `addr`/`len` are exactly what getsockname returned for the listener.
    cvt(unsafe { libc::connect(cfd, (&addr as *const libc::sockaddr_un).cast(), len) })?;
    Ok((listener, client))
}

/// True when a connection is waiting on `listener` (after ours was accepted, that means some
/// other process connected too, and may have been accepted instead of us).
fn has_pending(listener: &UnixListener) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc != 0
}

/// Serves one frontend connection to its end.
fn serve(config: &Arc<NetConfig>, frontend: UnixStream) -> Result<(), ConnError> {
    let backend = Arc::new(NetBackend::new(config.clone()));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("citadel-net".into(), backend.clone(), mem)
        .map_err(|e| ConnError::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    let result = (|| {
        for (i, handler) in handlers.iter().enumerate() {
            handler
                .register_listener(
                    backend.tap_fd(i),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    backend.tap_event_id(),
                )
                .map_err(|e| ConnError::Register(i, e))?;
        }
        let (unix_listener, client) = internal_channel().map_err(ConnError::Channel)?;
        let watch = unix_listener.try_clone().map_err(ConnError::Channel)?;
        let mut listener = Listener::from(unix_listener);
        daemon
            .start(&mut listener)
            .map_err(|e| ConnError::Daemon(e.to_string()))?;
        if has_pending(&watch) {
            daemon.request_shutdown();
            let _ = daemon.wait();
            return Err(ConnError::Hijacked);
        }
        drop(listener);
        drop(watch);
        let relay =
            proxy::Relay::start(frontend, client, backend.num_queues(), config.memory_files)
                .map_err(ConnError::Channel)?;
        let served = daemon.wait();
        let relayed = relay.stop();
        match served {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => {}
            Err(e) => log::warn!("frontend refused: {e}"),
        }
        relayed.map_err(ConnError::from)
    })();
    for handler in &handlers {
        handler.send_exit_event();
    }
    backend.discard_pending();
    // Dropping the daemon joins its workers; dropping the handlers closes their epoll sets.
    drop(daemon);
    drop(handlers);
    // SAFETY: the daemon and its epoll handlers are gone.
    unsafe { backend.close_exit_events() };
    result
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
    use std::io::{Read, Write};

    #[test]
    fn internal_channel_connects_and_notices_a_second_client() {
        let (listener, mut client) = internal_channel().unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(!has_pending(&listener));
        // Another process finding the abstract name would queue behind us, and be noticed.
        let addr = listener.local_addr().unwrap();
        let _intruder = UnixStream::connect_addr(&addr).unwrap();
        assert!(has_pending(&listener));
    }

    /// Eventfds open in this process.
    fn eventfds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy() == "anon_inode:[eventfd]")
            .count()
    }

    #[test]
    fn frontend_connections_leave_no_descriptor_behind() {
        let (tap, _network) = UnixStream::pair().unwrap();
        let config = Arc::new(NetConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            taps: vec![TapQueue::from_frame_socket(std::fs::File::from(
                std::os::fd::OwnedFd::from(tap),
            ))],
            stats: Arc::new(Stats::default()),
            memory_files: MemoryFilePolicy::SealedOnly,
        });
        const CONNECTIONS: usize = 32;
        let before = eventfds();
        for _ in 0..CONNECTIONS {
            // A frontend that leaves at once; the connection is served to its end.
            let (frontend, peer) = UnixStream::pair().unwrap();
            drop(peer);
            let _ = serve(&config, frontend);
        }
        // Each connection used to keep one eventfd per queue pair; other tests running
        // meanwhile may hold a few of their own.
        let grown = eventfds().saturating_sub(before);
        assert!(
            grown < CONNECTIONS / 2,
            "{grown} eventfds left after {CONNECTIONS} connections"
        );
    }
}
