//! A raw vhost-user frontend and memfd-backed guest memory, for tests that send Citadel's
//! backends messages and descriptor chains a real frontend never would.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// vhost-user request codes.
pub const GET_FEATURES: u32 = 1;
/// See [`GET_FEATURES`].
pub const SET_FEATURES: u32 = 2;
/// See [`GET_FEATURES`].
pub const SET_OWNER: u32 = 3;
/// See [`GET_FEATURES`].
pub const SET_MEM_TABLE: u32 = 5;
/// See [`GET_FEATURES`].
pub const SET_VRING_NUM: u32 = 8;
/// See [`GET_FEATURES`].
pub const SET_VRING_ADDR: u32 = 9;
/// See [`GET_FEATURES`].
pub const SET_VRING_BASE: u32 = 10;
/// See [`GET_FEATURES`].
pub const GET_VRING_BASE: u32 = 11;
/// See [`GET_FEATURES`].
pub const SET_VRING_KICK: u32 = 12;
/// See [`GET_FEATURES`].
pub const SET_VRING_CALL: u32 = 13;
/// See [`GET_FEATURES`].
pub const GET_PROTOCOL_FEATURES: u32 = 15;
/// See [`GET_FEATURES`].
pub const SET_PROTOCOL_FEATURES: u32 = 16;
/// See [`GET_FEATURES`].
pub const GET_QUEUE_NUM: u32 = 17;
/// See [`GET_FEATURES`].
pub const SET_VRING_ENABLE: u32 = 18;
/// See [`GET_FEATURES`].
pub const GET_CONFIG: u32 = 24;
/// See [`GET_FEATURES`].
pub const GET_INFLIGHT_FD: u32 = 31;
/// See [`GET_FEATURES`].
pub const SET_INFLIGHT_FD: u32 = 32;

/// Feature bit: vhost-user protocol features are negotiated.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Feature bit: virtio 1.0.
pub const F_VERSION_1: u64 = 1 << 32;
/// Protocol feature bit: the backend acks requests that ask for it.
pub const PF_REPLY_ACK: u64 = 1 << 3;

/// Header flag: protocol version 1, set on every message.
pub const VERSION: u32 = 0x1;
/// Header flag: this message is a reply.
pub const REPLY: u32 = 0x4;
/// Header flag: the frontend asks for an ack (needs the REPLY_ACK protocol feature).
pub const NEED_REPLY: u32 = 0x8;

/// Largest reply payload any request here can get; a bigger size field is a backend bug.
const MAX_REPLY: usize = 4096;

/// A non-blocking eventfd, as used for kick and call.
pub fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd creation; the result is checked and then owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Guest memory: a memfd mapped shared into the test, so the backend sees the same bytes.
/// Sealed against shrinking and growing, as Citadel's and QEMU's guest memory is, unless made
/// with [`GuestMemory::unsealed`].
pub struct GuestMemory {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl GuestMemory {
    /// `len` bytes of zeroed guest memory, sealed against shrinking and growing.
    pub fn new(len: usize) -> GuestMemory {
        let mem = GuestMemory::unsealed(len);
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_ADD_SEALS with constant flags on our own memfd.
        let rc = unsafe { libc::fcntl(mem.fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0, "sealing: {}", std::io::Error::last_os_error());
        mem
    }

    /// `len` bytes of zeroed guest memory whose memfd anyone holding it may still resize.
    pub fn unsealed(len: usize) -> GuestMemory {
        // SAFETY: valid C string, constant flags; the result is checked and owned.
        let fd = unsafe {
            libc::memfd_create(
                c"citadel-test-guest".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: resizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        // SAFETY: shared mapping of the whole memfd; checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestMemory {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    /// The memfd, to pass in SET_MEM_TABLE.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.len
    }

    /// Where the memory is mapped in this process: the frontend address of guest address 0.
    pub fn uaddr(&self) -> u64 {
        self.ptr as u64
    }

    fn check(&self, gpa: u64, len: usize) -> usize {
        let start = usize::try_from(gpa).expect("guest address fits usize");
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "{len} bytes at {gpa:#x} outside {} bytes of guest memory",
            self.len
        );
        start
    }

    /// Writes `bytes` at guest address `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let start = self.check(gpa, bytes.len());
        // SAFETY: the range was checked against the mapping's length; the mapping lives as
        // long as self.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(start), bytes.len()) };
    }

    /// Reads `len` bytes at guest address `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let start = self.check(gpa, len);
        // SAFETY: the range was checked against the mapping's length; the mapping lives as
        // long as self. The backend writes concurrently, so each byte is read volatile.
        (0..len)
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(start + i)) })
            .collect()
    }

    /// The little-endian u16 at `gpa` (ring indexes).
    pub fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A raw vhost-user frontend: builds every message by hand, so a test can send any bytes.
pub struct Frontend {
    /// The connection, for tests that read or close it directly.
    pub sock: UnixStream,
}

impl Frontend {
    /// A frontend on an already connected socket; replies time out after 10 s.
    pub fn new(sock: UnixStream) -> Frontend {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        Frontend { sock }
    }

    /// Connects to the backend at `path`, retrying for 10 s while it starts.
    pub fn connect(path: &Path) -> Frontend {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(path) {
                Ok(sock) => return Frontend::new(sock),
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "connecting to {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Sends one message: header with `flags` added to VERSION, then `payload`, with `fds`.
    pub fn send(&self, req: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&(VERSION | flags).to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        self.send_raw(&msg, fds)
    }

    /// Sends `bytes` as they are in one sendmsg, with `fds` attached.
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer set below stays valid during sendmsg.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !fds.is_empty() {
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) bytes, so the first header
            // and its data fit; the copy writes exactly fd_bytes into it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    fd_bytes,
                );
            }
        }
        // SAFETY: `hdr` describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        assert_eq!(n as usize, bytes.len(), "short sendmsg");
        Ok(())
    }

    /// Reads one reply: (request, payload, attached descriptors).
    pub fn recv(&mut self) -> std::io::Result<(u32, Vec<u8>, Vec<OwnedFd>)> {
        let mut head = [0u8; 12];
        let mut iov = libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        };
        let mut control = [0u8; 64];
        // SAFETY: msghdr is plain data; the buffers outlive the call.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = control.len();
        // SAFETY: `hdr` describes valid buffers.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel filled in; each SCM_RIGHTS entry
        // is a descriptor now owned by this process.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
            }
        }
        if n as usize != head.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short reply header ({n} bytes)"),
            ));
        }
        let req = u32::from_le_bytes(head[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(head[4..8].try_into().unwrap());
        assert_ne!(flags & REPLY, 0, "reply flag missing");
        let size = u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize;
        assert!(size <= MAX_REPLY, "reply of {size} bytes");
        let mut payload = vec![0u8; size];
        self.sock.read_exact(&mut payload)?;
        Ok((req, payload, fds))
    }

    /// Sends a payload-less GET request and returns the u64 it answers.
    pub fn get_u64(&mut self, req: u32) -> u64 {
        self.send(req, 0, &[], &[]).expect("send");
        let (r, p, _) = self.recv().expect("reply");
        assert_eq!(r, req, "reply to another request");
        u64::from_le_bytes(p[..8].try_into().unwrap())
    }

    /// Sends a request with NEED_REPLY and returns the ack status (0 = accepted).
    pub fn ack(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(req, NEED_REPLY, payload, fds).expect("send");
        let (r, p, _) = self.recv().expect("ack");
        assert_eq!(r, req, "ack for another request");
        u64::from_le_bytes(p[..8].try_into().unwrap())
    }

    /// Negotiates what every backend offers (VERSION_1, protocol features with REPLY_ACK),
    /// then sends `mem` as a one-region table at guest address 0 with `fd` as its descriptor.
    /// Returns SET_MEM_TABLE's ack status (0 = accepted).
    pub fn share_memory(&mut self, mem: &GuestMemory, fd: RawFd) -> u64 {
        let features = self.get_u64(GET_FEATURES);
        self.send(SET_OWNER, 0, &[], &[]).expect("send");
        let protocol = self.get_u64(GET_PROTOCOL_FEATURES);
        assert_ne!(protocol & PF_REPLY_ACK, 0, "REPLY_ACK not offered");
        self.send(SET_PROTOCOL_FEATURES, 0, &PF_REPLY_ACK.to_le_bytes(), &[])
            .expect("send");
        let acked = features & (F_VERSION_1 | F_PROTOCOL_FEATURES);
        assert_eq!(self.ack(SET_FEATURES, &acked.to_le_bytes(), &[]), 0);
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&0u32.to_le_bytes());
        for v in [0, mem.size() as u64, mem.uaddr(), 0] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        self.ack(SET_MEM_TABLE, &table, &[fd])
    }

    /// Sends GET_CONFIG for `size` bytes at `offset`; returns the reply payload: the echoed
    /// 12-byte offset/size/flags header, then the configuration bytes.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.resize(p.len() + size as usize, 0);
        self.send(GET_CONFIG, 0, &p, &[]).expect("send");
        let (r, reply, _) = self.recv().expect("config reply");
        assert_eq!(r, GET_CONFIG, "reply to another request");
        reply
    }
}

/// A GET_FEATURES request as raw bytes, for clients that do not speak vhost-user otherwise.
pub fn get_features_request() -> Vec<u8> {
    let mut msg = GET_FEATURES.to_le_bytes().to_vec();
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg
}
