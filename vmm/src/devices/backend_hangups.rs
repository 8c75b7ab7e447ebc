//! How the event loop learns that a backend process serving a slot is gone: the monitor's end
//! of the backend's vhost-user socket reports a hang-up (EPOLLRDHUP, EPOLLHUP) as soon as the
//! backend's end closes, which happens when the process dies however it dies (the kernel
//! closes its descriptors), or when it drops the connection while alive.
//!
//! The socket is watched rather than the launcher's reaping of the child because the socket
//! is what the device depends on: a backend that closed it is as useless as a dead one, and
//! the hang-up reaches the monitor without a new message in the launcher's protocol. Only the
//! hang-up is asked for, never readability, so the replies the monitor reads on the same
//! socket during a start or a stop wake nobody.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::interrupt::TransportInterrupt;
use super::virtio_mmio::{VirtioDevice, VirtioMmioTransport};

/// A device whose backend can be replaced when it hangs up, or given up on: a disk or NIC
/// slot, or the PCI card built on one.
pub trait Replaceable: VirtioDevice {
    /// The frontend of one backend.
    type Backend;
    /// The socket `backend` is reached through.
    fn socket_of(backend: &Self::Backend) -> RawFd;
    /// The socket of the backend serving the device now, if one does.
    fn backend_socket(&self) -> Option<RawFd>;
    /// Hands the device to `backend`; on a refusal the old one stays.
    fn replace(&mut self, backend: Self::Backend) -> Result<(), String>;
    /// Gives up on the device's backend.
    fn fail(&mut self);
}

/// The epoll set of the backend sockets of plugged slots, each under its slot's token. Only
/// the event loop changes it (plug, unplug and restart run there).
#[derive(Debug)]
pub struct BackendHangups {
    epoll: Epoll,
}

impl BackendHangups {
    /// Creates the empty set.
    pub fn new() -> std::io::Result<Self> {
        Ok(BackendHangups {
            epoll: Epoll::new()?,
        })
    }

    /// What the event loop waits on.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Reports a hang-up of `socket` under `token`.
    pub fn watch(&self, token: u64, socket: RawFd) {
        let added = self.epoll.ctl(
            ControlOperation::Add,
            socket,
            EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, token),
        );
        if let Err(e) = added {
            log::warn!("slot {token:#x}: watching its backend's socket: {e}");
        }
    }

    /// Stops reporting on `socket`; done before the socket is closed.
    pub fn unwatch(&self, token: u64, socket: RawFd) {
        let removed = self
            .epoll
            .ctl(ControlOperation::Delete, socket, EpollEvent::default());
        if let Err(e) = removed {
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::warn!("slot {token:#x}: unwatching its backend's socket: {e}");
            }
        }
    }

    /// Replaces the backend of the device in `transport`, watched under `token`, with
    /// `backend`; the watch moves to the new socket.
    pub fn replace<D: Replaceable, I: TransportInterrupt>(
        &self,
        token: u64,
        transport: &VirtioMmioTransport<D, I>,
        backend: D::Backend,
    ) -> Result<(), String> {
        let new_socket = D::socket_of(&backend);
        // Unwatched while it is still open: a successful replacement closes it.
        if let Some(old) = transport.with_device(|d| d.backend_socket()) {
            self.unwatch(token, old);
        }
        transport.with_device(|d| d.replace(backend))?;
        self.watch(token, new_socket);
        Ok(())
    }

    /// Gives up on the backend of the device in `transport`, watched under `token`: the
    /// device fails (see [`VirtioMmioTransport::fail_device`]) and its socket is no longer
    /// watched.
    pub fn fail<D: Replaceable, I: TransportInterrupt>(
        &self,
        token: u64,
        transport: &VirtioMmioTransport<D, I>,
    ) {
        if let Some(socket) = transport.with_device(|d| d.backend_socket()) {
            self.unwatch(token, socket);
        }
        transport.fail_device(D::fail);
    }

    /// The tokens of the slots whose backend hung up. A hang-up is reported until its socket
    /// is unwatched.
    pub fn ready(&self) -> Vec<u64> {
        let mut events = [EpollEvent::default(); 16];
        match self.epoll.wait(0, &mut events) {
            Ok(n) => events[..n].iter().map(|e| e.data()).collect(),
            Err(e) => {
                log::warn!("backends: waiting for hang-ups: {e}");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_closed_peer_is_reported_and_replies_are_not() {
        let hangups = BackendHangups::new().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        hangups.watch(3, ours.as_raw_fd());
        std::io::Write::write_all(&mut &theirs, b"reply").unwrap();
        assert!(hangups.ready().is_empty());
        drop(theirs);
        assert_eq!(hangups.ready(), vec![3]);
        hangups.unwatch(3, ours.as_raw_fd());
        assert!(hangups.ready().is_empty());
    }
}
