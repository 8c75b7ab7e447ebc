//! Reading a stream socket together with the descriptors (`SCM_RIGHTS`) attached to what is
//! read, as QMP clients pass files and taps.
//!
//! Every descriptor arrives close-on-exec (`MSG_CMSG_CLOEXEC`), so none can leak into a
//! process started later. Room is kept for [`MAX_FDS`] descriptors per read: the kernel stops
//! a read after a message that carries descriptors, so this bounds each message; the kernel
//! closes those of a larger message that do not fit and flags the read as truncated.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors one message may carry.
pub const MAX_FDS: usize = 4;

/// What one read brought.
pub struct Received {
    /// Bytes read; 0 at end of stream.
    pub len: usize,
    /// The descriptors that came with them.
    pub fds: Vec<OwnedFd>,
    /// The message carried more than [`MAX_FDS`] descriptors: the others were closed.
    pub truncated: bool,
}

/// Room for one `SCM_RIGHTS` header with [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; ControlBuffer::LEN]);

impl ControlBuffer {
    /// CMSG_SPACE(MAX_FDS * 4) on 64-bit Linux: a 16-byte header and the data rounded up to
    /// 8 bytes.
    const LEN: usize = 16 + (MAX_FDS * std::mem::size_of::<RawFd>()).next_multiple_of(8);
}

/// One `recvmsg` on the non-blocking `stream` into `buf`.
pub fn recv(stream: &UnixStream, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer([0; ControlBuffer::LEN]);
    // SAFETY: msghdr is plain data; the pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = ControlBuffer::LEN;
    // SAFETY: `msg` points to the live buffers above, whose lengths it states.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen,
    // and each SCM_RIGHTS header carries (cmsg_len - CMSG_LEN(0)) / 4 descriptors the kernel
    // has just installed in this process, owned by nobody else yet.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut control = vec![0u64; 64];
        // SAFETY: msghdr is plain data; the pointers are set to live buffers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let payload = std::mem::size_of_val(fds);
        // SAFETY: the control buffer (512 bytes) holds one header with up to 100 descriptors;
        // the header and data pointers come from the CMSG macros over that buffer.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
            assert_eq!(
                libc::sendmsg(stream.as_raw_fd(), &msg, 0),
                bytes.len() as isize
            );
        }
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD takes no pointer.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn descriptors_arrive_close_on_exec_with_their_bytes() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"plain").unwrap();
        let file = File::open("/dev/null").unwrap();
        send(&a, b"with", &[file.as_raw_fd(), file.as_raw_fd()]);
        let mut buf = [0u8; 64];
        let first = recv(&b, &mut buf).unwrap();
        // The read stops at the end of the message that carries descriptors.
        assert_eq!(&buf[..first.len], b"plainwith");
        assert_eq!(first.fds.len(), 2);
        assert!(first.fds.iter().all(cloexec));
        assert!(!first.truncated);
    }

    #[test]
    fn a_larger_message_is_flagged_and_its_excess_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/dev/null").unwrap();
        let many = vec![file.as_raw_fd(); MAX_FDS + 3];
        send(&a, b"x", &many);
        let mut buf = [0u8; 8];
        let got = recv(&b, &mut buf).unwrap();
        assert_eq!(got.len, 1);
        assert!(got.truncated);
        assert!(got.fds.len() <= MAX_FDS);
    }
}
