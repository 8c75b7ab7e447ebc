//! The device launcher: a small process, forked from the VMM before it confines itself, that
//! starts Citadel's vhost-user backends (`citadel-blk`, `citadel-net`) when the VMM asks.
//!
//! The VMM's own seccomp filter forbids `fork` and `execve`, and its Landlock domain forbids
//! opening disk images, so a device added at run time (QMP `blockdev-add`) needs someone else
//! to open the image and start the backend. That someone is the launcher, which can do just
//! that: it executes only the two configured binaries (Landlock), opens files beneath its "/"
//! (the jail's root when jailed) without following magic links, connects to the Unix sockets
//! of backends the user started (QMP `chardev-add`), creates the directory and files of a
//! snapshot (QMP `migrate`) and removes them again when writing it failed, and runs under the
//! `launcher` seccomp role.
//!
//! The VMM and the launcher talk over a `SOCK_SEQPACKET` socket pair: one JSON request, one
//! JSON reply, descriptors in `SCM_RIGHTS` (see [`protocol`]). The launcher treats what it
//! receives as untrusted: bounded messages, a bounded number of backends, images that must be
//! regular files or block devices, and only backends it started may be stopped.
//!
//! No backend outlives the VMM: the launcher dies with the VMM (`PR_SET_PDEATHSIG`), each
//! backend with the launcher, and when the VMM closes its end of the socket the launcher stops
//! every backend and exits.

pub mod confine;
pub mod connect;
pub mod image;
pub mod protocol;
mod server;
pub mod snapshot_dir;
mod spawn;
pub mod vfio;

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::{Reply, Request};

/// A host PCI function opened for passthrough.
#[derive(Debug)]
pub struct VfioHandle {
    /// Its VFIO container: guest RAM is mapped for the function's DMA through it.
    pub container: OwnedFd,
    /// The VFIO device.
    pub device: OwnedFd,
    /// Its regions and interrupt counts.
    pub info: protocol::VfioInfo,
}

/// What the launcher may start and how it confines itself.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// Absolute path of citadel-blk.
    pub blk_binary: PathBuf,
    /// Absolute path of citadel-net.
    pub net_binary: PathBuf,
    /// What a syscall outside the launcher's (and its backends') allowlist does.
    pub seccomp_action: citadel_seccomp::Mode,
    /// Landlock for the launcher; false only for `-sandbox landlock=off`.
    pub landlock: bool,
}

/// Where citadel-blk's image comes from.
#[derive(Debug)]
pub enum ImageSource {
    /// A path the launcher opens, resolved with its "/" (the jail's root when jailed) as the
    /// root; a relative path is taken from there too.
    Path(PathBuf),
    /// A descriptor already open.
    Fd(OwnedFd),
}

/// A citadel-blk to start.
#[derive(Debug)]
pub struct BlkSpec {
    /// Device id, for logs.
    pub id: String,
    /// The image.
    pub image: ImageSource,
    /// Serve the image read-only (and open it so).
    pub read_only: bool,
    /// Open the image with O_DIRECT.
    pub direct: bool,
    /// The disk's serial number, answered to the guest's GET_ID (see
    /// [`protocol::valid_serial`]).
    pub serial: Option<String>,
}

/// A citadel-net to start.
#[derive(Debug)]
pub struct NetSpec {
    /// Device id, for logs.
    pub id: String,
    /// The tap's queues, one per queue pair (at most 16): passed by the user, or attached by
    /// [`Launcher::open_tap`].
    pub queues: Vec<OwnedFd>,
    /// The device's MAC address (citadel-net picks a random local one when absent).
    pub mac: Option<[u8; 6]>,
}

/// A started backend.
#[derive(Debug)]
pub struct Backend {
    /// Its process id.
    pub pid: i32,
    /// The VMM's end of its vhost-user connection.
    pub socket: UnixStream,
}

/// Errors of the launcher, each one readable line.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// A backend binary path is not absolute.
    #[error("device launcher: backend binary {0} is not an absolute path")]
    RelativeBinary(PathBuf),
    /// The launcher's seccomp filter could not be built.
    #[error("device launcher: {0}")]
    Seccomp(#[from] citadel_seccomp::Error),
    /// A syscall of the VMM's side failed.
    #[error("device launcher: {what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// The launcher exited (or was killed).
    #[error("the device launcher has exited")]
    Gone,
    /// The launcher answered something that does not fit the request.
    #[error("device launcher: unexpected reply {0}")]
    Protocol(String),
    /// The launcher refused the request or could not carry it out; its words.
    #[error("{0}")]
    Refused(String),
}

/// How long dropping a [`Launcher`] waits for it to stop its backends and exit before it is
/// killed: its own grace for the backends and a margin.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// The VMM's handle on its launcher. Requests are serialised over one socket, so the handle
/// can be shared between threads. Dropping it stops the launcher and all its backends.
///
/// On the VMM's side a request costs `sendmsg` and `recvmsg` only, which a confined event loop
/// has. Dropping the handle also needs `shutdown`, `setsockopt(SO_RCVTIMEO)`, `wait4` and, for
/// a launcher that does not exit in time, `kill`; a VMM whose filter lacks those should let
/// the handle go with the process instead: its exit closes the socket just the same, and the
/// launcher stops its backends and exits.
#[derive(Debug)]
pub struct Launcher {
    pid: i32,
    control: Mutex<OwnedFd>,
}

impl Launcher {
    /// Forks the launcher process and waits until it has confined itself. The caller must
    /// still be single-threaded: the child runs on after `fork` without `execve`. The launcher
    /// gets SIGKILL when the calling thread ends (`PR_SET_PDEATHSIG` follows the thread that
    /// forked), so call this from the thread that lives as long as the VMM: its main thread.
    /// Call it before guest memory is mapped too: a shared mapping made before the fork would
    /// be shared with the launcher.
    pub fn start(config: LauncherConfig) -> Result<Launcher, LauncherError> {
        for binary in [&config.blk_binary, &config.net_binary] {
            if !binary.is_absolute() {
                return Err(LauncherError::RelativeBinary(binary.clone()));
            }
        }
        let filter = citadel_seccomp::CompiledFilter::new(
            citadel_seccomp::Role::Launcher,
            config.seccomp_action,
        )?;
        let (ours, theirs) = seqpacket_pair().map_err(|source| LauncherError::Sys {
            what: "creating the control socket",
            source,
        })?;
        // SAFETY: getpid has no preconditions.
        let vmm = unsafe { libc::getpid() };
        // SAFETY: the caller is single-threaded (documented above), so the child is a
        // consistent copy; it leaves only through _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(LauncherError::Sys {
                what: "fork",
                source: io::Error::last_os_error(),
            });
        }
        if pid == 0 {
            drop(ours);
            let code = run_launcher(&config, vmm, theirs, &filter);
            // SAFETY: leaves the launcher without running the VMM's destructors.
            unsafe { libc::_exit(code) };
        }
        drop(theirs);
        let launcher = Launcher {
            pid,
            control: Mutex::new(ours),
        };
        let control = launcher.lock();
        match receive(control.as_fd()) {
            Ok((Reply::Ready, _)) => {}
            Ok((Reply::Error { message }, _)) => {
                return Err(LauncherError::Refused(format!(
                    "the device launcher could not confine itself: {message}"
                )))
            }
            Ok((other, _)) => return Err(unexpected(other)),
            Err(e) => return Err(e),
        }
        drop(control);
        log::info!("device launcher started as pid {pid}");
        Ok(launcher)
    }

    /// The launcher's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Starts a citadel-blk. With [`ImageSource::Path`] the launcher opens the image: read-only
    /// when `read_only`, O_DIRECT when `direct`, and only a regular file or block device.
    pub fn spawn_blk(&self, spec: BlkSpec) -> Result<Backend, LauncherError> {
        let (path, fds) = match &spec.image {
            ImageSource::Path(path) => (
                Some(
                    path.to_str()
                        .ok_or_else(|| {
                            LauncherError::Refused(format!(
                                "Could not open '{}': the path is not valid UTF-8",
                                path.display()
                            ))
                        })?
                        .to_string(),
                ),
                Vec::new(),
            ),
            ImageSource::Fd(fd) => (None, vec![fd.as_raw_fd()]),
        };
        let request = Request::SpawnBlk {
            id: spec.id.clone(),
            path,
            read_only: spec.read_only,
            direct: spec.direct,
            serial: spec.serial.clone(),
        };
        self.spawn(&request, &fds)
    }

    /// Starts a citadel-net on the given tap queues.
    pub fn spawn_net(&self, spec: NetSpec) -> Result<Backend, LauncherError> {
        let fds: Vec<RawFd> = spec.queues.iter().map(|fd| fd.as_raw_fd()).collect();
        let request = Request::SpawnNet {
            id: spec.id.clone(),
            mac: spec.mac,
        };
        self.spawn(&request, &fds)
    }

    /// Attaches one queue of the tap called `name` in the launcher's network namespace,
    /// creating the tap when it is missing. The caller holds the queue for as long as the
    /// tap should live: a tap the launcher created goes away with its last queue.
    pub fn open_tap(&self, name: &str) -> Result<OwnedFd, LauncherError> {
        let request = Request::OpenTap {
            name: name.to_string(),
        };
        match self.call(&request, &[])? {
            (Reply::TapOpened, mut queues) if queues.len() == 1 => Ok(queues.remove(0)),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Connects to the Unix socket at `path` (resolved from the launcher's "/"), for a
    /// vhost-user backend the user started; see [`connect`].
    pub fn connect(&self, path: &str) -> Result<UnixStream, LauncherError> {
        let request = Request::Connect {
            path: path.to_string(),
        };
        match self.call(&request, &[])? {
            (Reply::Connected, mut sockets) if sockets.len() == 1 => {
                Ok(UnixStream::from(sockets.remove(0)))
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Stops a backend this launcher started: SIGTERM, up to 2 s to exit, then SIGKILL. It is
    /// reaped before this returns.
    pub fn stop(&self, pid: i32) -> Result<(), LauncherError> {
        match self.call(&Request::Stop { pid }, &[])? {
            (Reply::Stopped, _) => Ok(()),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Prepares the snapshot directory `path` (resolved from the launcher's "/"): see
    /// [`snapshot_dir::create`]. The files come back open for writing.
    pub fn create_snapshot(
        &self,
        path: &str,
    ) -> Result<snapshot_dir::SnapshotFiles, LauncherError> {
        let request = Request::CreateSnapshot {
            path: path.to_string(),
        };
        match self.call(&request, &[])? {
            (Reply::SnapshotCreated { created_dir }, fds) if fds.len() == 3 => {
                let mut fds = fds.into_iter().map(std::fs::File::from);
                match (fds.next(), fds.next(), fds.next()) {
                    (Some(dir), Some(memory), Some(state)) => Ok(snapshot_dir::SnapshotFiles {
                        dir,
                        memory,
                        state,
                        created_dir,
                    }),
                    _ => Err(LauncherError::Refused(
                        "the launcher sent too few snapshot files".into(),
                    )),
                }
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Removes what [`Launcher::create_snapshot`] made for `path`: see
    /// [`snapshot_dir::remove`].
    pub fn remove_snapshot(&self, path: &str, remove_dir: bool) -> Result<(), LauncherError> {
        let request = Request::RemoveSnapshot {
            path: path.to_string(),
            remove_dir,
        };
        match self.call(&request, &[])? {
            (Reply::SnapshotRemoved, _) => Ok(()),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Opens host PCI function `host` for passthrough: see [`vfio`]. Its VFIO container and
    /// device come back with the device's regions and interrupt counts.
    pub fn open_vfio(&self, host: &str) -> Result<VfioHandle, LauncherError> {
        let request = Request::OpenVfio {
            host: host.to_string(),
        };
        match self.call(&request, &[])? {
            (Reply::VfioOpened(info), fds) => match <[OwnedFd; 2]>::try_from(fds) {
                Ok([container, device]) => Ok(VfioHandle {
                    container,
                    device,
                    info,
                }),
                Err(_) => Err(LauncherError::Protocol("open-vfio: descriptors".into())),
            },
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Releases a function [`Launcher::open_vfio`] opened, once the VMM closed its
    /// descriptors.
    pub fn close_vfio(&self, host: &str) -> Result<(), LauncherError> {
        let request = Request::CloseVfio {
            host: host.to_string(),
        };
        match self.call(&request, &[])? {
            (Reply::VfioClosed, _) => Ok(()),
            (other, _) => Err(unexpected(other)),
        }
    }

    fn spawn(&self, request: &Request, fds: &[RawFd]) -> Result<Backend, LauncherError> {
        match self.call(request, fds)? {
            (Reply::Spawned { pid }, mut sockets) if sockets.len() == 1 => Ok(Backend {
                pid,
                socket: UnixStream::from(sockets.remove(0)),
            }),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// One request, one reply; an error reply becomes [`LauncherError::Refused`].
    fn call(
        &self,
        request: &Request,
        fds: &[RawFd],
    ) -> Result<(Reply, Vec<OwnedFd>), LauncherError> {
        let control = self.lock();
        protocol::send(control.as_fd(), request, fds).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => LauncherError::Gone,
            _ => LauncherError::Sys {
                what: "sending a request",
                source: e,
            },
        })?;
        match receive(control.as_fd())? {
            (Reply::Error { message }, _) => Err(LauncherError::Refused(message)),
            reply => Ok(reply),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OwnedFd> {
        // A panic while holding the lock leaves the socket as usable as before.
        self.control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Launcher {
    /// Shuts the control socket down, which makes the launcher stop its backends and exit,
    /// waits (at most [`EXIT_GRACE`]) for its end of the socket to close, which happens as it
    /// exits, and reaps it without blocking. A launcher still there after the grace is left to
    /// its death signal, which the kernel sends when the VMM exits (its backends die with
    /// it): the VMM's filter lets it reap with `WNOHANG` but not signal another process. The
    /// VMM-side syscalls are `shutdown`, `setsockopt(SO_RCVTIMEO)`, `recvmsg` and `wait4`.
    fn drop(&mut self) {
        let control = self.lock();
        let fd = control.as_raw_fd();
        let timeout = libc::timeval {
            tv_sec: EXIT_GRACE.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: shutdown and setsockopt on a socket this handle owns, with a live timeval
        // of the size given.
        unsafe {
            libc::shutdown(fd, libc::SHUT_WR);
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            match protocol::recv::<Reply>(control.as_fd()) {
                // End of file: the launcher is exiting.
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A stray reply or a refused message: keep waiting for the end.
                _ if Instant::now() < deadline => continue,
                _ => break,
            }
        }
        drop(control);
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc != 0 {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        log::warn!(
            "device launcher {} did not exit within {EXIT_GRACE:?}; it ends with the VMM",
            self.pid
        );
    }
}

fn unexpected(reply: Reply) -> LauncherError {
    LauncherError::Protocol(format!("{reply:?}"))
}

fn receive(control: std::os::fd::BorrowedFd<'_>) -> Result<(Reply, Vec<OwnedFd>), LauncherError> {
    match protocol::recv::<Reply>(control) {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(LauncherError::Gone),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(LauncherError::Gone),
        Err(e) => Err(LauncherError::Sys {
            what: "reading a reply",
            source: e,
        }),
    }
}

/// The launcher process, from fork to exit; returns its exit status.
fn run_launcher(
    config: &LauncherConfig,
    vmm: libc::pid_t,
    control: OwnedFd,
    filter: &citadel_seccomp::CompiledFilter,
) -> i32 {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return 1;
    }
    // The VMM died between fork and prctl: the signal will never come.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != vmm {
        return 1;
    }
    reset_signal_dispositions();
    if let Err(e) = confine::keep_only_control(control) {
        log::error!("device launcher: {e}");
        return 1;
    }
    let confined = server::child_signals()
        .map_err(|e| format!("signalfd: {e}"))
        .and_then(|signals| {
            confine::confine_launcher(config, filter)
                .map(|()| signals)
                .map_err(|e| e.to_string())
        });
    let announced = server::announce(confined.as_ref().map(|_| ()).map_err(Clone::clone));
    match (confined, announced) {
        (Ok(signals), Ok(())) => {
            server::serve(config, signals);
            0
        }
        _ => 1,
    }
}

/// Puts every signal the VMM may have a handler for back to its default action (a VMM handler
/// running in the launcher would act on the VMM's state, not the launcher's). SIGPIPE stays
/// ignored, as the Rust runtime set it: a closed stderr must not kill the launcher.
fn reset_signal_dispositions() {
    for signal in 1..=libc::SIGRTMAX() {
        if matches!(signal, libc::SIGKILL | libc::SIGSTOP | libc::SIGPIPE) {
            continue;
        }
        // SAFETY: SIG_DFL is a valid disposition for every catchable signal; the numbers
        // the kernel refuses (those glibc reserves) only make the call fail.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// A connected pair of `SOCK_SEQPACKET` sockets, close-on-exec.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
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
