//! Process lifecycle: setting up, sandboxing, then serving frontends one at a time until
//! SIGTERM (socket mode) or the frontend leaves (descriptor mode).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Error as VhostError;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_sandbox::unix_socket::{listen_private, ListenError, PeerPolicy};
use citadel_vhost_user::session::{recoverable, Session};

use crate::cli::{Args, Connection as ConnectionArg};
use crate::device::{Connection, Device, DeviceConfig, DeviceError};
use crate::disk::{Disk, DiskError};
use crate::watchdog::Watchdog;

const SIGNAL: u64 = 0;
const PEER: u64 = 1;
/// Longest one frontend request may take on the socket (the frontend pausing in the middle of
/// a message, or not reading a reply) before the frontend is dropped.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Fatal errors; each is reported as one line and exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The image could not be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The device could not be created.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Binding the listening socket failed.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The inherited connection descriptor is unusable.
    #[error("connection descriptor {fd}: {why}")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong.
        why: String,
    },
    /// Signal or epoll plumbing failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Sandboxing failed.
    #[error("sandbox: {0}")]
    Sandbox(#[from] citadel_sandbox::Error),
    /// Installing seccomp failed.
    #[error(transparent)]
    Seccomp(#[from] citadel_seccomp::Error),
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Sys { what, source }
}

enum Endpoint {
    Listener(UnixListener),
    Stream(UnixStream),
}

enum Ending {
    Disconnected,
    Terminate,
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 for every thread and returns a signalfd receiving them.
fn signal_fd() -> Result<File, ServerError> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are constants.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
    }
    // SAFETY: valid set pointer, null old-set pointer.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(sys("blocking signals")(std::io::Error::from_raw_os_error(
            rc,
        )));
    }
    // SAFETY: valid set pointer; a new descriptor is returned or -1.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(sys("signalfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: signalfd just returned this descriptor and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads pending signals; true when the process should exit.
fn drain_signals(fd: &mut File, dev: &Device) -> bool {
    let mut terminate = false;
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    while let Ok(n) = fd.read(&mut info) {
        if n != info.len() {
            break;
        }
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
        match signo {
            libc::SIGUSR1 => eprintln!("citadel-blk: {}", dev.stats.line()),
            _ => {
                log::info!("signal {signo}: exiting");
                terminate = true;
            }
        }
    }
    terminate
}

fn adopt_stream(fd: RawFd) -> Result<UnixStream, ServerError> {
    let bad = |why: String| ServerError::BadFd { fd, why };
    let opt = |name: libc::c_int| -> Result<libc::c_int, ServerError> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v`/`len` are valid out-pointers sized for an int option.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(bad(format!(
                "not a socket ({})",
                std::io::Error::last_os_error()
            )));
        }
        Ok(v)
    };
    if opt(libc::SO_DOMAIN)? != libc::AF_UNIX || opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(bad("not a Unix stream socket".into()));
    }
    // SAFETY: F_SETFD with FD_CLOEXEC on a descriptor just checked to be a socket.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is an open Unix stream socket handed to this process to own.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// Runs the backend to completion.
pub fn run(args: Args) -> Result<(), ServerError> {
    let disk = Disk::open(&args.image, args.readonly, args.direct)?;
    let capacity = disk.capacity();
    let dev = Arc::new(Device::new(
        disk,
        &DeviceConfig {
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            block_size: args.block_size,
            serial: args.serial.clone(),
            memory_files: if args.allow_unsealed_memory {
                MemoryFilePolicy::AllowUnsealed
            } else {
                MemoryFilePolicy::SealedOnly
            },
        },
    )?);
    let endpoint = match &args.connection {
        ConnectionArg::Listen(path) => Endpoint::Listener(listen_private(path)?),
        ConnectionArg::Fd(fd) => Endpoint::Stream(adopt_stream(*fd)?),
    };
    // Built before lockdown: the filter does not allow asking for the process's own uid.
    let peers = PeerPolicy::own_uid_and(&args.allow_uids, &args.allow_gids);
    let mut signals = signal_fd()?;
    let epoll = Epoll::new().map_err(sys("epoll_create"))?;
    epoll
        .ctl(
            ControlOperation::Add,
            signals.as_raw_fd(),
            EpollEvent::new(EventSet::IN, SIGNAL),
        )
        .map_err(sys("epoll_ctl"))?;

    // No request writes outside the image, so nothing may grow a file past it. A write that
    // tried anyway fails with EFBIG instead of killing the backend with SIGXFSZ.
    // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ, and no handler is installed.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(sys("ignoring SIGXFSZ")(std::io::Error::last_os_error()));
    }
    citadel_sandbox::restrict_self(&citadel_sandbox::Policy {
        limits: vec![
            citadel_sandbox::Limit::FileSize(capacity * crate::disk::SECTOR_SIZE),
            citadel_sandbox::Limit::LockedMemory(0),
            citadel_sandbox::Limit::OpenFiles(64 + 4 * u64::from(args.num_queues)),
        ],
        require_landlock: false,
    })?;
    citadel_seccomp::apply_to_current_thread(citadel_seccomp::Role::Blk, args.seccomp)?;
    let workers = dev.spawn_workers()?;
    log::info!(
        "serving {} sectors ({}{}) with {} queue(s), sandboxed",
        capacity,
        if args.readonly {
            "read-only"
        } else {
            "read-write"
        },
        if args.direct { ", O_DIRECT" } else { "" },
        args.num_queues
    );

    let result = match endpoint {
        Endpoint::Stream(stream) => {
            serve(&dev, &epoll, &mut signals, stream, MESSAGE_TIMEOUT).map(|_| ())
        }
        Endpoint::Listener(listener) => accept_loop(&dev, &epoll, &mut signals, listener, &peers),
    };
    dev.stop_workers();
    for w in workers {
        let _ = w.join();
    }
    log::info!("{}", dev.stats.line());
    result
}

fn accept_loop(
    dev: &Arc<Device>,
    epoll: &Epoll,
    signals: &mut File,
    listener: UnixListener,
    peers: &PeerPolicy,
) -> Result<(), ServerError> {
    epoll
        .ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, PEER),
        )
        .map_err(sys("epoll_ctl"))?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(sys("epoll_wait")(e)),
        };
        for ev in &events[..n] {
            if ev.data() == SIGNAL {
                if drain_signals(signals, dev) {
                    return Ok(());
                }
                continue;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    // Dropping the stream closes it before a single byte is read or answered.
                    match peers.check(&stream) {
                        Ok(peer) => log::info!("frontend connected ({peer})"),
                        Err(e) => {
                            log::warn!("refused a connection: {e}");
                            continue;
                        }
                    }
                    // The listener stays out of the epoll set while a frontend is served, so
                    // that the next one waits in the backlog.
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    let ending = serve(dev, epoll, signals, stream, MESSAGE_TIMEOUT)?;
                    if let Ending::Terminate = ending {
                        return Ok(());
                    }
                    epoll
                        .ctl(
                            ControlOperation::Add,
                            listener.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, PEER),
                        )
                        .map_err(sys("epoll_ctl"))?;
                }
                Err(e) => log::warn!("accept: {e}"),
            }
        }
    }
}

fn serve(
    dev: &Arc<Device>,
    epoll: &Epoll,
    signals: &mut File,
    stream: UnixStream,
    message_timeout: Duration,
) -> Result<Ending, ServerError> {
    let fd = stream.as_raw_fd();
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, PEER),
        )
        .map_err(sys("epoll_ctl"))?;
    let conn = Arc::new(Mutex::new(Connection::new(Arc::clone(dev))));
    let mut handler = match Session::new(stream, conn, dev.num_queues()) {
        Ok(session) => session,
        Err(e) => {
            log::warn!("dropping the frontend: duplicating its socket: {e}");
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return Ok(Ending::Disconnected);
        }
    };
    // Declared after the session, so dropped (and its thread joined) while the socket it
    // watches is still open.
    let watchdog = Watchdog::start(fd, message_timeout).map_err(sys("starting the watchdog"))?;
    let mut events = [EpollEvent::default(); 2];
    let ending = 'outer: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(sys("epoll_wait")(e)),
        };
        for ev in &events[..n] {
            if ev.data() == SIGNAL {
                if drain_signals(signals, dev) {
                    break 'outer Ending::Terminate;
                }
                continue;
            }
            let result = {
                let _busy = watchdog.busy();
                handler.handle_request()
            };
            match result {
                Ok(()) => {}
                Err(_) if watchdog.fired() => {
                    log::info!("frontend dropped: stalled inside a request");
                    break 'outer Ending::Disconnected;
                }
                Err(VhostError::Disconnected | VhostError::PartialMessage) => {
                    log::info!("frontend disconnected");
                    break 'outer Ending::Disconnected;
                }
                Err(e) if recoverable(&e) => log::warn!("refused a frontend request: {e}"),
                Err(e) => {
                    log::warn!("dropping the frontend: {e}");
                    break 'outer Ending::Disconnected;
                }
            }
        }
    };
    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    Ok(ending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ImageSource;
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    use std::time::Instant;

    fn memfd(name: &std::ffi::CStr) -> File {
        // SAFETY: valid C string, constant flags; the result is checked and then owned.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptor owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn a_frontend_stalled_inside_a_message_is_dropped() {
        let mut image = memfd(c"citadel-blk-test-disk");
        image.write_all(&[0u8; 4096]).unwrap();
        let disk = Disk::open(&ImageSource::Fd(image.into_raw_fd()), false, false).unwrap();
        let dev = Arc::new(
            Device::new(
                disk,
                &DeviceConfig {
                    num_queues: 1,
                    queue_size: 16,
                    block_size: 512,
                    serial: None,
                    memory_files: MemoryFilePolicy::SealedOnly,
                },
            )
            .unwrap(),
        );
        let (backend, mut frontend) = UnixStream::pair().unwrap();
        // Half of a GET_FEATURES header, and nothing more: the vhost crate keeps reading until
        // the header is complete, whatever the socket's timeout.
        frontend.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        let (done, ended) = std::sync::mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || {
            let epoll = Epoll::new().unwrap();
            let mut signals = memfd(c"citadel-blk-test-signals");
            let ending = serve(
                &dev,
                &epoll,
                &mut signals,
                backend,
                Duration::from_millis(300),
            );
            let _ = done.send(matches!(ending, Ok(Ending::Disconnected)));
        });
        let disconnected = ended
            .recv_timeout(Duration::from_secs(20))
            .expect("serving a stalled frontend never ended");
        assert!(disconnected, "the frontend was not dropped as disconnected");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
