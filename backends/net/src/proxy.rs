//! A message-level relay between the frontend's socket and the vhost-user-backend request
//! handler, which repairs one frontend quirk on the way.
//!
//! Debian's QEMU 7.2 sends `VHOST_USER_SET_VRING_ENABLE` before `VHOST_USER_SET_FEATURES`
//! (at reset and when the guest sets FEATURES_OK) and never again afterwards. The vhost crate's
//! request dispatcher (`BackendReqHandler::handle_request`, vhost 0.18) checks that the
//! `VHOST_USER_F_PROTOCOL_FEATURES` bit has been acked through SET_FEATURES before it accepts
//! SET_VRING_ENABLE and otherwise fails the request with `InactiveFeature`, which ends the
//! daemon's serving loop; vhost-user-backend 0.24's own `set_vring_enable` repeats the check.
//! So a backend built on them disconnects QEMU 7.2 before its rings ever start.
//!
//! The relay forwards every message unchanged, with its file descriptors, except
//! SET_VRING_ENABLE while PROTOCOL_FEATURES is not yet acked: it records the requested state
//! (acknowledging it itself when the frontend asked for a reply), and replays the recorded
//! states to the handler right after a SET_FEATURES that acks PROTOCOL_FEATURES.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use citadel_sandbox::memory_file::{check_memory_file, MemoryFilePolicy};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user header: request, flags, payload size, all u32 little endian.
const HDR_LEN: usize = 12;
/// Largest payload the vhost crate accepts on the main channel.
const MAX_PAYLOAD: usize = 0x1000;
/// Most fds one vhost-user message may carry.
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_MEM_TABLE: u32 = 5;
const REQ_ADD_MEM_REG: u32 = 37;
const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
const REQ_SET_VRING_ENABLE: u32 = 18;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// Errors that end a relayed connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The socket failed.
    #[error("{dir}: {source}")]
    Io {
        /// Which direction failed.
        dir: &'static str,
        /// What failed.
        source: io::Error,
    },
    /// The peer sent a header announcing a payload larger than any vhost-user message.
    #[error("{dir}: message {req} announces {size} payload bytes (max {MAX_PAYLOAD})")]
    Oversized {
        /// Which direction.
        dir: &'static str,
        /// Request code.
        req: u32,
        /// Announced size.
        size: u32,
    },
    /// A memory region the backend would map is not backed by its file.
    #[error("memory region {index}: {why}")]
    BadRegion {
        /// Region number in the message.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("{dir}: connection closed inside a message")]
    Truncated {
        /// Which direction.
        dir: &'static str,
    },
}

/// One vhost-user message with the fds that came with it.
struct Message {
    /// Request code from the header.
    request: u32,
    /// Flags from the header.
    flags: u32,
    /// The whole message, header included, as received.
    bytes: Vec<u8>,
    fds: Vec<File>,
}

impl Message {
    fn payload(&self) -> &[u8] {
        &self.bytes[HDR_LEN..]
    }
}

/// The little-endian u32 at byte `at` of `b`, or `None` when `b` is too short.
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The little-endian u64 at byte `at` of `b`, or `None` when `b` is too short.
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Reads one message; `Ok(None)` on a clean end of stream between messages.
fn recv_message(sock: &UnixStream, dir: &'static str) -> Result<Option<Message>, ProxyError> {
    let io_err = |source| ProxyError::Io { dir, source };
    let mut hdr = [0u8; HDR_LEN];
    let mut raw_fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    let (got, nfds) = loop {
        // SAFETY: the iovec points to `hdr`, live and HDR_LEN bytes long, and `raw_fds` has
        // room for MAX_FDS descriptors; the kernel writes only within those.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) } {
            Ok(v) => break v,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io_err(io::Error::from_raw_os_error(e.errno()))),
        }
    };
    let fds: Vec<File> = raw_fds[..nfds.min(MAX_FDS)]
        .iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: the kernel just installed these fds for us; nothing else owns them.
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    if got < HDR_LEN {
        reader
            .read_exact(&mut hdr[got..])
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ProxyError::Truncated { dir },
                _ => io_err(e),
            })?;
    }
    let [request, flags, size] =
        [0, 4, 8].map(|at| u32::from_le_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]));
    if size as usize > MAX_PAYLOAD {
        return Err(ProxyError::Oversized {
            dir,
            req: request,
            size,
        });
    }
    let mut bytes = vec![0u8; HDR_LEN + size as usize];
    bytes[..HDR_LEN].copy_from_slice(&hdr);
    reader
        .read_exact(&mut bytes[HDR_LEN..])
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ProxyError::Truncated { dir },
            _ => io_err(e),
        })?;
    Ok(Some(Message {
        request,
        flags,
        bytes,
        fds,
    }))
}

/// Refuses memory tables whose regions reach past the end of their file, are not backed by a
/// regular file, or (under [`MemoryFilePolicy::SealedOnly`]) by a file the frontend could
/// still shrink: the request handler maps them as given, and the first guest access past the
/// end of the file would kill the backend with SIGBUS.
fn check_memory_regions(msg: &Message, policy: MemoryFilePolicy) -> Result<(), ProxyError> {
    let payload = msg.payload();
    let (count, regions) = match (msg.request, payload.get(8..)) {
        (REQ_SET_MEM_TABLE, Some(regions)) => (u32_at(payload, 0).unwrap_or(0) as usize, regions),
        (REQ_ADD_MEM_REG, Some(regions)) => (1, regions),
        // Malformed sizes are refused by the request handler itself.
        _ => return Ok(()),
    };
    for (index, (region, file)) in regions
        .chunks_exact(32)
        .take(count)
        .zip(&msg.fds)
        .enumerate()
    {
        let bad = |why: String| ProxyError::BadRegion { index, why };
        // chunks_exact hands out 32-byte regions, so both fields are there.
        let size = u64_at(region, 8).unwrap_or(0);
        let offset = u64_at(region, 24).unwrap_or(0);
        let end = offset
            .checked_add(size)
            .ok_or_else(|| bad(format!("offset {offset:#x} + size {size:#x} overflows")))?;
        check_memory_file(file, end, policy).map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

fn send_message(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[File],
    dir: &'static str,
) -> Result<(), ProxyError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let attach: &[RawFd] = if sent == 0 { &raw } else { &[] };
        match sock.send_with_fds(&[&bytes[sent..]], attach) {
            Ok(n) => sent += n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => {
                return Err(ProxyError::Io {
                    dir,
                    source: io::Error::from_raw_os_error(e.errno()),
                })
            }
        }
    }
    Ok(())
}

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(HDR_LEN + size as usize);
    v.extend_from_slice(&request.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v
}

/// The SET_VRING_ENABLE bookkeeping of one connection.
#[derive(Debug, Default)]
pub struct EnableQuirk {
    num_queues: u32,
    protocol_acked: bool,
    reply_ack: bool,
    deferred: BTreeMap<u32, u32>,
}

/// What the relay does with one frontend message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward it as is.
    Forward,
    /// Keep it; reply to the frontend with this ack status if `Some`.
    Absorb(Option<u64>),
    /// Forward it, then send these SET_VRING_ENABLE (index, state) pairs to the handler.
    ForwardThenReplay(Vec<(u32, u32)>),
}

impl EnableQuirk {
    /// Bookkeeping for a device with `num_queues` rings.
    pub fn new(num_queues: usize) -> Self {
        EnableQuirk {
            num_queues: u32::try_from(num_queues).unwrap_or(u32::MAX),
            ..Default::default()
        }
    }

    /// Decides what to do with a frontend message of `request` type.
    pub fn on_message(&mut self, request: u32, flags: u32, payload: &[u8]) -> Action {
        match request {
            REQ_SET_PROTOCOL_FEATURES => {
                if let Some(v) = u64_at(payload, 0) {
                    self.reply_ack = v & PROTOCOL_F_REPLY_ACK != 0;
                }
                Action::Forward
            }
            REQ_SET_FEATURES => {
                let Some(features) = u64_at(payload, 0) else {
                    return Action::Forward;
                };
                let acked = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
                self.protocol_acked = acked;
                let deferred = std::mem::take(&mut self.deferred);
                if acked && !deferred.is_empty() {
                    log::info!(
                        "applying {} SET_VRING_ENABLE received before SET_FEATURES",
                        deferred.len()
                    );
                    Action::ForwardThenReplay(deferred.into_iter().collect())
                } else {
                    Action::Forward
                }
            }
            REQ_SET_VRING_ENABLE if !self.protocol_acked => {
                let need_reply = self.reply_ack && flags & FLAG_NEED_REPLY != 0;
                match (u32_at(payload, 0), u32_at(payload, 4)) {
                    (Some(index), Some(num)) if index < self.num_queues && num <= 1 => {
                        log::debug!("deferring SET_VRING_ENABLE {index}={num} until SET_FEATURES");
                        self.deferred.insert(index, num);
                        Action::Absorb(need_reply.then_some(0))
                    }
                    _ => {
                        log::warn!("refusing malformed SET_VRING_ENABLE before SET_FEATURES");
                        Action::Absorb(need_reply.then_some(1))
                    }
                }
            }
            _ => Action::Forward,
        }
    }
}

/// A running relay between a frontend and the request handler.
pub struct Relay {
    frontend: UnixStream,
    handler: UnixStream,
    threads: Vec<JoinHandle<Result<(), ProxyError>>>,
}

impl Relay {
    /// Starts relaying between `frontend` and `handler` for a device with `num_queues` rings.
    pub fn start(
        frontend: UnixStream,
        handler: UnixStream,
        num_queues: usize,
        memory_files: MemoryFilePolicy,
    ) -> io::Result<Relay> {
        let front_tx = Arc::new(Mutex::new(frontend.try_clone()?));
        let (f_in, h_out) = (frontend.try_clone()?, handler.try_clone()?);
        let (h_in, f_out) = (handler.try_clone()?, front_tx.clone());
        let down = std::thread::Builder::new()
            .name("vu-relay-in".into())
            .spawn(move || {
                let r = relay_from_frontend(&f_in, &h_out, &front_tx, num_queues, memory_files);
                let _ = h_out.shutdown(Shutdown::Both);
                r
            })?;
        let up = std::thread::Builder::new()
            .name("vu-relay-out".into())
            .spawn(move || {
                let r = relay_to_frontend(&h_in, &f_out);
                if let Ok(f) = f_out.lock() {
                    let _ = f.shutdown(Shutdown::Both);
                }
                r
            })?;
        Ok(Relay {
            frontend,
            handler,
            threads: vec![down, up],
        })
    }

    /// Cuts both connections and waits for the relay threads; returns the first error.
    pub fn stop(self) -> Result<(), ProxyError> {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.handler.shutdown(Shutdown::Both);
        let mut first = Ok(());
        for t in self.threads {
            let r = t.join().unwrap_or(Ok(()));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

fn relay_from_frontend(
    from: &UnixStream,
    to: &UnixStream,
    reply: &Mutex<UnixStream>,
    num_queues: usize,
    memory_files: MemoryFilePolicy,
) -> Result<(), ProxyError> {
    const DIR: &str = "frontend request";
    let mut quirk = EnableQuirk::new(num_queues);
    while let Some(msg) = recv_message(from, DIR)? {
        check_memory_regions(&msg, memory_files)?;
        match quirk.on_message(msg.request, msg.flags, msg.payload()) {
            Action::Forward => send_message(to, &msg.bytes, &msg.fds, DIR)?,
            Action::Absorb(ack) => {
                if let Some(status) = ack {
                    let mut out = header(msg.request, FLAG_VERSION | FLAG_REPLY, 8);
                    out.extend_from_slice(&status.to_le_bytes());
                    let f = reply.lock().unwrap_or_else(|e| e.into_inner());
                    send_message(&f, &out, &[], DIR)?;
                }
            }
            Action::ForwardThenReplay(states) => {
                send_message(to, &msg.bytes, &msg.fds, DIR)?;
                for (index, num) in states {
                    let mut out = header(REQ_SET_VRING_ENABLE, FLAG_VERSION, 8);
                    out.extend_from_slice(&index.to_le_bytes());
                    out.extend_from_slice(&num.to_le_bytes());
                    send_message(to, &out, &[], DIR)?;
                }
            }
        }
    }
    Ok(())
}

fn relay_to_frontend(from: &UnixStream, to: &Mutex<UnixStream>) -> Result<(), ProxyError> {
    const DIR: &str = "backend reply";
    while let Some(msg) = recv_message(from, DIR)? {
        let f = to.lock().unwrap_or_else(|e| e.into_inner());
        send_message(&f, &msg.bytes, &msg.fds, DIR)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(index: u32, num: u32) -> Vec<u8> {
        let mut v = index.to_le_bytes().to_vec();
        v.extend_from_slice(&num.to_le_bytes());
        v
    }

    #[test]
    fn enable_before_features_is_deferred_then_replayed() {
        let mut q = EnableQuirk::new(2);
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(
            q.on_message(
                REQ_SET_PROTOCOL_FEATURES,
                1,
                &PROTOCOL_F_REPLY_ACK.to_le_bytes()
            ),
            Action::Forward
        );
        assert_eq!(
            q.on_message(REQ_SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, &state(0, 0)),
            Action::Absorb(Some(0))
        );
        assert_eq!(
            q.on_message(REQ_SET_VRING_ENABLE, 1, &state(0, 1)),
            Action::Absorb(None)
        );
        assert_eq!(
            q.on_message(REQ_SET_VRING_ENABLE, 1, &state(1, 1)),
            Action::Absorb(None)
        );
        assert_eq!(
            q.on_message(REQ_SET_FEATURES, 1, &(pf | 1).to_le_bytes()),
            Action::ForwardThenReplay(vec![(0, 1), (1, 1)])
        );
        // Once acked, the handler sees SET_VRING_ENABLE itself.
        assert_eq!(
            q.on_message(REQ_SET_VRING_ENABLE, 1, &state(0, 0)),
            Action::Forward
        );
    }

    #[test]
    fn malformed_early_enable_is_refused() {
        let mut q = EnableQuirk::new(2);
        q.on_message(
            REQ_SET_PROTOCOL_FEATURES,
            1,
            &PROTOCOL_F_REPLY_ACK.to_le_bytes(),
        );
        for payload in [state(2, 1), state(0, 7), vec![1, 2, 3]] {
            assert_eq!(
                q.on_message(REQ_SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, &payload),
                Action::Absorb(Some(1))
            );
        }
        // Nothing was recorded, so nothing is replayed.
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(
            q.on_message(REQ_SET_FEATURES, 1, &pf.to_le_bytes()),
            Action::Forward
        );
    }

    #[test]
    fn features_without_protocol_bit_drop_deferred_states() {
        let mut q = EnableQuirk::new(2);
        q.on_message(REQ_SET_VRING_ENABLE, 1, &state(0, 1));
        assert_eq!(
            q.on_message(REQ_SET_FEATURES, 1, &1u64.to_le_bytes()),
            Action::Forward
        );
    }
}
