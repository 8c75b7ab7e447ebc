//! The QMP server: a Unix socket listener, any number of clients, non-blocking I/O driven by
//! the event loop's epoll.
//!
//! Protocol handling (framing, negotiation, parsing, reply shapes) is the `citadel-qmp`
//! crate's; this module only moves bytes. A client that stops reading never blocks the VMM:
//! its pending output is capped and the client is dropped when it overflows. Events raised
//! while no client is negotiated are kept (bounded) and delivered to the next client that
//! negotiates, so a `SHUTDOWN` or `STOP` is not lost between two connections.
//!
//! Descriptors a client attaches to its messages (`SCM_RIGHTS`) are queued on the connection
//! for the next command that takes one: `getfd` and `add-fd` each take the first. They may
//! come with the command's JSON (libvirt) or ahead of it with a message of their own (QEMU's
//! Python library sends a lone space). A read that completes a command closes whatever no
//! command took, unless a further command is still arriving, so descriptors sent with any
//! other command do not stay. A message with more than
//! `scm_rights::MAX_FDS` descriptors (or a queue that would
//! grow past that) has all of them closed and the next command that takes one refused.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use citadel_qmp::command::Request;
use citadel_qmp::error::QmpError;
use citadel_qmp::event::Event;
use citadel_qmp::framing::Decoder;
use citadel_qmp::reply::VersionInfo;
use citadel_qmp::session::{Outcome, Session};
use citadel_qmp::{greeting, reply};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::scm_rights;

/// Largest JSON object a client may send.
const MAX_OBJECT_BYTES: usize = 256 * 1024;
/// Largest amount of unsent output kept for one client before it is dropped.
const MAX_PENDING_OUTPUT: usize = 1024 * 1024;
/// Clients served at once. Each may hold up to MAX_OBJECT_BYTES of input and
/// MAX_PENDING_OUTPUT of replies, so the count bounds the memory peers can pin; more
/// connections are closed as soon as they are accepted.
const MAX_CLIENTS: usize = 16;
/// Events kept while no client is negotiated.
const MAX_BACKLOG_EVENTS: usize = 128;
/// Read chunk.
const READ_CHUNK: usize = 16 * 1024;
/// Chunks read from one client per readiness event. Clients are registered level-triggered, so
/// what is left is read on the next round, after the other clients and the VM's own events: a
/// client that never stops sending cannot hold the event loop. For the same reason a read that
/// does not fill the chunk ends the round: whatever arrives after it wakes epoll again, so
/// probing the socket once more would only cost a syscall that almost always fails.
const READS_PER_EVENT: usize = 8;
/// The QEMU version whose QMP dialect Citadel speaks, reported in the greeting and by
/// `query-version`. Clients gate features on it: Kata Containers refuses a major below 5.
pub const QEMU_DIALECT: (u32, u32, u32) = (5, 0, 1);

/// What the greeting and `query-version` report: the dialect, and Citadel's own version as
/// the package.
pub fn version() -> VersionInfo {
    let (major, minor, micro) = QEMU_DIALECT;
    VersionInfo::new(major, minor, micro)
        .with_package(concat!("citadel-", env!("CARGO_PKG_VERSION")))
}

/// What the VMM does with one command.
pub struct Response {
    /// Events raised before the reply is sent (QEMU sends `STOP` before `stop`'s return).
    pub events_before: Vec<Event>,
    /// The reply.
    pub result: Result<serde_json::Value, QmpError>,
    /// Events raised after the reply (`SHUTDOWN` follows `quit`'s return).
    pub events_after: Vec<Event>,
}

impl Response {
    /// A reply with no events.
    pub fn reply(result: Result<serde_json::Value, QmpError>) -> Self {
        Response {
            events_before: Vec::new(),
            result,
            events_after: Vec::new(),
        }
    }
}

/// Errors of the QMP listener itself (clients' errors only drop that client).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Creating the socket failed.
    #[error("QMP socket: {0}")]
    Bind(#[from] citadel_sandbox::unix_socket::ListenError),
    /// Registering the listener failed.
    #[error("QMP socket {path}: {source}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

struct Client {
    stream: UnixStream,
    decoder: Decoder,
    session: Session,
    out: VecDeque<u8>,
    want_write: bool,
    /// Descriptors received and not yet taken by a command (at most `scm_rights::MAX_FDS`).
    fds: VecDeque<OwnedFd>,
    /// A message carried more descriptors than allowed: its command is refused.
    too_many_fds: bool,
}

/// What a command executor gets: the request and, for a command that takes one
/// ([`citadel_qmp::Command::takes_descriptor`]), the descriptor attached to it.
pub type Handler<'a> = dyn FnMut(&Request, Option<OwnedFd>) -> Response + 'a;

impl Client {
    /// Queues descriptors that came with a read; past the per-message bound, every queued
    /// one is closed and the next command that takes one is refused.
    fn queue_fds(&mut self, token: u64, fds: Vec<OwnedFd>, truncated: bool) {
        if fds.is_empty() && !truncated {
            return;
        }
        log::debug!("QMP client {token}: {} descriptors received", fds.len());
        self.fds.extend(fds);
        if truncated || self.fds.len() > scm_rights::MAX_FDS {
            log::warn!(
                "QMP client {token} passed more than {} descriptors at once: closing them",
                scm_rights::MAX_FDS
            );
            self.fds.clear();
            self.too_many_fds = true;
        }
    }

    /// After a read that completed a command: closes the descriptors no command took, unless
    /// another command is still arriving (they may be its).
    fn close_unclaimed_fds(&mut self, token: u64) {
        if self.decoder.in_value() {
            return;
        }
        if !self.fds.is_empty() {
            log::debug!(
                "QMP client {token}: closing {} descriptors no command took",
                self.fds.len()
            );
            self.fds.clear();
        }
        self.too_many_fds = false;
    }
}

/// The listener and its clients. Epoll tokens at or above `first_token` belong to clients.
pub struct QmpServer {
    listener: UnixListener,
    path: PathBuf,
    listener_token: u64,
    next_token: u64,
    clients: BTreeMap<u64, Client>,
    backlog: VecDeque<String>,
    remove_at_exit: bool,
    /// Where clients' bytes land before the decoder takes them, allocated once rather than
    /// cleared on every readiness event.
    read_buf: Box<[u8]>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

impl QmpServer {
    /// Binds `path` with permission bits `mode` whatever the umask (replacing a stale socket
    /// there, as QEMU does) and registers the listener with `epoll` under `listener_token`;
    /// clients get tokens from `first_client_token` up.
    pub fn bind(
        path: &Path,
        mode: u32,
        epoll: &Epoll,
        listener_token: u64,
        first_client_token: u64,
    ) -> Result<QmpServer, ServerError> {
        let err = |source| ServerError::Listen {
            path: path.to_path_buf(),
            source,
        };
        let listener = citadel_sandbox::unix_socket::listen(path, mode)?;
        listener.set_nonblocking(true).map_err(err)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener_token),
            )
            .map_err(err)?;
        Ok(QmpServer {
            listener,
            path: path.to_path_buf(),
            listener_token,
            next_token: first_client_token,
            clients: BTreeMap::new(),
            backlog: VecDeque::new(),
            remove_at_exit: true,
            read_buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// Whether `token` is the listener's or one of the clients'.
    pub fn owns(&self, token: u64) -> bool {
        token == self.listener_token || self.clients.contains_key(&token)
    }

    /// Handles readiness of the listener or of a client. `handle` executes a command.
    pub fn on_ready(
        &mut self,
        epoll: &Epoll,
        token: u64,
        events: EventSet,
        handle: &mut Handler<'_>,
    ) {
        if token == self.listener_token {
            self.accept_all(epoll);
            return;
        }
        let mut drop_it = events.intersects(EventSet::ERROR);
        if events.contains(EventSet::OUT) {
            drop_it |= !self.flush_client(epoll, token);
        }
        if !drop_it && events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
        {
            drop_it = !self.read_client(epoll, token, handle);
        }
        if drop_it {
            self.drop_client(epoll, token);
        }
    }

    fn accept_all(&mut self, epoll: &Epoll) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    log::warn!("QMP accept: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("QMP: {MAX_CLIENTS} clients already connected, refusing another");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("QMP client: {e}");
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
            ) {
                log::warn!("QMP client: {e}");
                continue;
            }
            let mut client = Client {
                stream,
                decoder: Decoder::new(MAX_OBJECT_BYTES),
                session: Session::new(),
                out: VecDeque::new(),
                want_write: false,
                fds: VecDeque::new(),
                too_many_fds: false,
            };
            client.out.extend(greeting::greeting(&version()).as_bytes());
            self.clients.insert(token, client);
            log::debug!("QMP client {token} connected");
            if !self.flush_client(epoll, token) {
                self.drop_client(epoll, token);
            }
        }
    }

    /// Reads what the client sent and answers it. Returns false when the client is gone.
    fn read_client(&mut self, epoll: &Epoll, token: u64, handle: &mut Handler<'_>) -> bool {
        for _ in 0..READS_PER_EVENT {
            let Some(client) = self.clients.get_mut(&token) else {
                return false;
            };
            let buf = &mut self.read_buf;
            let received = match scm_rights::recv(&client.stream, buf) {
                Ok(r) if r.len == 0 => return false,
                Ok(r) => r,
                Err(e) if would_block(&e) => return true,
                Err(e) => {
                    log::debug!("QMP client {token}: {e}");
                    return false;
                }
            };
            client.queue_fds(token, received.fds, received.truncated);
            let frames = client.decoder.feed(&buf[..received.len]);
            let drained = received.len < buf.len();
            let completes_a_command = !frames.is_empty();
            for frame in frames {
                let Some(client) = self.clients.get_mut(&token) else {
                    return false;
                };
                // Malformed input can cost a reply per couple of bytes: stop answering a peer
                // that does not read them before its backlog outgrows the cap.
                if client.out.len() > MAX_PENDING_OUTPUT {
                    log::warn!("QMP client {token} is not reading its replies: disconnecting it");
                    return false;
                }
                let was_negotiated = client.session.negotiated();
                match client.session.handle(frame) {
                    Outcome::Reply(line) => {
                        client.out.extend(line.as_bytes());
                        if !was_negotiated && client.session.negotiated() {
                            for line in self.backlog.drain(..) {
                                client.out.extend(line.as_bytes());
                            }
                        }
                    }
                    Outcome::Dispatch(request) => {
                        let fd = if request.command.takes_descriptor() {
                            if client.too_many_fds {
                                let err = QmpError::generic(format!(
                                    "Too many file descriptors passed: at most {} per message",
                                    scm_rights::MAX_FDS
                                ));
                                client
                                    .out
                                    .extend(reply::error(request.id.as_ref(), &err).as_bytes());
                                continue;
                            }
                            client.fds.pop_front()
                        } else {
                            None
                        };
                        let Response {
                            events_before,
                            result,
                            events_after,
                        } = handle(&request, fd);
                        for event in &events_before {
                            self.broadcast(event);
                        }
                        let line = match result {
                            Ok(value) => reply::success(request.id.as_ref(), value),
                            Err(err) => reply::error(request.id.as_ref(), &err),
                        };
                        if let Some(c) = self.clients.get_mut(&token) {
                            c.out.extend(line.as_bytes());
                        }
                        for event in &events_after {
                            self.broadcast(event);
                        }
                    }
                }
            }
            if completes_a_command {
                if let Some(client) = self.clients.get_mut(&token) {
                    client.close_unclaimed_fds(token);
                }
            }
            if !self.flush_all(epoll) {
                return self.clients.contains_key(&token);
            }
            if drained {
                break;
            }
        }
        true
    }

    /// Queues `event` for every negotiated client, or for the backlog when there is none.
    pub fn broadcast(&mut self, event: &Event) {
        let line = event.to_line(SystemTime::now());
        let mut delivered = false;
        for client in self.clients.values_mut() {
            if client.session.negotiated() {
                client.out.extend(line.as_bytes());
                delivered = true;
            }
        }
        if !delivered {
            if self.backlog.len() == MAX_BACKLOG_EVENTS {
                self.backlog.pop_front();
            }
            self.backlog.push_back(line);
        }
    }

    /// Writes pending output of every client, dropping those that overflow or fail.
    /// Returns false if any client was dropped.
    pub fn flush_all(&mut self, epoll: &Epoll) -> bool {
        let tokens: Vec<u64> = self.clients.keys().copied().collect();
        let mut all_ok = true;
        for token in tokens {
            if !self.flush_client(epoll, token) {
                self.drop_client(epoll, token);
                all_ok = false;
            }
        }
        all_ok
    }

    /// Writes as much pending output as the socket takes. Returns false when the client must
    /// be dropped.
    fn flush_client(&mut self, epoll: &Epoll, token: u64) -> bool {
        let Some(client) = self.clients.get_mut(&token) else {
            return false;
        };
        while !client.out.is_empty() {
            let (front, _) = client.out.as_slices();
            match client.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    client.out.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    log::debug!("QMP client {token}: {e}");
                    return false;
                }
            }
        }
        if client.out.len() > MAX_PENDING_OUTPUT {
            log::warn!(
                "QMP client {token} is not reading its replies ({} bytes pending): disconnecting it",
                client.out.len()
            );
            return false;
        }
        let want_write = !client.out.is_empty();
        if want_write != client.want_write {
            let mut set = EventSet::IN | EventSet::READ_HANG_UP;
            if want_write {
                set |= EventSet::OUT;
            }
            if epoll
                .ctl(
                    ControlOperation::Modify,
                    client.stream.as_raw_fd(),
                    EpollEvent::new(set, token),
                )
                .is_err()
            {
                return false;
            }
            client.want_write = want_write;
        }
        true
    }

    fn drop_client(&mut self, epoll: &Epoll, token: u64) {
        if let Some(client) = self.clients.remove(&token) {
            // The fd is closed right after; a failed removal changes nothing.
            let _ = epoll.ctl(
                ControlOperation::Delete,
                client.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            log::debug!("QMP client {token} disconnected");
        }
    }

    /// Tries, for at most `limit`, to deliver everything still queued (used before exit so
    /// that the reply to `quit` and the `SHUTDOWN` event reach the clients).
    pub fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for client in self.clients.values_mut() {
            // Blocking writes with a timeout: the process is about to exit anyway.
            if client.stream.set_nonblocking(false).is_err() {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || client
                    .stream
                    .set_write_timeout(Some(left.max(Duration::from_millis(1))))
                    .is_err()
            {
                continue;
            }
            let pending: Vec<u8> = client.out.drain(..).collect();
            if let Err(e) = client.stream.write_all(&pending) {
                log::debug!("QMP: undelivered output at exit: {e}");
            }
        }
    }
}

impl QmpServer {
    /// Leaves the socket file in place at exit (a VMM that may not unlink anything).
    pub fn keep_socket_file(&mut self) {
        self.remove_at_exit = false;
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        if !self.remove_at_exit {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::debug!("removing {}: {e}", self.path.display());
        }
    }
}
