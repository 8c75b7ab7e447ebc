//! A hostile vhost-user frontend session decoded from arbitrary bytes, for the backends' fuzz
//! targets: messages with any request code, flags, payload and framing, carrying a sealed
//! memfd as guest memory, an unsealed one, or kick and call eventfds; writes into guest
//! memory between messages; and kicks.
//!
//! The decoding is total: every byte string is a session, so a fuzzer's mutations are never
//! wasted on inputs that would be refused before reaching the backend.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::vhost_user::{eventfd, Frontend, GuestMemory};

/// Size of each guest memory file.
pub const MEMORY_LEN: usize = 0x1_0000;
/// Most steps decoded from one input; longer inputs are cut there.
pub const MAX_STEPS: usize = 64;
/// Largest payload a message may carry (the vhost crate refuses anything longer).
const MAX_PAYLOAD: usize = 0x1000;

/// Op codes at and above this one are not vhost-user requests but harness actions.
const OP_WRITE_MEMORY: u8 = 0xfe;
const OP_KICK: u8 = 0xff;

/// Flag byte bits.
const FLAG_NEED_REPLY: u8 = 0x01;
const FLAG_RAW_FLAGS: u8 = 0x02;
const FLAG_LYING_SIZE: u8 = 0x04;

/// Descriptor byte bits: which of the session's files the message carries, in this order.
const FD_SEALED: u8 = 0x01;
const FD_KICK: u8 = 0x02;
const FD_CALL: u8 = 0x04;
const FD_UNSEALED: u8 = 0x08;

/// One thing the frontend does.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes (header included) with the descriptors named by `fds` (FD_* bits).
    Message {
        /// The whole message as it goes on the wire.
        bytes: Vec<u8>,
        /// Which descriptors to attach.
        fds: u8,
    },
    /// Write `bytes` into the sealed guest memory at `offset`.
    WriteMemory {
        /// Offset in the memory file (guest address, for a table mapping it at 0).
        offset: usize,
        /// What to write.
        bytes: Vec<u8>,
    },
    /// Signal the kick eventfd.
    Kick,
}

/// Takes bytes from the front of the input, zero when it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
}

/// Decodes a session. Each step starts with an op byte: [`OP_WRITE_MEMORY`] (offset u16,
/// length u8, bytes), [`OP_KICK`], or a request code followed by a flag byte, a descriptor
/// byte, the payload length (u16, cut at 4 KiB), the payload and, with `FLAG_RAW_FLAGS` or
/// `FLAG_LYING_SIZE`, the header's flags or size field as u32.
pub fn decode(data: &[u8]) -> Vec<Step> {
    let mut input = Input(data);
    let mut steps = Vec::new();
    while !input.0.is_empty() && steps.len() < MAX_STEPS {
        match input.u8() {
            OP_WRITE_MEMORY => {
                let offset = usize::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.take(len.min(MEMORY_LEN - offset)).to_vec();
                steps.push(Step::WriteMemory { offset, bytes });
            }
            OP_KICK => steps.push(Step::Kick),
            request => {
                let flags = input.u8();
                let fds = input.u8();
                let len = usize::from(input.u16()) % (MAX_PAYLOAD + 1);
                let payload = input.take(len).to_vec();
                let mut header_flags = crate::vhost_user::VERSION;
                if flags & FLAG_NEED_REPLY != 0 {
                    header_flags |= crate::vhost_user::NEED_REPLY;
                }
                if flags & FLAG_RAW_FLAGS != 0 {
                    header_flags = input.u32();
                }
                let size = if flags & FLAG_LYING_SIZE != 0 {
                    input.u32()
                } else {
                    payload.len() as u32
                };
                let mut bytes = Vec::with_capacity(12 + payload.len());
                bytes.extend_from_slice(&u32::from(request).to_le_bytes());
                bytes.extend_from_slice(&header_flags.to_le_bytes());
                bytes.extend_from_slice(&size.to_le_bytes());
                bytes.extend_from_slice(&payload);
                steps.push(Step::Message { bytes, fds });
            }
        }
    }
    steps
}

/// The frontend's side of one session: its socket, guest memory and eventfds.
pub struct Session {
    /// The frontend's end of the connection.
    pub frontend: Frontend,
    /// Guest memory sealed against shrinking, as backends require.
    pub memory: GuestMemory,
    unsealed: GuestMemory,
    kick: OwnedFd,
    call: OwnedFd,
}

impl Session {
    /// A session on the frontend end of a connected socket.
    pub fn new(sock: UnixStream) -> Session {
        sock.set_nonblocking(true)
            .expect("non-blocking frontend socket");
        Session {
            frontend: Frontend { sock },
            memory: GuestMemory::new(MEMORY_LEN),
            unsealed: GuestMemory::unsealed(MEMORY_LEN),
            kick: eventfd(),
            call: eventfd(),
        }
    }

    /// Performs one step that does not need the backend's attention right away; a failed
    /// send (the backend hung up, its buffer is full) is the backend's decision to make.
    pub fn perform(&self, step: &Step) {
        match step {
            Step::Message { bytes, fds } => {
                let mut raw: Vec<RawFd> = Vec::new();
                for (bit, fd) in [
                    (FD_SEALED, self.memory.fd()),
                    (FD_KICK, self.kick.as_raw_fd()),
                    (FD_CALL, self.call.as_raw_fd()),
                    (FD_UNSEALED, self.unsealed.fd()),
                ] {
                    if fds & bit != 0 {
                        raw.push(fd);
                    }
                }
                let _ = self.frontend.send_raw(bytes, &raw);
            }
            Step::WriteMemory { offset, bytes } => self.memory.write(*offset as u64, bytes),
            Step::Kick => {
                let _ = signal(self.kick.as_fd(), 1);
            }
        }
    }

    /// Waits up to `timeout_ms` for the backend to signal the call eventfd, and consumes the
    /// signal. True if it did.
    pub fn wait_call(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) } > 0;
        if ready {
            let mut counter = [0u8; 8];
            // SAFETY: reads 8 bytes into a live 8-byte buffer from our own eventfd.
            unsafe { libc::read(self.call.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        }
        ready
    }

    /// Reads and drops whatever the backend sent back (descriptors in replies are closed by
    /// the kernel), so its replies never fill the socket.
    pub fn drain_replies(&self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a live buffer of the given length from our own socket.
            let n = unsafe {
                libc::recv(
                    self.frontend.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return;
            }
        }
    }
}

/// Adds `value` to an eventfd's counter.
fn signal(fd: std::os::fd::BorrowedFd<'_>, value: u64) -> std::io::Result<()> {
    let bytes = value.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live 8-byte buffer to an eventfd we hold.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), 8) };
    if n != 8 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
