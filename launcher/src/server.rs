//! The launcher process: answers the VMM's requests one at a time, reaps the backends it
//! started, and stops them all and exits when the VMM's end of the control socket closes.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use citadel_seccomp::Mode;

use crate::confine::CONTROL_FD;
use crate::image::{open_beneath, ImageAccess, ImageError};
use crate::protocol::{self, Reply, Request};
use crate::snapshot_dir;
use crate::spawn::{spawn, SpawnError};
use crate::vfio::VfioDevices;
use crate::LauncherConfig;

/// Most backends running at once; a request for one more is refused.
const MAX_BACKENDS: usize = 64;

/// How long a backend has to exit after SIGTERM before it gets SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why one request failed; the text goes back to the VMM as one line.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Tap(#[from] citadel_tap::OpenError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot_dir::SnapshotDirError),
    #[error(transparent)]
    Vfio(#[from] crate::vfio::VfioOpenError),
    #[error("no running backend has pid {0}")]
    UnknownBackend(i32),
    #[error("{MAX_BACKENDS} backends are running already")]
    TooMany,
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> RequestError {
    move |source| RequestError::Sys { what, source }
}

/// The launcher's state: its configuration and the backends it runs.
struct Server<'a> {
    config: &'a LauncherConfig,
    /// Backend pid → device id.
    backends: BTreeMap<i32, String>,
    /// What every backend gets as its environment: the VMM's log level.
    environment: Vec<CString>,
    /// Host PCI functions opened for passthrough.
    vfio: VfioDevices,
}

/// Blocks SIGCHLD (it arrives through the returned signalfd instead). Done before the seccomp
/// filter, since `signalfd4` is not a syscall the launcher needs afterwards.
pub(crate) fn child_signals() -> io::Result<File> {
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the mask calls get valid pointers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: valid set pointer; a new descriptor is returned or -1.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd just returned this descriptor and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Serves requests on [`CONTROL_FD`] until the VMM's end closes; then stops every backend.
pub(crate) fn serve(config: &LauncherConfig, mut signals: File) {
    // SAFETY: CONTROL_FD is the control socket, open for the life of the launcher.
    let control = unsafe { BorrowedFd::borrow_raw(CONTROL_FD) };
    // The VMM's level, whose default is warn: backends share its stderr, and a backend's
    // start-up chatter must not bury the VMM's own one-line errors.
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_string());
    let environment = CString::new(format!("RUST_LOG={level}"))
        .ok()
        .into_iter()
        .collect();
    let mut server = Server {
        config,
        backends: BTreeMap::new(),
        environment,
        vfio: VfioDevices::default(),
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: CONTROL_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: a live array of two pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("launcher: poll: {err}");
            break;
        }
        if fds[1].revents != 0 {
            drain(&mut signals);
            server.reap();
        }
        if fds[0].revents == 0 {
            continue;
        }
        let (reply, attached) = match protocol::recv::<Request>(control) {
            Ok(None) => break,
            Ok(Some((request, fds))) => match server.handle(request, fds) {
                Ok(done) => done,
                Err(e) => (
                    Reply::Error {
                        message: e.to_string(),
                    },
                    Vec::new(),
                ),
            },
            Err(e) if e.kind() == io::ErrorKind::InvalidData => (
                Reply::Error {
                    message: format!("refused a request: {e}"),
                },
                Vec::new(),
            ),
            Err(e) => {
                log::error!("launcher: control socket: {e}");
                break;
            }
        };
        let attached_fds: Vec<RawFd> = attached.iter().map(|s| s.as_raw_fd()).collect();
        if let Err(e) = protocol::send(control, &reply, &attached_fds) {
            log::error!("launcher: replying: {e}");
            break;
        }
    }
    server.stop_all();
}

/// Empties the signalfd (the signals only say "look at the children").
fn drain(signals: &mut File) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    while matches!(signals.read(&mut info), Ok(n) if n == info.len()) {}
}

impl Server<'_> {
    fn handle(
        &mut self,
        request: Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<OwnedFd>), RequestError> {
        match request {
            Request::SpawnBlk {
                id,
                path,
                read_only,
                direct,
                serial,
            } => {
                // Checked before anything is opened: the request is untrusted.
                if serial
                    .as_deref()
                    .is_some_and(|s| !protocol::valid_serial(s))
                {
                    return Err(RequestError::Invalid(format!(
                        "a serial number is at most {} printable ASCII bytes",
                        protocol::MAX_SERIAL_LEN
                    )));
                }
                let image = match (path, single(fds)) {
                    (Some(path), Ok(None)) => OwnedFd::from(open_beneath(
                        Path::new("/"),
                        &path,
                        ImageAccess { read_only, direct },
                    )?),
                    (None, Ok(Some(fd))) => check_disk(fd)?,
                    _ => {
                        return Err(RequestError::Invalid(
                            "spawn-blk needs exactly one of a path and an image descriptor".into(),
                        ))
                    }
                };
                let mut args = vec!["--image-fd".to_string(), "4".to_string()];
                if read_only {
                    args.push("--readonly".into());
                }
                if direct {
                    args.push("--direct".into());
                }
                if let Some(serial) = serial {
                    args.push("--serial".into());
                    args.push(serial);
                }
                let binary = &self.config.blk_binary;
                self.start(&id, binary, args, &[image])
            }
            Request::SpawnNet { id, mac } => {
                if mac.is_some_and(|mac| mac[0] & 1 != 0) {
                    return Err(RequestError::Invalid(
                        "a multicast address cannot be a NIC's MAC address".into(),
                    ));
                }
                if fds.is_empty() {
                    return Err(RequestError::Invalid(
                        "spawn-net needs the tap's queue descriptors".into(),
                    ));
                }
                let numbers: Vec<String> = (0..fds.len())
                    .map(|i| (crate::spawn::FIRST_FD + 1 + i as RawFd).to_string())
                    .collect();
                let mut args = vec!["--tap-fd".to_string(), numbers.join(",")];
                if let Some(mac) = mac {
                    let text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
                    args.push("--mac".into());
                    args.push(text.join(":"));
                }
                let binary = &self.config.net_binary;
                self.start(&id, binary, args, &fds)
            }
            Request::OpenTap { name } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid(
                        "open-tap takes no descriptors".into(),
                    ));
                }
                let queues = citadel_tap::open_by_name(&name, 1)?
                    .into_iter()
                    .map(OwnedFd::from)
                    .collect();
                log::info!("launcher: tap {name} attached");
                Ok((Reply::TapOpened, queues))
            }
            Request::Connect { path } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid("connect takes no descriptors".into()));
                }
                let socket = crate::connect::connect_unix(&path)?;
                log::info!("launcher: connected to {path}");
                Ok((Reply::Connected, vec![socket]))
            }
            Request::OpenVfio { host } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid(
                        "open-vfio takes no descriptors".into(),
                    ));
                }
                let opened = self.vfio.open(&host)?;
                Ok((Reply::VfioOpened(opened.info), opened.fds))
            }
            Request::CloseVfio { host } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid(
                        "close-vfio takes no descriptors".into(),
                    ));
                }
                if !self.vfio.close(&host) {
                    return Err(RequestError::Invalid(format!(
                        "host {host} is not passed through"
                    )));
                }
                Ok((Reply::VfioClosed, Vec::new()))
            }
            Request::Stop { pid } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid("stop takes no descriptors".into()));
                }
                if self.backends.remove(&pid).is_none() {
                    return Err(RequestError::UnknownBackend(pid));
                }
                stop(&[pid]);
                log::info!("launcher: backend {pid} stopped");
                Ok((Reply::Stopped, Vec::new()))
            }
            Request::CreateSnapshot { path } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid(
                        "create-snapshot takes no descriptors".into(),
                    ));
                }
                let files = snapshot_dir::create(Path::new("/"), &path)?;
                log::info!("launcher: snapshot directory {path} prepared");
                Ok((
                    Reply::SnapshotCreated {
                        created_dir: files.created_dir,
                    },
                    snapshot_dir::into_fds(files),
                ))
            }
            Request::RemoveSnapshot { path, remove_dir } => {
                if !fds.is_empty() {
                    return Err(RequestError::Invalid(
                        "remove-snapshot takes no descriptors".into(),
                    ));
                }
                snapshot_dir::remove(Path::new("/"), &path, remove_dir)?;
                log::info!("launcher: partial snapshot in {path} removed");
                Ok((Reply::SnapshotRemoved, Vec::new()))
            }
        }
    }

    /// Starts `binary` with its vhost-user socket as descriptor 3 (`--fd 3`), `extra` as the
    /// descriptors after it and `args`; returns the VMM's end of the socket.
    fn start(
        &mut self,
        id: &str,
        binary: &Path,
        mut args: Vec<String>,
        extra: &[OwnedFd],
    ) -> Result<(Reply, Vec<OwnedFd>), RequestError> {
        if self.backends.len() >= MAX_BACKENDS {
            return Err(RequestError::TooMany);
        }
        let (frontend, backend) = stream_pair().map_err(sys("creating the vhost-user socket"))?;
        let mut fds = vec![backend.as_raw_fd()];
        fds.extend(extra.iter().map(|fd| fd.as_raw_fd()));
        let mut full = vec!["--fd".to_string(), "3".to_string()];
        full.append(&mut args);
        if self.config.seccomp_action == Mode::Log {
            full.push("--seccomp".into());
            full.push("log".into());
        }
        let pid = spawn(binary, &full, &self.environment, &fds)?;
        log::info!(
            "launcher: {id:?}: {} started as pid {pid}",
            binary.display()
        );
        self.backends.insert(pid, id.to_string());
        Ok((Reply::Spawned { pid }, vec![frontend]))
    }

    /// Reaps every backend that has exited.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let id = self.backends.remove(&pid).unwrap_or_default();
            // A backend ends with status 0 when its frontend hangs up: routine.
            if status == 0 {
                log::info!("launcher: backend {pid} ({id:?}) exited");
            } else {
                log::warn!("launcher: backend {pid} ({id:?}) exited, wait status {status:#x}");
            }
        }
    }

    /// Stops every backend still running.
    fn stop_all(&mut self) {
        let pids: Vec<i32> = std::mem::take(&mut self.backends).into_keys().collect();
        stop(&pids);
    }
}

/// SIGTERM to each of `pids`, up to [`STOP_GRACE`] for them to exit, SIGKILL to those still
/// there; every one is reaped before this returns.
fn stop(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: signals a child of this process, not reaped yet, so the pid is still its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut left: Vec<i32> = pids.to_vec();
    // A backend exits within a millisecond or so of SIGTERM, and `device_del` waits for this:
    // look often at first, then back off to 10 ms.
    let mut pause = Duration::from_micros(100);
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&pid| !reaped(pid, libc::WNOHANG));
        if !left.is_empty() {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
    for pid in left {
        // SAFETY: as above; the child has not been reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reaped(pid, 0);
    }
}

/// waitpid(pid, flags); true once the child is reaped (or is no child of ours any more).
fn reaped(pid: i32, flags: libc::c_int) -> bool {
    let mut status = 0;
    loop {
        // SAFETY: waitpid with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc >= 0 {
            return rc == pid;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// At most one descriptor: `Ok(None)`, `Ok(Some(fd))`, or the list back when it has more.
fn single(mut fds: Vec<OwnedFd>) -> Result<Option<OwnedFd>, Vec<OwnedFd>> {
    match fds.len() {
        0 => Ok(None),
        1 => Ok(fds.pop()),
        _ => Err(fds),
    }
}

/// Refuses an image descriptor that is not a regular file or a block device.
fn check_disk(fd: OwnedFd) -> Result<OwnedFd, RequestError> {
    let file = File::from(fd);
    let kind = file
        .metadata()
        .map_err(sys("checking the image descriptor"))?
        .mode()
        & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFBLK {
        return Err(RequestError::Invalid(
            "the image descriptor is not a regular file or block device".into(),
        ));
    }
    Ok(file.into())
}

/// A connected pair of Unix stream sockets, close-on-exec: (frontend end, backend end).
fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The reply the launcher sends once confined (or the reason it could not be).
pub(crate) fn announce(outcome: Result<(), String>) -> io::Result<()> {
    // SAFETY: CONTROL_FD is the control socket, open for the life of the launcher.
    let control = unsafe { BorrowedFd::borrow_raw(CONTROL_FD) };
    let reply = match outcome {
        Ok(()) => Reply::Ready,
        Err(message) => Reply::Error { message },
    };
    protocol::send(control.as_fd(), &reply, &[])
}
