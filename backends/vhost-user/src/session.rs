//! One frontend connection served message by message, with SET_VRING_ENABLE accepted before
//! SET_FEATURES.
//!
//! QEMU 7.2 sends `VHOST_USER_SET_VRING_ENABLE` before `VHOST_USER_SET_FEATURES` (at device
//! reset and when the guest sets FEATURES_OK) and, for some devices, never again afterwards.
//! The `vhost` crate's dispatcher (`BackendReqHandler::handle_request`, vhost 0.18) refuses
//! SET_VRING_ENABLE until `VHOST_USER_F_PROTOCOL_FEATURES` has been acked, so those rings would
//! stay disabled for good.
//!
//! A [`Session`] looks at each message before the dispatcher reads it (`MSG_PEEK`, without
//! taking its descriptors). A SET_VRING_ENABLE arriving while PROTOCOL_FEATURES is not acked is
//! read here, its state recorded (and acknowledged when the frontend asked for a reply), and
//! the recorded states go to the backend's `set_vring_enable` right after a SET_FEATURES that
//! acks PROTOCOL_FEATURES. Every other message reaches the dispatcher untouched.
//!
//! The session mirrors the dispatcher's view of the negotiation from the messages it peeks.
//! A frontend that splits one of those small messages over several writes (QEMU never does)
//! leaves the mirror behind; that frontend then only sees its own early enables refused or
//! deferred, as they were without the session.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::{BackendReqHandler, Error as VhostError, VhostUserBackendReqHandler};

/// vhost-user header: request, flags, payload size, all u32 little endian.
const HDR_LEN: usize = 12;
/// A header and a u64 or vring-state payload: every message the session looks into.
const PEEK_LEN: usize = HDR_LEN + 8;

const REQ_GET_FEATURES: u32 = 1;
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
const REQ_SET_VRING_ENABLE: u32 = 18;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// Whether an error from one message leaves the stream in step, so the next message can be
/// read. Refusals made after the whole message was consumed do; framing errors do not.
pub fn recoverable(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::InvalidParam
            | VhostError::InvalidOperation(_)
            | VhostError::InactiveFeature(_)
            | VhostError::InactiveOperation(_)
            | VhostError::ReqHandlerError(_)
    )
}

/// The frontend's messages, dispatched to `S`, with early SET_VRING_ENABLE accepted.
pub struct Session<S: VhostUserBackendReqHandler> {
    handler: BackendReqHandler<S>,
    backend: Arc<S>,
    /// The same socket as the dispatcher's, for peeking and for the early messages.
    stream: UnixStream,
    /// A GET_FEATURES was answered (the dispatcher acknowledges nothing before).
    features_read: bool,
    /// The last SET_FEATURES acked PROTOCOL_FEATURES.
    protocol_acked: bool,
    /// The last SET_PROTOCOL_FEATURES acked REPLY_ACK.
    reply_ack: bool,
    /// Number of rings of the device: early states for others are refused.
    rings: u32,
    /// Enable states received before PROTOCOL_FEATURES was acked, by ring index.
    early: BTreeMap<u32, bool>,
}

/// The start of the next message, as far as it has arrived.
struct Peeked {
    bytes: [u8; PEEK_LEN],
    len: usize,
}

impl Peeked {
    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.bytes.get(at..at + 4).filter(|_| self.len >= at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn request(&self) -> Option<u32> {
        self.u32_at(0)
    }

    fn flags(&self) -> u32 {
        self.u32_at(4).unwrap_or(0)
    }

    /// The 8-byte payload, when the header announces exactly that and it has all arrived.
    fn payload(&self) -> Option<[u8; 8]> {
        if self.u32_at(8)? != 8 || self.len < PEEK_LEN {
            return None;
        }
        self.bytes[HDR_LEN..PEEK_LEN].try_into().ok()
    }
}

impl<S: VhostUserBackendReqHandler> Session<S> {
    /// Serves `stream` with `backend`, a device of `rings` rings.
    pub fn new(stream: UnixStream, backend: Arc<S>, rings: u32) -> std::io::Result<Self> {
        let own = stream.try_clone()?;
        Ok(Session {
            handler: BackendReqHandler::from_stream(stream, Arc::clone(&backend)),
            backend,
            stream: own,
            features_read: false,
            protocol_acked: false,
            reply_ack: false,
            rings,
            early: BTreeMap::new(),
        })
    }

    /// Waits for the next message, then reads, handles and answers it.
    pub fn handle_request(&mut self) -> Result<(), VhostError> {
        let peeked = self.peek();
        let request = peeked.request();
        if request == Some(REQ_SET_VRING_ENABLE) && !self.protocol_acked {
            if let Some(payload) = peeked.payload() {
                return self.early_enable(peeked.flags(), payload);
            }
        }
        let result = self.handler.handle_request();
        // The dispatcher took these values even when the backend refused them, as long as the
        // message was whole; `payload` is only there for a whole message.
        match (request, peeked.payload()) {
            (Some(REQ_GET_FEATURES), _) if result.is_ok() => self.features_read = true,
            (Some(REQ_SET_FEATURES), Some(p)) => {
                self.protocol_acked = u64::from_le_bytes(p) & F_PROTOCOL_FEATURES != 0;
                if self.protocol_acked && result.is_ok() {
                    self.replay();
                }
            }
            (Some(REQ_SET_PROTOCOL_FEATURES), Some(p)) => {
                self.reply_ack = u64::from_le_bytes(p) & PROTOCOL_F_REPLY_ACK != 0;
            }
            _ => {}
        }
        result
    }

    /// The start of the next message, once some of it has arrived, without consuming it or its
    /// descriptors. Nothing (an empty peek) on end of file or a socket error, which the
    /// dispatcher then meets and reports.
    fn peek(&self) -> Peeked {
        let mut peeked = Peeked {
            bytes: [0; PEEK_LEN],
            len: 0,
        };
        let mut iov = libc::iovec {
            iov_base: peeked.bytes.as_mut_ptr().cast(),
            iov_len: PEEK_LEN,
        };
        // SAFETY: msghdr is plain data; zeroed means no name and no control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let n = loop {
            // SAFETY: `msg` points at one iovec over `peeked.bytes`, valid for the call. Without
            // a control buffer a peek leaves the descriptors queued for the dispatcher's read.
            let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_PEEK) };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        peeked.len = usize::try_from(n).unwrap_or(0);
        peeked
    }

    /// Consumes a SET_VRING_ENABLE that came before PROTOCOL_FEATURES was acked and records it.
    fn early_enable(&mut self, flags: u32, payload: [u8; 8]) -> Result<(), VhostError> {
        let mut message = [0u8; PEEK_LEN];
        // The whole message is queued (peeked); descriptors sent with it, which it must not
        // carry, are closed by the kernel as a plain read drops them.
        transfer(self.stream.as_raw_fd(), &mut message, Direction::Read)
            .map_err(VhostError::SocketBroken)?;
        let index = u32::from_le_bytes(payload[0..4].try_into().expect("4-byte slice"));
        let enable = match u32::from_le_bytes(payload[4..8].try_into().expect("4-byte slice")) {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(VhostError::InvalidParam),
        };
        let result = enable.and_then(|enable| {
            if index >= self.rings {
                return Err(VhostError::InvalidParam);
            }
            log::debug!("ring {index}: SET_VRING_ENABLE {enable} before SET_FEATURES, deferred");
            self.early.insert(index, enable);
            Ok(())
        });
        if self.features_read && self.reply_ack && flags & FLAG_NEED_REPLY != 0 {
            let mut reply = Vec::with_capacity(PEEK_LEN);
            reply.extend_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
            reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&u64::from(result.is_err()).to_le_bytes());
            transfer(self.stream.as_raw_fd(), &mut reply, Direction::Write)
                .map_err(VhostError::SocketBroken)?;
        }
        result
    }

    /// Hands the recorded enable states to the backend, now that it accepts them.
    fn replay(&mut self) {
        for (index, enable) in std::mem::take(&mut self.early) {
            if let Err(e) = self.backend.set_vring_enable(index, enable) {
                log::warn!("ring {index}: deferred SET_VRING_ENABLE {enable} refused: {e}");
            }
        }
    }
}

enum Direction {
    Read,
    Write,
}

/// Reads or writes all of `buf` with plain read(2)/write(2): the backends' seccomp filters
/// allow those, not the recvfrom/sendto that the standard library's socket I/O uses.
fn transfer(fd: RawFd, buf: &mut [u8], direction: Direction) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for `rest.len()` bytes, readable and writable, for the call.
        let n = unsafe {
            match direction {
                Direction::Read => libc::read(fd, rest.as_mut_ptr().cast(), rest.len()),
                Direction::Write => libc::write(fd, rest.as_ptr().cast(), rest.len()),
            }
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}
